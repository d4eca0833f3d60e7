//! Clearing: a marked region is cleared once it is identical on every leg — nothing in flight
//! to it and no out-of-sync leg missed it — and nothing has touched it for the idle delay.
//! When more regions are marked than the configured bound, the oldest idle ones go first.
//!
//! Ages come from a one-byte epoch per region: every write stores the current epoch into its
//! regions, and every clearing pass starts a new epoch and remembers when. A region last
//! touched in epoch `e` was last touched before epoch `e + 1` began, so it is idle when that
//! start is at least the idle delay ago. Epochs wrap at 256; a pass pulls regions older than
//! [`MAX_AGE`] epochs forward to `MAX_AGE` (they look younger than they are: never cleared too
//! early).
//!
//! The handshake with writers (Dekker style, all `SeqCst`): a writer increments the region's
//! in-flight counter, *then* checks the bits; the clearer clears the bits, *then* checks the
//! counter and re-sets the bits if a writer is in. Either the clearer sees the writer and keeps
//! the bit, or the writer sees the bit cleared and waits for it to be marked and written again.
//! The clearer holds the page's writer lock throughout, so no snapshot of the page is taken
//! while a bit is transiently cleared.

use crate::sync::Ordering;
use std::time::{Duration, Instant};

use super::WriteIntentBitmap;

/// Oldest age (in epochs) tracked exactly.
const MAX_AGE: u8 = 200;

/// When each recent clearing epoch began.
#[derive(Debug)]
pub(crate) struct ClearClock {
    starts: [Option<Instant>; 256],
    current: u8,
}

impl Default for ClearClock {
    fn default() -> Self {
        Self {
            starts: [None; 256],
            current: 0,
        }
    }
}

impl WriteIntentBitmap {
    /// Starts a new epoch at `now` and returns the regions to clear, in clearing order: every
    /// marked region idle for `idle_delay`, then — while more than `bound` regions would stay
    /// marked — the oldest of the rest that were not touched in the epoch just ended. Regions
    /// for which `keep` is true (missed by an out-of-sync leg) are never returned.
    pub(crate) fn clear_candidates(
        &self,
        clock: &mut ClearClock,
        now: Instant,
        idle_delay: Duration,
        bound: Option<u64>,
        keep: &impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let ended = clock.current;
        let next = ended.wrapping_add(1);
        clock.starts[next as usize] = Some(now);
        clock.current = next;
        self.epoch.store(next, Ordering::SeqCst);
        let mut idle = Vec::new();
        let mut busy = Vec::new(); // (age, region)
        let marked = self.marked_regions();
        let total = marked.len() as u64;
        for region in marked {
            let slot = &self.epochs[region as usize];
            let e = slot.load(Ordering::Relaxed);
            let mut age = next.wrapping_sub(e);
            if age > MAX_AGE {
                let pulled = next.wrapping_sub(MAX_AGE);
                let _ = slot.compare_exchange(e, pulled, Ordering::Relaxed, Ordering::Relaxed);
                age = MAX_AGE;
            }
            // Touched in the epoch that just ended, or in the new one: not a candidate.
            if age <= 1 || keep(region) {
                continue;
            }
            let end = clock.starts[e.wrapping_add(1) as usize];
            let is_idle = match end {
                Some(t) => now.saturating_duration_since(t) >= idle_delay,
                None => true,
            };
            if is_idle {
                idle.push(region);
            } else {
                busy.push((age, region));
            }
        }
        if let Some(bound) = bound {
            let left = total - idle.len() as u64;
            if left > bound {
                busy.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                idle.extend(busy.iter().take((left - bound) as usize).map(|&(_, r)| r));
            }
        }
        idle
    }

    /// Clears `region` unless a write is in flight to it or `keep(region)`. The caller holds
    /// the writer lock of the region's page and bumps the page's generation afterwards.
    pub(crate) fn try_clear(&self, region: u64, keep: &impl Fn(u64) -> bool) -> bool {
        let w = (region / 64) as usize;
        let bit = 1u64 << (region % 64);
        if self.marked[w].load(Ordering::SeqCst) & bit == 0 || keep(region) {
            return false;
        }
        let was_durable = self.durable[w].fetch_and(!bit, Ordering::SeqCst) & bit != 0;
        self.marked[w].fetch_and(!bit, Ordering::SeqCst);
        crate::sync::seqcst_handshake();
        // After the clear: a writer counted before this load is seen; one counted after it
        // sees the bit clear.
        if self.in_flight(region) || keep(region) {
            self.marked[w].fetch_or(bit, Ordering::SeqCst);
            if was_durable {
                // Still on disk: nothing was written while the page lock is held.
                self.durable[w].fetch_or(bit, Ordering::SeqCst);
            }
            return false;
        }
        true
    }

    /// Records that bits of page `page` were cleared (so the page needs writing).
    pub(crate) fn cleared(&self, page: u32) {
        self.pages[page as usize]
            .dirty_gen
            .fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MetadataLayout, WriteIntentBitmap};
    use super::*;

    fn bitmap() -> WriteIntentBitmap {
        WriteIntentBitmap::new(MetadataLayout::compute(64 << 20, 512, 64 << 10).unwrap())
    }

    #[test]
    fn only_idle_regions_are_candidates() {
        let b = bitmap();
        let mut clock = ClearClock::default();
        let t0 = Instant::now();
        let delay = Duration::from_millis(10);
        let none = |_| false;
        b.mark(b.range(0, 1), |_| {});
        b.touch(b.range(0, 1));
        // Touched in the epoch that is ending: not yet.
        assert!(b
            .clear_candidates(&mut clock, t0, delay, None, &none)
            .is_empty());
        // One epoch later, but the epoch it was last touched in ended less than the delay ago.
        assert!(b
            .clear_candidates(
                &mut clock,
                t0 + Duration::from_millis(5),
                delay,
                None,
                &none
            )
            .is_empty());
        let got = b.clear_candidates(
            &mut clock,
            t0 + Duration::from_millis(20),
            delay,
            None,
            &none,
        );
        assert_eq!(got, vec![0]);
        // A kept region never is.
        assert!(b
            .clear_candidates(
                &mut clock,
                t0 + Duration::from_millis(40),
                delay,
                None,
                &|r| r == 0
            )
            .is_empty());
    }

    #[test]
    fn over_the_bound_the_oldest_go_first() {
        let b = bitmap();
        let mut clock = ClearClock::default();
        let t0 = Instant::now();
        let long = Duration::from_secs(3600);
        let none = |_| false;
        for (i, region) in [5u64, 3, 9].iter().enumerate() {
            let r = b.range(region * 128, 1);
            b.mark(r, |_| {});
            b.touch(r);
            b.clear_candidates(
                &mut clock,
                t0 + Duration::from_millis(i as u64),
                long,
                None,
                &none,
            );
        }
        b.clear_candidates(&mut clock, t0, long, None, &none);
        let got = b.clear_candidates(&mut clock, t0, long, Some(1), &none);
        assert_eq!(got, vec![5, 3], "oldest first, down to the bound");
    }

    #[test]
    fn a_region_with_a_write_in_flight_is_not_cleared() {
        let b = bitmap();
        let r = b.range(0, 1);
        b.mark(r, |_| {});
        b.enter(r);
        assert!(!b.try_clear(0, &|_| false));
        assert!(b.is_marked(0));
        b.leave(r);
        assert!(!b.try_clear(0, &|_| true), "kept for an out-of-sync leg");
        assert!(b.try_clear(0, &|_| false));
        assert!(!b.is_marked(0));
    }
}
