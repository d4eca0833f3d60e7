//! Several cores hammering overlapping blocks: afterwards every in-sync leg is
//! byte-identical (invariant 3).
//!
//! A mem leg applies a command when it is submitted, so on its own it would apply one core's
//! commands in the same order on every leg. Real devices apply commands in any order before
//! completing them; [`DelayedDevice`] models that by handing each command to the mem leg
//! after a random delay (and the mem leg adds random completion latency), so each leg applies
//! overlapping commands in its own order. Only the overlap guard keeps the legs identical.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::delayed::DelayedDevice;
use nvmirror_mirror::{LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const LBA: usize = 512;
/// A small namespace so writes from different cores overlap all the time.
const BLOCKS: u64 = 256;
const MAX_NLB: u32 = 24;
const QD: usize = 8;

/// One core: `count` random writes (a few Write Zeroes among them) at queue depth `QD`.
fn hammer(vol: Arc<Volume>, core: u64, count: u64) {
    let mut qp = vol.open_qpair(QD as u32).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed + core);
    let mut bufs = vec![vec![0u8; MAX_NLB as usize * LBA]; QD];
    let mut free: Vec<usize> = (0..QD).collect();
    let mut cpl = [Completion::default(); QD];
    let mut submitted = 0;
    let mut completed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed < count {
        while submitted < count && !free.is_empty() {
            let b = free.pop().unwrap();
            let nlb = rng.gen_range(1..=MAX_NLB);
            let slba = rng.gen_range(0..=BLOCKS - u64::from(nlb));
            let op = if rng.gen_ratio(1, 16) {
                IoOp::WriteZeroes
            } else {
                IoOp::Write
            };
            // Every write's content is unique: core, sequence number, offset.
            for (i, chunk) in bufs[b].chunks_mut(8).enumerate() {
                let v = (core << 56) | (submitted << 20) | i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            let buf = IoBuf::from_slice(&mut bufs[b]);
            let cmd = IoCommand::with_buf(op, slba, nlb, buf, b as u64);
            // SAFETY: buffer `b` is not touched again until its completion is reaped.
            unsafe { qp.submit(cmd) }.unwrap();
            submitted += 1;
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success(), "core {core}: {}", c.status);
            free.push(c.tag as usize);
            completed += 1;
        }
        assert!(Instant::now() < deadline, "core {core} stalled");
    }
}

/// The same workload fanned out to the legs directly, with no volume (so no overlap guard)
/// in between: every write goes to every leg in the same submission, as the volume does.
fn hammer_without_guard(legs: Vec<Arc<dyn BlockDevice>>, core: u64, count: u64) {
    let mut qps: Vec<_> = legs
        .iter()
        .map(|l| l.open_qpair(QD as u32).unwrap())
        .collect();
    let mut rng = SmallRng::seed_from_u64(0x5eed + core);
    let mut bufs = vec![vec![0u8; MAX_NLB as usize * LBA]; QD];
    let mut free: Vec<usize> = (0..QD).collect();
    let mut left = [0usize; QD];
    let mut cpl = [Completion::default(); QD];
    let (mut submitted, mut completed) = (0, 0);
    while completed < count {
        while submitted < count && !free.is_empty() {
            let b = free.pop().unwrap();
            let nlb = rng.gen_range(1..=MAX_NLB);
            let slba = rng.gen_range(0..=BLOCKS - u64::from(nlb));
            for (i, chunk) in bufs[b].chunks_mut(8).enumerate() {
                let v = (core << 56) | (submitted << 20) | i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            let buf = IoBuf::from_slice(&mut bufs[b]);
            for qp in qps.iter_mut() {
                let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, buf, b as u64);
                // SAFETY: buffer `b` is not touched again until every leg's completion is in.
                unsafe { qp.submit(cmd) }.unwrap();
            }
            left[b] = qps.len();
            submitted += 1;
        }
        for qp in qps.iter_mut() {
            let n = qp.poll(&mut cpl);
            for c in &cpl[..n] {
                let b = c.tag as usize;
                left[b] -= 1;
                if left[b] == 0 {
                    free.push(b);
                    completed += 1;
                }
            }
        }
    }
}

/// Legs that apply overlapping commands in their own order (see the module docs).
fn reordering_legs() -> Vec<Arc<dyn BlockDevice>> {
    (0..3)
        .map(|i| {
            let latency = LatencyModel::Uniform {
                mean: Duration::from_micros(8),
                spread: Duration::from_micros(8),
            };
            let mem = MemDevice::new(BLOCKS * LBA as u64, LBA as u32, latency).unwrap();
            Arc::new(DelayedDevice {
                inner: Arc::new(mem.with_name(format!("mem://leg{i}"))),
                max_delay: Duration::from_micros(20),
            }) as Arc<dyn BlockDevice>
        })
        .collect()
}

fn first_difference(legs: &[Arc<dyn BlockDevice>]) -> Option<(usize, usize)> {
    let images: Vec<Vec<u8>> = legs.iter().map(|l| read_all(&**l).unwrap()).collect();
    (1..images.len()).find_map(|leg| {
        images[0]
            .iter()
            .zip(&images[leg])
            .position(|(a, b)| a != b)
            .map(|i| (leg, i / LBA))
    })
}

/// The negative control: the workload and the legs do make the legs diverge when nothing
/// orders overlapping writes, so the test below can fail.
#[test]
fn without_the_guard_the_same_workload_makes_the_legs_diverge() {
    // Rounds until the race shows: on a loaded machine the threads may run one after another
    // for a whole round. Each round writes over the last one's blocks with new stamps.
    let legs = reordering_legs();
    for round in 0..20u64 {
        let threads: Vec<_> = (0..4)
            .map(|core| {
                let legs = legs.clone();
                std::thread::spawn(move || hammer_without_guard(legs, core + 4 * round, 4000))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        if first_difference(&legs).is_some() {
            return;
        }
    }
    panic!("the legs stayed identical through 20 rounds without any ordering: the test below proves nothing");
}

#[test]
fn overlapping_writes_from_four_cores_leave_the_legs_identical() {
    let legs = reordering_legs();
    let cfg = VolumeConfig {
        // Small granules: writes that do not overlap mostly proceed in parallel.
        overlap_granule: 2 * LBA as u64,
        ..VolumeConfig::default()
    };
    let vol = Arc::new(Volume::new("hammer", legs, cfg).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|core| {
            let vol = Arc::clone(&vol);
            std::thread::spawn(move || hammer(vol, core, 4000))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    assert_eq!(vol.overlap_locks_held(), 0);
    let devs: Vec<_> = (0..3).map(|leg| vol.leg_device(leg).unwrap()).collect();
    if let Some((leg, lba)) = first_difference(&devs) {
        panic!("leg {leg} differs from leg 0 at LBA {lba}");
    }
    let stats = vol.stats();
    assert!(stats.overlap_waits > 0, "the cores did contend");
    assert_eq!(stats.legs[0].ops, 16_000);
}
