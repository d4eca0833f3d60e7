//! Resync under a concurrent random-write workload (invariant 5): several cores write
//! stamped data through their own queue pairs while a leg is detached, attached and rebuilt.
//! Afterwards the legs are byte-identical and every acknowledged write is on the rebuilt leg.
//!
//! Each core owns a slice of the namespace and keeps a model of it. Like an NVMe host, a core
//! never has two overlapping writes in flight (their order would be undefined), so the last
//! write submitted to a block is the one every leg must hold.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wait_for;
use nvmirror_mirror::{JobState, LegState, ResyncConfig, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const LBA: usize = 512;
const BLOCKS: u64 = 8192; // 4 MiB
const CORES: u64 = 3;
const QD: usize = 8;
const MAX_NLB: u32 = 16;

/// One core writing random stamped ranges inside its slice until `stop`; returns its model
/// of the slice and how many writes it completed.
fn core_workload(vol: Arc<Volume>, core: u64, stop: Arc<AtomicBool>) -> (Vec<u8>, u64) {
    let slice = BLOCKS / CORES;
    let base = core * slice;
    let mut model = read_all(&*vol.leg_device(0).unwrap()).unwrap()
        [(base as usize * LBA)..((base + slice) as usize * LBA)]
        .to_vec();
    let mut qp = vol.open_qpair(QD as u32).unwrap();
    let mut rng = SmallRng::seed_from_u64(0xfeed + core);
    let mut bufs = vec![vec![0u8; MAX_NLB as usize * LBA]; QD];
    let mut free: Vec<usize> = (0..QD).collect();
    // The range each buffer's write covers while it is in flight.
    let mut ranges = [(0u64, 0u64); QD];
    let mut cpl = [Completion::default(); QD];
    let mut seq = 0u64;
    let mut done = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && !free.is_empty() {
            let nlb = rng.gen_range(1..=MAX_NLB);
            let off = rng.gen_range(0..=slice - u64::from(nlb));
            let end = off + u64::from(nlb);
            let overlaps = (0..QD)
                .filter(|i| !free.contains(i))
                .any(|i| ranges[i].0 < end && off < ranges[i].1);
            if overlaps {
                continue;
            }
            let b = free.pop().unwrap();
            ranges[b] = (off, end);
            seq += 1;
            // Stamp: core, sequence number and position, so a lost or misplaced write shows.
            for (i, chunk) in bufs[b][..nlb as usize * LBA].chunks_mut(8).enumerate() {
                let v = (core << 56) | (seq << 20) | i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            let len = nlb as usize * LBA;
            let m = off as usize * LBA;
            model[m..m + len].copy_from_slice(&bufs[b][..len]);
            let buf = IoBuf::from_slice(&mut bufs[b]);
            let cmd = IoCommand::with_buf(IoOp::Write, base + off, nlb, buf, b as u64);
            // SAFETY: buffer `b` is not touched until its completion is reaped.
            unsafe { qp.submit(cmd) }.unwrap();
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success(), "core {core}: {}", c.status);
            free.push(c.tag as usize);
            done += 1;
        }
        if stopping && free.len() == QD {
            return (model, done);
        }
        assert!(Instant::now() < deadline, "core {core} stalled");
    }
}

fn run(add_new_leg: bool) {
    let latency = LatencyModel::Uniform {
        mean: Duration::from_micros(50),
        spread: Duration::from_micros(40),
    };
    let mem = |name: &str| -> Arc<dyn BlockDevice> {
        Arc::new(
            MemDevice::new(BLOCKS * LBA as u64, LBA as u32, latency)
                .unwrap()
                .with_name(name),
        )
    };
    let legs = if add_new_leg {
        vec![mem("mem://a")]
    } else {
        vec![mem("mem://a"), mem("mem://b")]
    };
    let cfg = VolumeConfig {
        region_size: 16 << 10,
        overlap_granule: 4 << 10,
        ..VolumeConfig::default()
    };
    let vol = Arc::new(Volume::new("load", legs, cfg).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let cores: Vec<_> = (0..CORES)
        .map(|core| {
            let (vol, stop) = (Arc::clone(&vol), Arc::clone(&stop));
            std::thread::spawn(move || core_workload(vol, core, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    // Host writes land ahead of, inside and behind the copy cursor all the time.
    let job_cfg = ResyncConfig {
        windows: 2,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let job = if add_new_leg {
        vol.add_leg_with(mem("mem://new"), job_cfg).unwrap()
    } else {
        vol.detach_leg(1).unwrap();
        // The cores go on writing while the leg is out; on a loaded machine the first
        // missed region may take a while.
        wait_for("a write that misses the detached leg", || {
            vol.missed_region_count(1).unwrap() > 0
        });
        std::thread::sleep(Duration::from_millis(50));
        vol.attach_leg_with(1, job_cfg).unwrap()
    };
    let status = job.run().join().unwrap();
    // Stop at once: later writes would cover up a write the copy lost.
    stop.store(true, Ordering::Relaxed);
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(vol.leg_states()[1].state, LegState::InSync);
    let models: Vec<_> = cores.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(models.iter().all(|(_, n)| *n > 100), "the cores did write");
    assert_eq!(vol.overlap_locks_held(), 0);

    let a = read_all(&*vol.leg_device(0).unwrap()).unwrap();
    let b = read_all(&*vol.leg_device(1).unwrap()).unwrap();
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("the rebuilt leg differs at LBA {}", i / LBA);
    }
    let slice = (BLOCKS / CORES) as usize * LBA;
    for (core, (model, _)) in models.iter().enumerate() {
        let got = &b[core * slice..(core + 1) * slice];
        if let Some(i) = model.iter().zip(got).position(|(x, y)| x != y) {
            panic!(
                "core {core}: an acknowledged write is missing on the rebuilt leg at LBA {}",
                (core * slice + i) / LBA
            );
        }
    }
}

#[test]
fn resync_under_concurrent_writes_loses_nothing() {
    run(false);
}

#[test]
fn adding_a_leg_under_concurrent_writes_loses_nothing() {
    run(true);
}
