//! The resync job: copies a Resyncing leg's regions from an in-sync leg, window by window, and
//! flips the leg to InSync when nothing is left.
//!
//! Life of a job: `Starting` (a sweep over the guard waits out host writes that read the leg
//! states before the leg entered Resyncing, so every write still to come reaches the leg),
//! then passes over the region set in ascending order — each region locked, read from the
//! source, written to the target, cleared from the set, unlocked — until a pass finds the set
//! empty; then a flush of the target and the flip (one CAS). Cancel, a failure, or the leg
//! leaving Resyncing ends the job with the leg Faulted and the regions not copied still marked.

mod copy;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{Completion, IoCommand, IoOp, Status};
use nvmirror_poller::{PollStatus, Poller, ReactorContext};

use super::channels::LegChannels;
use super::driver::{reactor_step, run_to_end, BackgroundJob};
use super::progress::JobShared;
use super::rate::{Pace, TokenBucket};
use super::source::RegionSource;
use super::window::{GuardSweep, RegionRange};
use super::{JobState, ResyncConfig, ResyncStatus};
use crate::legs::{LegState, MAX_LEGS};
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
    /// The metadata thread is writing the whole bitmap to the target (this ticket).
    WritingBitmap(u64),
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
    /// Lost: the leg its abandoned command went to (counted in that leg's `abandoned`).
    lost_on: usize,
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
    /// The rebuilt leg's device, told that a catch-up runs until the leg is in sync
    /// ([`BlockDevice::catch_up`]).
    catching_up: Option<Arc<dyn nvmirror_nvme::BlockDevice>>,
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
                lost_on: leg,
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
        let catching_up = vol.legs[leg].get().map(|l| Arc::clone(&l.dev));
        if let Some(dev) = &catching_up {
            dev.catch_up(true);
        }
        Ok(Self {
            catching_up,
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
            Phase::WritingBitmap(ticket) => {
                let ticket = *ticket;
                match self.vol.whole_bitmap_written(self.leg, ticket) {
                    None => {}
                    Some(ok) => {
                        self.phase = Phase::Copying;
                        self.on_bitmap_written(ok);
                        work = true;
                    }
                }
            }
            Phase::Copying | Phase::Flushing => {}
        }
        work |= self.reap(now);
        self.check_stop();
        // Before winding down too: a stopping job waits for its windows in flight, and one
        // its leg never answers must still be given up (releasing its region's guard).
        self.check_timeouts(now);
        if self.stopping.is_some() {
            self.wind_down();
            return true;
        }
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
        run_to_end(self)
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
        if busy || matches!(self.phase, Phase::Flushing | Phase::WritingBitmap(_)) {
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

    /// The catch-up is whole: the leg flipped in sync. (A job that stops short leaves the
    /// leg's device told that a catch-up runs: what it copied is only part of one.)
    fn end_catch_up(&mut self) {
        if let Some(dev) = self.catching_up.take() {
            dev.catch_up(false);
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
        // A persistent volume's leg gets the whole write-intent bitmap before it counts as in
        // sync: the metadata thread writes it, this poller looks for the result.
        match self.vol.request_whole_bitmap(self.leg) {
            Some(ticket) => self.phase = Phase::WritingBitmap(ticket),
            None => self.on_bitmap_written(true),
        }
    }

    /// The whole bitmap is on the target (or failed to get there): flip the leg.
    fn on_bitmap_written(&mut self, ok: bool) {
        if !ok {
            self.vol
                .fault_on_io(self.leg, None, Status::WRITE_FAULT, "resync bitmap");
            self.stop(
                JobState::Failed,
                Some(format!("leg {}: the bitmap could not be written", self.leg)),
            );
            return;
        }
        // Regions marked meanwhile: another pass, flush and bitmap first.
        if self.stopping.is_some() || self.regions.next_region(0).is_some() {
            return;
        }
        match self.vol.states.finish_resync(self.leg) {
            Ok(()) => {
                // The metadata thread records the new member; writes acknowledged from now
                // on wait for it.
                self.vol.persist_leg_states();
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
                self.end_catch_up();
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
        // Commands of lost windows, and of windows cut off in flight, may still be in a back
        // end: the legs they went to stay busy, and the windows' buffers alive, until the queue
        // pairs' close fence says they are over.
        let mut lost = [0u32; MAX_LEGS];
        for w in &self.windows {
            let leg = match w.stage {
                Stage::Lost => w.lost_on,
                Stage::Reading => w.source,
                Stage::Writing => self.leg,
                _ => continue,
            };
            if w.stage != Stage::Lost {
                if let Some(l) = self.vol.leg(leg) {
                    l.abandoned
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            lost[leg] += 1;
        }
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
        let fence = self.channels.close();
        let windows = std::mem::take(&mut self.windows);
        let vol = Arc::clone(&self.vol);
        fence.then(move || {
            drop(windows);
            for (leg, &n) in lost.iter().enumerate() {
                if let Some(l) = vol.leg(leg).filter(|_| n > 0) {
                    l.abandoned
                        .fetch_sub(n, std::sync::atomic::Ordering::Release);
                }
            }
        });
    }
}

impl BackgroundJob for ResyncJob {
    type Status = ResyncStatus;

    fn step(&mut self, now: Instant) -> bool {
        ResyncJob::poll(self, now)
    }

    fn ended(&self) -> bool {
        self.is_finished()
    }

    fn report(&self) -> ResyncStatus {
        self.status()
    }
}

impl Poller for ResyncJob {
    fn poll(&mut self, ctx: &mut ReactorContext) -> PollStatus {
        reactor_step(self, ctx.now())
    }
}

#[cfg(test)]
mod tests {
    use nvmirror_nvme::backend::{LatencyModel, MemDevice};
    use nvmirror_nvme::BlockDevice;

    use super::*;
    use crate::{Volume, VolumeConfig};

    #[test]
    fn the_job_waits_out_writes_holding_the_guard_before_it_reads_the_region_set() {
        let mem = || -> Arc<dyn BlockDevice> {
            Arc::new(MemDevice::new(8 << 20, 512, LatencyModel::None).unwrap())
        };
        let vol = Volume::new("v", vec![mem(), mem()], VolumeConfig::default()).unwrap();
        vol.fault_leg(1).unwrap();
        // A write that read the leg states before the attach (leg 1 out) holds its guard
        // entries and has not marked its region yet.
        let lba = 3 * 2048 + 5; // region 3 of 1 MiB regions
        let held = vol.shared().guard.span(lba, 1);
        assert!(vol.shared().guard.try_lock(held));
        let mut job = vol.attach_leg(1).unwrap();
        for _ in 0..20 {
            job.poll(Instant::now());
        }
        assert_eq!(job.status().state, JobState::Starting, "the sweep waits");
        // The write marks its region and completes.
        vol.shared().leg(1).unwrap().missed.mark(lba, 1);
        vol.shared().guard.unlock(held);
        let status = job.run_blocking();
        assert_eq!(status.state, JobState::Done);
        assert_eq!(
            status.regions_copied, 1,
            "the region marked before the sweep passed"
        );
        assert_eq!(vol.missed_region_count(1).unwrap(), 0);
    }
}
