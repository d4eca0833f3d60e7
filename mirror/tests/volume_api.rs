//! Volume construction, the queue-pair contract, read policies and statistics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{pattern, RefusingDevice, Rig};
use nvmirror_mirror::{Error, ReadPolicy, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, Status, SubmitError};

fn mem(bytes: u64, lba: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(bytes, lba, LatencyModel::None).unwrap())
}

#[test]
fn construction_checks_legs() {
    let cfg = VolumeConfig::default;
    assert!(matches!(
        Volume::new("v", vec![], cfg()),
        Err(Error::LegCount { count: 0, .. })
    ));
    let single = Volume::new("v", vec![mem(1 << 20, 512)], cfg()).unwrap();
    assert_eq!(single.leg_count(), 1, "one leg is an unmirrored volume");
    let five = (0..5).map(|_| mem(1 << 20, 512)).collect();
    assert!(matches!(
        Volume::new("v", five, cfg()),
        Err(Error::LegCount { count: 5, .. })
    ));
    let a = mem(1 << 20, 512);
    let err = Volume::new("v", vec![Arc::clone(&a), mem(1 << 20, 512), a], cfg()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DuplicateLeg {
                first: 0,
                second: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = Volume::new("v", vec![mem(1 << 20, 512), mem(1 << 20, 4096)], cfg()).unwrap_err();
    assert!(matches!(
        err,
        Error::LbaSizeMismatch {
            leg: 1,
            lba_size: 4096,
            expected: 512,
            ..
        }
    ));
    assert!(err.to_string().contains("4096-byte blocks"), "{err}");
    let bad = VolumeConfig {
        overlap_granule: 1000,
        ..VolumeConfig::default()
    };
    assert!(matches!(
        Volume::new("v", vec![mem(1 << 20, 512), mem(1 << 20, 512)], bad),
        Err(Error::Config { .. })
    ));
    // The exported namespace is the smallest leg.
    let v = Volume::new(
        "v",
        vec![mem(3 << 20, 4096), mem(2 << 20, 4096), mem(5 << 20, 4096)],
        cfg(),
    )
    .unwrap();
    assert_eq!(v.geometry().num_blocks, 512);
    assert_eq!(v.geometry().lba_size, 4096);
    assert_eq!(v.name(), "v");
    assert!(v.open_qpair(0).is_err());
}

#[test]
fn out_of_range_commands_complete_with_the_range_status_and_touch_no_leg() {
    let mut rig = Rig::new(2, VolumeConfig::default());
    let blocks = rig.vol.geometry().num_blocks;
    assert_eq!(rig.write(blocks - 1, 2, 1), Status::LBA_OUT_OF_RANGE);
    assert_eq!(
        rig.op(IoOp::WriteZeroes, blocks, 1),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(rig.op(IoOp::Deallocate, 0, 0), Status::INVALID_FIELD);
    // A buffer too small for the transfer.
    let tag = rig.submit(IoOp::Write, 0, 4, vec![0; 512]);
    assert_eq!(rig.wait(tag), Status::DATA_SGL_LENGTH_INVALID);
    let stats = rig.vol.stats();
    assert_eq!(stats.legs[0].ops + stats.legs[1].ops, 0);
    assert!(rig.write(blocks - 1, 1, 1).is_success());
}

#[test]
fn submit_is_refused_only_at_the_volume_queue_depth() {
    let legs = vec![mem(1 << 20, 512), mem(1 << 20, 512)];
    let vol = Volume::new("v", legs, VolumeConfig::default()).unwrap();
    let mut qp = vol.open_qpair(4).unwrap();
    let mut bufs = vec![vec![1u8; 512]; 5];
    // Five writes to the same block: the overlap guard holds four back, the queue refuses
    // the fifth.
    for (i, b) in bufs.iter_mut().enumerate().take(4) {
        let cmd = IoCommand::with_buf(IoOp::Write, 0, 1, IoBuf::from_slice(b), i as u64);
        // SAFETY: `bufs` outlives every command.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    assert_eq!(qp.outstanding(), 4);
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 1, IoBuf::from_slice(&mut bufs[4]), 4);
    // SAFETY: as above.
    assert_eq!(unsafe { qp.submit(cmd) }, Err(SubmitError::QueueFull));
    let mut tags = Vec::new();
    let mut cpl = [Completion::default(); 8];
    while tags.len() < 4 {
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success());
            tags.push(c.tag);
        }
    }
    assert_eq!(
        tags,
        vec![0, 1, 2, 3],
        "one core's overlapping writes start in order"
    );
    assert_eq!(qp.outstanding(), 0);
    assert!(vol.stats().overlap_waits > 0);
    assert_eq!(vol.overlap_locks_held(), 0);
}

#[test]
fn a_waiting_write_holds_back_only_the_writes_that_overlap_it() {
    let cfg = VolumeConfig {
        overlap_granule: 512,
        ..VolumeConfig::default()
    };
    let latency = LatencyModel::Fixed(Duration::from_millis(50));
    let mut rig = Rig::with_latency(2, cfg, latency);
    let w1 = rig.submit_write(0, 4, 1);
    let w2 = rig.submit_write(0, 8, 2); // waits for w1 (overlap guard on blocks 0-3)
    let w3 = rig.submit_write(100, 8, 3); // other blocks: goes at once
    let w4 = rig.submit_write(6, 4, 4); // free blocks, but overlaps the waiting w2: after it
    let mut order = Vec::new();
    while order.len() < 4 {
        rig.poll_once();
        for t in [w1, w2, w3, w4] {
            if rig.status(t).is_some() && !order.contains(&t) {
                order.push(t);
            }
        }
    }
    let at = |t| order.iter().position(|&x| x == t).unwrap();
    assert!(
        at(w3) < at(w2),
        "a write to other blocks waited behind a held-up one: {order:?}"
    );
    assert!(at(w1) < at(w2) && at(w2) < at(w4), "{order:?}");
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
    for leg in 0..2 {
        assert_eq!(rig.leg_bytes(leg, 0, 6), pattern(0, 8, 2)[..6 * 512]);
        assert_eq!(
            rig.leg_bytes(leg, 6, 4),
            pattern(6, 4, 4),
            "w4 is the last writer"
        );
    }
    assert!(rig.vol.stats().overlap_waits > 0);
}

#[test]
fn round_robin_reads_spread_over_the_legs() {
    let cfg = VolumeConfig {
        read_policy: ReadPolicy::RoundRobin,
        ..VolumeConfig::default()
    };
    let mut rig = Rig::new(3, cfg);
    assert!(rig.write(0, 8, 1).is_success());
    for _ in 0..30 {
        let (status, data) = rig.read(0, 8);
        assert!(status.is_success());
        assert_eq!(data, pattern(0, 8, 1));
    }
    let ops: Vec<u64> = rig.vol.stats().legs.iter().map(|l| l.ops).collect();
    assert_eq!(ops, vec![11, 11, 11], "one write and ten reads each");
}

#[test]
fn primary_policy_reads_only_the_primary() {
    let mut rig = Rig::new(3, VolumeConfig::default());
    assert!(rig.write(0, 8, 1).is_success());
    for _ in 0..10 {
        assert!(rig.read(0, 8).0.is_success());
    }
    let ops: Vec<u64> = rig.vol.stats().legs.iter().map(|l| l.ops).collect();
    assert_eq!(ops, vec![11, 1, 1]);
}

#[test]
fn least_latency_reads_prefer_the_fast_leg() {
    let slow = MemDevice::new(
        1 << 20,
        512,
        LatencyModel::Fixed(Duration::from_micros(400)),
    )
    .unwrap();
    let fast =
        MemDevice::new(1 << 20, 512, LatencyModel::Fixed(Duration::from_micros(10))).unwrap();
    let cfg = VolumeConfig {
        read_policy: ReadPolicy::LeastLatency,
        ..VolumeConfig::default()
    };
    let vol = Volume::new("v", vec![Arc::new(slow), Arc::new(fast)], cfg).unwrap();
    let mut qp = vol.open_qpair(8).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut cpl = [Completion::default(); 1];
    for i in 0..200u64 {
        let op = if i < 8 { IoOp::Write } else { IoOp::Read };
        let cmd = IoCommand::with_buf(op, 0, 8, IoBuf::from_slice(&mut buf), i);
        // SAFETY: one command at a time; `buf` outlives it.
        unsafe { qp.submit(cmd) }.unwrap();
        while qp.poll(&mut cpl) == 0 {}
        assert!(cpl[0].status.is_success());
    }
    let stats = vol.stats();
    // 8 writes reach both legs; of 192 reads most go to the 40x faster leg (the slow one is
    // retried now and then, and a descheduled test thread can make the fast one look slow).
    let (slow, fast) = (stats.legs[0].ops - 8, stats.legs[1].ops - 8);
    assert_eq!(slow + fast, 192);
    assert!(
        fast > 4 * slow,
        "slow leg served {slow} reads, fast leg {fast}"
    );
    assert!(stats.legs[0].latency.p50 > stats.legs[1].latency.p50);
}

#[test]
fn statistics_count_per_leg_and_who_completed_last() {
    // Latencies that differ by far more than one poll of the rig (tens of microseconds in a
    // debug build on a loaded machine): which leg is last must be the legs' doing, not the
    // order the poll visits them in.
    let mut rig = Rig::with_latency(
        3,
        VolumeConfig::default(),
        LatencyModel::Uniform {
            mean: Duration::from_micros(400),
            spread: Duration::from_micros(350),
        },
    );
    for i in 0..100u64 {
        rig.submit_write(i * 16, 8, i as u8);
        if i % 8 == 7 {
            rig.wait_all();
        }
    }
    rig.wait_all();
    assert!(rig.read(0, 8).0.is_success());
    let stats = rig.vol.stats();
    for (leg, s) in stats.legs.iter().enumerate() {
        assert_eq!(s.name, format!("mem://leg{leg}"));
        let reads = u64::from(leg == 0);
        assert_eq!(s.ops, 100 + reads);
        assert_eq!(s.bytes, (100 + reads) * 4096);
        assert_eq!(s.errors, 0);
        assert_eq!(s.latency.count, 100 + reads);
        assert!(s.latency.p50 >= Duration::from_micros(4), "{:?}", s.latency);
        assert!(s.latency.p99 >= s.latency.p50 && s.latency.max >= s.latency.p99);
    }
    let last: u64 = stats.legs.iter().map(|s| s.completed_last).sum();
    assert_eq!(
        last, 100,
        "exactly one leg completes each mirrored write last"
    );
    assert!(
        stats.legs.iter().filter(|s| s.completed_last > 0).count() >= 2,
        "with random latency more than one leg is last sometimes"
    );
    rig.assert_acked_writes_on_in_sync_legs();
}

#[test]
fn a_volume_drives_like_a_device_through_the_trait_object() {
    let legs = vec![mem(1 << 20, 4096), mem(1 << 20, 4096)];
    let dev: Arc<dyn BlockDevice> =
        Arc::new(Volume::new("v", legs, VolumeConfig::default()).unwrap());
    let mut qp = dev.open_qpair(2).unwrap();
    let mut data = vec![0x77u8; 8192];
    let cmd = IoCommand::with_buf(IoOp::Write, 3, 2, IoBuf::from_slice(&mut data), 9);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default(); 1];
    while qp.poll(&mut cpl) == 0 {}
    assert_eq!(
        cpl[0],
        Completion {
            tag: 9,
            status: Status::SUCCESS
        }
    );
    let all = nvmirror_nvme::read_all(&*dev).unwrap();
    assert!(all[3 * 4096..5 * 4096].iter().all(|&b| b == 0x77));
    assert!(all[..3 * 4096].iter().all(|&b| b == 0));
}

#[test]
fn a_leg_that_cannot_open_a_queue_pair_is_faulted_unless_it_is_the_last() {
    let legs: Vec<Arc<RefusingDevice>> = (0..2)
        .map(|_| {
            Arc::new(RefusingDevice {
                inner: mem(1 << 20, 512),
                refuse: false.into(),
            })
        })
        .collect();
    let devs = legs
        .iter()
        .map(|l| Arc::clone(l) as Arc<dyn BlockDevice>)
        .collect();
    let vol = Volume::new("v", devs, VolumeConfig::default()).unwrap();
    legs[1]
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut qp = vol.open_qpair(4).unwrap();
    assert_eq!(
        vol.leg_states()[1].state,
        nvmirror_mirror::LegState::Faulted
    );
    let mut data = vec![3u8; 512];
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 1, IoBuf::from_slice(&mut data), 1);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default(); 1];
    while qp.poll(&mut cpl) == 0 {}
    assert!(cpl[0].status.is_success());
    assert_eq!(vol.missed_regions(1).unwrap(), vec![0]);
    // The primary is the last in-sync leg: failing to open it is an error, not a fault.
    legs[0]
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let err = vol.open_volume_qpair(4).unwrap_err();
    assert!(
        matches!(err, Error::OpenLegQueuePair { leg: 0, .. }),
        "{err}"
    );
    assert_eq!(vol.leg_states()[0].state, nvmirror_mirror::LegState::InSync);
}

#[test]
fn closed_queue_pairs_keep_their_counts_and_leave_no_trace() {
    // Hosts that connect and disconnect all day: every closed queue pair's counters stay in
    // the volume's totals, and the per-queue-pair list does not grow.
    let legs = vec![mem(1 << 20, 512), mem(1 << 20, 512)];
    let vol = Volume::new("v", legs, VolumeConfig::default()).unwrap();
    let mut buf = vec![7u8; 512];
    for i in 0..300u64 {
        let mut qp = vol.open_qpair(4).unwrap();
        assert_eq!(vol.stats().queue_pairs, 1);
        let cmd = IoCommand::with_buf(IoOp::Write, i % 64, 1, IoBuf::from_slice(&mut buf), i);
        // SAFETY: `buf` outlives the command, which completes below before it is reused.
        unsafe { qp.submit(cmd) }.unwrap();
        let mut cpl = [Completion::default()];
        while qp.poll(&mut cpl) == 0 {}
        assert!(cpl[0].status.is_success());
    }
    let stats = vol.stats();
    assert_eq!(
        stats.queue_pairs, 0,
        "closed queue pairs are dropped from the list"
    );
    let ops: Vec<u64> = stats.legs.iter().map(|l| l.ops).collect();
    assert_eq!(ops, vec![300, 300], "their counts are kept");
    assert_eq!(stats.legs[0].latency.count, 300);
}
