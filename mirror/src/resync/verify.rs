//! The verify (scrub) job: compares the in-sync legs region by region with CRC32C, each
//! region under its window lock so host writes cannot cause false mismatches, and optionally
//! repairs a mismatch by copying the primary's data to the legs that differ.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{Completion, IoCommand, IoOp, Status};
use nvmirror_poller::{PollStatus, Poller, ReactorContext};

use super::channels::LegChannels;
use super::driver::{reactor_step, run_to_end, BackgroundJob};
use super::progress::JobShared;
use super::rate::{Pace, TokenBucket};
use super::window::{region_count, RegionRange};
use super::{JobState, ResyncConfig, VerifyStatus};
use crate::legs::MAX_LEGS;
use crate::volume::VolumeShared;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    Locking,
    Reading,
    Repairing,
    Lost,
}

#[derive(Debug)]
struct VerifyWindow {
    stage: Stage,
    range: RegionRange,
    lba: u64,
    nlb: u32,
    /// Legs compared in this region (in sync when its lock was taken).
    legs: u8,
    primary: usize,
    /// Legs whose command for the current step is outstanding.
    pending: u8,
    failed: Option<(usize, Status)>,
    mismatch: bool,
    repaired: bool,
    started: Instant,
    /// One buffer per leg.
    bufs: Vec<DmaBuf>,
}

/// A scrub of the in-sync legs. Drive it like a [`ResyncJob`](super::ResyncJob).
#[derive(Debug)]
pub struct VerifyJob {
    channels: LegChannels,
    windows: Vec<VerifyWindow>,
    _pool: DmaPool,
    vol: Arc<VolumeShared>,
    shared: Arc<JobShared>,
    max_blocks: u64,
    io_bytes: usize,
    cursor: u64,
    regions_total: u64,
    bucket: TokenBucket,
    pace: Pace,
    stopping: Option<(JobState, Option<String>)>,
    finished: bool,
    cpl: Vec<Completion>,
}

impl VerifyJob {
    pub(crate) fn new(
        vol: Arc<VolumeShared>,
        shared: Arc<JobShared>,
        cfg: &ResyncConfig,
    ) -> Result<Self, String> {
        let lba_size = u64::from(vol.geo.lba_size);
        let io_bytes = u64::from(cfg.max_io_bytes)
            .min(vol.cfg.region_size)
            .max(lba_size);
        let mut pool = DmaPool::new(cfg.windows * MAX_LEGS as u32, io_bytes as usize);
        let now = Instant::now();
        let windows = (0..cfg.windows)
            .map(|_| VerifyWindow {
                stage: Stage::Free,
                range: RegionRange::of(&vol, 0),
                lba: 0,
                nlb: 0,
                legs: 0,
                primary: 0,
                pending: 0,
                failed: None,
                mismatch: false,
                repaired: false,
                started: now,
                bufs: (0..MAX_LEGS)
                    .map(|_| {
                        pool.get()
                            .expect("the pool has a buffer per leg and window")
                    })
                    .collect(),
            })
            .collect();
        let regions_total = region_count(&vol);
        {
            let mut p = shared.progress();
            p.state = JobState::Running;
            p.regions_total = regions_total;
            p.bytes_total = vol.geo.bytes();
        }
        let pace = Pace::new(
            &vol,
            cfg.windows,
            cfg.latency_factor,
            cfg.sample_interval,
            now,
        );
        shared.progress().baseline_p99 = pace.baseline();
        Ok(Self {
            channels: LegChannels::new(cfg.windows * 2 + 1),
            windows,
            _pool: pool,
            shared,
            max_blocks: io_bytes / lba_size,
            io_bytes: io_bytes as usize,
            cursor: 0,
            regions_total,
            bucket: TokenBucket::new(now),
            pace,
            stopping: None,
            finished: false,
            cpl: vec![Completion::default(); 32],
            vol,
        })
    }

    pub fn status(&self) -> VerifyStatus {
        self.shared.verify_status()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Does a bounded amount of work; never blocks. Returns whether it did any.
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.finished {
            return false;
        }
        let mut work = self.reap(now);
        if self.stopping.is_none() && self.shared.cancel_requested() {
            self.stopping = Some((JobState::Cancelled, None));
        }
        if self.stopping.is_some() {
            self.wind_down();
            return true;
        }
        self.check_timeouts(now);
        self.pace.sample(&self.vol, now, self.shared.adaptive());
        if !self.shared.paused() {
            work |= self.start_windows(now);
        }
        if self.cursor >= self.regions_total && self.windows.iter().all(|w| w.stage == Stage::Free)
        {
            let mismatched = self.shared.progress().mismatched.len();
            tracing::info!(volume = %self.vol.name, mismatched, "verify done");
            self.shared.finish(JobState::Done, None);
            self.finished = true;
        }
        work
    }

    /// Polls on this thread until the job ends.
    pub fn run_blocking(&mut self) -> VerifyStatus {
        run_to_end(self)
    }

    /// Runs the job to the end on a thread of its own.
    pub fn run(mut self) -> JoinHandle<VerifyStatus> {
        std::thread::spawn(move || self.run_blocking())
    }

    fn wind_down(&mut self) {
        for w in &mut self.windows {
            if w.stage == Stage::Locking {
                w.stage = Stage::Free;
            }
        }
        if self
            .windows
            .iter()
            .any(|w| matches!(w.stage, Stage::Reading | Stage::Repairing))
        {
            return;
        }
        let (state, error) = self.stopping.take().unwrap_or((JobState::Failed, None));
        tracing::warn!(volume = %self.vol.name, ?state, error = error.as_deref().unwrap_or(""), "verify stopped");
        self.shared.finish(state, error);
        self.finished = true;
    }

    fn start_windows(&mut self, now: Instant) -> bool {
        let adaptive = self.shared.adaptive();
        let mut work = false;
        while self.cursor < self.regions_total {
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
            let range = RegionRange::of(&self.vol, self.cursor);
            if !self
                .bucket
                .admit(now, self.shared.max_rate(), range.bytes(&self.vol))
            {
                break;
            }
            self.cursor += 1;
            self.pace.started(now);
            let w = &mut self.windows[free];
            w.stage = Stage::Locking;
            w.range = range;
            w.lba = range.slba;
            w.mismatch = false;
            w.repaired = false;
            work = true;
        }
        for i in 0..self.windows.len() {
            if self.windows[i].stage != Stage::Locking
                || !self.vol.guard.try_lock(self.windows[i].range.span)
            {
                continue;
            }
            work = true;
            // The legs compared are those in sync now, under the lock.
            let snap = self.vol.states.snapshot();
            let mut legs = snap.in_sync_mask(snap.leg_count());
            for leg in 0..MAX_LEGS {
                if legs & (1 << leg) != 0 && self.channels.open(&self.vol, leg).is_err() {
                    legs &= !(1 << leg);
                }
            }
            let w = &mut self.windows[i];
            w.legs = legs;
            w.primary = snap.primary();
            if legs.count_ones() < 2 || legs & (1 << w.primary) == 0 {
                self.region_done(i);
                continue;
            }
            self.read_chunk(i, now);
        }
        work
    }

    fn read_chunk(&mut self, i: usize, now: Instant) {
        let w = &mut self.windows[i];
        w.nlb = w.range.chunk(w.lba, self.max_blocks);
        w.stage = Stage::Reading;
        w.started = now;
        w.pending = 0;
        w.failed = None;
        for leg in 0..MAX_LEGS {
            if w.legs & (1 << leg) == 0 {
                continue;
            }
            let cmd = IoCommand::with_buf(
                IoOp::Read,
                w.lba,
                w.nlb,
                w.bufs[leg].io_buf(),
                (i as u64) << 8 | leg as u64,
            );
            // SAFETY: the window's buffers belong to the job's pool, which outlives the queue
            // pairs; the window does not touch them until every completion is reaped.
            if unsafe { self.channels.submit(leg, cmd) } {
                w.pending |= 1 << leg;
            } else {
                w.failed = Some((leg, Status::INTERNAL_ERROR));
            }
        }
        if w.pending == 0 {
            self.step_done(i, now);
        }
    }

    fn reap(&mut self, now: Instant) -> bool {
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
                    let (i, leg) = ((cpl.tag >> 8) as usize, (cpl.tag & 0xff) as usize);
                    let Some(w) = self.windows.get_mut(i) else {
                        continue;
                    };
                    if w.stage == Stage::Lost {
                        w.pending &= !(1 << leg);
                        if w.pending == 0 {
                            w.stage = Stage::Free;
                        }
                        continue;
                    }
                    w.pending &= !(1 << leg);
                    if !cpl.status.is_success() && w.failed.is_none() {
                        w.failed = Some((leg, cpl.status));
                    }
                    if w.stage == Stage::Repairing && !cpl.status.is_success() {
                        // A leg that cannot take the primary's data is out of sync.
                        self.vol.fault_on_io(leg, None, cpl.status, "verify repair");
                        if let Some(l) = self.vol.leg(leg) {
                            l.missed.mark_region(w.range.region);
                        }
                    }
                    if w.pending == 0 {
                        self.step_done(i, now);
                    }
                }
                if n < self.cpl.len() {
                    break;
                }
            }
        }
        work
    }

    /// Every command of window `i`'s current step is in.
    fn step_done(&mut self, i: usize, now: Instant) {
        let w = &mut self.windows[i];
        match w.stage {
            Stage::Reading => {
                if let Some((leg, status)) = w.failed {
                    self.release(i);
                    self.stop(format!("reading leg {leg} failed: {status}"));
                    return;
                }
                let len = (w.nlb as usize) << self.vol.geo.lba_shift();
                let crc = |b: &DmaBuf| crc32c::crc32c(&b.as_slice()[..len.min(self.io_bytes)]);
                let want = crc(&w.bufs[w.primary]);
                let mut differ = 0u8;
                for leg in 0..MAX_LEGS {
                    if w.legs & (1 << leg) != 0 && crc(&w.bufs[leg]) != want {
                        differ |= 1 << leg;
                    }
                }
                if differ != 0 {
                    w.mismatch = true;
                    tracing::warn!(volume = %self.vol.name, region = w.range.region, lba = w.lba, legs = differ, "verify mismatch");
                    if self.shared.repair {
                        self.repair_chunk(i, differ, now);
                        return;
                    }
                }
                self.next_chunk(i, now);
            }
            Stage::Repairing => {
                w.repaired = true;
                self.next_chunk(i, now);
            }
            _ => {}
        }
    }

    /// Writes the primary's copy of the current chunk to the legs in `differ`.
    fn repair_chunk(&mut self, i: usize, differ: u8, now: Instant) {
        let w = &mut self.windows[i];
        w.stage = Stage::Repairing;
        w.started = now;
        w.pending = 0;
        let buf = w.bufs[w.primary].io_buf();
        for leg in 0..MAX_LEGS {
            if differ & (1 << leg) == 0 {
                continue;
            }
            let cmd =
                IoCommand::with_buf(IoOp::Write, w.lba, w.nlb, buf, (i as u64) << 8 | leg as u64);
            // SAFETY: as in `read_chunk`; several legs may read one write buffer at once.
            if unsafe { self.channels.submit(leg, cmd) } {
                w.pending |= 1 << leg;
            }
        }
        if w.pending == 0 {
            self.next_chunk(i, now);
        }
    }

    fn next_chunk(&mut self, i: usize, now: Instant) {
        let w = &mut self.windows[i];
        w.lba += u64::from(w.nlb);
        if w.lba < w.range.end && self.stopping.is_none() {
            self.read_chunk(i, now);
        } else if w.lba < w.range.end {
            self.release(i);
        } else {
            self.region_done(i);
        }
    }

    fn region_done(&mut self, i: usize) {
        let w = &self.windows[i];
        {
            let mut p = self.shared.progress();
            p.regions_done += 1;
            p.bytes_done += w.range.bytes(&self.vol);
            if w.mismatch {
                let pos = p.mismatched.partition_point(|&r| r < w.range.region);
                p.mismatched.insert(pos, w.range.region);
            }
            if w.repaired {
                p.repaired += 1;
            }
            p.window_limit = self.pace.limit(self.shared.adaptive());
        }
        self.release(i);
    }

    fn release(&mut self, i: usize) {
        let w = &mut self.windows[i];
        self.vol.guard.unlock(w.range.span);
        w.stage = Stage::Free;
    }

    fn stop(&mut self, error: String) {
        if self.stopping.is_none() {
            self.stopping = Some((JobState::Failed, Some(error)));
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        let timeout = self.vol.cfg.io_timeout;
        for i in 0..self.windows.len() {
            let w = &self.windows[i];
            if matches!(w.stage, Stage::Reading | Stage::Repairing)
                && now.saturating_duration_since(w.started) >= timeout
            {
                let region = w.range.region;
                self.vol.guard.unlock(w.range.span);
                self.windows[i].stage = Stage::Lost;
                self.stop(format!(
                    "region {region}: verify command timed out after {timeout:?}"
                ));
            }
        }
    }
}

impl Drop for VerifyJob {
    fn drop(&mut self) {
        for w in &self.windows {
            if matches!(w.stage, Stage::Reading | Stage::Repairing) {
                self.vol.guard.unlock(w.range.span);
            }
        }
        if !self.finished {
            self.shared.finish(
                JobState::Cancelled,
                Some("the job was dropped before it ended".into()),
            );
        }
    }
}

impl BackgroundJob for VerifyJob {
    type Status = VerifyStatus;

    fn step(&mut self, now: Instant) -> bool {
        VerifyJob::poll(self, now)
    }

    fn ended(&self) -> bool {
        self.is_finished()
    }

    fn report(&self) -> VerifyStatus {
        self.status()
    }
}

impl Poller for VerifyJob {
    fn poll(&mut self, ctx: &mut ReactorContext) -> PollStatus {
        reactor_step(self, ctx.now())
    }
}
