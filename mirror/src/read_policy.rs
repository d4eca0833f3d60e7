//! Which in-sync leg serves a read, per core.

use crate::config::ReadPolicy;
use crate::legs::MAX_LEGS;

/// One core's read-leg chooser.
#[derive(Debug)]
pub(crate) struct ReadSelector {
    policy: ReadPolicy,
    /// Round robin: the leg to try first next time.
    next: usize,
    /// Exponentially weighted moving average (weight 1/8) of each leg's completion latency
    /// in nanoseconds, as seen by this core. A candidate passed over decays by 1/64, so a leg
    /// whose average was inflated by one slow completion is tried again before long.
    ewma_ns: [u64; MAX_LEGS],
}

impl ReadSelector {
    pub(crate) fn new(policy: ReadPolicy) -> Self {
        Self {
            policy,
            next: 0,
            ewma_ns: [0; MAX_LEGS],
        }
    }

    /// Picks a leg among `candidates` (a non-empty mask). `inflight` is this core's
    /// outstanding commands per leg.
    #[inline]
    pub(crate) fn choose(
        &mut self,
        candidates: u8,
        primary: usize,
        inflight: &[u32; MAX_LEGS],
    ) -> usize {
        debug_assert!(candidates != 0);
        let lowest = candidates.trailing_zeros() as usize;
        match self.policy {
            ReadPolicy::Primary if candidates & (1 << primary) != 0 => primary,
            ReadPolicy::Primary => lowest,
            ReadPolicy::RoundRobin => {
                for i in 0..MAX_LEGS {
                    let leg = (self.next + i) % MAX_LEGS;
                    if candidates & (1 << leg) != 0 {
                        self.next = (leg + 1) % MAX_LEGS;
                        return leg;
                    }
                }
                lowest
            }
            ReadPolicy::LeastLatency => {
                let mut best = lowest;
                let mut best_score = u64::MAX;
                for (leg, (&ewma, &queued)) in self.ewma_ns.iter().zip(inflight).enumerate() {
                    if candidates & (1 << leg) == 0 {
                        continue;
                    }
                    let score = ewma.saturating_mul(1 + u64::from(queued));
                    if score < best_score {
                        best = leg;
                        best_score = score;
                    }
                }
                for (leg, ewma) in self.ewma_ns.iter_mut().enumerate() {
                    if leg != best && candidates & (1 << leg) != 0 {
                        *ewma -= *ewma / 64;
                    }
                }
                best
            }
        }
    }

    /// Feeds one completion latency of `leg`.
    #[inline]
    pub(crate) fn observe(&mut self, leg: usize, latency_ns: u64) {
        let e = &mut self.ewma_ns[leg];
        *e = *e - *e / 8 + latency_ns / 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_policy_falls_back_when_the_primary_is_not_a_candidate() {
        let mut s = ReadSelector::new(ReadPolicy::Primary);
        assert_eq!(s.choose(0b111, 1, &[0; 4]), 1);
        assert_eq!(s.choose(0b101, 1, &[0; 4]), 0);
    }

    #[test]
    fn round_robin_visits_each_candidate_in_turn() {
        let mut s = ReadSelector::new(ReadPolicy::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| s.choose(0b1011, 0, &[0; 4])).collect();
        assert_eq!(picks, vec![0, 1, 3, 0, 1, 3]);
    }

    #[test]
    fn least_latency_weighs_latency_by_queue_depth() {
        let mut s = ReadSelector::new(ReadPolicy::LeastLatency);
        for _ in 0..64 {
            s.observe(0, 100_000);
            s.observe(1, 20_000);
        }
        assert_eq!(s.choose(0b11, 0, &[0; 4]), 1);
        // Leg 1 is 5x faster but has 8 commands queued on this core: leg 0 wins.
        assert_eq!(s.choose(0b11, 0, &[0, 8, 0, 0]), 0);
        // A leg never measured scores zero and gets tried.
        assert_eq!(s.choose(0b111, 0, &[0; 4]), 2);
    }

    #[test]
    fn a_leg_passed_over_is_retried_eventually() {
        let mut s = ReadSelector::new(ReadPolicy::LeastLatency);
        for _ in 0..64 {
            s.observe(0, 5_000_000); // one very slow spell
            s.observe(1, 100_000);
        }
        let mut picks = [0; 2];
        for _ in 0..2000 {
            let leg = s.choose(0b11, 0, &[0; 4]);
            picks[leg] += 1;
            s.observe(leg, 100_000); // both legs are equally fast now
        }
        assert!(
            picks[0] > 500,
            "leg 0 was retried and shares the load: {picks:?}"
        );
    }
}
