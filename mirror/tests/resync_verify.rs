//! Verify (scrub): finds a block that differs between in-sync legs, reports its region, and
//! repairs it from the primary; host writes during the scrub cause no false mismatch.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::delayed::DelayedDevice;
use common::{Rig, LBA, VOLUME_BYTES};
use nvmirror_mirror::{Error, JobState, ResyncConfig, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp};

const REGION: u64 = 64 << 10;
const REGION_BLOCKS: u64 = REGION / LBA as u64;
const REGIONS: u64 = VOLUME_BYTES / REGION;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        ..VolumeConfig::default()
    }
}

/// Writes one block straight to a leg's device, behind the volume's back.
fn corrupt(dev: &dyn BlockDevice, lba: u64, byte: u8) {
    let mut data = vec![byte; LBA];
    let mut qp = dev.open_qpair(1).unwrap();
    let cmd = IoCommand::with_buf(IoOp::Write, lba, 1, IoBuf::from_slice(&mut data), 0);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    assert!(cpl[0].status.is_success());
}

#[test]
fn verify_finds_a_single_block_mismatch_and_repair_fixes_it() {
    let mut rig = Rig::new(3, cfg());
    for r in 0..REGIONS {
        assert!(rig.write(r * REGION_BLOCKS, 32, r as u8).is_success());
    }
    assert!(matches!(rig.vol.verify_status(), Err(Error::NoJob { .. })));
    let clean = rig.vol.verify_start(false).unwrap().run().join().unwrap();
    assert_eq!(clean.state, JobState::Done, "{clean:?}");
    assert_eq!(clean.regions_checked, REGIONS);
    assert_eq!(clean.bytes_checked, VOLUME_BYTES);
    assert!(clean.mismatched_regions.is_empty());

    // One block of leg 2 in region 37 changes behind the volume's back.
    let lba = 37 * REGION_BLOCKS + 100;
    corrupt(&**rig.faults[2].inner(), lba, 0xa5);
    let found = rig.vol.verify_start(false).unwrap().run().join().unwrap();
    assert_eq!(found.mismatched_regions, vec![37]);
    assert_eq!(found.regions_repaired, 0);
    assert_ne!(
        rig.leg_bytes(2, lba, 1),
        rig.leg_bytes(0, lba, 1),
        "no repair asked for"
    );

    let repaired = rig.vol.verify_start(true).unwrap().run().join().unwrap();
    assert_eq!(repaired.mismatched_regions, vec![37]);
    assert_eq!(repaired.regions_repaired, 1);
    assert_eq!(rig.vol.verify_status().unwrap(), repaired);
    let images: Vec<_> = (0..3)
        .map(|leg| read_all(&*rig.vol.leg_device(leg).unwrap()).unwrap())
        .collect();
    assert!(
        images[1] == images[0] && images[2] == images[0],
        "legs identical after repair"
    );
    let again = rig.vol.verify_start(false).unwrap().run().join().unwrap();
    assert!(again.mismatched_regions.is_empty());
    rig.assert_acked_writes_on_in_sync_legs();
}

#[test]
fn host_writes_during_verify_cause_no_false_mismatch() {
    // Legs that apply each command up to 100 µs late: a mirrored write lands on the two legs
    // at different moments, so a compare that did not hold the window lock would see them
    // differ.
    let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|i| {
            let mem = MemDevice::new(VOLUME_BYTES, LBA as u32, LatencyModel::None)
                .unwrap()
                .with_name(format!("mem://leg{i}"));
            Arc::new(DelayedDevice {
                inner: Arc::new(mem),
                max_delay: Duration::from_micros(100),
            }) as Arc<dyn BlockDevice>
        })
        .collect();
    let vol = Arc::new(Volume::new("scrub", legs, cfg()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vol, stop) = (Arc::clone(&vol), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut qp = vol.open_qpair(8).unwrap();
            let mut bufs = vec![vec![0u8; 16 * LBA]; 8];
            let mut free: Vec<usize> = (0..8).collect();
            let mut cpl = [Completion::default(); 8];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || free.len() < 8 {
                if !stop.load(Ordering::Relaxed) {
                    if let Some(b) = free.pop() {
                        n += 1;
                        bufs[b].fill(n as u8);
                        // Writes into every fourth region, one region at a time per buffer.
                        let slba = (n * 4 % REGIONS) * REGION_BLOCKS + b as u64 * 16;
                        let cmd = IoCommand::with_buf(
                            IoOp::Write,
                            slba,
                            16,
                            IoBuf::from_slice(&mut bufs[b]),
                            b as u64,
                        );
                        // SAFETY: buffer `b` is left alone until its completion is reaped.
                        unsafe { qp.submit(cmd) }.unwrap();
                    }
                }
                let k = qp.poll(&mut cpl);
                for c in &cpl[..k] {
                    assert!(c.status.is_success());
                    free.push(c.tag as usize);
                }
            }
            n
        })
    };
    let slow = ResyncConfig {
        windows: 2,
        max_rate: 16 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let job = vol.verify_start_with(false, slow).unwrap();
    assert!(matches!(
        vol.verify_start(false),
        Err(Error::JobRunning { .. })
    ));
    let status = job.run().join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 1000, "writes ran during the scrub ({writes})");
    assert_eq!(status.state, JobState::Done);
    assert!(status.mismatched_regions.is_empty(), "{status:?}");
}

#[test]
fn verify_can_be_cancelled() {
    let rig = Rig::new(2, cfg());
    let slow = ResyncConfig {
        windows: 1,
        max_rate: 1 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let handle = rig.vol.verify_start_with(true, slow).unwrap().run();
    std::thread::sleep(Duration::from_millis(100));
    rig.vol.verify_cancel().unwrap();
    let status = handle.join().unwrap();
    assert_eq!(status.state, JobState::Cancelled);
    assert!(status.regions_checked < REGIONS);
    assert_eq!(rig.vol.overlap_locks_held(), 0);
}
