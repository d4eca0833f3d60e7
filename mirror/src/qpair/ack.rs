//! Leg results in, host completions out: the join and the ack rule (invariant 1).
//!
//! - A modifying command or flush succeeds only if every leg it went to succeeded, or each
//!   leg that failed has been faulted out with the command's regions recorded in its
//!   missed-region set. A failed primary is replaced by a mirror that has the write.
//! - If no leg succeeded, the host gets the primary's status and no leg changes state. The
//!   legs may still differ (a failed or abandoned write may have reached some of them), so a
//!   modifying command's regions are recorded as diverged: their bitmap bits stay set until a
//!   reconcile copies them from the primary to the other in-sync legs.
//! - A failed read faults its leg (recording the read's regions, so a resync rewrites them)
//!   and is retried on another in-sync leg; with none left the host gets the first error.

use std::time::Instant;

use nvmirror_nvme::{Completion, IoOp, Status};

use super::intent::META_SLOT_BASE;
use super::{Parked, VolumeQueuePair, Waiting};
use crate::bitmap::RegionRange;
use crate::breakdown::PathKind;
use crate::join::{split_tag, JoinResult, LegOutcome};
use crate::recorder::AckStatus;
use crate::stats::bump;

/// A successful write or flush completion held until what it depends on is durable.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    cpl: Completion,
    /// The state word's event count it completed under: the superblocks must record it.
    events: u32,
    /// A flush that failed on a leg: the whole-volume marks for that leg must be on the
    /// surviving legs' bitmaps too.
    whole_bitmap: bool,
}

impl VolumeQueuePair {
    /// One completion reaped from leg `leg`'s queue pair; `STAMP`: stamp it for the breakdown.
    #[inline]
    pub(super) fn on_leg_completion<const STAMP: bool>(
        &mut self,
        leg: usize,
        cpl: Completion,
        now: Instant,
    ) {
        self.inflight[leg] -= 1;
        let (slot, generation) = split_tag(cpl.tag);
        if slot >= META_SLOT_BASE {
            self.on_meta_completion(leg, slot - META_SLOT_BASE, generation, cpl.status);
            return;
        }
        if slot as usize >= self.table.capacity() {
            bump(&self.stats.legs[leg].late_completions, 1);
            return;
        }
        let outcome = self
            .table
            .slot_mut(slot)
            .complete_owned(generation, leg, cpl.status);
        if outcome == LegOutcome::Stale {
            bump(&self.stats.legs[leg].late_completions, 1);
            self.note_late(leg);
            if !self.parked.is_empty() {
                self.unpark(slot, generation, leg);
            }
            if !self.lent.is_empty() {
                self.unlend(slot, generation, leg);
            }
            tracing::debug!(volume = %self.vol.name, leg, status = %cpl.status, "late completion ignored");
            return;
        }
        if STAMP {
            if let Some(r) = self.stages.as_deref_mut() {
                r.complete(slot, leg);
            }
        }
        let meta = self.table.meta(slot);
        let latency = now.saturating_duration_since(meta.started).as_nanos() as u64;
        let bytes = if meta.cmd.op.has_data() {
            u64::from(meta.cmd.nlb) << self.geo.lba_shift()
        } else {
            0
        };
        self.stats.legs[leg].record(bytes, latency, !cpl.status.is_success());
        self.reads.observe(leg, latency);
        if let LegOutcome::Last(result) = outcome {
            self.stats.host_latency.record(latency);
            self.finish(slot, result, Some(leg));
        }
    }

    /// Every leg of slot `slot`'s current generation is in. `last` is the leg whose
    /// completion closed it (`None` when a timeout did).
    pub(super) fn finish(&mut self, slot: u32, result: JoinResult, last: Option<usize>) {
        if self.table.meta(slot).cmd.op == IoOp::Read {
            self.finish_read(slot, result);
            return;
        }
        if result.legs.count_ones() >= 2 {
            if let Some(leg) = last {
                bump(&self.stats.legs[leg].completed_last, 1);
            }
        }
        let status = if result.failed == 0 {
            Status::SUCCESS
        } else {
            self.apply_ack_rule(slot, result)
        };
        let meta = *self.table.meta(slot);
        if let Some(span) = meta.span {
            // A leg still in sync may yet apply an abandoned command: the guard stays held
            // until it is reaped or fenced, so a retry cannot be overtaken by it.
            let pending = meta.abandoned & self.vol.states.snapshot().in_sync_mask(self.leg_count);
            if pending != 0 {
                self.parked.push(Parked {
                    slot,
                    generation: meta.generation,
                    legs: pending,
                    span,
                    cmd: meta.cmd,
                });
            } else {
                self.vol.guard.unlock(span);
                // After the ack rule marked any missed regions: the clearer sees those or us.
                self.intent_done(&meta.cmd);
            }
        }
        if !status.is_success() && meta.abandoned != 0 {
            // A leg may still read this buffer: reused now, it would write another command's
            // data here.
            self.lend(slot, meta.abandoned);
        }
        // A flush that failed on a leg marked every region for it (`apply_ack_rule`): the
        // host may count on that flush, so a crash after the ack must still resync the whole
        // leg — the ack waits for those marks on the survivors' bitmaps too.
        let whole_bitmap =
            meta.cmd.op == IoOp::Flush && result.failed != 0 && self.vol.bitmap.is_some();
        self.table.release(slot);
        self.ack_modifying(
            Completion {
                tag: meta.cmd.tag,
                status,
            },
            whole_bitmap,
        );
        if let Some(r) = self.stages.as_deref_mut() {
            r.join(slot, PathKind::Write, &result, last);
        }
    }

    /// Queues a write's or flush's completion. On a persistent volume a success waits (held,
    /// never blocking) until the superblocks record the leg states it completed under: a leg
    /// taken out must be named stale on stable storage before anything it missed is
    /// acknowledged; with no in-sync leg able to record that, the write fails instead.
    /// `whole_bitmap`: it also waits until every region's bit is durable (a failed flush).
    #[inline]
    fn ack_modifying(&mut self, cpl: Completion, whole_bitmap: bool) {
        let Some(rec) = self.vol.recorder() else {
            self.ready.push_back(cpl);
            return;
        };
        if !cpl.status.is_success() {
            self.ready.push_back(cpl);
            return;
        }
        let events = self.vol.states.snapshot().events();
        match rec.ack_status(events) {
            AckStatus::Backed
                if self.held.is_empty() && (!whole_bitmap || self.whole_bitmap_durable()) =>
            {
                self.ready.push_back(cpl)
            }
            AckStatus::Unbacked => self.ready.push_back(Completion {
                tag: cpl.tag,
                status: Status::WRITE_FAULT,
            }),
            _ => self.hold(Held {
                cpl,
                events,
                whole_bitmap,
            }),
        }
    }

    #[cold]
    fn hold(&mut self, held: Held) {
        if let Some(rec) = self.vol.recorder() {
            rec.wake();
        }
        self.held.push_back(held);
    }

    /// Whether every region's bit is on the in-sync legs' bitmaps (the pages a failed flush
    /// requested go out at the start of each `poll`).
    #[cold]
    fn whole_bitmap_durable(&self) -> bool {
        self.vol.bitmap.as_ref().map_or(true, |bm| {
            bm.is_durable(RegionRange {
                first: 0,
                last: bm.regions() - 1,
            })
        })
    }

    /// Hands out the held completions whose leg states are recorded now (in order).
    #[cold]
    #[inline(never)]
    pub(super) fn release_held(&mut self) {
        let Some(rec) = self.vol.recorder() else {
            return;
        };
        while let Some(&Held {
            cpl,
            events,
            whole_bitmap,
        }) = self.held.front()
        {
            let status = match rec.ack_status(events) {
                AckStatus::Pending => {
                    rec.wake();
                    return;
                }
                AckStatus::Backed if whole_bitmap && !self.whole_bitmap_durable() => return,
                AckStatus::Backed => cpl.status,
                AckStatus::Unbacked => Status::WRITE_FAULT,
            };
            self.held.pop_front();
            if !status.is_success() {
                tracing::error!(
                    volume = %self.vol.name, tag = cpl.tag,
                    "write not acknowledged: the leg states it depends on could not be recorded"
                );
            }
            self.ready.push_back(Completion {
                tag: cpl.tag,
                status,
            });
        }
    }

    /// Some leg of a fanned-out command failed: fault it, or fail the host command.
    ///
    /// Only the legs in sync at submission decide the host's status. A leg being resynchronised
    /// that failed — or that has a write every in-sync leg failed — is faulted and the
    /// command's regions are marked on it (fault first, so a resync that clears a region and
    /// then finds its leg still resyncing cannot lose the mark; docs/resync.md).
    #[cold]
    fn apply_ack_rule(&mut self, slot: u32, result: JoinResult) -> Status {
        let meta = *self.table.meta(slot);
        if let Some(status) = self.fenced_by(&result) {
            if meta.cmd.op.modifies() {
                // The write may have reached the other legs: they may differ there.
                self.vol.diverged.mark(meta.cmd.slba, meta.cmd.nlb);
            }
            return status;
        }
        let in_sync = result.legs & !meta.resyncing;
        let ok = result.succeeded() & in_sync;
        let resync_out = if ok == 0 {
            result.legs & meta.resyncing
        } else {
            result.failed & meta.resyncing
        };
        for leg in 0..self.leg_count {
            if resync_out & (1 << leg) != 0 {
                let status = result.status(leg);
                self.vol
                    .fault_on_io(leg, None, status, op_name(meta.cmd.op));
                // Pairs with the fence in the resync job between clearing a region and
                // reading the leg state: one of the two sees the other's write.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                self.vol.mark_missed(leg, &meta.cmd);
            }
        }
        if ok == 0 {
            if meta.cmd.op.modifies() {
                // Before `finish` drops the bitmap in-flight count: the clearer sees the mark.
                self.vol.diverged.mark(meta.cmd.slba, meta.cmd.nlb);
            }
            let primary = usize::from(meta.primary);
            let from = if in_sync & (1 << primary) != 0 {
                primary
            } else {
                (result.failed & in_sync).trailing_zeros() as usize
            };
            let status = result.status(from);
            tracing::warn!(
                volume = %self.vol.name, op = ?meta.cmd.op, slba = meta.cmd.slba,
                nlb = meta.cmd.nlb, %status, "command failed on every in-sync leg"
            );
            return status;
        }
        // The successor for a failed primary: a leg that has this write.
        let successor = Some(ok.trailing_zeros() as usize);
        let mut status = Status::SUCCESS;
        for leg in 0..self.leg_count {
            if result.failed & in_sync & (1 << leg) == 0 {
                continue;
            }
            let leg_status = result.status(leg);
            self.vol.mark_missed(leg, &meta.cmd);
            if !self
                .vol
                .fault_on_io(leg, successor, leg_status, op_name(meta.cmd.op))
            {
                // The failed leg is the last one in sync (the legs that have the data were
                // faulted meanwhile by another core): the write cannot be acknowledged.
                status = leg_status;
            }
        }
        // Writes' regions are durably marked already; a failed flush marks every region.
        self.intent_mark_missed(&meta.cmd);
        status
    }

    /// A leg answered Reservation Conflict: a newer primary has taken the reservation over
    /// (`fencing.rs`). The volume fences itself — this command and every later one fail, no
    /// leg is faulted — and the host gets the conflict.
    #[cold]
    fn fenced_by(&mut self, result: &JoinResult) -> Option<Status> {
        let leg = (0..self.leg_count).find(|&l| {
            result.failed & (1 << l) != 0 && crate::fencing::is_conflict(result.status(l))
        })?;
        let status = result.status(leg);
        let why = format!(
            "leg {leg} ({}) answered Reservation Conflict: another node holds its reservation",
            self.vol.leg_name(leg)
        );
        if self.vol.fence.fence(why.clone()) {
            tracing::error!(volume = %self.vol.name, leg, "fenced: {why}; no write is acknowledged from now on");
        }
        Some(status)
    }

    /// A late completion from `leg` for slot `slot`'s generation `generation`: when that was a
    /// parked write's last abandoned leg, its guard entries and bitmap count are released.
    #[cold]
    fn unpark(&mut self, slot: u32, generation: u32, leg: usize) {
        let done = super::lending::reaped_leg(
            &mut self.parked,
            |p| p.slot == slot && p.generation == generation,
            |p| &mut p.legs,
            leg,
        );
        if let Some(p) = done {
            self.vol.guard.unlock(p.span);
            self.intent_done(&p.cmd);
        }
    }

    /// A read attempt is in: done, or retried on another leg.
    fn finish_read(&mut self, slot: u32, result: JoinResult) {
        let meta = *self.table.meta(slot);
        let leg = result.legs.trailing_zeros() as usize;
        let status = result.status(leg);
        if status.is_success() {
            self.table.release(slot);
            self.ready.push_back(Completion {
                tag: meta.cmd.tag,
                status,
            });
            if let Some(r) = self.stages.as_deref_mut() {
                r.join(slot, PathKind::Read, &result, Some(leg));
            }
            return;
        }
        if meta.first_error.is_success() {
            self.table.meta_mut(slot).first_error = status;
        }
        let others = self.vol.states.snapshot().in_sync_mask(self.leg_count)
            & self.open_legs()
            & !meta.tried;
        // A media error with another leg to read from: rewrite the range on this leg from a
        // good copy (`read_repair`) rather than fault the whole leg for one bad sector.
        let repaired = meta.abandoned == 0
            && others != 0
            && self.vol.queue_read_repair(leg, &meta.cmd, status);
        if !repaired {
            // The leg could not read these blocks: a resync rewrites them from a good leg.
            self.vol.mark_missed(leg, &meta.cmd);
            self.vol.fault_on_io(leg, None, status, "read");
            self.intent_mark_missed(&meta.cmd);
        }
        let snap = self.vol.states.snapshot();
        let candidates = snap.in_sync_mask(self.leg_count) & self.open_legs() & !meta.tried;
        // A leg that timed out may still fill this buffer: no retry into it (the host
        // retries), and the buffer stays lent until that leg's command is reaped.
        let lent = meta.abandoned;
        if candidates == 0 || lent != 0 {
            if lent != 0 {
                self.lend(slot, lent);
            }
            let first_error = self.table.meta(slot).first_error;
            self.table.release(slot);
            self.ready.push_back(Completion {
                tag: meta.cmd.tag,
                status: first_error,
            });
            if let Some(r) = self.stages.as_deref_mut() {
                r.join(slot, PathKind::Read, &result, Some(leg));
            }
            return;
        }
        let next = self
            .reads
            .choose(candidates, snap.primary(), &self.inflight);
        bump(&self.stats.read_retries, 1);
        tracing::debug!(volume = %self.vol.name, from = leg, to = next, "read retried on another leg");
        let generation = self.table.rearm(slot, 1 << next, Instant::now());
        if self.inflight[next] < self.leg_depth[next] {
            self.send(slot, 1 << next);
        } else {
            self.table.meta_mut(slot).unsent = 1 << next;
            self.pending.push_back(Waiting::Resend(slot, generation));
        }
    }
}

fn op_name(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read",
        IoOp::Write => "write",
        IoOp::Flush => "flush",
        IoOp::WriteZeroes => "write zeroes",
        IoOp::Deallocate => "deallocate",
    }
}
