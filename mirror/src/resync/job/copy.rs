//! The copy windows of a [`ResyncJob`]: starting them in region order, moving each through
//! lock → read source → write target (chunk by chunk) → clear → unlock, and their failures.

use std::sync::atomic::Ordering;
use std::time::Instant;

use nvmirror_nvme::{Completion, IoCommand, IoOp, Status};

use super::{JobState, Phase, ResyncJob, Stage, FLUSH_TAG};
use crate::legs::{LegState, MAX_LEGS};
use crate::resync::window::RegionRange;

impl ResyncJob {
    /// Starts windows while the pace and the bandwidth cap allow, in ascending region order.
    pub(super) fn start_windows(&mut self, now: Instant) -> bool {
        let adaptive = self.shared.adaptive();
        let mut work = false;
        loop {
            let active = self
                .windows
                .iter()
                .filter(|w| w.stage != Stage::Free)
                .count();
            if !self.pace.may_open(now, adaptive, active) {
                break;
            }
            let Some(free) = self.windows.iter().position(|w| w.stage == Stage::Free) else {
                break;
            };
            let Some(region) = self.regions.next_region(self.cursor) else {
                break;
            };
            let range = RegionRange::of(&self.vol, region);
            if !self
                .bucket
                .admit(now, self.shared.max_rate(), range.bytes(&self.vol))
            {
                break;
            }
            self.cursor = region + 1;
            self.pace.started(now);
            let w = &mut self.windows[free];
            w.stage = Stage::Locking;
            w.range = range;
            w.lba = range.slba;
            work = true;
        }
        for i in 0..self.windows.len() {
            if self.windows[i].stage == Stage::Locking
                && self.vol.guard.try_lock(self.windows[i].range.span)
            {
                work = true;
                if let Err(e) = self.pick_source() {
                    self.vol.guard.unlock(self.windows[i].range.span);
                    self.windows[i].stage = Stage::Free;
                    self.stop(JobState::Failed, Some(e));
                    return true;
                }
                self.windows[i].source = self.source;
                self.issue(i, Stage::Reading, now);
            }
        }
        work
    }

    /// Keeps the source an in-sync leg (read under a window lock: a write that took the
    /// source out has completed, so its state is visible).
    fn pick_source(&mut self) -> Result<(), String> {
        let snap = self.vol.states.snapshot();
        if snap.state(self.source) == LegState::InSync {
            return Ok(());
        }
        let candidates = snap.in_sync_mask(snap.leg_count());
        if candidates == 0 {
            return Err("no in-sync leg to copy from".into());
        }
        let next = if candidates & (1 << snap.primary()) != 0 {
            snap.primary()
        } else {
            candidates.trailing_zeros() as usize
        };
        self.channels.open(&self.vol, next)?;
        tracing::info!(volume = %self.vol.name, leg = self.leg, old = self.source, new = next, "resync source changed");
        self.source = next;
        Ok(())
    }

    /// Sends window `i`'s command for `stage` (Reading: the chunk at `lba` from the source;
    /// Writing: the same chunk to the target).
    fn issue(&mut self, i: usize, stage: Stage, now: Instant) {
        let w = &mut self.windows[i];
        if stage == Stage::Reading {
            w.nlb = w.range.chunk(w.lba, self.max_blocks);
        }
        let (op, leg) = match stage {
            Stage::Reading => (IoOp::Read, w.source),
            _ => (IoOp::Write, self.leg),
        };
        w.stage = stage;
        w.started = now;
        let cmd = IoCommand::with_buf(op, w.lba, w.nlb, w.buf.io_buf(), i as u64);
        // SAFETY: the window's buffer belongs to the job's pool, which outlives the queue
        // pairs (field order), and the window is not touched again until this command's
        // completion is reaped in `reap` (or it is marked Lost and never reused until then).
        if !unsafe { self.channels.submit(leg, cmd) } {
            self.vol.guard.unlock(w.range.span);
            w.stage = Stage::Free;
            self.stop(
                JobState::Failed,
                Some(format!("leg {leg}: job queue pair refused a command")),
            );
        }
    }

    /// Reaps the job's queue pairs and moves each window on.
    pub(super) fn reap(&mut self, now: Instant) -> bool {
        let mut work = false;
        for leg in 0..MAX_LEGS {
            loop {
                let n = self.channels.poll(leg, &mut self.cpl);
                if n == 0 {
                    break;
                }
                work = true;
                for k in 0..n {
                    let cpl = self.cpl[k];
                    self.on_completion(cpl, now);
                }
                if n < self.cpl.len() {
                    break;
                }
            }
        }
        work
    }

    fn on_completion(&mut self, cpl: Completion, now: Instant) {
        if cpl.tag == FLUSH_TAG {
            self.on_flush(cpl.status);
            return;
        }
        let i = cpl.tag as usize;
        let Some(w) = self.windows.get_mut(i) else {
            return;
        };
        match w.stage {
            Stage::Lost => {
                // The command given up on is reaped (cancelled or late): the leg it went to
                // no longer holds it, and the window's buffer is free again.
                w.stage = Stage::Free;
                if let Some(l) = self.vol.leg(w.lost_on) {
                    l.abandoned.fetch_sub(1, Ordering::Release);
                }
            }
            Stage::Reading if !cpl.status.is_success() => {
                let (source, status) = (w.source, cpl.status);
                self.release(i);
                self.stop(
                    JobState::Failed,
                    Some(format!("reading leg {source} failed: {status}")),
                );
            }
            Stage::Reading if self.stopping.is_some() => self.release(i),
            Stage::Reading => self.issue(i, Stage::Writing, now),
            Stage::Writing if !cpl.status.is_success() => self.target_failed(i, cpl.status),
            Stage::Writing => {
                w.lba += u64::from(w.nlb);
                if w.lba < w.range.end && self.stopping.is_none() {
                    self.issue(i, Stage::Reading, now);
                } else if w.lba < w.range.end {
                    self.release(i);
                } else {
                    self.region_done(i);
                }
            }
            Stage::Free | Stage::Locking => {}
        }
    }

    /// Window `i` copied its whole region: forget the region (under the lock), then unlock.
    fn region_done(&mut self, i: usize) {
        let range = self.windows[i].range;
        self.regions.region_copied(range.region);
        // A failed host write or flush faults the leg before marking its regions (a flush
        // holds no window lock). The fence pairs with one between those two steps, so either
        // the mark lands after this clear or the state read below sees the fault and the
        // region is marked again.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.vol.states.snapshot().state(self.leg) != LegState::Resyncing {
            self.regions.region_dirty(range.region);
        } else {
            let bytes = range.bytes(&self.vol);
            self.bytes_done += bytes;
            let mut p = self.shared.progress();
            p.regions_done += 1;
            p.bytes_done += bytes;
            p.window_limit = self.pace.limit(self.shared.adaptive());
        }
        self.release(i);
    }

    fn release(&mut self, i: usize) {
        let w = &mut self.windows[i];
        self.vol.guard.unlock(w.range.span);
        w.stage = Stage::Free;
    }

    /// A write to the target failed: fault it (the region stays marked) and stop.
    fn target_failed(&mut self, i: usize, status: Status) {
        self.vol.fault_on_io(self.leg, None, status, "resync write");
        self.release(i);
        self.stop(
            JobState::Failed,
            Some(format!("writing leg {} failed: {status}", self.leg)),
        );
    }

    /// Windows whose command is older than the volume's I/O timeout are given up.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        let timeout = self.vol.cfg.io_timeout;
        for i in 0..self.windows.len() {
            let w = &self.windows[i];
            let hung = matches!(w.stage, Stage::Reading | Stage::Writing)
                && now.saturating_duration_since(w.started) >= timeout;
            if !hung {
                continue;
            }
            let (stage, leg) = (
                w.stage,
                if w.stage == Stage::Reading {
                    w.source
                } else {
                    self.leg
                },
            );
            if stage == Stage::Writing {
                self.vol
                    .fault_on_io(self.leg, None, Status::ABORTED_BY_HOST, "resync write");
            }
            self.vol.guard.unlock(self.windows[i].range.span);
            // Until it is reaped the command may still land on `leg` (a write after a later
            // copy of its region) or fill the window's buffer: the leg counts it as abandoned
            // (attaching it again is refused meanwhile) and the window is not reused.
            self.windows[i].stage = Stage::Lost;
            self.windows[i].lost_on = leg;
            if let Some(l) = self.vol.leg(leg) {
                l.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            self.channels.cancel(leg, i as u64);
            self.stop(
                JobState::Failed,
                Some(format!(
                    "leg {leg}: resync command timed out after {timeout:?}"
                )),
            );
        }
        if matches!(self.phase, Phase::Flushing)
            && now.saturating_duration_since(self.flush_started) >= timeout
        {
            self.on_flush(Status::ABORTED_BY_HOST);
        }
    }
}
