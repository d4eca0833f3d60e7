//! The write-intent rule (invariant 4) on recording legs: a region's bit is on disk on every
//! leg before that leg receives a write to the region; a write to a marked region costs no
//! metadata I/O; first touches share page writes; sequential streams are predicted; clearing
//! never removes a bit under a write in flight or a faulted leg's missed region.

mod bitmap_rig;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmap_rig::{raw_read, run_writes, RecordingLeg, LBA};
use nvmirror_mirror::{BitmapConfig, LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::LatencyModel;
use nvmirror_nvme::BlockDevice;
use rand::{Rng, SeedableRng};

const LEG_BYTES: u64 = 64 << 20;
const REGION: u64 = 64 << 10;
const BLOCKS_PER_REGION: u64 = REGION / LBA as u64;

fn cfg(bitmap: BitmapConfig) -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        bitmap,
        ..VolumeConfig::default()
    }
}

fn rig(
    legs: usize,
    c: VolumeConfig,
    latency: LatencyModel,
) -> (Arc<Volume>, Vec<Arc<RecordingLeg>>) {
    let recs: Vec<_> = (0..legs)
        .map(|i| RecordingLeg::new(&format!("rec://leg{i}"), LEG_BYTES, latency))
        .collect();
    let devs = recs
        .iter()
        .map(|r| Arc::clone(r) as Arc<dyn BlockDevice>)
        .collect();
    let vol = Volume::format("v", devs, c, false).unwrap();
    let layout = vol.metadata_layout().unwrap();
    for r in &recs {
        let mut bits = vec![0u8; layout.bitmap_len as usize];
        raw_read(&**r, layout.bitmap_offset, &mut bits);
        r.watch(layout, bits);
    }
    (Arc::new(vol), recs)
}

fn assert_no_violations(recs: &[Arc<RecordingLeg>]) {
    for r in recs {
        let v = r.violations();
        assert!(v.is_empty(), "{}: {:?}", r.name(), &v[..v.len().min(5)]);
        assert!(r.data_writes() > 0);
    }
}

fn random_writes(n: usize, blocks: u64, seed: u64) -> Vec<(u64, u32)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let nlb = rng.gen_range(1..=64u32);
            (rng.gen_range(0..blocks - u64::from(nlb)), nlb)
        })
        .collect()
}

#[test]
fn bit_is_durable_before_data_on_one_core() {
    let (vol, recs) = rig(2, cfg(BitmapConfig::default()), LatencyModel::None);
    let blocks = vol.geometry().num_blocks;
    let mut qp = vol.open_qpair(32).unwrap();
    run_writes(&mut *qp, &random_writes(3000, blocks, 1), 32, 0xab);
    assert_no_violations(&recs);
    let s = vol.stats();
    assert!(s.metadata_writes > 0 && s.bitmap_first_touches > 0, "{s:?}");
    assert_eq!(s.bitmap_writes, 3000);
}

#[test]
fn bit_is_durable_before_data_with_threads_and_a_clearer() {
    let bitmap = BitmapConfig {
        idle_delay: Duration::ZERO,
        max_marked_regions: Some(16),
        ..BitmapConfig::default()
    };
    let (vol, recs) = rig(
        2,
        cfg(bitmap),
        LatencyModel::Uniform {
            mean: Duration::from_micros(20),
            spread: Duration::from_micros(15),
        },
    );
    let blocks = vol.geometry().num_blocks;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clearer = {
        let (vol, stop) = (Arc::clone(&vol), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut cleared = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cleared += vol.clear_idle_regions(Instant::now()).unwrap();
            }
            cleared
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let vol = Arc::clone(&vol);
            std::thread::spawn(move || {
                let mut qp = vol.open_qpair(16).unwrap();
                // A small hot set, so writers and the clearer keep meeting on the same regions.
                let writes = random_writes(2000, blocks.min(40 * BLOCKS_PER_REGION), 10 + t);
                run_writes(&mut *qp, &writes, 16, t as u8);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cleared = clearer.join().unwrap();
    assert!(cleared > 0, "the clearer must have raced the writers");
    assert_no_violations(&recs);
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
}

#[test]
fn a_write_to_a_marked_region_costs_no_metadata_io() {
    let (vol, recs) = rig(2, cfg(BitmapConfig::default()), LatencyModel::None);
    let mut qp = vol.open_qpair(8).unwrap();
    let region = 7 * BLOCKS_PER_REGION;
    run_writes(&mut *qp, &[(region, 8)], 1, 1);
    let before = (
        vol.stats().metadata_writes,
        recs[0].meta_writes(),
        recs[1].meta_writes(),
    );
    assert_eq!(before, (1, 1, 1));
    let again: Vec<_> = (0..200).map(|i| (region + (i % 100), 4)).collect();
    run_writes(&mut *qp, &again, 8, 2);
    let after = (
        vol.stats().metadata_writes,
        recs[0].meta_writes(),
        recs[1].meta_writes(),
    );
    assert_eq!(before, after, "no metadata I/O for marked regions");
    let s = vol.stats();
    assert_eq!(s.bitmap_first_touches, 1);
    assert_eq!(s.bitmap_hits, 200);
    assert_no_violations(&recs);
}

#[test]
fn first_touches_in_one_poll_share_one_page_write() {
    let (vol, recs) = rig(2, cfg(BitmapConfig::default()), LatencyModel::None);
    let mut qp = vol.open_qpair(32).unwrap();
    // 16 writes to 16 different, non-adjacent regions (no stream), submitted before a poll.
    let writes: Vec<_> = (0..16u64)
        .map(|i| (i * 3 * BLOCKS_PER_REGION + 5, 8))
        .collect();
    run_writes(&mut *qp, &writes, 32, 3);
    let s = vol.stats();
    assert_eq!(s.bitmap_first_touches, 16);
    assert_eq!(s.metadata_writes, 1, "{s:?}");
    assert_eq!(recs[0].meta_writes(), 1);
    assert_eq!(vol.marked_region_count(), 16);
    assert_no_violations(&recs);
}

fn sequential(c: VolumeConfig) -> (nvmirror_mirror::VolumeStats, Vec<Arc<RecordingLeg>>) {
    let (vol, recs) = rig(2, c, LatencyModel::None);
    let mut qp = vol.open_qpair(4).unwrap();
    let nlb = 32u32; // 16 KiB: four writes per region
    let writes: Vec<_> = (0..vol.geometry().num_blocks / u64::from(nlb))
        .map(|i| (i * u64::from(nlb), nlb))
        .collect();
    run_writes(&mut *qp, &writes, 1, 4);
    assert_no_violations(&recs);
    (vol.stats(), recs)
}

#[test]
fn prediction_makes_sequential_streams_hit() {
    let (with, _) = sequential(cfg(BitmapConfig::default()));
    let (without, _) = sequential(cfg(BitmapConfig {
        predict_max: 0,
        ..BitmapConfig::default()
    }));
    // 63 MiB of 64 KiB regions: 1008 regions, 4032 writes.
    assert_eq!(with.bitmap_writes, 4032);
    assert_eq!(without.bitmap_first_touches, 1008);
    assert!((without.bitmap_hit_rate() - 0.75).abs() < 1e-9);
    assert!(with.bitmap_hit_rate() > 0.99, "{}", with.bitmap_hit_rate());
    assert!(with.predicted_regions > 900, "{with:?}");
    assert!(
        with.metadata_writes * 10 < without.metadata_writes,
        "{} vs {}",
        with.metadata_writes,
        without.metadata_writes
    );
}

#[test]
fn random_writes_predict_nothing() {
    let (vol, _) = rig(2, cfg(BitmapConfig::default()), LatencyModel::None);
    let mut qp = vol.open_qpair(8).unwrap();
    let writes: Vec<_> = (0..50u64)
        .map(|i| ((i * 7919) % 900 * BLOCKS_PER_REGION, 8))
        .collect();
    run_writes(&mut *qp, &writes, 1, 5);
    assert_eq!(vol.stats().predicted_regions, 0);
}

/// `n` mem legs behind fault injectors, and the same legs as plain devices.
fn faulty_legs(
    n: usize,
) -> (
    Vec<Arc<nvmirror_nvme::backend::FaultyDevice>>,
    Vec<Arc<dyn BlockDevice>>,
) {
    use nvmirror_nvme::backend::{FaultyDevice, MemDevice};
    let faulty: Vec<Arc<FaultyDevice>> = (0..n)
        .map(|_| {
            let mem = MemDevice::new(LEG_BYTES, LBA, LatencyModel::None).unwrap();
            Arc::new(FaultyDevice::wrap(Arc::new(mem)))
        })
        .collect();
    let devs = faulty
        .iter()
        .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
        .collect();
    (faulty, devs)
}

#[test]
fn a_write_in_flight_keeps_its_region_marked() {
    use nvmirror_nvme::backend::{Fault, OpFilter};
    let (faulty, devs) = faulty_legs(2);
    let c = cfg(BitmapConfig {
        idle_delay: Duration::ZERO,
        max_marked_regions: Some(0),
        ..BitmapConfig::default()
    });
    let vol = Volume::format("v", devs, c, false).unwrap();
    let mut qp = vol.open_volume_qpair(4).unwrap();
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair};
    let mut data = vec![9u8; 4096];
    let buf = nvmirror_nvme::dma::IoBuf::from_slice(&mut data);
    let slba = 3 * BLOCKS_PER_REGION;
    // Mark region 3 with a first write while nothing hangs, then hang the next data write.
    // SAFETY: `data` outlives the commands, all reaped below.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, slba, 8, buf, 1)) }.unwrap();
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {}
    assert!(vol.region_marked(3));
    let id = faulty[1].injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    // SAFETY: as above.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, slba, 8, buf, 2)) }.unwrap();
    for _ in 0..100 {
        assert_eq!(qp.poll(&mut c), 0);
    }
    let later = Instant::now() + Duration::from_secs(1);
    for i in 0..5 {
        assert_eq!(
            vol.clear_idle_regions(later + Duration::from_secs(i))
                .unwrap(),
            0
        );
        assert!(vol.region_marked(3), "cleared under a write in flight");
    }
    faulty[1].injector().clear(id);
    while qp.poll(&mut c) == 0 {}
    assert!(c[0].status.is_success());
    let t = Instant::now() + Duration::from_secs(10);
    vol.clear_idle_regions(t).unwrap();
    vol.clear_idle_regions(t + Duration::from_secs(1)).unwrap();
    assert!(!vol.region_marked(3), "idle and identical: cleared");
}

#[test]
fn a_faulted_legs_missed_regions_are_never_cleared() {
    let c = cfg(BitmapConfig {
        idle_delay: Duration::from_millis(1),
        ..BitmapConfig::default()
    });
    let (vol, recs) = rig(2, c, LatencyModel::None);
    let mut qp = vol.open_qpair(8).unwrap();
    run_writes(&mut *qp, &[(BLOCKS_PER_REGION, 8)], 1, 1); // region 1, both legs
    vol.fault_leg(1).unwrap();
    run_writes(
        &mut *qp,
        &[(5 * BLOCKS_PER_REGION, 8), (9 * BLOCKS_PER_REGION, 8)],
        2,
        2,
    );
    assert_eq!(vol.missed_regions(1).unwrap(), vec![5, 9]);
    let mut t = Instant::now();
    for _ in 0..4 {
        t += Duration::from_secs(1);
        vol.clear_idle_regions(t).unwrap();
    }
    assert_eq!(vol.marked_regions().unwrap(), vec![5, 9]);
    // On disk on the survivor too.
    let l = vol.metadata_layout().unwrap();
    let mut page = vec![0u8; 4096];
    raw_read(&*vol.leg_device(0).unwrap(), l.bitmap_offset, &mut page);
    assert_eq!(page[0], 0b10_0000);
    assert_eq!(page[1], 0b10);
    drop(qp);
    assert!(recs[0].violations().is_empty());
}

#[test]
fn a_hung_bitmap_page_write_faults_its_leg_after_the_timeout() {
    use nvmirror_nvme::backend::{Fault, OpFilter};
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair};
    let (faulty, devs) = faulty_legs(2);
    let c = VolumeConfig {
        io_timeout: Duration::from_millis(50),
        ..cfg(BitmapConfig::default())
    };
    let vol = Volume::format("v", devs, c, false).unwrap();
    let mut qp = vol.open_volume_qpair(4).unwrap();
    faulty[1].injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut data = vec![1u8; 4096];
    let buf = nvmirror_nvme::dma::IoBuf::from_slice(&mut data);
    let started = Instant::now();
    // SAFETY: `data` outlives the command (and the volume's legs, which may keep it).
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 0, 8, buf, 1)) }.unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the host must not hang"
        );
    }
    assert!(cpl[0].status.is_success(), "{:?}", cpl[0].status);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    assert_eq!(vol.stats().legs[1].timeouts, 1);
    assert_eq!(vol.missed_regions(1).unwrap(), vec![0]);
    std::mem::forget(data);
}

#[test]
fn first_touches_on_two_cores_share_one_page_write() {
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair};
    let (vol, recs) = rig(2, cfg(BitmapConfig::default()), LatencyModel::None);
    // Two queue pairs stand for two cores; one thread drives both in a fixed interleaving.
    let mut a = vol.open_volume_qpair(4).unwrap();
    let mut b = vol.open_volume_qpair(4).unwrap();
    let mut da = vec![1u8; 4096];
    let mut db = vec![2u8; 4096];
    let (ba, bb) = (
        nvmirror_nvme::dma::IoBuf::from_slice(&mut da),
        nvmirror_nvme::dma::IoBuf::from_slice(&mut db),
    );
    // SAFETY: both buffers outlive their commands, reaped below.
    unsafe {
        a.submit(IoCommand::with_buf(
            IoOp::Write,
            BLOCKS_PER_REGION,
            8,
            ba,
            1,
        ))
    }
    .unwrap();
    // SAFETY: as above.
    unsafe {
        b.submit(IoCommand::with_buf(
            IoOp::Write,
            3 * BLOCKS_PER_REGION,
            8,
            bb,
            2,
        ))
    }
    .unwrap();
    let mut c = [Completion::default()];
    let (mut got_a, mut got_b) = (false, false);
    for _ in 0..100 {
        got_a |= a.poll(&mut c) == 1;
        got_b |= b.poll(&mut c) == 1;
    }
    assert!(got_a && got_b);
    let s = vol.stats();
    assert_eq!(s.bitmap_first_touches, 2);
    assert_eq!(
        s.metadata_writes, 1,
        "core b's bit rode on core a's page write"
    );
    assert_eq!(recs[0].meta_writes(), 1);
    assert_no_violations(&recs);
}
