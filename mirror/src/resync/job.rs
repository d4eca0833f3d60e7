//! The resync job: copies a Resyncing leg's regions from an in-sync leg, window by window, and
//! flips the leg to InSync when nothing is left.
//!
//! Life of a job: `Starting` (a sweep over the guard waits out host writes that read the leg
//! states before the leg entered Resyncing, so every write still to come reaches the leg),
//! then passes over the region set in ascending order — each region locked, read from the
//! source, written to the target, cleared from the set, unlocked — until a pass finds the set
//! empty; then a flush of the target and the flip (one CAS). Cancel, a failure, or the leg
//! leaving Resyncing ends the job with the leg Faulted and the regions not copied still marked.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{Completion, IoCommand, IoOp, Status};
use nvmirror_poller::{PollStatus, Poller, ReactorContext};

use super::channels::LegChannels;
use super::progress::JobShared;
use super::rate::{Pace, TokenBucket};
use super::source::RegionSource;
use super::window::{GuardSweep, RegionRange};
use super::{JobState, ResyncConfig, ResyncStatus};
use crate::legs::LegState;
use crate::volume::VolumeShared;

/// Guard entries passed per poll while starting.
const SWEEP_BUDGET: usize = 8192;
/// Tag of the final flush.
const FLUSH_TAG: u64 = u64::MAX;
/// How often the copy rate is measured.
const RATE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug)]
enum Phase {
    Starting(GuardSweep),
    Copying,
    /// The final flush of the target is out.
    Flushing,
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    /// Has a region; waiting for its guard entries.
    Locking,
    Reading,
    Writing,
    /// Its command outlived the I/O timeout; the lock is released and the window is not
    /// reused until the late completion arrives.
    Lost,
}

/// One region in flight.
#[derive(Debug)]
struct CopyWindow {
    stage: Stage,
    range: RegionRange,
    /// First block of the command in flight.
    lba: u64,
    nlb: u32,
    source: usize,
    started: Instant,
    buf: DmaBuf,
}

/// A resync of one leg. Drive it with [`poll`](Self::poll), a reactor ([`Poller`]) or
/// [`run`](Self::run).
#[derive(Debug)]
pub struct ResyncJob {
    // The queue pairs are declared first so they are dropped before the buffers they use.
    channels: LegChannels,
    windows: Vec<CopyWindow>,
    _pool: DmaPool,
    vol: Arc<VolumeShared>,
    shared: Arc<JobShared>,
    regions: Box<dyn RegionSource>,
    leg: usize,
    /// The in-sync leg copied from; replaced when it leaves sync.
    source: usize,
    max_blocks: u64,
    phase: Phase,
    cursor: u64,
    bucket: TokenBucket,
    pace: Pace,
    /// Set when the job is winding down: it waits for its windows, then ends in this state.
    stopping: Option<(JobState, Option<String>)>,
    cpl: Vec<Completion>,
    flush_started: Instant,
    rate_mark: (Instant, u64),
    bytes_done: u64,
}

impl ResyncJob {
    pub(crate) fn new(
        vol: Arc<VolumeShared>,
        shared: Arc<JobShared>,
        leg: usize,
        source: usize,
        regions: Box<dyn RegionSource>,
        cfg: ResyncConfig,
    ) -> Result<Self, String> {
        let lba_size = u64::from(vol.geo.lba_size);
        let region_bytes = vol.cfg.region_size;
        let io_bytes = u64::from(cfg.max_io_bytes).min(region_bytes).max(lba_size);
        let mut pool = DmaPool::new(cfg.windows, io_bytes as usize);
        let now = Instant::now();
        let windows = (0..cfg.windows)
            .map(|_| CopyWindow {
                stage: Stage::Free,
                range: RegionRange::of(&vol, 0),
                lba: 0,
                nlb: 0,
                source,
                started: now,
                buf: pool.get().expect("the pool has one buffer per window"),
            })
            .collect();
        let mut channels = LegChannels::new(cfg.windows + 2);
        channels.open(&vol, leg)?;
        channels.open(&vol, source)?;
        let pace = Pace::new(
            &vol,
            cfg.windows,
            cfg.latency_factor,
            cfg.sample_interval,
            now,
        );
        shared.progress().baseline_p99 = pace.baseline();
        Ok(Self {
            channels,
            windows,
            _pool: pool,
            shared,
            regions,
            leg,
            source,
            max_blocks: io_bytes / lba_size,
            phase: Phase::Starting(GuardSweep::new()),
            cursor: 0,
            bucket: TokenBucket::new(now),
            pace,
            stopping: None,
            cpl: vec![Completion::default(); 32],
            flush_started: now,
            rate_mark: (now, 0),
            bytes_done: 0,
            vol,
        })
    }

    /// The leg being rebuilt.
    pub fn leg(&self) -> usize {
        self.leg
    }

    /// The job's progress (the same as [`Volume::resync_status`](crate::Volume::resync_status)).
    pub fn status(&self) -> ResyncStatus {
        self.shared.resync_status()
    }

    /// Whether the job has ended (done, cancelled or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Does a bounded amount of work; never blocks. Returns whether it did any.
    pub fn poll(&mut self, now: Instant) -> bool {
        let mut work = false;
        match &mut self.phase {
            Phase::Finished => return false,
            Phase::Starting(sweep) => {
                if !sweep.step(&self.vol.guard, SWEEP_BUDGET) {
                    return true;
                }
                self.begin_copy(now);
                work = true;
            }
            Phase::Copying | Phase::Flushing => {}
        }
        work |= self.reap(now);
        self.check_stop();
        if self.stopping.is_some() {
            self.wind_down();
            return true;
        }
        self.check_timeouts(now);
        self.pace.sample(&self.vol, now, self.shared.adaptive());
        self.measure_rate(now);
        if matches!(self.phase, Phase::Copying) && !self.shared.paused() {
            work |= self.start_windows(now);
            work |= self.end_of_pass();
        }
        work
    }

    /// Polls on this thread until the job ends, backing off briefly while idle.
    pub fn run_blocking(&mut self) -> ResyncStatus {
        while !self.is_finished() {
            if !self.poll(Instant::now()) {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        self.status()
    }

    /// Runs the job to the end on a thread of its own (tests, the command line).
    pub fn run(mut self) -> JoinHandle<ResyncStatus> {
        std::thread::spawn(move || self.run_blocking())
    }

    fn begin_copy(&mut self, now: Instant) {
        let remaining = self.regions.remaining();
        let total = (remaining * self.vol.cfg.region_size).min(self.vol.geo.bytes());
        {
            let mut p = self.shared.progress();
            p.state = JobState::Running;
            p.passes = 1;
            p.bytes_total = total;
            p.window_limit = self.pace.limit(self.shared.adaptive());
        }
        tracing::info!(
            volume = %self.vol.name, leg = self.leg, source = self.source,
            regions = remaining, "resync copying"
        );
        self.rate_mark = (now, 0);
        self.phase = Phase::Copying;
    }

    /// Ends the job when asked to, or when its leg is no longer being resynchronised.
    fn check_stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let state = self.vol.states.snapshot().state(self.leg);
        if state != LegState::Resyncing && !matches!(self.phase, Phase::Finished) {
            self.stop(
                JobState::Failed,
                Some(format!("leg {} is {state}, not resyncing", self.leg)),
            );
        } else if self.shared.cancel_requested() {
            self.stop(JobState::Cancelled, None);
        }
    }

    fn stop(&mut self, state: JobState, error: Option<String>) {
        if self.stopping.is_none() {
            self.stopping = Some((state, error));
        }
    }

    /// Waits for the windows with I/O in flight; then takes the leg out and records the end.
    fn wind_down(&mut self) {
        for w in &mut self.windows {
            if w.stage == Stage::Locking {
                w.stage = Stage::Free;
            }
        }
        let busy = self
            .windows
            .iter()
            .any(|w| matches!(w.stage, Stage::Reading | Stage::Writing));
        if busy || matches!(self.phase, Phase::Flushing) {
            return;
        }
        let (state, error) = self.stopping.take().unwrap_or((JobState::Failed, None));
        // The leg keeps what is left marked; Faulted stops its writes until it is attached
        // again, which continues from there.
        if let Err(r) = self.vol.states.take_out(self.leg, LegState::Faulted, None) {
            tracing::debug!(volume = %self.vol.name, leg = self.leg, refusal = ?r, "leg not faulted at resync end");
        }
        tracing::warn!(
            volume = %self.vol.name, leg = self.leg, ?state, error = error.as_deref().unwrap_or(""),
            left = self.regions.remaining(), "resync stopped"
        );
        self.shared.finish(state, error);
        self.phase = Phase::Finished;
    }

    /// Starts windows while the pace and the bandwidth cap allow, in ascending region order.
    fn start_windows(&mut self, now: Instant) -> bool {
        let adaptive = self.shared.adaptive();
        let limit = self.pace.limit(adaptive) as usize;
        let mut work = false;
        loop {
            let active = self
                .windows
                .iter()
                .filter(|w| w.stage != Stage::Free)
                .count();
            if active >= limit || !self.pace.may_start(now, adaptive) {
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
    fn reap(&mut self, now: Instant) -> bool {
        let mut work = false;
        for leg in 0..crate::legs::MAX_LEGS {
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
            Stage::Lost => w.stage = Stage::Free,
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
    fn check_timeouts(&mut self, now: Instant) {
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
            self.windows[i].stage = Stage::Lost;
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

    /// At the end of a pass: another pass if regions were marked behind the cursor, else the
    /// final flush.
    fn end_of_pass(&mut self) -> bool {
        if self.windows.iter().any(|w| w.stage != Stage::Free)
            || self.regions.next_region(self.cursor).is_some()
        {
            return false;
        }
        if self.regions.next_region(0).is_some() {
            self.cursor = 0;
            let extra = self.regions.remaining() * self.vol.cfg.region_size;
            let mut p = self.shared.progress();
            p.passes += 1;
            p.bytes_total = p.bytes_done + extra;
            return true;
        }
        let cmd = IoCommand::new(IoOp::Flush, 0, 0, FLUSH_TAG);
        // SAFETY: a flush carries no buffer.
        if unsafe { self.channels.submit(self.leg, cmd) } {
            self.flush_started = Instant::now();
            self.phase = Phase::Flushing;
        } else {
            self.stop(
                JobState::Failed,
                Some("the target's queue pair refused the flush".into()),
            );
        }
        true
    }

    /// The final flush is in: flip the leg, or start another pass if something was marked.
    fn on_flush(&mut self, status: Status) {
        if !matches!(self.phase, Phase::Flushing) {
            return;
        }
        self.phase = Phase::Copying;
        if !status.is_success() {
            self.vol.fault_on_io(self.leg, None, status, "resync flush");
            self.stop(
                JobState::Failed,
                Some(format!("flushing leg {} failed: {status}", self.leg)),
            );
            return;
        }
        if self.stopping.is_some() || self.regions.next_region(0).is_some() {
            return;
        }
        match self.vol.states.finish_resync(self.leg) {
            Ok(()) => {
                let passes = {
                    let mut p = self.shared.progress();
                    p.bytes_total = p.bytes_done;
                    p.passes
                };
                tracing::info!(
                    volume = %self.vol.name, leg = self.leg, passes, bytes = self.bytes_done,
                    "resync done: leg in sync"
                );
                self.shared.finish(JobState::Done, None);
                self.phase = Phase::Finished;
            }
            Err(r) => self.stop(
                JobState::Failed,
                Some(format!("leg {} could not flip to in sync: {r:?}", self.leg)),
            ),
        }
    }

    fn measure_rate(&mut self, now: Instant) {
        let (at, bytes) = self.rate_mark;
        let dt = now.saturating_duration_since(at);
        if dt < RATE_INTERVAL {
            return;
        }
        let rate = ((self.bytes_done - bytes) as f64 / dt.as_secs_f64()) as u64;
        self.rate_mark = (now, self.bytes_done);
        let mut p = self.shared.progress();
        p.rate = if p.rate == 0 {
            rate
        } else {
            (p.rate + rate) / 2
        };
        p.window_limit = self.pace.limit(self.shared.adaptive());
    }
}

impl Drop for ResyncJob {
    fn drop(&mut self) {
        // Window locks are shared with every core: never leave one held.
        for w in &self.windows {
            if matches!(w.stage, Stage::Reading | Stage::Writing) {
                self.vol.guard.unlock(w.range.span);
            }
        }
        if !matches!(self.phase, Phase::Finished) {
            let _ = self.vol.states.take_out(self.leg, LegState::Faulted, None);
            self.shared.finish(
                JobState::Cancelled,
                Some("the job was dropped before it ended".into()),
            );
        }
    }
}

impl Poller for ResyncJob {
    fn poll(&mut self, ctx: &mut ReactorContext) -> PollStatus {
        if ResyncJob::poll(self, ctx.now()) {
            PollStatus::Busy
        } else if self.is_finished() {
            PollStatus::Done
        } else {
            PollStatus::Idle
        }
    }
}
