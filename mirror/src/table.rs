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
}
