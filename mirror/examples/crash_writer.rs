//! Crash-consistency workload for persistent volumes (`scripts/crash-loop.sh`).
//!
//!     crash_writer run <dir>       # open (format the first time), write until killed
//!     crash_writer recover <dir>   # open, recover, verify, shut down cleanly
//!
//! The volume mirrors `<dir>/leg0.img` and `<dir>/leg1.img` (io_uring legs, 64 MiB each).
//! `run` writes random 4 KiB blocks, each stamped with its LBA, a sequence number and a
//! CRC32C, and appends every *acknowledged* write's (LBA, sequence) to `<dir>/acks.log` after
//! the ack. Now and then it faults a leg, so a kill can land while a leg is out. `recover`
//! opens the volume (which makes the in-sync legs agree on every marked region), copies the
//! regions a stale leg missed, then checks that both legs are byte-identical over the
//! exported range and that every logged ack is on disk (the block holds that sequence number
//! or a newer one). Exit status 0 when every check passes.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nvmirror_mirror::{BitmapConfig, LegState, Volume, VolumeConfig};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::Rng;

const BLOCK: usize = 4096;
const DEPTH: usize = 16;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: 256 << 10,
        bitmap: BitmapConfig {
            idle_delay: Duration::from_millis(30),
            max_marked_regions: Some(64),
            predict_max: 64,
        },
        ..VolumeConfig::default()
    }
}

fn legs(dir: &Path) -> Vec<Arc<dyn BlockDevice>> {
    (0..2)
        .map(|i| {
            let uri = format!("file://{}/leg{i}.img?create=64MiB", dir.display());
            // A killed process's io_uring is torn down asynchronously: its claim on the file
            // can outlive it for a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match open_leg(&uri) {
                    Ok(dev) => break dev,
                    Err(nvmirror_nvme::Error::Busy { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => fail(&format!("open {uri}: {e}")),
                }
            }
        })
        .collect()
}

fn fail(msg: &str) -> ! {
    eprintln!("crash_writer: {msg}");
    std::process::exit(1)
}

/// A block's content: LBA, sequence, filler, and a CRC32C over the rest at the end.
fn stamp(block: &mut [u8], lba: u64, seq: u64) {
    block[0..8].copy_from_slice(&lba.to_le_bytes());
    block[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut x = seq ^ lba.rotate_left(17);
    for chunk in block[16..BLOCK - 4].chunks_mut(8) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let crc = crc32c::crc32c(&block[..BLOCK - 4]);
    block[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// `(lba, seq)` of a well-formed block, `None` for a torn or foreign one.
fn parse(block: &[u8]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(block[BLOCK - 4..].try_into().ok()?);
    if crc != crc32c::crc32c(&block[..BLOCK - 4]) {
        return None;
    }
    Some((
        u64::from_le_bytes(block[0..8].try_into().ok()?),
        u64::from_le_bytes(block[8..16].try_into().ok()?),
    ))
}

/// Opens the volume (formatting blank legs) and recovers every stale leg.
fn open(dir: &Path) -> Volume {
    let devs = legs(dir);
    let vol = match Volume::open_persistent("crash", devs.clone(), cfg()) {
        Ok(v) => v,
        Err(nvmirror_mirror::Error::Metadata { reason, .. }) if reason.contains("format") => {
            Volume::format("crash", devs, cfg(), false).unwrap_or_else(|e| fail(&e.to_string()))
        }
        Err(e) => fail(&e.to_string()),
    };
    // Stale legs are rebuilt by the resync engine (online copy of the marked regions).
    for leg in 0..vol.leg_count() {
        if vol.leg_states()[leg].state != LegState::InSync {
            let mut job = vol
                .attach_leg(leg)
                .unwrap_or_else(|e| fail(&format!("attach leg {leg}: {e}")));
            let st = job.run_blocking();
            if vol.leg_states()[leg].state != LegState::InSync {
                fail(&format!(
                    "resync of leg {leg} ended {:?}: {:?}",
                    st.state, st.error
                ));
            }
            println!("resynced leg {leg}: {} regions", st.regions_copied);
        }
    }
    vol
}

fn run(dir: &Path) {
    let vol = open(dir);
    let blocks_per = (BLOCK as u64) >> vol.geometry().lba_shift();
    let nblocks = vol.geometry().num_blocks / blocks_per;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acks.log"))
        .unwrap_or_else(|e| fail(&format!("acks.log: {e}")));
    let mut qp = vol.open_volume_qpair(DEPTH as u32).unwrap();
    let mut pool = DmaPool::new(DEPTH as u32, BLOCK);
    let mut bufs: Vec<_> = (0..DEPTH).map(|_| pool.get().unwrap()).collect();
    let mut inflight: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
    let mut rng = rand::thread_rng();
    // Sequence numbers grow across runs: nanoseconds since the epoch at start, then +1.
    let mut seq = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let fault_at = rng.gen_bool(0.4).then(|| rng.gen_range(100..5000u64));
    let mut acked = 0u64;
    let mut last_clear = Instant::now();
    let mut cpl = [Completion::default(); DEPTH];
    loop {
        for (i, slot) in inflight.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            // A hot quarter of the volume gets nearly every write, so regions are rewritten and a
            // leg out for a while misses part of the volume, not all of it.
            let block = if rng.gen_bool(0.995) {
                rng.gen_range(0..nblocks / 4)
            } else {
                rng.gen_range(0..nblocks)
            };
            seq += 1;
            stamp(bufs[i].as_mut_slice(), block, seq);
            let cmd = IoCommand::with_buf(
                IoOp::Write,
                block * blocks_per,
                blocks_per as u32,
                bufs[i].io_buf(),
                i as u64,
            );
            // SAFETY: `bufs[i]` is neither touched nor freed until this tag completes.
            unsafe { qp.submit(cmd) }.unwrap_or_else(|e| fail(&format!("{e:?}")));
            *slot = Some((block, seq));
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            let i = c.tag as usize;
            let (block, s) = inflight[i].take().expect("a tag in flight");
            if !c.status.is_success() {
                fail(&format!("write of block {block} failed: {}", c.status));
            }
            let mut rec = [0u8; 16];
            rec[..8].copy_from_slice(&block.to_le_bytes());
            rec[8..].copy_from_slice(&s.to_le_bytes());
            log.write_all(&rec)
                .unwrap_or_else(|e| fail(&format!("acks.log: {e}")));
            acked += 1;
            if Some(acked) == fault_at {
                let leg = rng.gen_range(0..2);
                if vol.fault_leg(leg).is_ok() {
                    println!("faulted leg {leg} after {acked} acks");
                }
            }
        }
        if last_clear.elapsed() > Duration::from_millis(20) {
            last_clear = Instant::now();
            vol.clear_idle_regions(last_clear)
                .unwrap_or_else(|e| fail(&e.to_string()));
        }
    }
}

/// The whole leg, read through aligned buffers (the legs are O_DIRECT).
fn read_leg(dev: &dyn BlockDevice) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let geo = dev.geometry();
    let mut pool = DmaPool::new(1, CHUNK);
    let buf = pool.get().expect("one buffer");
    let mut qp = dev.open_qpair(1).unwrap_or_else(|e| fail(&e.to_string()));
    let mut out = Vec::with_capacity(geo.bytes() as usize);
    while (out.len() as u64) < geo.bytes() {
        let n = (geo.bytes() - out.len() as u64).min(CHUNK as u64) as usize;
        let lba = out.len() as u64 >> geo.lba_shift();
        let nlb = (n >> geo.lba_shift()) as u32;
        let cmd = IoCommand::with_buf(IoOp::Read, lba, nlb, buf.io_buf(), 0);
        // SAFETY: `buf` is read only after the completion is reaped below.
        unsafe { qp.submit(cmd) }.unwrap_or_else(|e| fail(&format!("{e:?}")));
        let mut c = [Completion::default()];
        while qp.poll(&mut c) == 0 {}
        if !c[0].status.is_success() {
            fail(&format!(
                "{}: read at LBA {lba}: {}",
                dev.name(),
                c[0].status
            ));
        }
        out.extend_from_slice(&buf.as_slice()[..n]);
    }
    pool.put(buf);
    out
}

fn recover(dir: &Path) {
    let started = Instant::now();
    let vol = open(dir);
    let l = vol
        .metadata_layout()
        .unwrap_or_else(|| fail("not persistent"));
    let range =
        l.data_offset as usize..(l.data_offset + l.data_blocks * u64::from(l.lba_size)) as usize;
    let a = read_leg(&*vol.leg_device(0).unwrap());
    let b = read_leg(&*vol.leg_device(1).unwrap());
    if a[range.clone()] != b[range.clone()] {
        let first = range
            .clone()
            .find(|&i| a[i] != b[i])
            .expect("they differ somewhere");
        fail(&format!(
            "legs differ, first at volume byte {}",
            first - range.start
        ));
    }
    let mut raw = Vec::new();
    if let Ok(mut f) = std::fs::File::open(dir.join("acks.log")) {
        f.read_to_end(&mut raw)
            .unwrap_or_else(|e| fail(&format!("acks.log: {e}")));
    }
    let mut newest: HashMap<u64, u64> = HashMap::new();
    for rec in raw.chunks_exact(16) {
        let block = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
        let e = newest.entry(block).or_insert(0);
        *e = (*e).max(seq);
    }
    let data = &a[range];
    for (&block, &seq) in &newest {
        let at = block as usize * BLOCK;
        match data.get(at..at + BLOCK).and_then(parse) {
            Some((lba, s)) if lba == block && s >= seq => {}
            found => fail(&format!(
                "acknowledged write lost: block {block} seq {seq}, found {found:?}"
            )),
        }
    }
    println!(
        "verified: {} acks over {} blocks, legs identical, {:.2?}",
        raw.len() / 16,
        newest.len(),
        started.elapsed()
    );
    vol.shutdown_clean()
        .unwrap_or_else(|e| fail(&e.to_string()));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(dir)) = (args.get(1), args.get(2)) else {
        fail("usage: crash_writer run|recover <dir>");
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|e| fail(&format!("{dir}: {e}")));
    match mode.as_str() {
        "run" => run(&dir),
        "recover" => recover(&dir),
        _ => fail("usage: crash_writer run|recover <dir>"),
    }
}
