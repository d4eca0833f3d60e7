//! Resync measurements, three of them:
//!
//!     cargo run --release -p nvmirror-mirror --example resync_bench -- dirty  [--size BYTES] [--pct P]
//!     cargo run --release -p nvmirror-mirror --example resync_bench -- copy   [--size BYTES]
//!     cargo run --release -p nvmirror-mirror --example resync_bench -- hostlat [--size BYTES] [--secs S]
//!         [--no-adaptive]
//!     common options: [--latency 20us] [--region BYTES] [--windows N]
//!
//! - `dirty`: a leg misses writes to P % of the regions (one 4 KiB write each) and is attached
//!   again; prints bytes copied / dirty bytes (1.0 means exactly the dirty regions).
//! - `copy`: a full resync of a new leg on an idle volume against a raw copy of the same
//!   bytes between the same kinds of back end (same window count and I/O size, read then
//!   write, nothing else); prints both throughputs and their ratio.
//! - `hostlat`: one core writes 4 KiB at random at QD 32 on a two-leg volume; its p99
//!   latency is measured for `S` seconds before a full resync of leg 1 and during it.
//!
//! Legs are `mem://` devices with the given fixed latency (none by default).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmirror_mirror::{JobState, RegionSource, ResyncConfig, Volume, VolumeConfig};
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    mode: String,
    size: u64,
    pct: f64,
    secs: f64,
    adaptive: bool,
    latency: Option<String>,
    region: u64,
    windows: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("a mode is needed: dirty, copy or hostlat")?;
    let mut args = Args {
        mode,
        size: 1 << 30,
        pct: 10.0,
        secs: 3.0,
        adaptive: true,
        latency: None,
        region: VolumeConfig::default().region_size,
        windows: ResyncConfig::default().windows,
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--size" => {
                args.size = value("--size")?
                    .parse()
                    .map_err(|e| format!("--size: {e}"))?
            }
            "--pct" => args.pct = value("--pct")?.parse().map_err(|e| format!("--pct: {e}"))?,
            "--secs" => {
                args.secs = value("--secs")?
                    .parse()
                    .map_err(|e| format!("--secs: {e}"))?
            }
            "--no-adaptive" => args.adaptive = false,
            "--latency" => args.latency = Some(value("--latency")?),
            "--region" => {
                args.region = value("--region")?
                    .parse()
                    .map_err(|e| format!("--region: {e}"))?
            }
            "--windows" => {
                args.windows = value("--windows")?
                    .parse()
                    .map_err(|e| format!("--windows: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn vcfg(args: &Args) -> VolumeConfig {
    VolumeConfig {
        region_size: args.region,
        ..VolumeConfig::default()
    }
}

fn rcfg(args: &Args) -> ResyncConfig {
    ResyncConfig {
        windows: args.windows,
        adaptive: args.adaptive,
        ..ResyncConfig::default()
    }
}

fn mem(args: &Args, name: &str) -> Result<Arc<dyn BlockDevice>, String> {
    let uri = match &args.latency {
        Some(l) => format!("mem://{}?latency={l}", args.size),
        None => format!("mem://{}", args.size),
    };
    let dev = open_leg(&uri).map_err(|e| format!("{uri}: {e}"))?;
    let _ = name;
    Ok(dev)
}

/// Writes the whole device sequentially in 1 MiB commands (so mem chunks exist and hold
/// data), through one queue pair.
fn prefill(dev: &dyn BlockDevice, seed: u8) -> Result<(), String> {
    let geo = dev.geometry();
    let mut qp = dev.open_qpair(4).map_err(|e| e.to_string())?;
    let mut pool = DmaPool::new(1, 1 << 20);
    let mut buf = pool.get().ok_or("pool")?;
    buf.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i as u8) ^ seed);
    let blocks = (1u64 << 20) >> geo.lba_shift();
    let mut lba = 0;
    while lba < geo.num_blocks {
        let nlb = blocks.min(geo.num_blocks - lba) as u32;
        // SAFETY: `buf` is reaped below before it is reused.
        unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, lba, nlb, buf.io_buf(), 0)) }
            .map_err(|e| format!("{e:?}"))?;
        wait_one(&mut *qp)?;
        lba += u64::from(nlb);
    }
    pool.put(buf);
    Ok(())
}

fn wait_one(qp: &mut dyn QueuePair) -> Result<(), String> {
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    if cpl[0].status.is_success() {
        Ok(())
    } else {
        Err(cpl[0].status.to_string())
    }
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / f64::from(1 << 30)
}

fn dirty(args: &Args) -> Result<(), String> {
    let vol = Volume::new("bench", vec![mem(args, "a")?, mem(args, "b")?], vcfg(args))
        .map_err(|e| e.to_string())?;
    let region = vol.region_size();
    let regions = vol.geometry().bytes() / region;
    vol.detach_leg(1).map_err(|e| e.to_string())?;
    let mut qp = vol.open_volume_qpair(1).map_err(|e| e.to_string())?;
    let mut pool = DmaPool::new(1, 4096);
    let buf = pool.get().ok_or("pool")?;
    let mut rng = SmallRng::seed_from_u64(7);
    let want = ((regions as f64) * args.pct / 100.0).round() as u64;
    let lba_per_region = region / u64::from(vol.geometry().lba_size);
    let nlb = (4096 / vol.geometry().lba_size).max(1);
    while vol.missed_region_count(1).map_err(|e| e.to_string())? < want {
        let r = rng.gen_range(0..regions);
        let lba = r * lba_per_region + rng.gen_range(0..lba_per_region - u64::from(nlb));
        // SAFETY: `buf` is reaped before reuse.
        unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, lba, nlb, buf.io_buf(), 0)) }
            .map_err(|e| format!("{e:?}"))?;
        wait_one(&mut qp)?;
    }
    let dirty_bytes = want * region;
    let start = Instant::now();
    let status = vol
        .attach_leg(1)
        .map_err(|e| e.to_string())?
        .run()
        .join()
        .map_err(|_| "job panicked")?;
    let took = start.elapsed();
    if status.state != JobState::Done {
        return Err(format!(
            "resync ended {:?}: {:?}",
            status.state, status.error
        ));
    }
    println!(
        "dirty: {} of {regions} regions ({:.1} %), {} MiB dirty; copied {} MiB in {took:.2?} ({:.2} GiB/s); copied/dirty = {:.3}",
        want,
        args.pct,
        dirty_bytes >> 20,
        status.bytes_copied >> 20,
        gib_s(status.bytes_copied, took),
        status.bytes_copied as f64 / dirty_bytes as f64
    );
    drop(qp);
    pool.put(buf);
    Ok(())
}

/// Copies every region of `src` to `dst` with `windows` region copies in flight, each a
/// sequence of read-then-write commands of `io` bytes: the resync's I/O with nothing else.
fn raw_copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    windows: u32,
    io: usize,
    region: u64,
) -> Result<Duration, String> {
    let geo = src.geometry();
    let mut rq = src.open_qpair(windows + 2).map_err(|e| e.to_string())?;
    let mut wq = dst.open_qpair(windows + 2).map_err(|e| e.to_string())?;
    let mut pool = DmaPool::new(windows, io);
    let bufs: Vec<DmaBuf> = (0..windows).map(|_| pool.get().unwrap()).collect();
    let io_blocks = (io as u64) >> geo.lba_shift();
    let region_blocks = region >> geo.lba_shift();
    // Per window: (next lba, end lba, writing?)
    let mut state: Vec<Option<(u64, u64, bool)>> = vec![None; windows as usize];
    let mut next_region = 0u64;
    let regions = geo.num_blocks.div_ceil(region_blocks);
    let mut cpl = [Completion::default(); 32];
    let start = Instant::now();
    loop {
        for (i, st) in state.iter_mut().enumerate() {
            if st.is_none() && next_region < regions {
                let s = next_region * region_blocks;
                *st = Some((s, (s + region_blocks).min(geo.num_blocks), false));
                next_region += 1;
                let nlb = io_blocks.min(region_blocks) as u32;
                // SAFETY: window i's buffer is reused only after this command is reaped.
                unsafe {
                    rq.submit(IoCommand::with_buf(
                        IoOp::Read,
                        s,
                        nlb,
                        bufs[i].io_buf(),
                        i as u64,
                    ))
                }
                .map_err(|e| format!("{e:?}"))?;
            }
        }
        if state.iter().all(|s| s.is_none()) {
            break;
        }
        let mut busy = false;
        let n = rq.poll(&mut cpl);
        busy |= n > 0;
        for c in &cpl[..n] {
            let i = c.tag as usize;
            let (lba, end, _) = state[i].ok_or("stray read")?;
            let nlb = io_blocks.min(end - lba) as u32;
            state[i] = Some((lba, end, true));
            // SAFETY: as above.
            unsafe {
                wq.submit(IoCommand::with_buf(
                    IoOp::Write,
                    lba,
                    nlb,
                    bufs[i].io_buf(),
                    i as u64,
                ))
            }
            .map_err(|e| format!("{e:?}"))?;
        }
        let n = wq.poll(&mut cpl);
        busy |= n > 0;
        for c in &cpl[..n] {
            let i = c.tag as usize;
            let (lba, end, _) = state[i].ok_or("stray write")?;
            let lba = lba + io_blocks.min(end - lba);
            if lba < end {
                state[i] = Some((lba, end, false));
                let nlb = io_blocks.min(end - lba) as u32;
                // SAFETY: as above.
                unsafe {
                    rq.submit(IoCommand::with_buf(
                        IoOp::Read,
                        lba,
                        nlb,
                        bufs[i].io_buf(),
                        i as u64,
                    ))
                }
                .map_err(|e| format!("{e:?}"))?;
            } else {
                state[i] = None;
            }
        }
        if !busy {
            // The resync job's thread backs off the same way when a poll finds nothing.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let took = start.elapsed();
    drop(rq);
    drop(wq);
    for b in bufs {
        pool.put(b);
    }
    Ok(took)
}

fn copy(args: &Args) -> Result<(), String> {
    let cfg = rcfg(args);
    let src = mem(args, "src")?;
    prefill(&*src, 1)?;
    let raw_dst = mem(args, "raw")?;
    prefill(&*raw_dst, 9)?; // the same memory state as the resync target
    let bytes = src.geometry().bytes();
    let vcfg = vcfg(args);
    let raw = raw_copy(
        &*src,
        &*raw_dst,
        cfg.windows,
        cfg.max_io_bytes as usize,
        vcfg.region_size,
    )?;
    drop(raw_dst);
    let vol = Volume::new("bench", vec![src], vcfg).map_err(|e| e.to_string())?;
    let dst = mem(args, "dst")?;
    prefill(&*dst, 9)?;
    let start = Instant::now();
    let status = vol
        .add_leg_with(dst, cfg)
        .map_err(|e| e.to_string())?
        .run()
        .join()
        .map_err(|_| "job panicked")?;
    let took = start.elapsed();
    if status.state != JobState::Done {
        return Err(format!(
            "resync ended {:?}: {:?}",
            status.state, status.error
        ));
    }
    println!(
        "copy: {} MiB; raw copy {raw:.2?} ({:.2} GiB/s); resync {took:.2?} ({:.2} GiB/s); resync/raw throughput = {:.3}",
        bytes >> 20,
        gib_s(bytes, raw),
        gib_s(status.bytes_copied, took),
        raw.as_secs_f64() / took.as_secs_f64()
    );
    Ok(())
}

/// Every region, in order (a full resync of a leg that is already a member).
#[derive(Debug)]
struct AllRegions {
    left: Vec<bool>,
}

impl RegionSource for AllRegions {
    fn next_region(&mut self, from: u64) -> Option<u64> {
        (from as usize..self.left.len())
            .find(|&r| self.left[r])
            .map(|r| r as u64)
    }
    fn region_copied(&mut self, region: u64) {
        self.left[region as usize] = false;
    }
    fn region_dirty(&mut self, region: u64) {
        self.left[region as usize] = true;
    }
    fn remaining(&self) -> u64 {
        self.left.iter().filter(|&&l| l).count() as u64
    }
}

fn p99(samples: &mut [u64]) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    Duration::from_nanos(samples[(samples.len() * 99 / 100).min(samples.len() - 1)])
}

fn hostlat(args: &Args) -> Result<(), String> {
    let (a, b) = (mem(args, "a")?, mem(args, "b")?);
    prefill(&*a, 3)?;
    prefill(&*b, 3)?;
    let vol = Arc::new(Volume::new("bench", vec![a, b], vcfg(args)).map_err(|e| e.to_string())?);
    // Phase 0: before the resync, 1: during it, 2: stop.
    let phase = Arc::new(AtomicU8::new(0));
    let samples = Arc::new(Mutex::new([Vec::new(), Vec::new()]));
    let done = Arc::new(AtomicBool::new(false));
    let host = {
        let (vol, phase, samples, done) = (
            Arc::clone(&vol),
            Arc::clone(&phase),
            Arc::clone(&samples),
            Arc::clone(&done),
        );
        std::thread::spawn(move || -> Result<u64, String> {
            const QD: usize = 32;
            let mut qp = vol
                .open_volume_qpair(QD as u32)
                .map_err(|e| e.to_string())?;
            let mut pool = DmaPool::new(QD as u32, 4096);
            let bufs: Vec<DmaBuf> = (0..QD).map(|_| pool.get().unwrap()).collect();
            let nlb = (4096 / vol.geometry().lba_size).max(1);
            let blocks = vol.geometry().num_blocks / u64::from(nlb);
            let mut rng = SmallRng::seed_from_u64(11);
            let mut started = [Instant::now(); QD];
            let mut free: Vec<usize> = (0..QD).collect();
            let mut cpl = [Completion::default(); QD];
            let mut local = [Vec::with_capacity(1 << 20), Vec::with_capacity(1 << 20)];
            let mut ios = 0u64;
            while !done.load(Ordering::Relaxed) || free.len() < QD {
                if !done.load(Ordering::Relaxed) {
                    while let Some(i) = free.pop() {
                        let lba = rng.gen_range(0..blocks) * u64::from(nlb);
                        started[i] = Instant::now();
                        // SAFETY: buffer i is reused only after its completion is reaped.
                        unsafe {
                            qp.submit(IoCommand::with_buf(
                                IoOp::Write,
                                lba,
                                nlb,
                                bufs[i].io_buf(),
                                i as u64,
                            ))
                        }
                        .map_err(|e| format!("{e:?}"))?;
                    }
                }
                let n = qp.poll(&mut cpl);
                let now = Instant::now();
                let p = phase.load(Ordering::Relaxed) as usize;
                for c in &cpl[..n] {
                    let i = c.tag as usize;
                    if p < 2 {
                        local[p].push(now.duration_since(started[i]).as_nanos() as u64);
                    }
                    free.push(i);
                    ios += 1;
                }
            }
            *samples.lock().unwrap() = local;
            drop(qp);
            for b in bufs {
                pool.put(b);
            }
            Ok(ios)
        })
    };
    std::thread::sleep(Duration::from_secs_f64(args.secs));
    vol.fault_leg(1).map_err(|e| e.to_string())?;
    let regions = vol.geometry().bytes().div_ceil(vol.region_size()) as usize;
    let cfg = rcfg(args);
    let job = vol
        .attach_leg_from(
            1,
            Box::new(AllRegions {
                left: vec![true; regions],
            }),
            cfg,
        )
        .map_err(|e| e.to_string())?;
    phase.store(1, Ordering::Relaxed);
    let start = Instant::now();
    let handle = job.run();
    // The adaptive controller's window limit, sampled while the job runs.
    let mut limits = Vec::new();
    while !handle.is_finished() {
        if let Ok(st) = vol.resync_status() {
            limits.push(st.window_limit);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = handle.join().map_err(|_| "job panicked")?;
    let took = start.elapsed();
    phase.store(2, Ordering::Relaxed);
    // Zero means the job was still starting (no window yet).
    limits.retain(|&l| l > 0);
    let min_limit = limits.iter().copied().min().unwrap_or(0);
    let mean_limit = limits.iter().map(|&l| f64::from(l)).sum::<f64>() / limits.len().max(1) as f64;
    done.store(true, Ordering::Relaxed);
    let ios = host.join().map_err(|_| "host panicked")??;
    let mut s = std::mem::take(&mut *samples.lock().unwrap());
    let (before, during) = (p99(&mut s[0]), p99(&mut s[1]));
    println!(
        "hostlat: adaptive={} resync {:?} of {} MiB in {took:.2?} ({:.2} GiB/s); host 4KiB QD32 randwrite p99 before {before:?} ({} IOs), during {during:?} ({} IOs); ratio {:.2}; windows allowed min {min_limit} mean {mean_limit:.1}; {ios} IOs total",
        args.adaptive,
        status.state,
        status.bytes_copied >> 20,
        gib_s(status.bytes_copied, took),
        s[0].len(),
        s[1].len(),
        during.as_secs_f64() / before.as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| match args.mode.as_str() {
        "dirty" => dirty(&args),
        "copy" => copy(&args),
        "hostlat" => hostlat(&args),
        other => Err(format!("unknown mode {other}")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("resync_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
