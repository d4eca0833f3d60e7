//! The engine: `numjobs` threads, each pinned to a core with its own queue pair and
//! `iodepth` DMA buffers, each keeping up to `iodepth` I/Os in flight (submit, poll a batch,
//! resubmit every slot the batch freed). The loop itself is in `job_thread.rs`.
//!
//! Timing: three clocks per I/O, as fio defines them, each recorded in nanoseconds in an HDR
//! histogram per direction (3 significant digits).
//!
//! - `slat`, submission latency: from the moment the I/O became ready to issue to the moment
//!   its `submit` returned. In a closed loop an I/O is ready when its slot was freed, that is
//!   at the stamp of the poll that reaped the previous I/O of the slot (the first I/O of each
//!   slot: when the loop started), so `slat` holds the submission work of the commands ahead
//!   of it in the batch, the offset draw and its own submission (for an in-process `mem://`
//!   leg, the copy). In an open loop (`rate_iops`) it is ready when it is due, so `slat` also
//!   holds the wait for a free slot (coordinated omission is counted, not hidden).
//! - `clat`, completion latency: from the return of its `submit` to the poll that reaped its
//!   completion (the stamp taken after that poll returned).
//! - `lat`, total latency: `slat + clat`, from ready to reaped. In a closed loop every slot's
//!   time is cut into such cycles with no gap between them, so IOPS × mean(`lat`) is `iodepth`
//!   (Little's law), up to the I/Os still in flight at the window's edges.
//!
//! The clock is `quanta`'s TSC clock (about 8 ns a read here, against 18 ns for a vDSO
//! `clock_gettime`): one read per I/O, just after its `submit` returned, and one per poll,
//! just after it returned; the same poll stamp ends the `clat` of what it reaped and starts
//! the `slat` of the I/Os that reuse the freed slots.
//!
//! End. With `time_based` a thread runs until `ramp_time + runtime`. Without it, it also stops
//! submitting once it has submitted `io_size` (default `size`) bytes after the ramp, and ends
//! when those I/Os are done, or at `ramp_time + runtime`, whichever is first.
//!
//! Ramp. I/Os reaped before `ramp_time` has passed are not counted; the measured window is
//! `[ramp_time, end]`, and I/Os still in flight at its end are drained without being counted.
//! Failed I/Os are counted as errors whenever they complete, ramp and drain included.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use nvmirror_nvme::{BlockDevice, Status};

use crate::histlog::IntervalLog;
use crate::job::{JobSpec, RwMode};
use crate::verify::VerifyFailure;
use crate::{Error, Result};

/// Highest latency the histograms resolve (one hour); longer ones are recorded as this.
pub const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// Significant decimal digits the histograms keep.
pub const HIST_SIGFIG: u8 = 3;

/// How long a job waits for its in-flight I/Os after the run before giving up on them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest buffer memory one job thread may ask for.
pub const MAX_JOB_BUFFER_BYTES: u64 = 4 << 30;

/// An empty latency histogram in nanoseconds.
pub fn latency_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG)
        .map_err(|e| Error::Histogram(e.to_string()))
}

/// One empty latency histogram per direction ([`Direction::index`]).
pub fn latency_histograms() -> Result<[Histogram<u64>; 3]> {
    Ok([
        latency_histogram()?,
        latency_histogram()?,
        latency_histogram()?,
    ])
}

/// A direction of I/O, as fio reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
    Trim,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Self::Read, Self::Write, Self::Trim];

    /// Index into per-direction arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// fio's name (`read`, `write`, `trim`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Trim => "trim",
        }
    }

    /// Whether a job of mode `rw` issues this direction.
    pub fn issued_by(self, rw: RwMode) -> bool {
        match self {
            Self::Read => rw.reads(),
            Self::Write => rw.writes(),
            Self::Trim => rw.trims(),
        }
    }
}

/// What `--verify` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Blocks whose stamp was checked (reads and the read-back pass).
    pub blocks_checked: u64,
    /// Blocks that failed.
    pub failures: u64,
    /// The first failure.
    pub first: Option<VerifyFailure>,
}

impl VerifyStats {
    /// Counts one failed block.
    #[inline]
    pub fn fail(&mut self, failure: VerifyFailure) {
        self.failures += 1;
        self.first.get_or_insert(failure);
    }
}

/// What one job thread (or all of them, merged) measured.
#[derive(Clone, Debug)]
pub struct JobStats {
    /// Completion latency (`clat`) of successful reads in the measured window; its count is
    /// the number of reads.
    pub read: Histogram<u64>,
    /// The same for writes.
    pub write: Histogram<u64>,
    /// The same for trims.
    pub trim: Histogram<u64>,
    /// Bytes transferred by the counted I/Os, per direction ([`Direction::index`]).
    pub io_bytes: [u64; 3],
    /// Submission latency (`slat`) of the same I/Os, per direction ([`Direction::index`]):
    /// from ready (slot freed, or due in an open loop) to the return of `submit`.
    pub slat: [Histogram<u64>; 3],
    /// Total latency (`lat`, `slat + clat`) of the same I/Os, per direction: from ready to the
    /// poll that reaped the completion.
    pub lat: [Histogram<u64>; 3],
    /// I/Os that completed with a non-success status, or never completed (`unfinished`).
    pub errors: u64,
    /// The status of the first failed I/O.
    pub first_error: Option<Status>,
    /// I/Os still outstanding when the drain after the run gave up.
    pub unfinished: u64,
    /// Length of the measured window (the longest of all threads once merged).
    pub runtime: Duration,
    /// Verification results (all zero without `--verify`).
    pub verify: VerifyStats,
    /// Per-interval latency histograms, with `--hdr-log`.
    pub intervals: Option<IntervalLog>,
}

impl JobStats {
    /// Empty statistics.
    pub fn new() -> Result<Self> {
        Ok(Self {
            read: latency_histogram()?,
            write: latency_histogram()?,
            trim: latency_histogram()?,
            io_bytes: [0; 3],
            slat: latency_histograms()?,
            lat: latency_histograms()?,
            errors: 0,
            first_error: None,
            unfinished: 0,
            runtime: Duration::ZERO,
            verify: VerifyStats::default(),
            intervals: None,
        })
    }

    /// The completion-latency histogram of `dir`.
    pub fn clat(&self, dir: Direction) -> &Histogram<u64> {
        match dir {
            Direction::Read => &self.read,
            Direction::Write => &self.write,
            Direction::Trim => &self.trim,
        }
    }

    /// The submission-latency histogram of `dir`.
    pub fn slat(&self, dir: Direction) -> &Histogram<u64> {
        &self.slat[dir.index()]
    }

    /// The total-latency histogram of `dir`.
    pub fn total_lat(&self, dir: Direction) -> &Histogram<u64> {
        &self.lat[dir.index()]
    }

    /// Adds another thread's numbers, like fio's `group_reporting`.
    pub fn merge(&mut self, other: &JobStats) -> Result<()> {
        let add = |a: &mut Histogram<u64>, b: &Histogram<u64>| {
            a.add(b).map_err(|e| Error::Histogram(format!("{e:?}")))
        };
        add(&mut self.read, &other.read)?;
        add(&mut self.write, &other.write)?;
        add(&mut self.trim, &other.trim)?;
        for (a, b) in self.io_bytes.iter_mut().zip(other.io_bytes) {
            *a += b;
        }
        for (a, b) in self.slat.iter_mut().zip(&other.slat) {
            add(a, b)?;
        }
        for (a, b) in self.lat.iter_mut().zip(&other.lat) {
            add(a, b)?;
        }
        self.errors += other.errors;
        self.first_error = self.first_error.or(other.first_error);
        self.unfinished += other.unfinished;
        self.runtime = self.runtime.max(other.runtime);
        self.verify.blocks_checked += other.verify.blocks_checked;
        self.verify.failures += other.verify.failures;
        self.verify.first = self.verify.first.or(other.verify.first);
        if let Some(theirs) = &other.intervals {
            self.intervals
                .get_or_insert_with(IntervalLog::default)
                .merge(theirs)?;
        }
        Ok(())
    }

    /// Counts one failed I/O.
    #[inline]
    pub fn fail(&mut self, status: Status) {
        self.errors += 1;
        self.first_error.get_or_insert(status);
    }
}

/// The result of a run: the job, the device it ran against, and all threads merged.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub spec: JobSpec,
    /// The target's name (its URI).
    pub target: String,
    pub stats: JobStats,
}

/// Runs `spec` against `target` and returns the merged statistics once every thread is done.
pub fn run(target: &Arc<dyn BlockDevice>, spec: &JobSpec) -> Result<RunResult> {
    let geo = target.geometry();
    let layout = spec.layout(geo)?;
    let buffers =
        spec.bs_bounds().1 * u64::from(spec.iodepth) * if spec.rw.is_mixed() { 2 } else { 1 };
    if buffers > MAX_JOB_BUFFER_BYTES {
        return Err(Error::Flag {
            flag: "--iodepth",
            reason: format!(
                "{} buffers of --bs {} need {buffers} bytes per job, more than {MAX_JOB_BUFFER_BYTES}",
                spec.iodepth, spec.bs_bounds().1
            ),
        });
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let gate = StartGate::new(spec.numjobs);
    let outcomes: Vec<(u32, Result<Option<JobStats>>)> = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(spec.numjobs as usize);
        let mut outcomes = Vec::new();
        for job in 0..spec.numjobs {
            let core = (!cores.is_empty()).then(|| cores[job as usize % cores.len()]);
            let (target, gate) = (&**target, &gate);
            let spawned = std::thread::Builder::new()
                .name(format!("bench-job{job}"))
                .spawn_scoped(s, move || {
                    crate::job_thread::run_job(target, spec, layout, job, core, gate)
                });
            match spawned {
                Ok(h) => handles.push((job, h)),
                Err(source) => {
                    gate.abort();
                    outcomes.push((job, Err(Error::SpawnJob { job, source })));
                    break;
                }
            }
        }
        for (job, h) in handles {
            let outcome = h.join().unwrap_or(Err(Error::JobPanicked { job }));
            outcomes.push((job, outcome));
        }
        outcomes
    });
    let mut stats = JobStats::new()?;
    let mut first_err = None;
    for (_, outcome) in outcomes {
        match outcome {
            Ok(Some(s)) => stats.merge(&s)?,
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(RunResult {
        spec: spec.clone(),
        target: target.name().to_string(),
        stats,
    })
}

/// Lets job threads start measuring together once all have opened their queue pairs, or
/// stops them all if one could not.
#[derive(Debug)]
pub(crate) struct StartGate {
    jobs: u32,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    arrived: u32,
    failed: bool,
    aborted: bool,
}

impl StartGate {
    fn new(jobs: u32) -> Self {
        Self {
            jobs,
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    /// Reports this thread ready (or failed) and waits for the others; true means go.
    pub(crate) fn arrive(&self, ready: bool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.arrived += 1;
        st.failed |= !ready;
        self.changed.notify_all();
        while st.arrived < self.jobs && !st.aborted && !st.failed {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.aborted && !st.failed
    }

    fn abort(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted = true;
        self.changed.notify_all();
    }
}
