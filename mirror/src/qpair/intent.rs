//! The write-intent gate and the per-core bitmap page writer (persistent volumes only).
//!
//! `intent_gate` runs for every modifying command right after the overlap guard is taken and
//! before any leg sees the command. When every region of the command is marked and durable it
//! costs a few atomic operations and the command goes on. Otherwise it marks the regions (and,
//! for a sequential stream, the next ones), queues their bitmap pages for writing, and the
//! command waits in the pending FIFO. At the next `poll`, before the FIFO is retried, every
//! queued page whose writer lock is free is snapshotted once and written to every in-sync leg
//! through this core's leg queue pairs, so the first touches of one poll iteration share one
//! write per page. When every leg has the page, its bits become durable, the lock is released
//! and the waiting commands go on.
//!
//! Metadata commands use slot numbers from [`META_SLOT_BASE`] in the leg tag, beyond any join
//! slot, so their completions are told apart from data completions by the tag alone.

use std::time::Instant;

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{IoCommand, IoOp, Status, SubmitError};

use super::VolumeQueuePair;
use crate::bitmap::predict::StreamPredictor;
use crate::bitmap::{RegionRange, BITMAP_PAGE};
use crate::join::leg_tag;
use crate::legs::MAX_LEGS;
use crate::stats::bump;
use crate::volume::VolumeShared;

/// Join-slot numbers at and above this are metadata writes.
pub(super) const META_SLOT_BASE: u32 = 0x8000_0000;
/// Bitmap page writes one core keeps in flight at most.
const META_SLOTS: usize = 8;
/// Pages one core remembers as waiting to be written (at least; every page of the bitmap
/// fits).
const MAX_REQUESTED: usize = 256;

/// One bitmap page write in flight.
#[derive(Debug)]
struct MetaWrite {
    page: u32,
    gen: u64,
    /// Tag generation: a late completion of an earlier write in this slot is ignored.
    seq: u32,
    started: Instant,
    /// Legs that have not answered yet.
    outstanding: u8,
    legs: u8,
    failed: u8,
    first_error: Status,
    /// Legs that did not answer within the I/O timeout: they may still read `buf`.
    abandoned: u8,
    buf: Option<DmaBuf>,
}

/// A page buffer that abandoned leg commands may still read: out of the pool until they are
/// reaped (or their queue pairs close, with this writer).
#[derive(Debug)]
struct LentPage {
    idx: u32,
    seq: u32,
    legs: u8,
    buf: DmaBuf,
}

/// A core's bitmap state: the page writer and the stream predictor.
#[derive(Debug)]
pub(super) struct IntentWriter {
    requested: Vec<u32>,
    writes: Vec<Option<MetaWrite>>,
    /// Tag generation of the next write.
    seq: u32,
    /// Writes in flight.
    busy: usize,
    pool: DmaPool,
    /// Page buffers lent to abandoned leg commands (at most one per write slot).
    lent: Vec<LentPage>,
    predictor: StreamPredictor,
}

impl IntentWriter {
    pub(super) fn new(predict_max: u32, pages: usize) -> Self {
        Self {
            requested: Vec::with_capacity(MAX_REQUESTED.max(pages)),
            writes: (0..META_SLOTS).map(|_| None).collect(),
            seq: 0,
            busy: 0,
            pool: DmaPool::new(META_SLOTS as u32, BITMAP_PAGE as usize),
            lent: Vec::with_capacity(META_SLOTS),
            predictor: StreamPredictor::new(predict_max),
        }
    }

    fn request(requested: &mut Vec<u32>, page: u32) {
        if requested.len() < requested.capacity() && !requested.contains(&page) {
            requested.push(page);
        }
    }

    pub(super) fn has_requests(&self) -> bool {
        !self.requested.is_empty()
    }

    /// Whether page writes are in flight (so `poll` watches them for the I/O timeout).
    pub(super) fn busy(&self) -> bool {
        self.busy != 0
    }
}

impl VolumeQueuePair {
    /// The bitmap gate: true when `cmd` may go to its legs now; false when it has to wait
    /// for a bitmap page write. On true, the command's regions are counted in flight until
    /// [`intent_done`](Self::intent_done).
    #[inline]
    pub(super) fn intent_gate(&mut self, cmd: &IoCommand) -> bool {
        let Some(bm) = self.vol.bitmap.as_ref() else {
            return true;
        };
        let r = bm.range(cmd.slba, cmd.nlb);
        // Counted before the bits are read: the clearer sees us, or we see its clear.
        bm.enter(r);
        if bm.is_durable(r) {
            bm.touch(r);
            if let Some(w) = self.intent.as_mut() {
                w.predictor.observe(cmd.slba, cmd.nlb);
            }
            bump(&self.stats.bitmap_writes, 1);
            return true;
        }
        bm.leave(r);
        self.intent_first_touch(cmd, r);
        false
    }

    /// A modifying command that passed the gate is done on every leg.
    #[inline]
    pub(super) fn intent_done(&self, cmd: &IoCommand) {
        release_intent(&self.vol, cmd);
    }

    /// A modifying command queued behind waiting ones: marks its regions now, so their pages
    /// go out with this poll iteration's other first touches.
    #[inline]
    pub(super) fn intent_note(&mut self, cmd: &IoCommand) {
        if let Some(bm) = self.vol.bitmap.as_ref() {
            let r = bm.range(cmd.slba, cmd.nlb);
            if !bm.is_durable(r) {
                self.intent_first_touch(cmd, r);
            }
        }
    }

    /// A leg was faulted after missing `cmd` (a failed read, or a failed flush: every region)
    /// outside the write gate: its regions are marked in the bitmap too, and written at the
    /// next `poll`, so a crash before the leg is recovered still resyncs them. They cannot be
    /// cleared meanwhile: the leg is out and has them in its missed set.
    #[cold]
    pub(super) fn intent_mark_missed(&mut self, cmd: &IoCommand) {
        let (Some(bm), Some(w)) = (self.vol.bitmap.as_ref(), self.intent.as_mut()) else {
            return;
        };
        let r = if cmd.op == IoOp::Flush {
            RegionRange {
                first: 0,
                last: bm.regions() - 1,
            }
        } else {
            bm.range(cmd.slba, cmd.nlb)
        };
        let req = &mut w.requested;
        bm.mark(r, |p| IntentWriter::request(req, p));
    }

    #[cold]
    fn intent_first_touch(&mut self, cmd: &IoCommand, r: RegionRange) {
        let (Some(bm), Some(w)) = (self.vol.bitmap.as_ref(), self.intent.as_mut()) else {
            return;
        };
        bump(&self.stats.bitmap_waits, 1);
        let req = &mut w.requested;
        let new = bm.mark(r, |p| IntentWriter::request(req, p));
        // Pages marked by someone else (or by an earlier attempt) that are still not on disk.
        let (p0, p1) = bm.page_span(r);
        for p in p0..=p1 {
            if bm.needs_write(p) {
                IntentWriter::request(req, p);
            }
        }
        bm.touch(r);
        if new {
            bump(&self.stats.bitmap_first_touches, 1);
            if let Some(ahead) = w.predictor.predict(cmd.slba, cmd.nlb, r, bm.regions()) {
                bm.mark(ahead, |p| IntentWriter::request(req, p));
                bm.touch(ahead);
                bump(&self.stats.predicted_regions, ahead.last - ahead.first + 1);
            }
        }
    }

    /// Writes the queued bitmap pages whose writer lock is free (called by `poll` before the
    /// pending FIFO is retried).
    pub(super) fn write_intent_pages(&mut self) {
        let (Some(bm), Some(w)) = (self.vol.bitmap.as_ref(), self.intent.as_mut()) else {
            return;
        };
        let legs = self.vol.states.snapshot().in_sync_mask(self.leg_count) & {
            let mut open = 0u8;
            for leg in 0..self.leg_count {
                if self.legs[leg].is_some() {
                    open |= 1 << leg;
                }
            }
            open
        };
        let mut i = 0;
        while i < w.requested.len() {
            let page = w.requested[i];
            if !bm.needs_write(page) {
                w.requested.swap_remove(i);
                continue;
            }
            let room = (0..self.leg_count)
                .all(|leg| legs & (1 << leg) == 0 || self.inflight[leg] < self.leg_depth[leg]);
            let Some(idx) = w.writes.iter().position(Option::is_none) else {
                return;
            };
            if legs == 0 || !room || !bm.try_lock(page) {
                i += 1;
                continue;
            }
            if !bm.needs_write(page) {
                bm.unlock(page);
                w.requested.swap_remove(i);
                continue;
            }
            let Some(mut buf) = w.pool.get() else {
                bm.unlock(page);
                return;
            };
            let gen = bm.snapshot(page, buf.as_mut_slice());
            let layout = bm.layout;
            w.seq = w.seq.wrapping_add(1);
            let seq = w.seq;
            // With FUA: a bit is on stable storage, not in a leg's volatile write cache,
            // before any data write for its region is sent (docs/bitmap.md, ordering).
            let cmd = IoCommand::with_buf(
                IoOp::Write,
                layout.page_lba(u64::from(page)),
                layout.page_blocks(),
                buf.io_buf(),
                leg_tag(META_SLOT_BASE + idx as u32, seq),
            )
            .with_fua();
            let mut sent = 0u8;
            let mut failed = 0u8;
            for leg in 0..self.leg_count {
                if legs & (1 << leg) == 0 {
                    continue;
                }
                let Some(qp) = self.legs[leg].as_mut() else {
                    continue;
                };
                // SAFETY: `buf` belongs to this writer's pool and is not touched or returned
                // to the pool until every leg's completion for it has been reaped (a write
                // abandoned at the timeout keeps it lent until then, `LentPage`), or the leg
                // queue pairs, dropped before this writer, are gone.
                match unsafe { qp.submit(cmd) } {
                    Ok(()) => {
                        self.inflight[leg] += 1;
                        sent |= 1 << leg;
                    }
                    Err(SubmitError::QueueFull) => failed |= 1 << leg,
                }
            }
            bump(&self.stats.metadata_writes, 1);
            w.requested.swap_remove(i);
            w.busy += 1;
            w.writes[idx] = Some(MetaWrite {
                abandoned: 0,
                page,
                gen,
                seq,
                started: Instant::now(),
                outstanding: sent,
                legs: sent | failed,
                failed,
                first_error: if failed != 0 {
                    Status::HOST_PATHING_ERROR
                } else {
                    Status::SUCCESS
                },
                buf: Some(buf),
            });
            if sent == 0 {
                self.finish_page_write(idx);
                return;
            }
        }
    }

    /// A leg answered bitmap page write `idx`.
    #[cold]
    pub(super) fn on_meta_completion(&mut self, leg: usize, idx: u32, seq: u32, status: Status) {
        let Some(Some(mw)) = self
            .intent
            .as_mut()
            .and_then(|w| w.writes.get_mut(idx as usize))
        else {
            bump(&self.stats.legs[leg].late_completions, 1);
            self.note_late(leg);
            self.unlend_page(leg, idx, seq);
            return;
        };
        if mw.seq != seq || mw.outstanding & (1 << leg) == 0 {
            bump(&self.stats.legs[leg].late_completions, 1);
            self.note_late(leg);
            self.unlend_page(leg, idx, seq);
            return;
        }
        mw.outstanding &= !(1 << leg);
        if !status.is_success() {
            mw.failed |= 1 << leg;
            if mw.first_error.is_success() {
                mw.first_error = status;
            }
        }
        if mw.outstanding == 0 {
            self.finish_page_write(idx as usize);
        }
    }

    /// Every leg of page write `idx` is in: legs that failed are faulted; the page's bits are
    /// durable once every leg that stays in sync has them.
    #[cold]
    fn finish_page_write(&mut self, idx: usize) {
        let Some(w) = self.intent.as_mut() else {
            return;
        };
        let Some(mut mw) = w.writes[idx].take() else {
            return;
        };
        w.busy -= 1;
        let Some(bm) = self.vol.bitmap.as_ref() else {
            return;
        };
        let mut complete = mw.legs & !mw.failed != 0;
        if mw.failed != 0 && crate::fencing::is_conflict(mw.first_error) {
            // A newer primary holds a leg's reservation (`fencing.rs`): the volume fences
            // itself instead of faulting the leg, so the data writes waiting for this page
            // meet the same conflict there and are never acknowledged.
            let leg = mw.failed.trailing_zeros() as usize;
            let why = format!(
                "leg {leg} ({}) answered Reservation Conflict to a bitmap page write: another node holds its reservation",
                self.vol.leg_name(leg)
            );
            if self.vol.fence.fence(why.clone()) {
                tracing::error!(volume = %self.vol.name, leg, "fenced: {why}; no write is acknowledged from now on");
            }
            mw.failed = 0;
        }
        for leg in 0..self.leg_count {
            if mw.failed & (1 << leg) != 0
                && !self
                    .vol
                    .fault_on_io(leg, None, mw.first_error, "bitmap page write")
            {
                // The last in-sync leg could not take the page: the bits are not durable.
                complete = false;
            }
        }
        if let Some(buf) = mw.buf.take() {
            if complete {
                bm.written(mw.page, mw.gen, buf.as_slice());
            }
            if mw.abandoned != 0 {
                w.lent.push(LentPage {
                    idx: idx as u32,
                    seq: mw.seq,
                    legs: mw.abandoned,
                    buf,
                });
            } else {
                w.pool.put(buf);
            }
        }
        bm.unlock(mw.page);
        if !complete {
            IntentWriter::request(&mut w.requested, mw.page);
        }
    }

    /// Page writes older than the I/O timeout are abandoned on the legs that have not
    /// answered, as if those legs had failed (invariant 7: the writes waiting for the page are
    /// not held up longer than that).
    #[cold]
    pub(super) fn expire_meta_writes(&mut self) {
        let timeout = self.vol.cfg.io_timeout;
        let Some(w) = self.intent.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mut expired = [false; META_SLOTS];
        let mut abandoned_per_leg = [0u32; MAX_LEGS];
        for (i, slot) in w.writes.iter_mut().enumerate() {
            let Some(mw) = slot.as_mut() else { continue };
            if now.saturating_duration_since(mw.started) < timeout || mw.outstanding == 0 {
                continue;
            }
            for (leg, n) in abandoned_per_leg
                .iter_mut()
                .enumerate()
                .take(self.leg_count)
            {
                if mw.outstanding & (1 << leg) != 0 {
                    *n += 1;
                    bump(&self.stats.legs[leg].timeouts, 1);
                    tracing::warn!(volume = %self.vol.name, leg, page = mw.page, "bitmap page write timed out; abandoning it");
                }
            }
            for (leg, qp) in self.legs.iter_mut().enumerate().take(self.leg_count) {
                if mw.outstanding & (1 << leg) != 0 {
                    if let Some(qp) = qp.as_mut() {
                        qp.cancel(&[leg_tag(META_SLOT_BASE + i as u32, mw.seq)]);
                    }
                }
            }
            mw.failed |= mw.outstanding;
            mw.abandoned |= mw.outstanding;
            mw.outstanding = 0;
            if mw.first_error.is_success() {
                mw.first_error = Status::ABORTED_BY_HOST;
            }
            expired[i] = true;
        }
        for (leg, &n) in abandoned_per_leg.iter().enumerate() {
            for _ in 0..n {
                self.note_abandoned(leg);
            }
        }
        for (i, _) in expired.iter().enumerate().filter(|(_, &e)| e) {
            self.finish_page_write(i);
        }
    }

    /// A late completion of `leg` for write slot `idx`, generation `seq`: the page buffer it
    /// held goes back to the pool once no abandoned command reads it.
    #[cold]
    fn unlend_page(&mut self, leg: usize, idx: u32, seq: u32) {
        let Some(w) = self.intent.as_mut() else {
            return;
        };
        let Some(i) = w.lent.iter().position(|l| l.idx == idx && l.seq == seq) else {
            return;
        };
        w.lent[i].legs &= !(1 << leg);
        if w.lent[i].legs == 0 {
            let l = w.lent.swap_remove(i);
            w.pool.put(l.buf);
        }
    }

    /// Releases the page locks of writes still in flight (the queue pair is going away).
    pub(super) fn drop_intent(&mut self) {
        let (Some(bm), Some(w)) = (self.vol.bitmap.as_ref(), self.intent.as_mut()) else {
            return;
        };
        for mw in w.writes.iter_mut().filter_map(Option::take) {
            bm.unlock(mw.page);
        }
    }
}

/// A write is done on every leg (or fenced): its regions leave the bitmap's in-flight count.
pub(super) fn release_intent(vol: &VolumeShared, cmd: &IoCommand) {
    if let Some(bm) = vol.bitmap.as_ref() {
        if cmd.op.modifies() {
            bm.leave(bm.range(cmd.slba, cmd.nlb));
        }
    }
}
