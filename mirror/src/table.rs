//! The per-core join table: a fixed slab of [`JoinSlot`]s (capacity = queue depth) and what
//! the owning core remembers about each command in flight.
//!
//! A leg command's tag is `generation << 32 | slot` ([`leg_tag`](crate::join::leg_tag)). The
//! generation is bumped whenever a slot is (re)armed, so a completion that arrives after its
//! command was abandoned, or after the slot was reused, matches nothing and is dropped.

use std::time::Instant;

use nvmirror_nvme::{IoCommand, IoOp, Status};

use crate::guard::GranuleSpan;
use crate::join::JoinSlot;

/// The owning core's bookkeeping for one slot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotMeta {
    /// Current generation; leg results for any other are stale.
    pub(crate) generation: u32,
    pub(crate) in_use: bool,
    /// The host command (its tag is the host tag).
    pub(crate) cmd: IoCommand,
    /// When the current generation was handed to its legs.
    pub(crate) started: Instant,
    /// Legs of the current generation.
    pub(crate) legs: u8,
    /// Legs of the current generation whose queue pair refused the command so far.
    pub(crate) unsent: u8,
    /// Reads: every leg tried so far.
    pub(crate) tried: u8,
    /// The primary when the command was submitted.
    pub(crate) primary: u8,
    /// Legs of the command that were being resynchronised at submission: they get the
    /// command, but their result never decides the host's status.
    pub(crate) resyncing: u8,
    /// Overlap-guard entries held until every leg is done.
    pub(crate) span: Option<GranuleSpan>,
    /// Reads: the first leg's error, returned when no leg is left to retry on.
    pub(crate) first_error: Status,
    /// Legs whose command was abandoned after the I/O timeout while the back end still had
    /// it (it may yet be applied).
    pub(crate) abandoned: u8,
}

/// A join slot and its bookkeeping, together in two cache lines.
#[derive(Debug)]
#[repr(align(64))]
struct Entry {
    slot: JoinSlot,
    meta: SlotMeta,
}

/// A per-core slab of join slots.
#[derive(Debug)]
pub(crate) struct JoinTable {
    entries: Box<[Entry]>,
    /// Free slot indices (a stack: the most recently freed slot is the warmest).
    free: Vec<u32>,
}

impl JoinTable {
    pub(crate) fn new(depth: u32, now: Instant) -> Self {
        let idle = SlotMeta {
            generation: 0,
            in_use: false,
            cmd: IoCommand::new(IoOp::Flush, 0, 0, 0),
            started: now,
            legs: 0,
            unsent: 0,
            tried: 0,
            primary: 0,
            resyncing: 0,
            span: None,
            first_error: Status::SUCCESS,
            abandoned: 0,
        };
        Self {
            entries: (0..depth)
                .map(|_| Entry {
                    slot: JoinSlot::new(),
                    meta: idle,
                })
                .collect(),
            free: (0..depth).rev().collect(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Slots in use.
    #[inline]
    pub(crate) fn in_use(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Takes a free slot for `cmd`, arms it for `legs` under a fresh generation, and returns
    /// the slot index. The caller checked [`is_full`](Self::is_full).
    #[inline]
    pub(crate) fn alloc(
        &mut self,
        cmd: IoCommand,
        legs: u8,
        primary: usize,
        span: Option<GranuleSpan>,
        now: Instant,
    ) -> u32 {
        let slot = self.free.pop().expect("caller checked for a free slot");
        let Entry {
            slot: join,
            meta: m,
        } = &mut self.entries[slot as usize];
        m.generation = m.generation.wrapping_add(1);
        m.in_use = true;
        m.cmd = cmd;
        m.started = now;
        m.legs = legs;
        m.unsent = 0;
        m.tried = legs;
        m.primary = primary as u8;
        m.resyncing = 0;
        m.span = span;
        m.first_error = Status::SUCCESS;
        m.abandoned = 0;
        join.arm(m.generation, legs);
        slot
    }

    /// Re-arms a slot in use for another attempt on `legs` (a read retry): a new generation,
    /// so results of the previous attempt are stale.
    pub(crate) fn rearm(&mut self, slot: u32, legs: u8, now: Instant) -> u32 {
        let Entry {
            slot: join,
            meta: m,
        } = &mut self.entries[slot as usize];
        m.generation = m.generation.wrapping_add(1);
        m.started = now;
        m.legs = legs;
        m.unsent = 0;
        m.tried |= legs;
        join.arm(m.generation, legs);
        m.generation
    }

    /// Returns a slot to the free list.
    #[inline]
    pub(crate) fn release(&mut self, slot: u32) {
        let m = &mut self.entries[slot as usize].meta;
        debug_assert!(m.in_use);
        m.in_use = false;
        m.span = None;
        self.free.push(slot);
    }

    #[inline]
    pub(crate) fn slot(&self, slot: u32) -> &JoinSlot {
        &self.entries[slot as usize].slot
    }

    #[inline]
    pub(crate) fn slot_mut(&mut self, slot: u32) -> &mut JoinSlot {
        &mut self.entries[slot as usize].slot
    }

    #[inline]
    pub(crate) fn meta(&self, slot: u32) -> &SlotMeta {
        &self.entries[slot as usize].meta
    }

    #[inline]
    pub(crate) fn meta_mut(&mut self, slot: u32) -> &mut SlotMeta {
        &mut self.entries[slot as usize].meta
    }
}

/// The join table driven through the calls a volume queue pair makes for each command —
/// reserve a slot, one completion per leg, release when the last one fires — for the
/// `join` benchmark. Not part of the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct JoinTableBench {
    table: JoinTable,
    now: Instant,
}

#[doc(hidden)]
impl JoinTableBench {
    pub fn new(depth: u32) -> Self {
        let now = Instant::now();
        Self {
            table: JoinTable::new(depth, now),
            now,
        }
    }

    /// Reserves a slot for `cmd` armed for the legs in `legs`; returns the leg tag, or
    /// `None` when every slot is in use.
    #[inline]
    pub fn reserve(&mut self, cmd: IoCommand, legs: u8) -> Option<u64> {
        if self.table.is_full() {
            return None;
        }
        let slot = self.table.alloc(cmd, legs, 0, None, self.now);
        Some(crate::join::leg_tag(slot, self.table.meta(slot).generation))
    }

    /// Leg `leg`'s completion for the command tagged `tag`: the merged result when it was
    /// the last outstanding leg (the slot is then released), else `None`.
    #[inline]
    pub fn leg_completion(
        &mut self,
        tag: u64,
        leg: usize,
        status: Status,
    ) -> Option<crate::join::JoinResult> {
        let (slot, generation) = crate::join::split_tag(tag);
        if slot as usize >= self.table.capacity() {
            return None;
        }
        match self
            .table
            .slot_mut(slot)
            .complete_owned(generation, leg, status)
        {
            crate::join::LegOutcome::Last(r) => {
                self.table.release(slot);
                Some(r)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::LegOutcome;

    #[test]
    fn reuse_bumps_the_generation_and_stale_results_are_dropped() {
        let now = Instant::now();
        let mut t = JoinTable::new(2, now);
        let cmd = IoCommand::new(IoOp::Write, 0, 1, 42);
        let a = t.alloc(cmd, 0b11, 0, None, now);
        let gen_a = t.meta(a).generation;
        assert_eq!(t.in_use(), 1);
        assert_eq!(
            t.slot(a).complete(gen_a, 0, Status::SUCCESS),
            LegOutcome::Counted
        );
        t.release(a);
        let b = t.alloc(cmd, 0b01, 0, None, now);
        assert_eq!(a, b, "the warmest slot is reused");
        assert_ne!(t.meta(b).generation, gen_a);
        assert_eq!(
            t.slot(b).complete(gen_a, 1, Status::SUCCESS),
            LegOutcome::Stale
        );
        let retry = t.rearm(b, 0b10, now);
        assert_eq!(t.meta(b).tried, 0b11);
        assert_eq!(
            t.slot(b).complete(retry - 1, 0, Status::SUCCESS),
            LegOutcome::Stale
        );
        assert!(matches!(
            t.slot(b).complete(retry, 1, Status::SUCCESS),
            LegOutcome::Last(_)
        ));
        t.alloc(cmd, 1, 0, None, now);
        assert!(t.is_full());
        assert_eq!(t.capacity(), 2);
    }

    #[test]
    fn the_bench_driver_fires_once_on_the_last_leg_and_frees_the_slot() {
        let mut b = JoinTableBench::new(1);
        let cmd = IoCommand::new(IoOp::Write, 0, 1, 9);
        let tag = b.reserve(cmd, 0b111).unwrap();
        assert!(b.reserve(cmd, 0b1).is_none(), "one slot, in use");
        assert!(b.leg_completion(tag, 2, Status::SUCCESS).is_none());
        assert!(b.leg_completion(tag, 0, Status::WRITE_FAULT).is_none());
        assert!(
            b.leg_completion(tag, 0, Status::SUCCESS).is_none(),
            "duplicate"
        );
        let r = b.leg_completion(tag, 1, Status::SUCCESS).unwrap();
        assert_eq!((r.legs, r.failed), (0b111, 0b001));
        assert!(
            b.leg_completion(tag, 1, Status::SUCCESS).is_none(),
            "fired once"
        );
        let again = b.reserve(cmd, 0b11).unwrap();
        assert_ne!(again, tag, "a new generation");
    }
}
