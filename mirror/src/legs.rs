//! Leg states and the primary index, shared by every core of a volume.
//!
//! All of it lives in one `AtomicU64` (the *state word*): the primary index, the number of leg
//! slots in use, a 4-bit state per leg and a transition counter. One word means a core reads every leg's state with a single
//! load when it fans a write out, and a transition that must change two things at once —
//! fault the primary *and* promote a mirror, or refuse to take out the last in-sync leg — is
//! a single compare-and-swap that exactly one core wins.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most legs a volume can have (a primary and three mirrors).
pub const MAX_LEGS: usize = 4;

const PRIMARY_MASK: u64 = 0xf;
const COUNT_SHIFT: u32 = 4;
const COUNT_MASK: u64 = 0xf << COUNT_SHIFT;
const STATE_SHIFT: u32 = 8;
const STATE_BITS: u32 = 4;
const EVENTS_SHIFT: u32 = 32;

/// Where a leg stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LegState {
    /// Holds every acknowledged write; receives every write.
    InSync = 0,
    /// Failed or timed out; receives nothing; its missed regions are recorded.
    Faulted = 1,
    /// Being rebuilt from an in-sync leg; not yet trusted for reads or acks.
    Resyncing = 2,
    /// Removed from the volume; receives nothing; its missed regions are recorded.
    Detached = 3,
    /// Taken out of the volume for good by `remove_leg`; its slot is retired.
    Removed = 4,
}

impl LegState {
    fn from_bits(bits: u64) -> Self {
        match bits & ((1 << STATE_BITS) - 1) {
            0 => Self::InSync,
            1 => Self::Faulted,
            2 => Self::Resyncing,
            3 => Self::Detached,
            _ => Self::Removed,
        }
    }

    /// The lower-case name used in logs and the control plane.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InSync => "in_sync",
            Self::Faulted => "faulted",
            Self::Resyncing => "resyncing",
            Self::Detached => "detached",
            Self::Removed => "removed",
        }
    }
}

impl fmt::Display for LegState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A leg's role in the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LegRole {
    Primary,
    Mirror,
}

/// What [`Volume::leg_states`](crate::Volume::leg_states) reports per leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegInfo {
    /// The leg's name (the URI it was opened from).
    pub name: String,
    pub role: LegRole,
    pub state: LegState,
}

/// One reading of the state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LegSnapshot(u64);

impl LegSnapshot {
    /// Index of the primary leg.
    #[inline]
    pub(crate) fn primary(self) -> usize {
        (self.0 & PRIMARY_MASK) as usize
    }

    /// Number of leg slots in use (removed legs included).
    #[inline]
    pub(crate) fn leg_count(self) -> usize {
        ((self.0 & COUNT_MASK) >> COUNT_SHIFT) as usize
    }

    #[inline]
    pub(crate) fn state(self, leg: usize) -> LegState {
        LegState::from_bits(self.0 >> (STATE_SHIFT + STATE_BITS * leg as u32))
    }

    /// Bit `i` set for every in-sync leg among the first `legs`.
    #[inline]
    pub(crate) fn in_sync_mask(self, legs: usize) -> u8 {
        let mut mask = 0;
        for leg in 0..legs {
            if self.state(leg) == LegState::InSync {
                mask |= 1 << leg;
            }
        }
        mask
    }

    /// Bit `i` set for every leg among the first `legs` that receives host writes: the in-sync
    /// legs and the legs being resynchronised.
    #[inline]
    pub(crate) fn write_mask(self, legs: usize) -> u8 {
        let mut mask = 0;
        for leg in 0..legs {
            if matches!(self.state(leg), LegState::InSync | LegState::Resyncing) {
                mask |= 1 << leg;
            }
        }
        mask
    }

    /// Bit `i` set for every leg being resynchronised among the first `legs`.
    #[inline]
    pub(crate) fn resyncing_mask(self, legs: usize) -> u8 {
        self.write_mask(legs) & !self.in_sync_mask(legs)
    }

    /// Number of transitions since the volume was created.
    pub(crate) fn events(self) -> u32 {
        (self.0 >> EVENTS_SHIFT) as u32
    }

    fn with_state(self, leg: usize, state: LegState) -> Self {
        let shift = STATE_SHIFT + STATE_BITS * leg as u32;
        let cleared = self.0 & !(((1 << STATE_BITS) - 1) << shift);
        Self(cleared | (state as u64) << shift)
    }

    fn with_primary(self, primary: usize) -> Self {
        Self((self.0 & !PRIMARY_MASK) | primary as u64)
    }

    fn with_leg_count(self, count: usize) -> Self {
        Self((self.0 & !COUNT_MASK) | (count as u64) << COUNT_SHIFT)
    }

    fn with_next_event(self) -> Self {
        Self(self.0.wrapping_add(1 << EVENTS_SHIFT))
    }
}

/// A state change that happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: LegState,
    /// The leg promoted to primary, when the leg taken out was the primary.
    pub(crate) promoted: Option<usize>,
}

/// Why a state change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The leg is the last in-sync one: taking it out would leave no copy to serve from.
    LastInSync,
    /// The leg is detached already.
    AlreadyDetached,
    /// The leg is not in a state this change starts from.
    WrongState(LegState),
    /// Every leg slot is taken.
    NoFreeSlot,
    /// The leg is the primary.
    Primary,
}

/// The state word of one volume.
#[derive(Debug)]
pub(crate) struct LegStates {
    word: AtomicU64,
}

impl LegStates {
    /// `legs` legs, all in sync, leg 0 primary.
    pub(crate) fn new(legs: usize) -> Self {
        debug_assert!((1..=MAX_LEGS).contains(&legs));
        Self {
            word: AtomicU64::new(LegSnapshot(0).with_leg_count(legs).0),
        }
    }

    /// Applies `f` to the word until one CAS wins; `f` returns the next word (the event
    /// counter is bumped here) or a refusal.
    fn update<T>(
        &self,
        mut f: impl FnMut(LegSnapshot) -> Result<(LegSnapshot, T), Refusal>,
    ) -> Result<T, Refusal> {
        let mut cur = self.snapshot();
        loop {
            let (next, out) = f(cur)?;
            match self.word.compare_exchange_weak(
                cur.0,
                next.with_next_event().0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(out),
                Err(actual) => cur = LegSnapshot(actual),
            }
        }
    }

    /// Faulted or Detached → Resyncing: the leg receives every write from now on.
    pub(crate) fn begin_resync(&self, leg: usize) -> Result<LegState, Refusal> {
        self.update(|cur| {
            let from = cur.state(leg);
            if leg >= cur.leg_count() || !matches!(from, LegState::Faulted | LegState::Detached) {
                return Err(Refusal::WrongState(from));
            }
            Ok((cur.with_state(leg, LegState::Resyncing), from))
        })
    }

    /// Resyncing → InSync, the single CAS that makes a rebuilt leg a full member.
    pub(crate) fn finish_resync(&self, leg: usize) -> Result<(), Refusal> {
        self.update(|cur| match cur.state(leg) {
            LegState::Resyncing => Ok((cur.with_state(leg, LegState::InSync), ())),
            other => Err(Refusal::WrongState(other)),
        })
    }

    /// Appends a leg slot in state Resyncing; returns its index. The caller has filled the
    /// slot's shared data before (the CAS publishes it).
    pub(crate) fn add_resyncing(&self, expected_index: usize) -> Result<(), Refusal> {
        self.update(|cur| {
            let n = cur.leg_count();
            if n >= MAX_LEGS || n != expected_index {
                return Err(Refusal::NoFreeSlot);
            }
            Ok((
                cur.with_leg_count(n + 1).with_state(n, LegState::Resyncing),
                (),
            ))
        })
    }

    /// Retires a leg that is not the primary (never the last in-sync one).
    pub(crate) fn remove(&self, leg: usize) -> Result<LegState, Refusal> {
        self.update(|cur| {
            let from = cur.state(leg);
            if leg >= cur.leg_count() || from == LegState::Removed {
                return Err(Refusal::WrongState(from));
            }
            if cur.primary() == leg {
                return Err(Refusal::Primary);
            }
            Ok((cur.with_state(leg, LegState::Removed), from))
        })
    }

    #[inline]
    pub(crate) fn snapshot(&self) -> LegSnapshot {
        LegSnapshot(self.word.load(Ordering::Acquire))
    }

    /// Moves `leg` to `to` (Faulted or Detached). When `leg` is the primary, the in-sync leg
    /// `successor` (if it is one) or else the lowest-numbered in-sync leg becomes primary in
    /// the same step. Returns `Ok(None)` when the leg already was in state `to`.
    pub(crate) fn take_out(
        &self,
        leg: usize,
        to: LegState,
        successor: Option<usize>,
    ) -> Result<Option<Transition>, Refusal> {
        debug_assert!(matches!(to, LegState::Faulted | LegState::Detached));
        let mut cur = self.snapshot();
        loop {
            let from = cur.state(leg);
            if from == LegState::Removed {
                return Err(Refusal::WrongState(from));
            }
            if from == LegState::Detached {
                return if to == LegState::Detached {
                    Err(Refusal::AlreadyDetached)
                } else {
                    Ok(None)
                };
            }
            if from == to {
                return Ok(None);
            }
            let mut next = cur.with_state(leg, to).with_next_event();
            let mut promoted = None;
            if from == LegState::InSync {
                let others = cur.in_sync_mask(cur.leg_count()) & !(1 << leg);
                if others == 0 {
                    return Err(Refusal::LastInSync);
                }
                if cur.primary() == leg {
                    let succ = match successor {
                        Some(s) if others & (1 << s) != 0 => s,
                        _ => others.trailing_zeros() as usize,
                    };
                    next = next.with_primary(succ);
                    promoted = Some(succ);
                }
            }
            match self.word.compare_exchange_weak(
                cur.0,
                next.0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Some(Transition { from, promoted })),
                Err(actual) => cur = LegSnapshot(actual),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulting_a_mirror_keeps_the_primary() {
        let s = LegStates::new(3);
        assert_eq!(s.snapshot().in_sync_mask(3), 0b111);
        let t = s.take_out(2, LegState::Faulted, None).unwrap().unwrap();
        assert_eq!(t.from, LegState::InSync);
        assert_eq!(t.promoted, None);
        let snap = s.snapshot();
        assert_eq!(snap.primary(), 0);
        assert_eq!(snap.state(2), LegState::Faulted);
        assert_eq!(snap.in_sync_mask(3), 0b011);
        assert_eq!(snap.events(), 1);
        // Faulting again changes nothing.
        assert_eq!(s.take_out(2, LegState::Faulted, None), Ok(None));
        assert_eq!(s.snapshot().events(), 1);
    }

    #[test]
    fn faulting_the_primary_promotes_the_successor_or_lowest_in_sync() {
        let s = LegStates::new(4);
        let t = s.take_out(0, LegState::Faulted, Some(2)).unwrap().unwrap();
        assert_eq!(t.promoted, Some(2));
        assert_eq!(s.snapshot().primary(), 2);
        // A successor that is not in sync is ignored.
        let t = s.take_out(2, LegState::Faulted, Some(0)).unwrap().unwrap();
        assert_eq!(t.promoted, Some(1));
        assert_eq!(s.snapshot().primary(), 1);
    }

    #[test]
    fn the_last_in_sync_leg_is_never_taken_out() {
        let s = LegStates::new(2);
        s.take_out(1, LegState::Faulted, None).unwrap();
        assert_eq!(
            s.take_out(0, LegState::Faulted, None),
            Err(Refusal::LastInSync)
        );
        assert_eq!(
            s.take_out(0, LegState::Detached, None),
            Err(Refusal::LastInSync)
        );
        // A faulted leg can be detached, once.
        assert!(s.take_out(1, LegState::Detached, None).unwrap().is_some());
        assert_eq!(
            s.take_out(1, LegState::Detached, None),
            Err(Refusal::AlreadyDetached)
        );
        assert_eq!(s.take_out(1, LegState::Faulted, None), Ok(None));
        assert_eq!(s.snapshot().state(0), LegState::InSync);
    }

    #[test]
    fn only_a_resyncing_leg_comes_back_in_sync_and_never_a_removed_one() {
        let s = LegStates::new(3);
        s.take_out(1, LegState::Faulted, None).unwrap();
        // A faulted leg goes back in sync through a resync only.
        assert_eq!(
            s.finish_resync(1),
            Err(Refusal::WrongState(LegState::Faulted))
        );
        s.begin_resync(1).unwrap();
        s.finish_resync(1).unwrap();
        assert_eq!(s.snapshot().state(1), LegState::InSync);
        // A removed leg cannot start a resync, and one removed while resyncing does not
        // finish it.
        s.remove(2).unwrap();
        assert_eq!(
            s.begin_resync(2),
            Err(Refusal::WrongState(LegState::Removed))
        );
        assert_eq!(
            s.finish_resync(2),
            Err(Refusal::WrongState(LegState::Removed))
        );
        s.take_out(1, LegState::Faulted, None).unwrap();
        s.begin_resync(1).unwrap();
        s.remove(1).unwrap();
        assert_eq!(
            s.finish_resync(1),
            Err(Refusal::WrongState(LegState::Removed))
        );
        assert_eq!(s.snapshot().state(1), LegState::Removed);
    }

    #[test]
    fn resync_transitions_add_and_remove() {
        let s = LegStates::new(1);
        assert_eq!(s.snapshot().leg_count(), 1);
        assert_eq!(s.add_resyncing(2), Err(Refusal::NoFreeSlot));
        s.add_resyncing(1).unwrap();
        let snap = s.snapshot();
        assert_eq!(snap.leg_count(), 2);
        assert_eq!(snap.state(1), LegState::Resyncing);
        assert_eq!(snap.in_sync_mask(2), 0b01);
        assert_eq!(snap.write_mask(2), 0b11);
        assert_eq!(snap.resyncing_mask(2), 0b10);
        // A resyncing leg cannot start another resync; it flips exactly once.
        assert_eq!(
            s.begin_resync(1),
            Err(Refusal::WrongState(LegState::Resyncing))
        );
        s.finish_resync(1).unwrap();
        assert_eq!(
            s.finish_resync(1),
            Err(Refusal::WrongState(LegState::InSync))
        );
        assert_eq!(s.snapshot().in_sync_mask(2), 0b11);
        s.take_out(1, LegState::Faulted, None).unwrap();
        assert_eq!(s.begin_resync(1), Ok(LegState::Faulted));
        // The primary is never removed; a resyncing mirror is.
        assert_eq!(s.remove(0), Err(Refusal::Primary));
        assert_eq!(s.remove(1), Ok(LegState::Resyncing));
        assert_eq!(s.snapshot().state(1), LegState::Removed);
        assert_eq!(
            s.begin_resync(1),
            Err(Refusal::WrongState(LegState::Removed))
        );
        assert_eq!(
            s.take_out(1, LegState::Faulted, None),
            Err(Refusal::WrongState(LegState::Removed))
        );
        assert_eq!(s.snapshot().events(), 5);
    }

    #[test]
    fn racing_faults_leave_exactly_one_in_sync_leg() {
        for _ in 0..200 {
            let s = std::sync::Arc::new(LegStates::new(4));
            let handles: Vec<_> = (0..4)
                .map(|leg| {
                    let s = std::sync::Arc::clone(&s);
                    std::thread::spawn(move || s.take_out(leg, LegState::Faulted, None).is_ok())
                })
                .collect();
            let won = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&ok| ok)
                .count();
            assert_eq!(won, 3);
            let snap = s.snapshot();
            let mask = snap.in_sync_mask(4);
            assert_eq!(mask.count_ones(), 1);
            assert_eq!(1 << snap.primary(), mask, "the primary is the survivor");
        }
    }
}
