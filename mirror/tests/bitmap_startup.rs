//! Start-up of persistent volumes: superblock validation, the freshest leg, the exact resync
//! set after a crash or a leg fault, clean shutdown, and arbitrary metadata bytes.

mod bitmap_rig;

use std::sync::Arc;

use bitmap_rig::{raw_read, raw_write, run_writes, LBA};
use nvmirror_mirror::superblock::{MemberState, Superblock};
use nvmirror_mirror::{Error, LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::{read_all, BlockDevice};
use proptest::prelude::*;

const REGION: u64 = 64 << 10;
const BPR: u64 = REGION / LBA as u64;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        ..VolumeConfig::default()
    }
}

fn legs(n: usize, bytes: u64, tag: &str) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|i| {
            Arc::new(
                MemDevice::new(bytes, LBA, LatencyModel::None)
                    .unwrap()
                    .with_name(format!("mem://{tag}{i}")),
            ) as Arc<dyn BlockDevice>
        })
        .collect()
}

fn superblock(dev: &dyn BlockDevice) -> Superblock {
    let mut head = vec![0u8; 4096];
    raw_read(dev, 0, &mut head);
    Superblock::decode(&head).unwrap()
}

/// The exported range of every leg, compared.
fn assert_identical(vol: &Volume) {
    let l = vol.metadata_layout().unwrap();
    let range = l.data_offset as usize..(l.data_offset + l.data_blocks * u64::from(LBA)) as usize;
    let first = read_all(&*vol.leg_device(0).unwrap()).unwrap();
    for leg in 1..vol.leg_count() {
        let other = read_all(&*vol.leg_device(leg).unwrap()).unwrap();
        assert!(
            first[range.clone()] == other[range.clone()],
            "leg {leg} differs"
        );
    }
}

/// Brings leg `leg` back through the resync engine, to the end.
fn resync(vol: &Volume, leg: usize) -> nvmirror_mirror::ResyncStatus {
    let status = vol.attach_leg(leg).unwrap().run_blocking();
    assert_eq!(vol.leg_states()[leg].state, LegState::InSync, "{status:?}");
    status
}

#[test]
fn a_removed_leg_is_never_brought_back_in_sync() {
    let devs = legs(3, 16 << 20, "r");
    let vol = Volume::format("v", devs, cfg(), false).unwrap();
    vol.fault_leg(2).unwrap();
    vol.remove_leg(2).unwrap();
    let err = vol.attach_leg(2).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("removed"), "{err}");
    assert_eq!(vol.leg_states()[2].state, LegState::Removed);
}

#[test]
fn format_lays_out_and_translates_by_the_data_offset() {
    let devs = legs(2, 16 << 20, "a");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let l = vol.metadata_layout().unwrap();
    assert_eq!(l.data_offset, 1 << 20);
    assert_eq!(vol.geometry().num_blocks, (15 << 20) / u64::from(LBA));
    let mut qp = vol.open_qpair(4).unwrap();
    run_writes(&mut *qp, &[(0, 8)], 1, 0x77);
    for d in &devs {
        let mut b = vec![0u8; 4096];
        raw_read(&**d, l.data_offset, &mut b);
        assert!(
            b.iter().all(|&x| x == 0x77),
            "LBA 0 lands at the data offset"
        );
        let sb = superblock(&**d);
        assert_eq!(sb.volume_name, "v");
        assert!(!sb.clean, "the clean flag is cleared before any write");
    }
}

#[test]
fn format_refuses_used_legs_and_other_volumes() {
    let devs = legs(2, 16 << 20, "b");
    let mut junk = vec![0xeeu8; 4096];
    raw_write(&*devs[1], 0, &mut junk);
    match Volume::format("v", devs.clone(), cfg(), false) {
        Err(Error::LegNotBlank { leg: 1, name, .. }) => assert_eq!(name, "mem://b1"),
        other => panic!("{other:?}"),
    }
    drop(Volume::format("v", devs.clone(), cfg(), true).unwrap());
    // A second format of the same legs needs force; another volume's name is refused.
    assert!(matches!(
        Volume::format("v", devs.clone(), cfg(), false),
        Err(Error::LegNotBlank { leg: 0, .. })
    ));
    let err = Volume::format("w", devs, cfg(), true).unwrap_err();
    assert!(matches!(err, Error::ForeignLeg { leg: 0, .. }), "{err}");
    assert!(err.to_string().contains("'v'"), "{err}");
}

#[test]
fn foreign_or_corrupt_superblocks_are_errors_naming_the_leg() {
    let a = legs(2, 16 << 20, "a");
    let b = legs(2, 16 << 20, "b");
    drop(Volume::format("va", a.clone(), cfg(), false).unwrap());
    drop(Volume::format("vb", b.clone(), cfg(), false).unwrap());
    let err = Volume::open_persistent("va", vec![Arc::clone(&a[0]), Arc::clone(&b[1])], cfg())
        .unwrap_err();
    match &err {
        Error::ForeignLeg { leg: 1, name, .. } => assert_eq!(name, "mem://b1"),
        other => panic!("{other:?}"),
    }
    // Legs swapped: each is the other's index.
    let err = Volume::open_persistent("va", vec![Arc::clone(&a[1]), Arc::clone(&a[0])], cfg())
        .unwrap_err();
    assert!(matches!(err, Error::ForeignLeg { .. }), "{err}");
    // A flipped byte in leg 1's superblock.
    let mut head = vec![0u8; 4096];
    raw_read(&*a[1], 0, &mut head);
    head[70] ^= 0x10;
    raw_write(&*a[1], 0, &mut head);
    let err = Volume::open_persistent("va", a, cfg()).unwrap_err();
    match &err {
        Error::Metadata {
            leg: 1,
            name,
            reason,
            ..
        } => {
            assert_eq!(name, "mem://a1");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn clean_shutdown_starts_without_resync() {
    let devs = legs(2, 16 << 20, "c");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_qpair(4).unwrap();
    run_writes(&mut *qp, &[(0, 8), (5 * BPR, 8)], 2, 1);
    drop(qp);
    vol.shutdown_clean().unwrap();
    for d in &devs {
        assert!(superblock(&**d).clean);
    }
    let vol = Volume::open_persistent("v", devs.clone(), cfg()).unwrap();
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    for d in &devs {
        assert!(
            !superblock(&**d).clean,
            "cleared at start, before any write"
        );
    }
    let qp = vol.open_qpair(1).unwrap();
    assert!(matches!(vol.shutdown_clean(), Err(Error::Busy { .. })));
    drop(qp);
}

#[test]
fn a_crash_resyncs_exactly_the_marked_regions_from_the_freshest_leg() {
    let devs = legs(2, 16 << 20, "d");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let l = vol.metadata_layout().unwrap();
    let mut qp = vol.open_qpair(4).unwrap();
    run_writes(&mut *qp, &[(3 * BPR, 8), (7 * BPR + 1, 8)], 2, 0x33);
    drop(qp);
    drop(vol); // a crash: no clean shutdown
               // A write in flight at the crash reached leg 1 only.
    let mut torn = vec![0x44u8; 4096];
    raw_write(&*devs[1], l.data_offset + 7 * REGION, &mut torn);
    let vol = Volume::open_persistent("v", devs.clone(), cfg()).unwrap();
    assert!(vol.leg_states().iter().all(|s| s.state == LegState::InSync));
    assert_eq!(vol.marked_regions().unwrap(), vec![3, 7]);
    // The marked regions were made identical, from the freshest leg (leg 0 on a tie).
    assert_identical(&vol);
    let mut b = vec![0u8; 4096];
    raw_read(&*devs[1], l.data_offset + 7 * REGION, &mut b);
    assert!(b[..512].iter().all(|&x| x == 0), "the torn block is gone");
    assert!(
        b[512..].iter().all(|&x| x == 0x33),
        "the acknowledged write is kept"
    );
}

#[test]
fn a_faulted_leg_comes_back_stale_with_exactly_its_missed_regions() {
    let devs = legs(2, 16 << 20, "e");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_qpair(4).unwrap();
    run_writes(&mut *qp, &[(BPR, 8)], 1, 1);
    let events = vol.event_counter().unwrap();
    vol.fault_leg(0).unwrap(); // the primary: leg 1 takes over
    assert_eq!(vol.event_counter().unwrap(), events + 1);
    assert_eq!(superblock(&*devs[1]).event_counter, events + 1);
    assert_eq!(
        superblock(&*devs[0]).event_counter,
        events,
        "the faulted leg is not written"
    );
    run_writes(&mut *qp, &[(4 * BPR, 8), (6 * BPR, 8 * BPR as u32)], 2, 2);
    drop(qp);
    drop(vol);
    // Leg 0 would claim to be in sync; leg 1 is fresher and names it stale.
    let vol = Volume::open_persistent("v", devs.clone(), cfg()).unwrap();
    assert_eq!(vol.primary(), 1);
    assert_eq!(vol.leg_states()[0].state, LegState::Faulted);
    let expect: Vec<u64> = [1u64, 4].into_iter().chain(6..14).collect();
    assert_eq!(vol.regions_to_resync(0).unwrap(), expect);
    assert_eq!(resync(&vol, 0).regions_copied, expect.len() as u64);
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    assert_identical(&vol);
    let events = vol.event_counter().unwrap();
    assert_eq!(superblock(&*devs[0]).event_counter, events);
    assert_eq!(superblock(&*devs[1]).event_counter, events);
    // And the volume restarts with both in sync.
    drop(vol);
    let vol = Volume::open_persistent("v", devs, cfg()).unwrap();
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
}

#[test]
fn a_detached_leg_stays_detached_across_a_restart() {
    let devs = legs(3, 16 << 20, "d");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_qpair(4).unwrap();
    run_writes(&mut *qp, &[(BPR, 8)], 1, 1);
    vol.detach_leg(2).unwrap();
    vol.fault_leg(1).unwrap();
    run_writes(&mut *qp, &[(3 * BPR, 8)], 2, 2);
    drop(qp);
    vol.shutdown_clean().unwrap();
    let sb = superblock(&*devs[0]);
    assert_eq!(
        sb.member_states[..3],
        [
            MemberState::InSync,
            MemberState::Stale,
            MemberState::Detached
        ]
    );
    // The operator's detach survives the restart; the faulted leg comes back faulted, to be
    // resynced by whoever runs the volume.
    let vol = Volume::open_persistent("v", devs.clone(), cfg()).unwrap();
    let states: Vec<LegState> = vol.leg_states().iter().map(|l| l.state).collect();
    assert_eq!(
        states,
        [LegState::InSync, LegState::Faulted, LegState::Detached]
    );
    // Every region still marked in the bitmap (written since the last clearing) is resynced.
    assert_eq!(vol.regions_to_resync(2).unwrap(), [1, 3]);
    assert_eq!(resync(&vol, 2).regions_copied, 2);
    assert_eq!(resync(&vol, 1).regions_copied, 2);
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    assert_identical(&vol);
}

#[test]
fn a_blank_replacement_leg_needs_every_region() {
    let devs = legs(2, 16 << 20, "f");
    drop(Volume::format("v", devs.clone(), cfg(), false).unwrap());
    let fresh = legs(1, 16 << 20, "new").remove(0);
    let vol = Volume::open_persistent("v", vec![Arc::clone(&devs[0]), fresh], cfg()).unwrap();
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    let regions = vol.geometry().num_blocks.div_ceil(BPR);
    assert_eq!(vol.regions_to_resync(1).unwrap().len() as u64, regions);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_metadata_bytes_never_panic_start_up(
        at in 0usize..8192,
        bytes in proptest::collection::vec(any::<u8>(), 1..600),
        keep_crc in any::<bool>(),
    ) {
        let devs = legs(2, 4 << 20, "p");
        drop(Volume::format("v", devs.clone(), cfg(), false).unwrap());
        let mut head = vec![0u8; 8192];
        raw_read(&*devs[1], 0, &mut head);
        let end = (at + bytes.len()).min(head.len());
        head[at..end].copy_from_slice(&bytes[..end - at]);
        if keep_crc {
            let crc = crc32c::crc32c(&head[..252]);
            head[252..256].copy_from_slice(&crc.to_le_bytes());
        }
        raw_write(&*devs[1], 0, &mut head);
        if let Ok(vol) = Volume::open_persistent("v", devs, cfg()) {
            let _ = vol.leg_states();
        }
    }
}

/// Two 16 MiB legs behind fault injectors, and the same legs as plain devices.
fn faulty_legs(
    tag: &str,
) -> (
    Vec<Arc<nvmirror_nvme::backend::FaultyDevice>>,
    Vec<Arc<dyn BlockDevice>>,
) {
    use nvmirror_nvme::backend::FaultyDevice;
    let faulty: Vec<Arc<FaultyDevice>> = legs(2, 16 << 20, tag)
        .into_iter()
        .map(|d| Arc::new(FaultyDevice::wrap(d)))
        .collect();
    let devs = faulty
        .iter()
        .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
        .collect();
    (faulty, devs)
}

#[test]
fn a_failed_read_marks_its_regions_durably_for_the_next_start() {
    use nvmirror_nvme::backend::{Fault, OpFilter};
    use nvmirror_nvme::dma::IoBuf;
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair, Status};
    let (faulty, devs) = faulty_legs("r");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let data_lba = vol.metadata_layout().unwrap().data_lba();
    faulty[0].injector().arm(Fault::FailRange {
        ops: OpFilter::Reads,
        slba: data_lba + 5 * BPR,
        nlb: BPR,
        status: Status::DATA_TRANSFER_ERROR, // not a media error: faults the leg
    });
    let mut qp = vol.open_volume_qpair(4).unwrap();
    let mut data = vec![0u8; 4096];
    let buf = IoBuf::from_slice(&mut data);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, 5 * BPR + 3, 8, buf, 1)) }.unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    assert!(cpl[0].status.is_success(), "retried on leg 1");
    assert_eq!(vol.leg_states()[0].state, LegState::Faulted);
    assert!(vol.region_marked(5));
    // The page write goes out at the next polls; the fault is recorded in the survivor's
    // superblock by the metadata thread (a read does not wait for it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        qp.poll(&mut cpl);
        let sb = read_all(&**faulty[1].inner()).unwrap();
        let sb = Superblock::decode(&sb[..4096]).unwrap();
        if sb.member_states[0] != MemberState::InSync {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fault was never recorded"
        );
        std::thread::yield_now();
    }
    for _ in 0..10 {
        qp.poll(&mut cpl);
    }
    drop(qp);
    drop(vol); // crash
    let vol = Volume::open_persistent("v", devs, cfg()).unwrap();
    assert_eq!(vol.leg_states()[0].state, LegState::Faulted);
    assert_eq!(vol.regions_to_resync(0).unwrap(), vec![5]);
}

/// After an unclean stop, a leg that cannot take the reconciling copy of the marked regions
/// comes up stale (faulted, regions to resync) instead of failing the whole start: the
/// freshest leg holds every acknowledged write.
#[test]
fn a_leg_failing_the_unclean_stop_copy_comes_up_stale() {
    use nvmirror_nvme::backend::{Fault, OpFilter};
    use nvmirror_nvme::dma::IoBuf;
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair, Status};
    let (faulty, devs) = faulty_legs("u");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_volume_qpair(4).unwrap();
    let mut data = vec![7u8; 4096];
    let buf = IoBuf::from_slice(&mut data);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 3 * BPR, 8, buf, 1)) }.unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    assert!(cpl[0].status.is_success());
    drop(qp);
    drop(vol); // crash: region 3 stays marked
    faulty[1].injector().arm(Fault::FailRange {
        ops: OpFilter::Writes,
        slba: 0,
        nlb: u64::MAX / 2,
        status: Status::WRITE_FAULT,
    });
    let vol = Volume::open_persistent("v", devs, cfg()).expect("the start goes on without leg 1");
    let states = vol.leg_states();
    assert_eq!(states[0].state, LegState::InSync);
    assert_eq!(states[1].state, LegState::Faulted);
    assert!(vol.regions_to_resync(1).unwrap().contains(&3));
}

/// A slot the operator removed is opened with a placeholder device at the next start: it
/// must come up removed, never as the in-sync primary that reads, and resyncs copy, from
/// the placeholder (the chaos soak read zeros from a `null://` placeholder in slot 0).
#[test]
fn a_removed_primary_slot_stays_removed_after_a_restart() {
    use nvmirror_nvme::dma::IoBuf;
    use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair};
    let devs = legs(3, 16 << 20, "rm");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_volume_qpair(4).unwrap();
    let mut data = vec![0x6bu8; 4096];
    // SAFETY: `data` outlives the command, reaped below.
    unsafe {
        qp.submit(IoCommand::with_buf(
            IoOp::Write,
            64,
            8,
            IoBuf::from_slice(&mut data),
            1,
        ))
    }
    .unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    assert!(cpl[0].status.is_success());
    drop(qp);
    vol.detach_leg(0).unwrap();
    vol.remove_leg(0).unwrap();
    drop(vol); // crash
    let mut reopened = devs.clone();
    reopened[0] = nvmirror_nvme::open_leg(&format!("null://{}", 16u64 << 20)).unwrap();
    let vol = Volume::open_persistent("v", reopened, cfg()).unwrap();
    assert_eq!(vol.leg_states()[0].state, LegState::Removed);
    assert_ne!(vol.primary(), 0);
    let mut qp = vol.open_volume_qpair(4).unwrap();
    for tag in 0..8u64 {
        let mut back = vec![0u8; 4096];
        // SAFETY: `back` outlives the command, reaped below.
        unsafe {
            qp.submit(IoCommand::with_buf(
                IoOp::Read,
                64,
                8,
                IoBuf::from_slice(&mut back),
                tag,
            ))
        }
        .unwrap();
        while qp.poll(&mut cpl) == 0 {}
        assert!(cpl[0].status.is_success());
        assert!(
            back.iter().all(|&b| b == 0x6b),
            "read {tag} came from the placeholder"
        );
    }
}

#[test]
fn two_removed_slots_and_a_stale_leg_leave_the_freshest_leg_primary_after_a_crash() {
    let devs = legs(4, 16 << 20, "rm2");
    let vol = Volume::format("v", devs.clone(), cfg(), false).unwrap();
    vol.detach_leg(0).unwrap();
    vol.remove_leg(0).unwrap();
    vol.detach_leg(1).unwrap();
    vol.remove_leg(1).unwrap();
    vol.detach_leg(3).unwrap();
    drop(vol); // crash
    let mut reopened = devs.clone();
    for slot in reopened.iter_mut().take(2) {
        *slot = nvmirror_nvme::open_leg(&format!("null://{}", 16u64 << 20)).unwrap();
    }
    let vol = Volume::open_persistent("v", reopened, cfg()).unwrap();
    let states: Vec<_> = vol.leg_states().iter().map(|l| l.state).collect();
    assert_eq!(
        states,
        [
            LegState::Removed,
            LegState::Removed,
            LegState::InSync,
            LegState::Detached
        ]
    );
    assert_eq!(vol.primary(), 2);
}
