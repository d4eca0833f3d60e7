//! The fault matrix: each failure mode with 1, 2 and 3 mirrors. Every case checks the host
//! status, the leg states, and that every acknowledged write is on every in-sync leg.

mod common;

use std::time::{Duration, Instant};

use common::{pattern, short_timeout, Rig};
use nvmirror_mirror::{LegRole, LegState, VolumeConfig};
use nvmirror_nvme::backend::{Fault, OpFilter};
use nvmirror_nvme::{IoOp, Status};

/// 2, 3 and 4 legs: one, two and three mirrors.
const LEG_COUNTS: [usize; 3] = [2, 3, 4];

fn fail_writes(slba: u64, nlb: u64, status: Status) -> Fault {
    Fault::FailRange {
        ops: OpFilter::Writes,
        slba,
        nlb,
        status,
    }
}

fn in_sync_except(n: usize, out: &[usize]) -> Vec<LegState> {
    (0..n)
        .map(|i| {
            if out.contains(&i) {
                LegState::Faulted
            } else {
                LegState::InSync
            }
        })
        .collect()
}

#[test]
fn a_mirror_failing_a_write_is_faulted_and_the_host_gets_success() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        assert!(rig.write(96, 8, 1).is_success());
        let mirror = n - 1;
        rig.arm(mirror, fail_writes(100, 1, Status::WRITE_FAULT));
        assert_eq!(rig.write(96, 8, 2), Status::SUCCESS, "{n} legs");
        assert_eq!(rig.states(), in_sync_except(n, &[mirror]));
        assert_eq!(rig.vol.primary(), 0);
        assert_eq!(rig.vol.missed_regions(mirror).unwrap(), vec![0]);
        // The faulted mirror really lacks the write; later writes skip it.
        assert_eq!(rig.leg_bytes(mirror, 96, 8), pattern(96, 8, 1));
        assert!(rig.write(5000, 16, 3).is_success());
        assert_eq!(rig.vol.missed_regions(mirror).unwrap(), vec![0, 2]);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
        assert_eq!(rig.vol.stats().legs[mirror].errors, 1);
        assert_eq!(rig.vol.overlap_locks_held(), 0);
    }
}

#[test]
fn the_primary_failing_a_write_promotes_a_mirror() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        rig.arm(0, fail_writes(0, 1 << 20, Status::WRITE_FAULT));
        assert_eq!(rig.write(10, 4, 1), Status::SUCCESS, "{n} legs");
        assert_eq!(rig.states(), in_sync_except(n, &[0]));
        assert_eq!(rig.vol.primary(), 1);
        let roles: Vec<_> = rig.vol.leg_states().iter().map(|l| l.role).collect();
        assert_eq!(roles[1], LegRole::Primary);
        assert_eq!(roles[0], LegRole::Mirror);
        assert_eq!(rig.vol.missed_regions(0).unwrap(), vec![0]);
        // Reads now come from the new primary and see the write.
        let (status, data) = rig.read(10, 4);
        assert!(status.is_success());
        assert_eq!(data, pattern(10, 4, 1));
        assert_eq!(rig.vol.stats().legs[0].ops, 1, "leg 0 served no read");
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn a_hung_mirror_is_faulted_after_the_timeout_and_its_late_completion_ignored() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, short_timeout());
        assert!(rig.write(0, 8, 1).is_success());
        let mirror = n - 1;
        let hang = rig.arm(
            mirror,
            Fault::Hang {
                ops: OpFilter::Writes,
            },
        );
        let t0 = Instant::now();
        assert_eq!(rig.write(2048, 8, 2), Status::SUCCESS, "{n} legs");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "host completion after {took:?}, timeout is 50 ms"
        );
        assert_eq!(rig.states(), in_sync_except(n, &[mirror]));
        assert_eq!(rig.vol.missed_regions(mirror).unwrap(), vec![1]);
        let stats = rig.vol.stats();
        assert_eq!(stats.legs[mirror].timeouts, 1);
        assert_eq!(stats.legs[mirror].late_completions, 0);
        // Releasing the hang lets the abandoned command complete: it is dropped.
        rig.clear(mirror, hang);
        rig.pump_until_late_completions(mirror, 1);
        assert!(rig.write(4096, 8, 3).is_success());
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
        assert_eq!(rig.vol.overlap_locks_held(), 0);
    }
}

#[test]
fn a_hung_primary_is_faulted_and_a_mirror_promoted() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, short_timeout());
        let hang = rig.arm(0, Fault::Hang { ops: OpFilter::All });
        let t0 = Instant::now();
        assert_eq!(rig.write(64, 8, 1), Status::SUCCESS);
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(rig.states(), in_sync_except(n, &[0]));
        assert_eq!(rig.vol.primary(), 1);
        rig.clear(0, hang);
        rig.pump_until_late_completions(0, 1);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn a_leg_gone_mid_stream_is_faulted_and_no_acknowledged_write_is_lost() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        let gone_leg = 1;
        let mut tags = Vec::new();
        for i in 0..400u64 {
            if i == 200 {
                rig.arm(gone_leg, Fault::Gone);
            }
            // 16 commands in flight, spread over the namespace (8191 blocks).
            let slba = (i * 977) % 8000;
            tags.push(rig.submit_write(slba, 1 + (i % 32) as u32, i as u8));
            if tags.len() % 16 == 0 {
                rig.wait_all();
            }
        }
        rig.wait_all();
        for t in tags {
            assert_eq!(rig.status(t), Some(Status::SUCCESS), "{n} legs");
        }
        assert_eq!(rig.states(), in_sync_except(n, &[gone_leg]));
        assert_eq!(rig.vol.primary(), 0);
        assert!(rig.vol.missed_region_count(gone_leg).unwrap() > 0);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn every_leg_failing_gives_the_host_the_primary_status() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        assert!(rig.write(300, 4, 1).is_success());
        rig.arm(0, fail_writes(300, 4, Status::WRITE_FAULT));
        for leg in 1..n {
            rig.arm(leg, fail_writes(300, 4, Status::DATA_TRANSFER_ERROR));
        }
        assert_eq!(rig.write(300, 4, 2), Status::WRITE_FAULT, "{n} legs");
        assert_eq!(rig.states(), in_sync_except(n, &[]));
        for leg in 0..n {
            assert_eq!(rig.vol.missed_region_count(leg).unwrap(), 0);
        }
        // The volume goes on elsewhere.
        assert!(rig.write(1000, 4, 3).is_success());
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n);
        assert_eq!(rig.vol.overlap_locks_held(), 0);
    }
}

/// A read error that is not a media error (those are repaired in place, `read_repair.rs`)
/// faults the leg and the read is retried elsewhere.
#[test]
fn a_read_failing_on_the_primary_is_retried_on_a_mirror() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        assert!(rig.write(4000, 8, 7).is_success());
        rig.arm(
            0,
            Fault::FailRange {
                ops: OpFilter::Reads,
                slba: 4004,
                nlb: 1,
                status: Status::DATA_TRANSFER_ERROR,
            },
        );
        let (status, data) = rig.read(4000, 8);
        assert_eq!(status, Status::SUCCESS, "{n} legs");
        assert_eq!(data, pattern(4000, 8, 7));
        assert_eq!(rig.states(), in_sync_except(n, &[0]));
        assert_eq!(rig.vol.primary(), 1);
        assert_eq!(rig.vol.stats().read_retries, 1);
        // The unreadable blocks are marked so a resync rewrites them.
        assert_eq!(rig.vol.missed_regions(0).unwrap(), vec![1]);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn a_read_failing_on_every_leg_returns_the_first_error() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        assert!(rig.write(8, 8, 1).is_success());
        for leg in 0..n {
            rig.arm(
                leg,
                Fault::FailRange {
                    ops: OpFilter::Reads,
                    slba: 0,
                    nlb: 64,
                    status: Status::DATA_TRANSFER_ERROR,
                },
            );
        }
        let (status, _) = rig.read(8, 8);
        assert_eq!(status, Status::DATA_TRANSFER_ERROR, "{n} legs");
        // Every leg but the last in-sync one was faulted; that one stays.
        let states = rig.states();
        assert_eq!(states.iter().filter(|&&s| s == LegState::InSync).count(), 1);
        assert_eq!(rig.vol.stats().read_retries, n as u64 - 1);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), 1);
    }
}

/// A read that times out is not retried into its own buffer (the hung leg may still fill
/// it, `lent_buffers.rs`): the host gets a retryable abort, the leg is faulted, and the
/// host's retry is served by another leg.
#[test]
fn a_hung_read_fails_retryably_and_the_retry_goes_to_another_leg() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, short_timeout());
        assert!(rig.write(16, 8, 9).is_success());
        let hang = rig.arm(
            0,
            Fault::Hang {
                ops: OpFilter::Reads,
            },
        );
        let t0 = Instant::now();
        let (status, _) = rig.read(16, 8);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(status, Status::ABORTED_BY_HOST, "{n} legs");
        assert!(!status.dnr(), "the host may retry");
        assert_eq!(rig.states(), in_sync_except(n, &[0]));
        let (status, data) = rig.read(16, 8);
        assert_eq!(status, Status::SUCCESS, "{n} legs: the retry");
        assert_eq!(data, pattern(16, 8, 9));
        rig.clear(0, hang);
        rig.pump_until_late_completions(0, 1);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn write_zeroes_deallocate_and_flush_fan_out_and_fault_like_writes() {
    for n in LEG_COUNTS {
        let mut rig = Rig::new(n, VolumeConfig::default());
        assert!(rig.write(0, 64, 1).is_success());
        assert!(rig.op(IoOp::WriteZeroes, 8, 8).is_success());
        assert!(rig.op(IoOp::Deallocate, 32, 8).is_success());
        assert!(rig.op(IoOp::Flush, 0, 0).is_success());
        for leg in 0..n {
            assert!(rig.leg_bytes(leg, 8, 8).iter().all(|&b| b == 0));
            assert!(rig.leg_bytes(leg, 32, 8).iter().all(|&b| b == 0));
        }
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n);
        let mirror = n - 1;
        rig.arm(mirror, fail_writes(2100, 1, Status::WRITE_FAULT));
        assert!(rig.op(IoOp::WriteZeroes, 2048, 64).is_success());
        assert_eq!(rig.states(), in_sync_except(n, &[mirror]));
        assert_eq!(rig.vol.missed_regions(mirror).unwrap(), vec![1]);
        // A flush is not sent to the faulted leg, so it marks nothing more.
        assert!(rig.op(IoOp::Flush, 0, 0).is_success());
        assert_eq!(rig.vol.missed_regions(mirror).unwrap(), vec![1]);
        assert_eq!(rig.assert_acked_writes_on_in_sync_legs(), n - 1);
    }
}

#[test]
fn a_flush_failing_on_a_mirror_marks_every_region() {
    let mut rig = Rig::new(3, VolumeConfig::default());
    rig.arm(
        2,
        Fault::FailAfter {
            n: 0,
            status: Status::INTERNAL_ERROR,
        },
    );
    assert!(rig.op(IoOp::Flush, 0, 0).is_success());
    assert_eq!(rig.states(), in_sync_except(3, &[2]));
    assert_eq!(rig.vol.missed_regions(2).unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(rig.vol.missed_region_count(1).unwrap(), 0);
}
