//! One core, 4 KiB random writes at a fixed queue depth: IOPS and mean latency of a single
//! device or of a volume mirrored over several.
//!
//!     cargo run --release -p nvmirror-mirror --example mirror_iops -- [--secs S] [--qd N]
//!         [--bs BYTES] [--read] [--no-prefill] [--raw] [--journal URI] URI [URI ...]
//!
//! `--journal URI` mirrors the last leg asynchronously through a journal on `URI`
//! (`async-journal`, docs/journal.md).
//!
//! The namespace is written once sequentially before the timed run (so a mem leg's memory is
//! allocated up front) unless `--no-prefill` is given.
//! One URI drives that device directly (the baseline); 2 to 4 URIs drive a volume over them.
//! With `--raw`, several URIs are driven by a bare fan-out instead of a volume: every command
//! to every leg, one completion when all are in, nothing else — the floor the volume's cost is
//! measured against. For example `mem://1GiB`, `null://1GiB`, `mem://1GiB?latency=20us`.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{
    open_leg, BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, Status, SubmitError,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    secs: f64,
    qd: u32,
    bs: usize,
    op: IoOp,
    prefill: bool,
    raw: bool,
    journal: Option<String>,
    uris: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        secs: 3.0,
        qd: 32,
        bs: 4096,
        op: IoOp::Write,
        prefill: true,
        raw: false,
        journal: None,
        uris: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--secs" => {
                args.secs = value("--secs")?
                    .parse()
                    .map_err(|e| format!("--secs: {e}"))?
            }
            "--qd" => args.qd = value("--qd")?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--bs" => args.bs = value("--bs")?.parse().map_err(|e| format!("--bs: {e}"))?,
            "--read" => args.op = IoOp::Read,
            "--no-prefill" => args.prefill = false,
            "--raw" => args.raw = true,
            "--journal" => args.journal = Some(value("--journal")?),
            "-h" | "--help" => return Err(String::new()),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => args.uris.push(a),
        }
    }
    if args.uris.is_empty() {
        return Err("give at least one leg URI".into());
    }
    if args.qd == 0 || args.bs == 0 || args.secs.is_nan() || args.secs <= 0.0 {
        return Err("--qd, --bs and --secs must be positive".into());
    }
    Ok(args)
}

fn run(args: &Args) -> Result<(), String> {
    let mut legs = args
        .uris
        .iter()
        .map(|u| open_leg(u).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut journaled = None;
    if let Some(j) = &args.journal {
        let far = legs
            .pop()
            .ok_or("--journal needs a leg to mirror asynchronously")?;
        let journal = open_leg(j).map_err(|e| e.to_string())?;
        let leg = Arc::new(
            nvmirror_mirror::JournaledLeg::open(far, journal, Default::default())
                .map_err(|e| e.to_string())?,
        );
        legs.push(Arc::clone(&leg) as Arc<dyn BlockDevice>);
        journaled = Some(leg);
    }
    let n = legs.len();
    let mut volume = None;
    let (mut qp, geo, what): (Box<dyn QueuePair>, Geometry, String) = if n == 1 {
        let qp = legs[0].open_qpair(args.qd).map_err(|e| e.to_string())?;
        (qp, legs[0].geometry(), "single device".into())
    } else if args.raw {
        let geo = legs
            .iter()
            .map(|l| l.geometry())
            .min_by_key(|g| g.num_blocks);
        let qp = RawFanout::open(&legs, args.qd)?;
        (
            Box::new(qp),
            geo.expect("legs"),
            format!("raw fan-out, {n}"),
        )
    } else {
        let vol = Volume::new("bench", legs, VolumeConfig::default()).map_err(|e| e.to_string())?;
        let qp = vol.open_qpair(args.qd).map_err(|e| e.to_string())?;
        let geo = vol.geometry();
        volume = Some(vol);
        (qp, geo, format!("volume, {n} legs"))
    };
    let nlb = (args.bs as u64 >> geo.lba_shift()).max(1) as u32;
    let slots = geo.num_blocks / u64::from(nlb);
    if slots == 0 {
        return Err("the device is smaller than one block of --bs".into());
    }
    if args.prefill {
        prefill(&mut *qp, geo)?;
    }
    let mut pool = DmaPool::new(args.qd, args.bs);
    let mut bufs: Vec<_> = (0..args.qd)
        .map(|_| pool.get().expect("pool sized to qd"))
        .collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        b.as_mut_slice().fill(i as u8);
    }
    let mut rng = SmallRng::seed_from_u64(42);
    let mut started = vec![Instant::now(); args.qd as usize];
    let mut cpl = vec![Completion::default(); args.qd as usize];
    let io_bufs: Vec<_> = bufs.iter().map(|b| b.io_buf()).collect();
    let mut submit = |qp: &mut dyn QueuePair, tag: usize| {
        let slba = rng.gen_range(0..slots) * u64::from(nlb);
        let cmd = IoCommand::with_buf(args.op, slba, nlb, io_bufs[tag], tag as u64);
        // SAFETY: buffer `tag` belongs to this command until its completion is reaped; the
        // pool outlives the loop.
        unsafe { qp.submit(cmd) }.map_err(|e| format!("submit: {e:?}"))
    };
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    started.fill(t0);
    for tag in 0..args.qd as usize {
        submit(&mut *qp, tag)?;
    }
    let deadline = t0 + Duration::from_secs_f64(args.secs);
    let (mut ios, mut errors, mut lat_ns) = (0u64, 0u64, 0u128);
    let mut end;
    loop {
        let n = qp.poll(&mut cpl);
        end = Instant::now();
        for c in &cpl[..n] {
            let tag = c.tag as usize;
            lat_ns += (end - started[tag]).as_nanos();
            ios += 1;
            if !c.status.is_success() {
                errors += 1;
            }
            started[tag] = end;
            submit(&mut *qp, tag)?;
        }
        if end >= deadline {
            break;
        }
    }
    let secs = (end - t0).as_secs_f64();
    // CPU time per I/O: what one core can sustain, even when the machine is shared.
    let cpu_per_io = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if ios > 0 => format!("{:.0} ns", (b - a) as f64 / ios as f64),
        _ => "n/a".into(),
    };
    println!(
        "{what:<16} {:<9} qd={:<3} bs={:<5} {:>9.0} IOPS  mean {:>7.2} us  cpu/io {cpu_per_io}  errors {errors}  [{}]",
        if args.op == IoOp::Read { "randread" } else { "randwrite" },
        args.qd,
        args.bs,
        ios as f64 / secs,
        lat_ns as f64 / ios.max(1) as f64 / 1000.0,
        args.uris.join(" ")
    );
    // Drain what is still in flight before the buffers go.
    let mut left = qp.outstanding();
    while left > 0 {
        left -= qp.poll(&mut cpl) as u32;
    }
    drop(qp);
    if let Some(vol) = volume {
        let st = vol.stats();
        for l in &st.legs {
            println!(
                "  leg {:<28} ops {:>9}  p50 {:>7.2} us  p99 {:>7.2} us  completed last {:>9}",
                l.name,
                l.ops,
                l.latency.p50.as_secs_f64() * 1e6,
                l.latency.p99.as_secs_f64() * 1e6,
                l.completed_last
            );
        }
        println!(
            "  waits: overlap {}  slot/queue {}",
            st.overlap_waits, st.resource_waits
        );
    }
    if let Some(leg) = journaled {
        if let Some(r) = leg.replication() {
            println!(
                "  async leg: {}  rpo {:.3} s  lag {} writes  journal bytes per host byte {:.3}  step-downs {}",
                r.state,
                r.rpo_seconds,
                r.lag_writes,
                r.journal_bytes as f64 / r.host_bytes.max(1) as f64,
                r.step_downs
            );
        }
    }
    for b in bufs {
        pool.put(b);
    }
    Ok(())
}

/// Every command to every leg, one completion when all legs are in; no guard, no fault
/// handling, no timeouts, no statistics. Host tags must be below the queue depth.
#[derive(Debug)]
struct RawFanout {
    legs: Vec<Box<dyn QueuePair>>,
    /// Legs still outstanding, and the merged status, per host tag.
    left: Vec<usize>,
    status: Vec<Status>,
    reaped: Vec<Completion>,
    ready: VecDeque<Completion>,
    depth: u32,
    outstanding: u32,
}

impl RawFanout {
    fn open(legs: &[Arc<dyn BlockDevice>], depth: u32) -> Result<Self, String> {
        Ok(Self {
            legs: legs
                .iter()
                .map(|l| l.open_qpair(depth).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            left: vec![0; depth as usize],
            status: vec![Status::SUCCESS; depth as usize],
            reaped: vec![Completion::default(); depth as usize],
            ready: VecDeque::with_capacity(depth as usize),
            depth,
            outstanding: 0,
        })
    }
}

impl QueuePair for RawFanout {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        let tag = cmd.tag as usize;
        if self.outstanding >= self.depth || tag >= self.left.len() {
            return Err(SubmitError::QueueFull);
        }
        self.outstanding += 1;
        self.left[tag] = self.legs.len();
        self.status[tag] = Status::SUCCESS;
        for leg in &mut self.legs {
            // SAFETY: forwarded from our caller's promise; one write buffer may go to several
            // devices at once.
            unsafe { leg.submit(cmd) }?;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        for leg in &mut self.legs {
            let n = leg.poll(&mut self.reaped);
            for c in &self.reaped[..n] {
                let tag = c.tag as usize;
                if !c.status.is_success() {
                    self.status[tag] = c.status;
                }
                self.left[tag] -= 1;
                if self.left[tag] == 0 {
                    self.ready.push_back(Completion {
                        tag: c.tag,
                        status: self.status[tag],
                    });
                }
            }
        }
        let n = out.len().min(self.ready.len());
        for (slot, c) in out.iter_mut().zip(self.ready.drain(..n)) {
            *slot = c;
        }
        self.outstanding -= n as u32;
        n
    }
}

/// CPU time of the calling thread in nanoseconds (Linux `schedstat`), if available.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Writes the whole namespace once, sequentially in 1 MiB commands, so a mem leg's memory is
/// allocated before the timed run.
fn prefill(qp: &mut dyn QueuePair, geo: Geometry) -> Result<(), String> {
    let mut pool = DmaPool::new(1, 1 << 20);
    let buf = pool.get().expect("one buffer");
    let chunk = (1u64 << 20) >> geo.lba_shift();
    let mut cpl = [Completion::default(); 1];
    let mut lba = 0;
    while lba < geo.num_blocks {
        let nlb = chunk.min(geo.num_blocks - lba) as u32;
        let cmd = IoCommand::with_buf(IoOp::Write, lba, nlb, buf.io_buf(), 0);
        // SAFETY: the buffer is not touched until the completion is reaped below.
        unsafe { qp.submit(cmd) }.map_err(|e| format!("prefill: {e:?}"))?;
        while qp.poll(&mut cpl) == 0 {}
        if !cpl[0].status.is_success() {
            return Err(format!("prefill at LBA {lba}: {}", cpl[0].status));
        }
        lba += u64::from(nlb);
    }
    pool.put(buf);
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("mirror_iops: {e}");
            }
            eprintln!("usage: mirror_iops [--secs S] [--qd N] [--bs BYTES] [--read] [--no-prefill] [--raw] URI [URI ...]");
            return ExitCode::FAILURE;
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirror_iops: {e}");
            ExitCode::FAILURE
        }
    }
}
