//! Read-repair (review I10): one unreadable sector does not take a whole leg out. The read is
//! served from another leg, the range is rewritten on the leg that failed, and only a leg that
//! keeps failing reads (past its budget) is faulted.

mod common;

use common::{pattern, short_timeout, Rig};
use nvmirror_mirror::{LegState, READ_ERROR_BUDGET};
use nvmirror_nvme::backend::{Fault, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, Status};

/// Writes `data` straight to leg `leg`'s device, behind the volume's back (a sector gone bad).
fn scribble(rig: &Rig, leg: usize, slba: u64, mut data: Vec<u8>) {
    let mut qp = rig.faults[leg].open_qpair(1).unwrap();
    let nlb = (data.len() / 512) as u32;
    let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, IoBuf::from_slice(&mut data), 0);
    // SAFETY: `data` outlives the command, which is waited for.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {}
    assert!(c[0].status.is_success());
}

fn bad_sector(slba: u64) -> Fault {
    Fault::FailRange {
        ops: OpFilter::Reads,
        slba,
        nlb: 8,
        status: Status::UNRECOVERED_READ_ERROR,
    }
}

#[test]
fn a_bad_sector_is_read_from_the_mirror_and_rewritten() {
    let mut rig = Rig::new(2, short_timeout());
    assert!(rig.write(16, 8, 9).is_success());
    scribble(&rig, 0, 16, vec![0xee; 8 * 512]);
    let fault = rig.arm(0, bad_sector(16));
    let (status, data) = rig.read(16, 8);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(data, pattern(16, 8, 9));
    assert_eq!(
        rig.states(),
        [LegState::InSync, LegState::InSync],
        "one bad sector faulted the whole leg"
    );
    // The sector is remapped by the device once written; the repair writes it.
    rig.clear(0, fault);
    assert_eq!(rig.vol.repair_read_errors().unwrap(), 1);
    assert_eq!(rig.vol.read_repairs(), 1);
    assert_eq!(rig.leg_bytes(0, 16, 8), pattern(16, 8, 9));
    assert_eq!(
        rig.vol.repair_read_errors().unwrap(),
        0,
        "nothing left to repair"
    );
}

#[test]
fn a_leg_that_keeps_failing_reads_is_faulted_past_its_budget() {
    let mut rig = Rig::new(2, short_timeout());
    assert!(rig.write(0, 8, 1).is_success());
    rig.arm(0, bad_sector(0));
    for i in 0..READ_ERROR_BUDGET {
        let (status, _) = rig.read(0, 8);
        assert_eq!(status, Status::SUCCESS, "read {i}");
        assert_eq!(rig.states()[0], LegState::InSync, "read {i}");
    }
    let (status, data) = rig.read(0, 8);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(data, pattern(0, 8, 1));
    assert_eq!(rig.states(), [LegState::Faulted, LegState::InSync]);
}

#[test]
fn a_path_error_still_faults_the_leg() {
    let mut rig = Rig::new(2, short_timeout());
    assert!(rig.write(0, 8, 1).is_success());
    rig.arm(
        0,
        Fault::FailRange {
            ops: OpFilter::Reads,
            slba: 0,
            nlb: 8,
            status: Status::HOST_PATHING_ERROR,
        },
    );
    let (status, _) = rig.read(0, 8);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(rig.states(), [LegState::Faulted, LegState::InSync]);
}

#[test]
fn a_sector_bad_on_every_leg_fails_the_read_and_cannot_be_repaired() {
    let mut rig = Rig::new(2, short_timeout());
    assert!(rig.write(0, 8, 1).is_success());
    rig.arm(0, bad_sector(0));
    rig.arm(1, bad_sector(0));
    let (status, _) = rig.read(0, 8);
    assert_eq!(status, Status::UNRECOVERED_READ_ERROR);
    // No good copy anywhere: nothing is repaired, and one leg stays in sync (the last to
    // fail a read is faulted while another is left).
    assert_eq!(rig.vol.repair_read_errors().unwrap(), 0);
    let states = rig.states();
    assert_eq!(
        states.iter().filter(|&&s| s == LegState::InSync).count(),
        1,
        "{states:?}"
    );
}
