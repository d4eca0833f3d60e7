//! What the write-intent bitmap costs (`docs/bitmap.md`), on one core.
//!
//!     cargo run --release -p nvmirror-mirror --example bitmap_bench -- seq [--size BYTES]
//!         [--bs BYTES] [--predict N]
//!     cargo run --release -p nvmirror-mirror --example bitmap_bench -- rand [--secs S]
//!         [--hot BYTES] [--latency US] [--qd N] [--rounds N] [--bitmap on|off|both]
//!
//! `seq`: sequential writes over `null://` legs (data discarded), bitmap on: prints metadata
//! page writes per 1000 host writes and the hit rate, with prediction on and off.
//! `rand`: 4 KiB random writes over a hot set on `mem://…?latency=…` legs, after a sequential
//! prefill of the hot set; prints IOPS and p50/p99 host latency with and without the bitmap,
//! alternating the two for `--rounds` rounds so drift on a shared machine hits both alike.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{BitmapConfig, Volume, VolumeConfig};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::uri::parse_size;
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    mode: String,
    size: u64,
    bs: u64,
    predict: Option<u32>,
    secs: f64,
    hot: u64,
    latency_us: u64,
    qd: u32,
    rounds: u32,
    bitmap: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        mode: String::new(),
        size: 4 << 30,
        bs: 128 << 10,
        predict: None,
        secs: 3.0,
        hot: 1 << 30,
        latency_us: 20,
        qd: 32,
        rounds: 3,
        bitmap: "both".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--size" => a.size = parse_size(&value("--size")?)?,
            "--bs" => a.bs = parse_size(&value("--bs")?)?,
            "--hot" => a.hot = parse_size(&value("--hot")?)?,
            "--predict" => {
                a.predict = Some(value("--predict")?.parse().map_err(|e| format!("{e}"))?)
            }
            "--secs" => a.secs = value("--secs")?.parse().map_err(|e| format!("{e}"))?,
            "--latency" => {
                a.latency_us = value("--latency")?.parse().map_err(|e| format!("{e}"))?
            }
            "--qd" => a.qd = value("--qd")?.parse().map_err(|e| format!("{e}"))?,
            "--rounds" => a.rounds = value("--rounds")?.parse().map_err(|e| format!("{e}"))?,
            "--bitmap" => a.bitmap = value("--bitmap")?,
            "seq" | "rand" => a.mode = arg,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if a.mode.is_empty() {
        return Err("usage: bitmap_bench seq|rand [options]".into());
    }
    if !matches!(a.bitmap.as_str(), "on" | "off" | "both") {
        return Err("--bitmap is on, off or both".into());
    }
    Ok(a)
}

fn legs(uri: &str) -> Result<Vec<Arc<dyn BlockDevice>>, String> {
    (0..2)
        .map(|_| open_leg(uri).map_err(|e| e.to_string()))
        .collect()
}

fn cfg(predict: u32) -> VolumeConfig {
    VolumeConfig {
        bitmap: BitmapConfig {
            predict_max: predict,
            ..BitmapConfig::default()
        },
        ..VolumeConfig::default()
    }
}

/// Drives `writes` (slba, nlb) through `qp` at depth `qd`; returns per-command latencies (ns).
fn drive(
    qp: &mut dyn QueuePair,
    qd: u32,
    bs: usize,
    mut next: impl FnMut() -> Option<(u64, u32)>,
    lat: &mut Vec<u32>,
) -> Result<u64, String> {
    let mut pool = DmaPool::new(qd, bs);
    let bufs: Vec<_> = (0..qd).map(|_| pool.get().expect("qd buffers")).collect();
    let mut started = vec![Instant::now(); qd as usize];
    let mut free: Vec<u32> = (0..qd).collect();
    let mut cpl = vec![Completion::default(); qd as usize];
    let mut outstanding = 0;
    let mut done = 0u64;
    let mut exhausted = false;
    loop {
        while !exhausted {
            let Some(&slot) = free.last() else { break };
            let Some((slba, nlb)) = next() else {
                exhausted = true;
                break;
            };
            free.pop();
            started[slot as usize] = Instant::now();
            let cmd = IoCommand::with_buf(
                IoOp::Write,
                slba,
                nlb,
                bufs[slot as usize].io_buf(),
                u64::from(slot),
            );
            // SAFETY: the buffer belongs to `pool`, alive until every command is reaped below.
            unsafe { qp.submit(cmd) }.map_err(|e| format!("{e:?}"))?;
            outstanding += 1;
        }
        if exhausted && outstanding == 0 {
            break;
        }
        let n = qp.poll(&mut cpl);
        if n > 0 {
            let now = Instant::now();
            for c in &cpl[..n] {
                if !c.status.is_success() {
                    return Err(format!("write failed: {}", c.status));
                }
                let d = now.duration_since(started[c.tag as usize]).as_nanos();
                if lat.len() < lat.capacity() {
                    lat.push(d.min(u128::from(u32::MAX)) as u32);
                }
                free.push(c.tag as u32);
                outstanding -= 1;
                done += 1;
            }
        }
    }
    for b in bufs {
        pool.put(b);
    }
    Ok(done)
}

/// A leg that keeps its first `keep_blocks` blocks (the metadata) in RAM and discards the
/// rest, so a sequential run over gigabytes needs no memory for data.
#[derive(Debug)]
struct MetadataOnly {
    meta: Arc<dyn BlockDevice>,
    data: Arc<dyn BlockDevice>,
    keep_blocks: u64,
}

#[derive(Debug)]
struct MetadataOnlyQp {
    meta: Box<dyn QueuePair>,
    data: Box<dyn QueuePair>,
    keep_blocks: u64,
}

impl BlockDevice for MetadataOnly {
    fn geometry(&self) -> nvmirror_nvme::Geometry {
        self.data.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(MetadataOnlyQp {
            meta: self.meta.open_qpair(depth)?,
            data: self.data.open_qpair(depth)?,
            keep_blocks: self.keep_blocks,
        }))
    }
    fn name(&self) -> &str {
        self.data.name()
    }
}

impl QueuePair for MetadataOnlyQp {
    fn depth(&self) -> u32 {
        self.data.depth()
    }
    fn outstanding(&self) -> u32 {
        self.meta.outstanding() + self.data.outstanding()
    }
    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), nvmirror_nvme::SubmitError> {
        if cmd.op != IoOp::Flush && cmd.slba < self.keep_blocks {
            // SAFETY: forwarded under the caller's promise for `cmd.buf`.
            unsafe { self.meta.submit(cmd) }
        } else {
            // SAFETY: as above.
            unsafe { self.data.submit(cmd) }
        }
    }
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = self.meta.poll(out);
        n + self.data.poll(&mut out[n..])
    }
}

fn seq(a: &Args) -> Result<(), String> {
    let bytes = a.size + (64 << 20);
    let keep = 64u64 << 20;
    for predict in a.predict.map_or(vec![256, 64, 0], |p| vec![p]) {
        let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
            .map(|_| -> Result<Arc<dyn BlockDevice>, String> {
                Ok(Arc::new(MetadataOnly {
                    meta: open_leg(&format!("mem://{keep}")).map_err(|e| e.to_string())?,
                    data: open_leg(&format!("null://{bytes}")).map_err(|e| e.to_string())?,
                    keep_blocks: keep / 512,
                }))
            })
            .collect::<Result<_, _>>()?;
        let vol = Volume::format("bench", legs, cfg(predict), false).map_err(|e| e.to_string())?;
        let mut qp = vol.open_volume_qpair(32).map_err(|e| e.to_string())?;
        let lba = u64::from(vol.geometry().lba_size);
        let nlb = (a.bs / lba) as u32;
        let total = a.size.min(vol.geometry().bytes()) / a.bs;
        let mut i = 0;
        let mut lat = Vec::new();
        let t = Instant::now();
        drive(
            &mut qp,
            32,
            a.bs as usize,
            || {
                (i < total).then(|| {
                    i += 1;
                    ((i - 1) * u64::from(nlb), nlb)
                })
            },
            &mut lat,
        )?;
        let s = vol.stats();
        println!(
            "seq bs={} size={} predict_max={predict}: {} host writes, {} metadata writes = {:.2} per 1000, hit rate {:.4}, {} regions predicted, {:.2?}",
            a.bs, a.size, s.bitmap_writes, s.metadata_writes,
            s.metadata_writes as f64 * 1000.0 / s.bitmap_writes as f64,
            s.bitmap_hit_rate(), s.predicted_regions, t.elapsed()
        );
    }
    Ok(())
}

struct Result1 {
    iops: f64,
    p50: Duration,
    p99: Duration,
    meta: u64,
}

fn rand_round(a: &Args, bitmap: bool) -> Result<Result1, String> {
    let uri = format!("mem://{}?latency={}us", a.hot + (64 << 20), a.latency_us);
    let legs = legs(&uri)?;
    let vol = if bitmap {
        Volume::format("bench", legs, cfg(256), false)
    } else {
        Volume::new("bench", legs, cfg(256))
    }
    .map_err(|e| e.to_string())?;
    let mut qp = vol.open_volume_qpair(a.qd).map_err(|e| e.to_string())?;
    let lba = u64::from(vol.geometry().lba_size);
    let hot_blocks = a.hot.min(vol.geometry().bytes()) / lba;
    // Prefill the hot set (allocates the mem legs' memory; marks every region).
    let chunk = (128 << 10) / lba;
    let mut at = 0;
    let mut lat = Vec::new();
    drive(
        &mut qp,
        a.qd,
        128 << 10,
        || {
            (at + chunk <= hot_blocks).then(|| {
                at += chunk;
                (at - chunk, chunk as u32)
            })
        },
        &mut lat,
    )?;
    let meta0 = vol.stats().metadata_writes;
    let nlb = (4096 / lba) as u32;
    let blocks4k = hot_blocks / u64::from(nlb);
    let mut rng = SmallRng::seed_from_u64(7);
    let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
    let mut lat = Vec::with_capacity(20_000_000);
    let mut k = 0u32;
    let t = Instant::now();
    let done = drive(
        &mut qp,
        a.qd,
        4096,
        || {
            k = k.wrapping_add(1);
            if k % 256 == 0 && Instant::now() >= deadline {
                return None;
            }
            Some((rng.gen_range(0..blocks4k) * u64::from(nlb), nlb))
        },
        &mut lat,
    )?;
    let secs = t.elapsed().as_secs_f64();
    lat.sort_unstable();
    let q = |p: f64| {
        Duration::from_nanos(u64::from(
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)],
        ))
    };
    Ok(Result1 {
        iops: done as f64 / secs,
        p50: q(0.50),
        p99: q(0.99),
        meta: vol.stats().metadata_writes - meta0,
    })
}

fn rand(a: &Args) -> Result<(), String> {
    let modes: Vec<bool> = match a.bitmap.as_str() {
        "on" => vec![true],
        "off" => vec![false],
        _ => vec![false, true],
    };
    let mut results: Vec<(bool, Result1)> = Vec::new();
    for round in 0..a.rounds {
        for &m in &modes {
            let r = rand_round(a, m)?;
            println!(
                "round {round} bitmap={}: {:.0} IOPS, p50 {:.1?}, p99 {:.1?}, {} metadata writes in the timed run",
                if m { "on " } else { "off" }, r.iops, r.p50, r.p99, r.meta
            );
            results.push((m, r));
        }
    }
    let median = |m: bool, f: &dyn Fn(&Result1) -> f64| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == m)
            .map(|r| f(&r.1))
            .collect();
        v.sort_by(|x, y| x.partial_cmp(y).expect("no NaN"));
        v[v.len() / 2]
    };
    if modes.len() == 2 {
        let (io_off, io_on) = (median(false, &|r| r.iops), median(true, &|r| r.iops));
        let p99 = |r: &Result1| r.p99.as_nanos() as f64;
        let (p_off, p_on) = (median(false, &p99), median(true, &p99));
        println!(
            "median: IOPS on/off = {:.3}, p99 on/off = {:.3} ({:.0} vs {:.0} IOPS, {:.1} vs {:.1} us)",
            io_on / io_off, p_on / p_off, io_on, io_off, p_on / 1000.0, p_off / 1000.0
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|a| if a.mode == "seq" { seq(&a) } else { rand(&a) });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitmap_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
