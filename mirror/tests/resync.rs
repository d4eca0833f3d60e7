//! Resync: attach, add and remove legs; exact copies; cancel and resume; pause; failures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, RefusingDevice, Rig, LBA, VOLUME_BYTES};
use nvmirror_mirror::{Error, JobState, LegState, ResyncConfig, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::{read_all, BlockDevice, Status};

/// 64 KiB regions: 128 blocks, 64 regions in the 4 MiB volume.
const REGION: u64 = 64 << 10;
const REGION_BLOCKS: u64 = REGION / LBA as u64;
const REGIONS: u64 = VOLUME_BYTES / REGION;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        ..VolumeConfig::default()
    }
}

/// A resync paced to about `bytes_per_sec`, one window at a time.
fn slow(bytes_per_sec: u64) -> ResyncConfig {
    ResyncConfig {
        windows: 1,
        max_rate: bytes_per_sec,
        adaptive: false,
        ..ResyncConfig::default()
    }
}

fn assert_legs_identical(vol: &Volume) {
    let first = read_all(&*vol.leg_device(0).unwrap()).unwrap();
    for leg in 1..vol.leg_count() {
        let other = read_all(&*vol.leg_device(leg).unwrap()).unwrap();
        if let Some(i) = first.iter().zip(&other).position(|(a, b)| a != b) {
            panic!("leg {leg} differs from leg 0 at LBA {}", i / LBA);
        }
    }
}

/// Fills every region of the volume with data, through the volume.
fn fill(rig: &mut Rig, seed: u8) {
    for r in 0..REGIONS {
        assert!(rig
            .write(r * REGION_BLOCKS, 64, seed.wrapping_add(r as u8))
            .is_success());
    }
}

#[test]
fn detach_writes_attach_copies_exactly_the_missed_regions() {
    let mut rig = Rig::new(2, cfg());
    fill(&mut rig, 1);
    rig.vol.detach_leg(1).unwrap();
    for (slba, nlb) in [(130, 4), (640, 5), (1270, 20), (8191, 1)] {
        assert!(rig.write(slba, nlb, 9).is_success());
    }
    let missed = rig.vol.missed_regions(1).unwrap();
    assert_eq!(missed, vec![1, 5, 9, 10, 63]);
    let events = rig.vol.events();

    let status = rig.vol.attach_leg(1).unwrap().run().join().unwrap();
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(status.regions_copied, 5);
    assert_eq!(
        status.bytes_copied,
        5 * REGION,
        "exactly the missed regions"
    );
    assert_eq!(status.bytes_total, status.bytes_copied);
    assert_eq!(status.passes, 1);
    assert_eq!(status.percent, 100.0);
    assert_eq!(rig.states(), vec![LegState::InSync, LegState::InSync]);
    assert_eq!(rig.vol.missed_region_count(1).unwrap(), 0);
    // Two transitions: Detached → Resyncing and the flip Resyncing → InSync.
    assert_eq!(rig.vol.events(), events + 2);
    assert_eq!(rig.vol.overlap_locks_held(), 0);
    assert_legs_identical(&rig.vol);
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
    assert_eq!(rig.vol.resync_status().unwrap(), status);
}

#[test]
fn add_leg_to_a_one_leg_volume_copies_everything() {
    let mut rig = Rig::new(1, cfg());
    fill(&mut rig, 3);
    let mem = MemDevice::new(VOLUME_BYTES, LBA as u32, LatencyModel::None)
        .unwrap()
        .with_name("mem://new");
    let faulty = Arc::new(FaultyDevice::wrap(Arc::new(mem)));
    rig.faults.push(Arc::clone(&faulty));
    let new: Arc<dyn BlockDevice> = faulty;
    let job = rig.vol.add_leg(Arc::clone(&new)).unwrap();
    assert_eq!(rig.vol.leg_count(), 2);
    assert_eq!(rig.vol.leg_states()[1].state, LegState::Resyncing);
    assert_eq!(rig.vol.missed_region_count(1).unwrap(), REGIONS);
    let status = job.run().join().unwrap();
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(
        status.bytes_copied, VOLUME_BYTES,
        "a new leg gets every region"
    );
    assert_eq!(status.regions_copied, REGIONS);
    assert_eq!(rig.vol.leg_states()[1].state, LegState::InSync);
    assert_legs_identical(&rig.vol);
    // The host queue pair opened before the leg existed now writes to it as well.
    assert!(rig.write(4000, 8, 77).is_success());
    assert_legs_identical(&rig.vol);
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
    // The same device cannot be added twice; a smaller or other-block-size one neither.
    assert!(matches!(rig.vol.add_leg(new), Err(Error::AddLeg { .. })));
    let small: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(VOLUME_BYTES / 2, LBA as u32, LatencyModel::None).unwrap());
    assert!(matches!(rig.vol.add_leg(small), Err(Error::AddLeg { .. })));
    let big_blocks: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(VOLUME_BYTES, 4096, LatencyModel::None).unwrap());
    assert!(matches!(
        rig.vol.add_leg(big_blocks),
        Err(Error::AddLeg { .. })
    ));
}

#[test]
fn cancel_midway_then_attach_again_resumes_where_it_stopped() {
    let mut rig = Rig::new(2, cfg());
    fill(&mut rig, 5);
    rig.vol.detach_leg(1).unwrap();
    fill(&mut rig, 6); // every region missed
    assert_eq!(rig.vol.missed_region_count(1).unwrap(), REGIONS);

    // 64 regions at 1 MiB/s: about 4 s if left alone.
    let handle = rig.vol.attach_leg_with(1, slow(1 << 20)).unwrap().run();
    wait_for("a quarter copied", || {
        rig.vol.resync_status().unwrap().regions_copied >= 8
    });
    rig.vol.resync_cancel().unwrap();
    let first = handle.join().unwrap();
    assert_eq!(first.state, JobState::Cancelled, "{first:?}");
    assert_eq!(
        rig.states()[1],
        LegState::Faulted,
        "cancel leaves the leg faulted"
    );
    let left = rig.vol.missed_region_count(1).unwrap();
    assert_eq!(
        first.regions_copied + left,
        REGIONS,
        "nothing copied is forgotten, nothing left is lost"
    );
    assert!(left > 0 && left < REGIONS);
    // The regions copied are the lowest ones (ascending order).
    assert_eq!(rig.vol.missed_regions(1).unwrap()[0], first.regions_copied);

    let second = rig.vol.attach_leg(1).unwrap().run().join().unwrap();
    assert_eq!(second.state, JobState::Done);
    assert_eq!(second.bytes_copied, left * REGION);
    assert!(
        second.bytes_copied < VOLUME_BYTES,
        "the second resync copies less than everything"
    );
    assert_legs_identical(&rig.vol);
}

#[test]
fn pause_stops_the_copy_and_resume_finishes_it() {
    let mut rig = Rig::new(2, cfg());
    rig.vol.detach_leg(1).unwrap();
    fill(&mut rig, 7);
    let handle = rig.vol.attach_leg_with(1, slow(2 << 20)).unwrap().run();
    wait_for("some progress", || {
        rig.vol.resync_status().unwrap().regions_copied >= 2
    });
    rig.vol.resync_pause().unwrap();
    std::thread::sleep(Duration::from_millis(50)); // the window in flight finishes
    let paused = rig.vol.resync_status().unwrap();
    assert_eq!(paused.state, JobState::Paused);
    std::thread::sleep(Duration::from_millis(200));
    let still = rig.vol.resync_status().unwrap();
    assert_eq!(
        still.regions_copied, paused.regions_copied,
        "nothing copied while paused"
    );
    assert_eq!(rig.states()[1], LegState::Resyncing);
    // Writes keep reaching the resyncing leg while paused.
    assert!(rig.write(3 * REGION_BLOCKS + 1, 2, 42).is_success());
    rig.vol.resync_set_rate(0, false).unwrap();
    rig.vol.resync_resume().unwrap();
    let done = handle.join().unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.max_rate, 0);
    assert_legs_identical(&rig.vol);
    rig.assert_acked_writes_on_in_sync_legs();
}

#[test]
fn a_write_failure_on_the_target_faults_it_and_keeps_its_regions() {
    let mut rig = Rig::new(3, cfg());
    rig.vol.detach_leg(2).unwrap();
    fill(&mut rig, 11);
    let bad = rig.arm(
        2,
        Fault::FailRange {
            ops: OpFilter::Writes,
            slba: 20 * REGION_BLOCKS + 3,
            nlb: 1,
            status: Status::WRITE_FAULT,
        },
    );
    let status = rig.vol.attach_leg(2).unwrap().run().join().unwrap();
    assert_eq!(status.state, JobState::Failed);
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or("")
            .contains("writing leg 2"),
        "{status:?}"
    );
    assert_eq!(
        rig.states(),
        vec![LegState::InSync, LegState::InSync, LegState::Faulted]
    );
    assert!(
        rig.vol.region_missed(2, 20).unwrap(),
        "the failed region stays marked"
    );
    assert_eq!(rig.vol.overlap_locks_held(), 0);
    // Host I/O goes on; the in-sync legs have every acknowledged write.
    assert!(rig.write(5, 3, 12).is_success());
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
    // With the fault cleared, a second attach finishes the job.
    rig.clear(2, bad);
    let status = rig.vol.attach_leg(2).unwrap().run().join().unwrap();
    assert_eq!(status.state, JobState::Done);
    assert_legs_identical(&rig.vol);
}

#[test]
fn a_resyncing_leg_gets_writes_but_never_serves_reads_or_fails_the_host() {
    let mut rig = Rig::new(2, cfg());
    fill(&mut rig, 13);
    rig.vol.fault_leg(1).unwrap();
    assert!(rig.write(10, 4, 14).is_success());
    let mut job = rig.vol.attach_leg(1).unwrap();
    assert_eq!(rig.states()[1], LegState::Resyncing);
    // A write now reaches leg 1 although nothing has been copied yet.
    assert!(rig.write(2 * REGION_BLOCKS, 8, 15).is_success());
    assert_eq!(
        rig.leg_bytes(1, 2 * REGION_BLOCKS, 8),
        rig.expected(2 * REGION_BLOCKS, 8)
    );
    // Reads come from leg 0 only, whatever leg 1 would say.
    let reads_before = rig.vol.stats().legs[1].ops;
    rig.arm(
        1,
        Fault::FailRange {
            ops: OpFilter::Reads,
            slba: 0,
            nlb: u64::MAX / 2,
            status: Status::UNRECOVERED_READ_ERROR,
        },
    );
    for r in 0..8 {
        let (s, data) = rig.read(r * REGION_BLOCKS, 16);
        assert!(s.is_success());
        assert_eq!(data, rig.expected(r * REGION_BLOCKS, 16));
    }
    assert_eq!(
        rig.vol.stats().legs[1].ops,
        reads_before,
        "no read went to leg 1"
    );
    // A write failing on the resyncing leg faults it; the host still gets success.
    rig.arm(
        1,
        Fault::FailRange {
            ops: OpFilter::Writes,
            slba: 40 * REGION_BLOCKS,
            nlb: 1,
            status: Status::WRITE_FAULT,
        },
    );
    assert!(rig.write(40 * REGION_BLOCKS, 1, 16).is_success());
    assert_eq!(rig.states()[1], LegState::Faulted);
    assert!(rig.vol.region_missed(1, 40).unwrap());
    // The job notices and ends without flipping the leg.
    let status = job.run_blocking();
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(rig.states()[1], LegState::Faulted);
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 1);
}

#[test]
fn control_requests_are_checked() {
    let mut rig = Rig::new(3, cfg());
    assert!(matches!(rig.vol.resync_status(), Err(Error::NoJob { .. })));
    assert!(matches!(rig.vol.resync_pause(), Err(Error::NoJob { .. })));
    assert!(matches!(
        rig.vol.attach_leg(1),
        Err(Error::LegState {
            state: LegState::InSync,
            ..
        })
    ));
    assert!(matches!(
        rig.vol.attach_leg(7),
        Err(Error::NoSuchLeg { .. })
    ));
    assert!(matches!(
        rig.vol.remove_leg(0),
        Err(Error::LegIsPrimary { .. })
    ));
    rig.vol.fault_leg(1).unwrap();
    rig.vol.fault_leg(2).unwrap();
    let job = rig.vol.attach_leg(1).unwrap();
    assert!(matches!(
        rig.vol.attach_leg(2),
        Err(Error::JobRunning { .. })
    ));
    assert!(matches!(
        rig.vol.remove_leg(1),
        Err(Error::JobRunning { .. })
    ));
    assert_eq!(rig.vol.resync_status().unwrap().state, JobState::Starting);
    drop(job); // a dropped job leaves the leg faulted
    assert_eq!(rig.states()[1], LegState::Faulted);
    assert_eq!(rig.vol.resync_status().unwrap().state, JobState::Cancelled);
    // A removed mirror gets nothing more; its index stays taken.
    rig.vol.remove_leg(2).unwrap();
    assert_eq!(rig.states()[2], LegState::Removed);
    assert!(matches!(rig.vol.attach_leg(2), Err(Error::LegState { .. })));
    assert!(rig.write(0, 8, 1).is_success());
    assert_eq!(rig.vol.leg_count(), 3);
    let bad = ResyncConfig {
        windows: 0,
        ..ResyncConfig::default()
    };
    assert!(matches!(
        rig.vol.attach_leg_with(1, bad),
        Err(Error::Config { .. })
    ));
}

#[test]
fn a_job_runs_on_a_reactor() {
    use nvmirror_poller::{ReactorConfig, ReactorPool};
    let mut rig = Rig::new(2, cfg());
    rig.vol.detach_leg(1).unwrap();
    fill(&mut rig, 21);
    let job = rig.vol.attach_leg(1).unwrap();
    let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
    pool.handle()
        .send_msg(0, move |ctx| ctx.register_poller(Box::new(job)))
        .unwrap();
    wait_for("the reactor to finish the resync", || {
        rig.vol.resync_status().unwrap().state == JobState::Done
    });
    pool.shutdown();
    assert_eq!(rig.states()[1], LegState::InSync);
    assert_legs_identical(&rig.vol);
}

#[test]
fn a_hung_target_is_faulted_after_the_io_timeout_and_host_writes_go_on() {
    let cfg = VolumeConfig {
        region_size: REGION,
        ..common::short_timeout()
    };
    let mut rig = Rig::new(2, cfg);
    rig.vol.detach_leg(1).unwrap();
    fill(&mut rig, 31);
    let hang = rig.arm(
        1,
        Fault::Hang {
            ops: OpFilter::Writes,
        },
    );
    let handle = rig.vol.attach_leg(1).unwrap().run();
    wait_for("the first window", || {
        rig.vol.resync_status().unwrap().state == JobState::Running
    });
    // A write into the window the job holds waits for it, but not past the I/O timeout.
    let start = Instant::now();
    assert!(rig.write(3, 2, 32).is_success());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let status = handle.join().unwrap();
    assert_eq!(status.state, JobState::Failed);
    // The copy's own command times out, or (on a loaded machine) the host write's command to
    // the hung leg times out first and faults the leg under the job: either way the job ends
    // failed because of the hang.
    let error = status.error.as_deref().unwrap_or("");
    assert!(
        error.contains("timed out") || error.contains("is faulted"),
        "{status:?}"
    );
    assert_eq!(rig.states()[1], LegState::Faulted);
    assert!(rig.vol.region_missed(1, 0).unwrap());
    assert_eq!(rig.vol.overlap_locks_held(), 0);
    rig.clear(1, hang);
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 1);
}

#[test]
fn the_copy_moves_to_another_in_sync_leg_when_its_source_leaves_sync() {
    let mut rig = Rig::new(3, cfg());
    rig.vol.detach_leg(2).unwrap();
    fill(&mut rig, 41);
    assert_eq!(rig.vol.missed_region_count(2).unwrap(), REGIONS);
    let handle = rig.vol.attach_leg_with(2, slow(4 << 20)).unwrap().run();
    wait_for("some regions copied", || {
        rig.vol.resync_status().unwrap().regions_copied >= 4
    });
    // The primary (the job's source) goes out; leg 1 is promoted.
    rig.vol.fault_leg(0).unwrap();
    assert_eq!(rig.vol.primary(), 1);
    // Writes after the fault reach legs 1 and 2 only.
    assert!(rig.write(40 * REGION_BLOCKS, 8, 42).is_success());
    assert!(rig.write(2 * REGION_BLOCKS, 8, 43).is_success());
    rig.vol.resync_set_rate(0, false).unwrap();
    let status = handle.join().unwrap();
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(
        rig.states(),
        vec![LegState::Faulted, LegState::InSync, LegState::InSync]
    );
    let one = read_all(&*rig.vol.leg_device(1).unwrap()).unwrap();
    let two = read_all(&*rig.vol.leg_device(2).unwrap()).unwrap();
    assert!(
        one == two,
        "the rebuilt leg matches the leg it now copies from"
    );
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
}

#[test]
fn a_core_that_cannot_open_a_queue_pair_on_a_resyncing_leg_faults_it() {
    use std::sync::atomic::Ordering::Relaxed;
    let mem = |name: &str| -> Arc<dyn BlockDevice> {
        Arc::new(
            MemDevice::new(VOLUME_BYTES, LBA as u32, LatencyModel::None)
                .unwrap()
                .with_name(name),
        )
    };
    let flaky = Arc::new(RefusingDevice {
        inner: mem("mem://flaky"),
        refuse: false.into(),
    });
    let vol = Volume::new(
        "v",
        vec![mem("mem://a"), Arc::clone(&flaky) as Arc<dyn BlockDevice>],
        cfg(),
    )
    .unwrap();
    let state = |vol: &Volume| vol.leg_states()[1].state;

    // A queue pair opened while leg 1 is out and cannot be opened has none on it; when leg 1
    // starts resyncing, that core's next write tries again, and faults the leg when it fails.
    vol.fault_leg(1).unwrap();
    flaky.refuse.store(true, Relaxed);
    let mut qp = vol.open_volume_qpair(4).unwrap();
    flaky.refuse.store(false, Relaxed);
    let mut job = vol.attach_leg(1).unwrap();
    assert_eq!(state(&vol), LegState::Resyncing);
    flaky.refuse.store(true, Relaxed);
    let mut data = vec![7u8; LBA];
    let buf = nvmirror_nvme::dma::IoBuf::from_slice(&mut data);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe {
        nvmirror_nvme::QueuePair::submit(
            &mut qp,
            nvmirror_nvme::IoCommand::with_buf(nvmirror_nvme::IoOp::Write, 0, 1, buf, 1),
        )
    }
    .unwrap();
    let mut cpl = [nvmirror_nvme::Completion::default()];
    while nvmirror_nvme::QueuePair::poll(&mut qp, &mut cpl) == 0 {}
    assert!(cpl[0].status.is_success());
    assert_eq!(
        state(&vol),
        LegState::Faulted,
        "the leg would miss this core's writes"
    );
    assert!(vol.region_missed(1, 0).unwrap());
    assert_eq!(job.run_blocking().state, JobState::Failed);

    // A queue pair opened while the leg is resyncing faults it the same way.
    flaky.refuse.store(false, Relaxed);
    let _job = vol.attach_leg(1).unwrap();
    flaky.refuse.store(true, Relaxed);
    let _qp2 = vol.open_volume_qpair(4).unwrap();
    assert_eq!(state(&vol), LegState::Faulted);
}

#[test]
fn a_hung_leg_is_attached_only_once_its_abandoned_commands_are_reaped_or_fenced() {
    let short = VolumeConfig {
        io_timeout: Duration::from_millis(50),
        ..cfg()
    };
    let mut rig = Rig::new(2, short);
    let hang = rig.arm(
        1,
        Fault::Hang {
            ops: OpFilter::Writes,
        },
    );
    assert!(
        rig.write(2048, 8, 2).is_success(),
        "acked after the timeout"
    );
    assert_eq!(rig.states()[1], LegState::Faulted);
    // The abandoned write could still land on the leg after a resync copied its region.
    let err = rig.vol.attach_leg(1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LegBusy {
                leg: 1,
                abandoned: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("timed-out"), "{err}");
    assert_eq!(
        rig.states()[1],
        LegState::Faulted,
        "a refused attach changes nothing"
    );
    // The device answers at last: the late completion is reaped and the leg may come back.
    rig.clear(1, hang);
    rig.pump_until_late_completions(1, 1);
    let status = rig.vol.attach_leg(1).unwrap().run().join().unwrap();
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);

    // Closing the queue pair that abandoned a command fences it just as well.
    let hang = rig.arm(
        1,
        Fault::Hang {
            ops: OpFilter::Writes,
        },
    );
    assert!(rig.write(4096, 8, 3).is_success());
    assert!(matches!(
        rig.vol.attach_leg(1),
        Err(Error::LegBusy { abandoned: 1, .. })
    ));
    rig.qp = rig.vol.open_qpair(32).unwrap();
    rig.clear(1, hang);
    let status = rig.vol.attach_leg(1).unwrap().run().join().unwrap();
    assert_eq!(status.state, JobState::Done, "{status:?}");
    assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 2);
}
