//! The missed-region set records exactly the regions a leg did not get.

mod common;

use common::Rig;
use nvmirror_mirror::{Error, LegState, VolumeConfig};
use nvmirror_nvme::backend::{Fault, OpFilter};
use nvmirror_nvme::{IoOp, Status};

/// 64 KiB regions: 128 blocks of 512 bytes, 64 regions in the 4 MiB volume.
fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: 64 << 10,
        ..VolumeConfig::default()
    }
}

#[test]
fn after_a_mirror_faults_every_later_write_marks_its_regions() {
    let mut rig = Rig::new(3, cfg());
    // Before any fault nothing is marked, however much is written.
    for r in 0..64 {
        assert!(rig.write(r * 128, 8, r as u8).is_success());
    }
    assert_eq!(rig.vol.missed_region_count(2).unwrap(), 0);

    rig.arm(
        2,
        Fault::FailRange {
            ops: OpFilter::Writes,
            slba: 130,
            nlb: 1,
            status: Status::WRITE_FAULT,
        },
    );
    assert!(rig.write(129, 4, 1).is_success()); // region 1: the failing write
    assert_eq!(rig.states()[2], LegState::Faulted);
    assert!(rig.write(640, 5, 2).is_success()); // region 5
    assert!(rig.write(1270, 20, 3).is_success()); // regions 9 and 10
    assert!(rig.op(IoOp::WriteZeroes, 2560, 1).is_success()); // region 20
    assert!(rig.op(IoOp::Deallocate, 3840, 128).is_success()); // region 30
    assert!(rig.write(8191, 1, 4).is_success()); // the last block: region 63
                                                 // Reads and flushes mark nothing.
    assert!(rig.read(4000, 8).0.is_success());
    assert!(rig.op(IoOp::Flush, 0, 0).is_success());
    // A write repeated into a marked region changes nothing.
    assert!(rig.write(641, 1, 5).is_success());

    assert_eq!(
        rig.vol.missed_regions(2).unwrap(),
        vec![1, 5, 9, 10, 20, 30, 63]
    );
    assert_eq!(rig.vol.missed_region_count(2).unwrap(), 7);
    assert!(rig.vol.region_missed(2, 9).unwrap());
    assert!(!rig.vol.region_missed(2, 8).unwrap());
    // The legs that got every write have nothing marked.
    assert_eq!(rig.vol.missed_region_count(0).unwrap(), 0);
    assert_eq!(rig.vol.missed_region_count(1).unwrap(), 0);
    rig.assert_acked_writes_on_in_sync_legs();
}

#[test]
fn fault_and_detach_by_request_mark_from_then_on() {
    let mut rig = Rig::new(3, cfg());
    rig.vol.fault_leg(1).unwrap();
    rig.vol.detach_leg(2).unwrap();
    assert_eq!(
        rig.states(),
        vec![LegState::InSync, LegState::Faulted, LegState::Detached]
    );
    assert!(rig.write(128 * 7, 1, 1).is_success());
    assert_eq!(rig.vol.missed_regions(1).unwrap(), vec![7]);
    assert_eq!(rig.vol.missed_regions(2).unwrap(), vec![7]);
    assert_eq!(
        rig.vol.stats().legs[1].ops,
        0,
        "a faulted leg receives nothing"
    );
    // The last in-sync leg cannot be taken out; a detached leg cannot be detached twice.
    assert!(matches!(
        rig.vol.fault_leg(0),
        Err(Error::LastInSyncLeg { leg: 0, .. })
    ));
    assert!(matches!(
        rig.vol.detach_leg(2),
        Err(Error::AlreadyDetached { leg: 2, .. })
    ));
    assert!(matches!(
        rig.vol.missed_regions(3),
        Err(Error::NoSuchLeg { leg: 3, .. })
    ));
    rig.vol.detach_leg(1).unwrap();
    assert_eq!(rig.vol.events(), 3);
    rig.assert_acked_writes_on_in_sync_legs();
}

#[test]
fn faulting_the_primary_by_request_promotes() {
    let mut rig = Rig::new(2, cfg());
    assert!(rig.write(0, 8, 1).is_success());
    rig.vol.fault_leg(0).unwrap();
    assert_eq!(rig.vol.primary(), 1);
    let (status, data) = rig.read(0, 8);
    assert!(status.is_success());
    assert_eq!(data, common::pattern(0, 8, 1));
    assert_eq!(rig.vol.stats().legs[1].ops, 2, "the write and the read");
}
