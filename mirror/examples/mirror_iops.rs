//! One core, 4 KiB random writes at a fixed queue depth: IOPS and mean latency of a single
//! device or of a volume mirrored over several.
//!
//!     cargo run --release -p nvmirror-mirror --example mirror_iops -- [--secs S] [--qd N]
//!         [--bs BYTES] [--read] [--no-prefill] URI [URI ...]
//!
//! The namespace is written once sequentially before the timed run (so a mem leg's memory is
//! allocated up front) unless `--no-prefill` is given.
//! One URI drives that device directly (the baseline); 2 to 4 URIs drive a volume over them.
//! For example `mem://1GiB`, `null://1GiB`, `mem://1GiB?latency=20us`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    secs: f64,
    qd: u32,
    bs: usize,
    op: IoOp,
    prefill: bool,
    uris: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        secs: 3.0,
        qd: 32,
        bs: 4096,
        op: IoOp::Write,
        prefill: true,
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
    let legs = args
        .uris
        .iter()
        .map(|u| open_leg(u).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut volume = None;
    let (dev, what): (Arc<dyn BlockDevice>, String) = if legs.len() == 1 {
        (Arc::clone(&legs[0]), "single device".into())
    } else {
        let n = legs.len();
        let vol = Volume::new("bench", legs, VolumeConfig::default()).map_err(|e| e.to_string())?;
        let vol = Arc::new(vol);
        volume = Some(Arc::clone(&vol));
        (vol, format!("volume, {n} legs"))
    };
    let geo = dev.geometry();
    let nlb = (args.bs as u64 >> geo.lba_shift()).max(1) as u32;
    let slots = geo.num_blocks / u64::from(nlb);
    if slots == 0 {
        return Err("the device is smaller than one block of --bs".into());
    }
    let mut qp = dev.open_qpair(args.qd).map_err(|e| e.to_string())?;
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
    for b in bufs {
        pool.put(b);
    }
    Ok(())
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
            eprintln!("usage: mirror_iops [--secs S] [--qd N] [--bs BYTES] [--read] [--no-prefill] URI [URI ...]");
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
