//! The closed-loop engine: `numjobs` threads, each pinned to a core with its own queue pair
//! and `iodepth` DMA buffers, each keeping `iodepth` I/Os in flight (submit, poll a batch,
//! resubmit every slot the batch freed).
//!
//! Timing. Completion latency is the time from submission to the poll that reaped the
//! completion, recorded in nanoseconds in an HDR histogram (3 significant digits). The clock
//! is read once per submit batch and once per poll batch, not once per I/O: every command of
//! a batch gets the batch's submit stamp, taken *before* the first submission, and every
//! completion of a poll gets the stamp taken *after* the poll returned. A latency is thus never
//! under-stated; it may include the submission work of the commands ahead of it in its batch
//! (on `mem://`, where submission copies the data, that is most of the service time). Two
//! clock reads per batch (a vDSO `clock_gettime` each) are shared by up to `iodepth` I/Os
//! instead of being paid by every one.
//!
//! Ramp. I/Os reaped before `ramp_time` has passed are not counted; the measured window is
//! `[ramp_time, first poll at or after ramp_time + runtime]`, and I/Os still in flight at its
//! end are drained without being counted. Failed I/Os are counted as errors whenever they
//! complete, ramp and drain included.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nvmirror_nvme::dma::{DmaBuf, DmaPool, IoBuf};
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::job::{IoLayout, IoPattern, JobSpec};
use crate::{Error, Result};

/// Highest latency the histograms resolve (one hour); longer ones are recorded as this.
pub const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// Significant decimal digits the histograms keep.
pub const HIST_SIGFIG: u8 = 3;

/// How long a job waits for its in-flight I/Os after the run before giving up on them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest buffer memory one job thread may ask for.
pub const MAX_JOB_BUFFER_BYTES: u64 = 4 << 30;

/// An empty completion-latency histogram in nanoseconds.
pub fn latency_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG)
        .map_err(|e| Error::Histogram(e.to_string()))
}

/// What one job thread (or all of them, merged) measured.
#[derive(Clone, Debug)]
pub struct JobStats {
    /// Completion latency of successful reads in the measured window; its count is the
    /// number of reads.
    pub read: Histogram<u64>,
    /// The same for writes.
    pub write: Histogram<u64>,
    /// I/Os that completed with a non-success status, or never completed (`unfinished`).
    pub errors: u64,
    /// The status of the first failed I/O.
    pub first_error: Option<Status>,
    /// I/Os still outstanding when the drain after the run gave up.
    pub unfinished: u64,
    /// Length of the measured window (the longest of all threads once merged).
    pub runtime: Duration,
}

impl JobStats {
    fn new() -> Result<Self> {
        Ok(Self {
            read: latency_histogram()?,
            write: latency_histogram()?,
            errors: 0,
            first_error: None,
            unfinished: 0,
            runtime: Duration::ZERO,
        })
    }

    /// Adds another thread's numbers, like fio's `group_reporting`.
    pub fn merge(&mut self, other: &JobStats) -> Result<()> {
        let add = |a: &mut Histogram<u64>, b: &Histogram<u64>| {
            a.add(b).map_err(|e| Error::Histogram(format!("{e:?}")))
        };
        add(&mut self.read, &other.read)?;
        add(&mut self.write, &other.write)?;
        self.errors += other.errors;
        self.first_error = self.first_error.or(other.first_error);
        self.unfinished += other.unfinished;
        self.runtime = self.runtime.max(other.runtime);
        Ok(())
    }

    fn fail(&mut self, status: Status) {
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
    let layout = spec.layout(target.geometry())?;
    let buffers = spec.bs * u64::from(spec.iodepth) * if spec.rw.is_mixed() { 2 } else { 1 };
    if buffers > MAX_JOB_BUFFER_BYTES {
        return Err(Error::Flag {
            flag: "--iodepth",
            reason: format!(
                "{} buffers of --bs {} need {buffers} bytes per job, more than {MAX_JOB_BUFFER_BYTES}",
                spec.iodepth, spec.bs
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
                .spawn_scoped(s, move || run_job(target, spec, layout, job, core, gate));
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
struct StartGate {
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
    fn arrive(&self, ready: bool) -> bool {
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

/// One job thread's queue pair, buffers and generator.
struct JobQueue {
    qp: Box<dyn QueuePair>,
    pool: DmaPool,
    /// Buffers taken from `pool` for the whole run.
    bufs: Vec<DmaBuf>,
    /// Per slot: the buffer its reads land in and the one its writes come from (the same one
    /// unless the job mixes reads and writes, so reads never clobber the write pattern).
    read_buf: Vec<IoBuf>,
    write_buf: Vec<IoBuf>,
    pattern: IoPattern,
}

impl JobQueue {
    fn open(target: &dyn BlockDevice, spec: &JobSpec, layout: IoLayout, job: u32) -> Result<Self> {
        let depth = spec.iodepth as usize;
        let qp = target
            .open_qpair(spec.iodepth)
            .map_err(|source| Error::OpenQueuePair { job, source })?;
        let sets = if spec.rw.is_mixed() { 2 } else { 1 };
        let mut pool = DmaPool::new(spec.iodepth * sets, spec.bs as usize);
        let mut bufs: Vec<DmaBuf> = std::iter::from_fn(|| pool.get()).collect();
        if spec.rw.writes() {
            let mut rng = SmallRng::seed_from_u64(spec.seed ^ 0x5eed_f111 ^ u64::from(job));
            for buf in &mut bufs[(sets as usize - 1) * depth..] {
                let bytes = buf.as_mut_slice();
                rng.fill_bytes(bytes);
                for b in bytes.iter_mut().filter(|b| **b == 0) {
                    *b = 0xa5;
                }
            }
        }
        let bs = spec.bs as usize;
        let read_buf = bufs[..depth]
            .iter()
            .map(|b| b.io_buf().prefix(bs))
            .collect();
        let write_buf = bufs[(sets as usize - 1) * depth..]
            .iter()
            .map(|b| b.io_buf().prefix(bs))
            .collect();
        Ok(Self {
            qp,
            pool,
            bufs,
            read_buf,
            write_buf,
            pattern: IoPattern::new(spec, layout, job),
        })
    }
}

/// Direction index into the per-direction histograms.
const READ: usize = 0;
const WRITE: usize = 1;

fn run_job(
    target: &dyn BlockDevice,
    spec: &JobSpec,
    layout: IoLayout,
    job: u32,
    core: Option<core_affinity::CoreId>,
    gate: &StartGate,
) -> Result<Option<JobStats>> {
    if let Some(core) = core {
        // Pinning is best effort: an unpinned job still measures correctly.
        core_affinity::set_for_current(core);
    }
    // Everything the loop needs is allocated before the start.
    let setup = JobQueue::open(target, spec, layout, job).and_then(|q| {
        Ok((
            q,
            JobStats::new()?,
            [latency_histogram()?, latency_histogram()?],
        ))
    });
    if !gate.arrive(setup.is_ok()) {
        return setup.map(|_| None);
    }
    let (mut q, mut stats, mut clat) = setup?;
    let depth = spec.iodepth as usize;
    let nlb = layout.nlb;
    let mut free: Vec<u32> = (0..spec.iodepth).rev().collect();
    let mut submitted_at = vec![0u64; depth];
    let mut slot_dir = vec![READ as u8; depth];
    let mut cpl = vec![Completion::default(); depth];
    let ramp_end = spec.ramp_time.as_nanos() as u64;
    let end = ramp_end + spec.runtime.as_nanos() as u64;

    let epoch = Instant::now();
    let window_end = loop {
        if !free.is_empty() {
            let stamp = epoch.elapsed().as_nanos() as u64;
            while let Some(slot) = free.pop() {
                let s = slot as usize;
                let (op, slba) = q.pattern.next_io();
                let (buf, dir) = if op == IoOp::Write {
                    (q.write_buf[s], WRITE)
                } else {
                    (q.read_buf[s], READ)
                };
                let cmd = IoCommand::with_buf(op, slba, nlb, buf, u64::from(slot));
                // SAFETY: the buffer belongs to `q.pool`, which outlives every command (it is
                // leaked below if a command never completes); a slot has one command at a time,
                // and nothing touches a slot's buffers until its completion is reaped.
                if unsafe { q.qp.submit(cmd) }.is_err() {
                    free.push(slot);
                    break;
                }
                submitted_at[s] = stamp;
                slot_dir[s] = dir as u8;
            }
        }
        let n = q.qp.poll(&mut cpl);
        let now = epoch.elapsed().as_nanos() as u64;
        let counting = now >= ramp_end;
        for c in &cpl[..n] {
            // The tag is the slot index submitted above, returned unchanged by the back end.
            let slot = c.tag as usize;
            if !c.status.is_success() {
                stats.fail(c.status);
            } else if counting {
                let lat = now - submitted_at[slot];
                clat[slot_dir[slot] as usize].saturating_record(lat);
            }
            free.push(c.tag as u32);
        }
        if now >= end {
            break now;
        }
    };
    stats.runtime = Duration::from_nanos(window_end - ramp_end);

    // Drain: the buffers must outlive every command, so wait for the stragglers.
    let mut inflight = depth - free.len();
    let give_up = Instant::now() + DRAIN_TIMEOUT;
    while inflight > 0 {
        let n = q.qp.poll(&mut cpl);
        for c in &cpl[..n] {
            if !c.status.is_success() {
                stats.fail(c.status);
            }
        }
        inflight -= n;
        if n == 0 {
            if Instant::now() >= give_up {
                break;
            }
            std::hint::spin_loop();
        }
    }
    let [read, write] = clat;
    stats.read = read;
    stats.write = write;
    if inflight > 0 {
        stats.unfinished = inflight as u64;
        stats.errors += inflight as u64;
        // The device may still write into the buffers: never free them.
        std::mem::forget(q.pool);
    } else {
        for b in q.bufs {
            q.pool.put(b);
        }
    }
    Ok(Some(stats))
}
