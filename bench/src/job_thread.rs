//! One job thread: its queue pair, buffers and generator, the submit/poll loop, the drain and
//! the verify read-back pass. See [`crate::engine`] for how time is measured.
//!
//! Everything the loop touches is allocated before the start gate opens; per I/O the loop does
//! no allocation, takes no lock and makes no syscall beyond the queue pair's own, and reads the
//! clock once per I/O and once per poll.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvmirror_nvme::dma::{DmaBuf, DmaPool, IoBuf};
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::engine::{latency_histograms, Direction, JobStats, StartGate, DRAIN_TIMEOUT};
use crate::histlog::IntervalRecorder;
use crate::job::{IoLayout, JobSpec, VerifyMode};
use crate::pattern::IoPattern;
use crate::verify::BlockVerifier;
use crate::{Error, Result};

const READ: u8 = Direction::Read as u8;
const WRITE: u8 = Direction::Write as u8;
const TRIM: u8 = Direction::Trim as u8;

/// A redrawn offset whose blocks are in flight is given up after this many tries per batch.
const CLAIM_TRIES: u32 = 8;

/// One job thread's queue pair, buffers and generator.
struct JobQueue {
    qp: Box<dyn QueuePair>,
    pool: DmaPool,
    /// Buffers taken from `pool` for the whole run: slot `s` reads into `bufs[s]` and writes
    /// from `bufs[write_base + s]` (the same buffer unless the job mixes reads and writes, so
    /// reads never clobber the write pattern).
    bufs: Vec<DmaBuf>,
    write_base: usize,
    /// Per slot: the views of its read and write buffers at `bs` (the high end of `bsrange`),
    /// built once so the loop need not.
    read_io: Vec<IoBuf>,
    write_io: Vec<IoBuf>,
    pattern: IoPattern,
}

impl JobQueue {
    fn open(target: &dyn BlockDevice, spec: &JobSpec, layout: IoLayout, job: u32) -> Result<Self> {
        let depth = spec.iodepth as usize;
        let qp = target
            .open_qpair(spec.iodepth)
            .map_err(|source| Error::OpenQueuePair { job, source })?;
        let sets = if spec.rw.is_mixed() { 2 } else { 1 };
        let max_bs = spec.bs_bounds().1 as usize;
        let mut pool = DmaPool::new(spec.iodepth * sets, max_bs);
        let mut bufs: Vec<DmaBuf> = std::iter::from_fn(|| pool.get()).collect();
        let write_base = (sets as usize - 1) * depth;
        if spec.rw.writes() {
            let mut rng = SmallRng::seed_from_u64(spec.seed ^ 0x5eed_f111 ^ u64::from(job));
            for buf in &mut bufs[write_base..] {
                let bytes = buf.as_mut_slice();
                rng.fill_bytes(bytes);
                for b in bytes.iter_mut().filter(|b| **b == 0) {
                    *b = 0xa5;
                }
            }
        }
        let read_io = bufs[..depth]
            .iter()
            .map(|b| b.io_buf().prefix(max_bs))
            .collect();
        let write_io = bufs[write_base..]
            .iter()
            .map(|b| b.io_buf().prefix(max_bs))
            .collect();
        Ok(Self {
            qp,
            pool,
            bufs,
            write_base,
            read_io,
            write_io,
            pattern: IoPattern::new(spec, layout, job),
        })
    }
}

/// What a slot's command is, for its completion: the part every job needs.
#[derive(Clone, Copy, Debug, Default)]
struct SlotState {
    /// When the command became ready to issue (its slot freed, or due in an open loop), ns
    /// since the thread's epoch: where `slat` and `lat` start.
    ready: u64,
    /// When its `submit` returned: where `slat` ends and `clat` starts.
    submitted: u64,
    /// Length in units.
    units: u32,
    dir: u8,
}

/// The rest, kept (and written) only by verify jobs, so a plain loop stores as little per I/O
/// as it can.
#[derive(Clone, Copy, Debug, Default)]
struct SlotExtra {
    /// First unit.
    unit: u64,
    /// Generation stamped into a verified write.
    generation: u64,
}

/// Open-loop schedule: I/O `i` is due `i / rate` seconds after the thread's epoch.
#[derive(Debug)]
struct Pacer {
    rate: u64,
    issued: u64,
    next_due: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            issued: 0,
            next_due: 0,
        }
    }

    #[inline]
    fn advance(&mut self) {
        self.issued += 1;
        self.next_due = (u128::from(self.issued) * 1_000_000_000 / u128::from(self.rate)) as u64;
    }
}

pub(crate) fn run_job(
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
    let ramp_end = spec.ramp_time.as_nanos() as u64;
    let active = Direction::ALL.map(|d| d.issued_by(spec.rw));
    // Everything the loop needs is allocated before the start.
    let setup = JobQueue::open(target, spec, layout, job).and_then(|q| {
        let intervals = match spec.log_interval {
            Some(iv) => Some(IntervalRecorder::new(iv, ramp_end, active)?),
            None => None,
        };
        Ok((
            q,
            JobStats::new()?,
            latency_histograms()?,
            latency_histograms()?,
            latency_histograms()?,
            intervals,
        ))
    });
    if !gate.arrive(setup.is_ok()) {
        return setup.map(|_| None);
    }
    let (mut q, mut stats, mut slat, mut clat, mut lat, mut intervals) = setup?;
    let lba_size = target.geometry().lba_size;
    let unit_bytes = layout.unit_bytes(lba_size);
    let mut verifier = (spec.verify != VerifyMode::None).then(|| {
        let mut v = BlockVerifier::new(
            q.pattern.range(),
            layout.first_lba,
            layout.nlb,
            lba_size,
            spec.rw.writes(),
            spec.seed.wrapping_add(u64::from(job)),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        );
        if spec.verify_ledger.is_some() {
            v.record_acked();
        }
        v
    });
    let depth = spec.iodepth as usize;
    let mut free: Vec<u32> = (0..spec.iodepth).rev().collect();
    // Slots whose command failed while a leg may still use their buffers
    // (`QueuePair::buffer_lent`): out of use until the queue pair gives them back.
    let mut lent = 0usize;
    let mut released = [0u64; 16];
    let mut slots = vec![SlotState::default(); depth];
    let mut extra = vec![SlotExtra::default(); depth];
    let mut cpl = vec![Completion::default(); depth];
    let end = ramp_end + spec.runtime.as_nanos() as u64;
    let mut pacer = spec.rate_iops.map(Pacer::new);
    let mut budget = if spec.time_based {
        u64::MAX
    } else {
        spec.io_size.unwrap_or(layout.units * unit_bytes)
    };
    let mut exhausted = false;
    let fixed_size = layout.max_units <= 1;
    let tracked = verifier.is_some();

    // One TSC clock for every stamp of the thread: ns since `epoch`, about 8 ns a read. It is
    // read once per I/O (after its submit returned) and once per poll (after it returned).
    let clock = quanta::Clock::new();
    let epoch = clock.raw();
    let ns = |clock: &quanta::Clock| clock.delta_as_nanos(epoch, clock.raw());
    // The latest poll stamp (the loop's start, before the first poll).
    let mut now = ns(&clock);
    // Per slot: when it was last freed, where the `slat` of its next command starts in a
    // closed loop.
    let mut freed_at = vec![now; depth];
    let window_end = loop {
        if !free.is_empty() && !exhausted {
            let counted = now >= ramp_end;
            let mut tries = 0;
            while let Some(&slot) = free.last() {
                let ready = match &pacer {
                    Some(p) if p.next_due > now => break,
                    Some(p) => p.next_due,
                    None => freed_at[slot as usize],
                };
                let io = q.pattern.next_io();
                if let Some(v) = &mut verifier {
                    if !v.claim(io.unit, io.units) {
                        tries += 1;
                        if tries >= CLAIM_TRIES {
                            break;
                        }
                        continue;
                    }
                }
                let bytes = u64::from(io.units) * unit_bytes;
                if counted {
                    if bytes > budget {
                        exhausted = true;
                        if let Some(v) = &mut verifier {
                            v.release(io.unit, io.units, Some(0));
                        }
                        break;
                    }
                    budget -= bytes;
                }
                let s = slot as usize;
                let slba = layout.first_lba + io.unit * u64::from(layout.nlb);
                let nlb = io.units * layout.nlb;
                let mut generation = 0;
                let (cmd, dir) = match io.op {
                    IoOp::Write => {
                        if let Some(v) = &mut verifier {
                            generation = v.next_generation();
                            let buf = q.bufs[q.write_base + s].as_mut_slice();
                            v.stamp(buf, io.unit, io.units, generation);
                        }
                        let b = sized(q.write_io[s], bytes, fixed_size);
                        (
                            IoCommand::with_buf(io.op, slba, nlb, b, u64::from(slot)),
                            WRITE,
                        )
                    }
                    IoOp::Read => {
                        let b = sized(q.read_io[s], bytes, fixed_size);
                        (
                            IoCommand::with_buf(io.op, slba, nlb, b, u64::from(slot)),
                            READ,
                        )
                    }
                    op => (IoCommand::new(op, slba, nlb, u64::from(slot)), TRIM),
                };
                // SAFETY: the buffer belongs to `q.pool`, which outlives every command (it is
                // leaked below if a command never completes); a slot has one command at a time,
                // and nothing touches a slot's buffers until its completion is reaped.
                if unsafe { q.qp.submit(cmd) }.is_err() {
                    if let Some(v) = &mut verifier {
                        v.release(io.unit, io.units, Some(0));
                    }
                    if counted {
                        budget += bytes;
                    }
                    break;
                }
                // The one clock read per I/O: `slat` ends and `clat` starts here.
                let submitted = ns(&clock);
                free.pop();
                if let Some(p) = &mut pacer {
                    p.advance();
                }
                slots[s] = SlotState {
                    ready,
                    submitted,
                    units: io.units,
                    dir,
                };
                if tracked {
                    extra[s] = SlotExtra {
                        unit: io.unit,
                        generation,
                    };
                }
            }
        }
        let n = q.qp.poll(&mut cpl);
        // The one clock read per poll: the `clat` of what it reaped ends here, and the `slat`
        // of the commands that reuse the freed slots starts here.
        now = ns(&clock);
        let counting = now >= ramp_end;
        for c in &cpl[..n] {
            // The tag is the slot index submitted above, returned unchanged by the back end.
            let slot = c.tag as usize;
            let st = slots[slot];
            let ok = c.status.is_success();
            if !ok {
                stats.fail(c.status);
            } else if counting {
                let d = st.dir as usize;
                // An open-loop command may be sent after the stamp that found it due.
                slat[d].saturating_record(st.submitted.saturating_sub(st.ready));
                clat[d].saturating_record(now - st.submitted);
                let total = now.saturating_sub(st.ready);
                lat[d].saturating_record(total);
                if !fixed_size {
                    stats.io_bytes[d] += u64::from(st.units) * unit_bytes;
                }
                if let Some(iv) = &mut intervals {
                    iv.record(st.dir as usize, total);
                }
            }
            if let Some(v) = &mut verifier {
                settle_verified(v, &q, &st, &extra[slot], slot, ok, &mut stats);
            }
            if !ok && q.qp.buffer_lent(c.tag) {
                lent += 1;
            } else {
                free.push(slot as u32);
                freed_at[slot] = now;
            }
        }
        if lent > 0 {
            let back = reclaim(&mut *q.qp, &mut released, &mut free);
            for &t in &released[..back] {
                freed_at[t as usize] = now;
            }
            lent -= back;
        }
        if counting {
            if let Some(iv) = &mut intervals {
                iv.tick(now);
            }
        }
        if now >= end || (exhausted && free.len() + lent == depth) {
            break now;
        }
    };
    stats.runtime = Duration::from_nanos(window_end - ramp_end);
    if fixed_size {
        for (bytes, h) in stats.io_bytes.iter_mut().zip(&clat) {
            *bytes = h.len() * unit_bytes;
        }
    }
    stats.intervals = intervals.map(|iv| iv.finish(window_end));
    let [read, write, trim] = clat;
    stats.read = read;
    stats.write = write;
    stats.trim = trim;
    stats.slat = slat;
    stats.lat = lat;

    // Drain: the buffers must outlive every command, so wait for the stragglers and for
    // the lent buffers to come back.
    let mut inflight = depth - free.len() - lent;
    let mut give_up = Instant::now() + DRAIN_TIMEOUT;
    while inflight + lent > 0 {
        let n = q.qp.poll(&mut cpl);
        for c in &cpl[..n] {
            let ok = c.status.is_success();
            if !ok {
                stats.fail(c.status);
            }
            let slot = c.tag as usize;
            if let Some(v) = &mut verifier {
                settle_verified(v, &q, &slots[slot], &extra[slot], slot, ok, &mut stats);
            }
            if !ok && q.qp.buffer_lent(c.tag) {
                lent += 1;
            } else {
                free.push(slot as u32);
            }
        }
        inflight -= n;
        let back = if lent > 0 {
            reclaim(&mut *q.qp, &mut released, &mut free)
        } else {
            0
        };
        lent -= back;
        if n + back > 0 {
            give_up = Instant::now() + DRAIN_TIMEOUT;
        } else if Instant::now() >= give_up {
            break;
        } else {
            std::hint::spin_loop();
        }
    }
    if let (Some(v), Some(path)) = (&verifier, &spec.verify_ledger) {
        if v.writer() {
            let path = match job {
                0 => path.clone(),
                n => std::path::PathBuf::from(format!("{}.{n}", path.display())),
            };
            if let Err(e) = v.write_ledger(&path) {
                eprintln!("--verify-ledger {}: {e}", path.display());
            }
        }
    }
    if inflight + lent > 0 {
        // Lent buffers that never came back completed (their failure is counted) but are
        // still the back end's.
        stats.unfinished = inflight as u64;
        stats.errors += inflight as u64;
        // The device may still write into the buffers: never free them.
        std::mem::forget(q.pool);
        return Ok(Some(stats));
    }
    if let Some(v) = &verifier {
        if v.writer() && !read_back(&mut q, v, &mut cpl, &mut stats) {
            std::mem::forget(q.pool);
            return Ok(Some(stats));
        }
    }
    for b in q.bufs {
        q.pool.put(b);
    }
    Ok(Some(stats))
}

/// Slots whose lent buffers the queue pair gave back go back to `free`; returns how many.
#[cold]
fn reclaim(qp: &mut dyn QueuePair, tags: &mut [u64], free: &mut Vec<u32>) -> usize {
    let n = qp.poll_released(tags);
    free.extend(tags[..n].iter().map(|&t| t as u32));
    n
}

/// The first `bytes` of a slot's buffer; the whole view when every I/O has one size.
#[inline(always)]
fn sized(buf: IoBuf, bytes: u64, fixed_size: bool) -> IoBuf {
    if fixed_size {
        buf
    } else {
        buf.prefix(bytes as usize)
    }
}

/// Checks a completed verified I/O and releases its blocks in the ledger.
#[inline]
fn settle_verified(
    v: &mut BlockVerifier,
    q: &JobQueue,
    st: &SlotState,
    ex: &SlotExtra,
    slot: usize,
    ok: bool,
    stats: &mut JobStats,
) {
    match (st.dir, ok) {
        (WRITE, true) => v.release(ex.unit, st.units, Some(ex.generation)),
        (WRITE, false) => v.release(ex.unit, st.units, None),
        (READ, true) => {
            v.check_io(
                q.bufs[slot].as_slice(),
                ex.unit,
                st.units,
                &mut stats.verify,
            );
            v.release(ex.unit, st.units, Some(0));
        }
        _ => v.release(ex.unit, st.units, Some(0)),
    }
}

/// fio's verify phase: reads back every block this thread wrote and checks that it holds the
/// last generation acknowledged for it. Not timed. False when some reads never completed
/// (they are counted as unfinished errors, and the buffers must not be freed).
fn read_back(
    q: &mut JobQueue,
    v: &BlockVerifier,
    cpl: &mut [Completion],
    stats: &mut JobStats,
) -> bool {
    let bb = v.block_bytes();
    let runs = v.written_runs((q.pool.buf_size() / bb) as u64);
    let depth = q.read_io.len().min(cpl.len());
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut slot_run = vec![(0u64, 0u64); depth];
    let mut next = 0;
    let mut inflight = 0;
    let mut give_up = Instant::now() + DRAIN_TIMEOUT;
    while next < runs.len() || inflight > 0 {
        while next < runs.len() {
            let Some(&s) = free.last() else { break };
            let (first, count) = runs[next];
            let buf = q.read_io[s].prefix(count as usize * bb);
            let cmd = IoCommand::with_buf(IoOp::Read, v.lba(first), count as u32, buf, s as u64);
            // SAFETY: as in the main loop: the buffer belongs to `q.pool`, which outlives the
            // command, and the slot's buffer is not touched until its completion is reaped.
            if unsafe { q.qp.submit(cmd) }.is_err() {
                break;
            }
            free.pop();
            slot_run[s] = runs[next];
            next += 1;
            inflight += 1;
        }
        let n = q.qp.poll(cpl);
        for c in &cpl[..n] {
            let s = c.tag as usize;
            if c.status.is_success() {
                let (first, count) = slot_run[s];
                v.check_blocks(q.bufs[s].as_slice(), first, count, true, &mut stats.verify);
            } else {
                stats.fail(c.status);
            }
            free.push(s);
        }
        inflight -= n;
        if n > 0 {
            give_up = Instant::now() + DRAIN_TIMEOUT;
        } else if Instant::now() >= give_up {
            stats.unfinished += inflight as u64;
            stats.errors += inflight as u64;
            return false;
        }
    }
    true
}
