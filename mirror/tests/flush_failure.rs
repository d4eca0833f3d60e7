//! A host Flush that fails on one leg faults that leg and marks every region for its resync
//! (it may have lost anything in its volatile cache). The Flush is acknowledged only once those
//! whole-volume marks are durable on the surviving legs' bitmaps, not only their superblocks: a
//! crash right after the ack must still resync the whole stale leg (docs/bitmap.md).

mod bitmap_rig;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmap_rig::{raw_write, LBA};
use nvmirror_mirror::{LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};

const BYTES: u64 = 8 << 20;
const REGION: u64 = 64 << 10;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        io_timeout: Duration::from_secs(5),
        ..VolumeConfig::default()
    }
}

fn mem(name: &str) -> Arc<MemDevice> {
    Arc::new(
        MemDevice::new(BYTES, LBA, LatencyModel::None)
            .unwrap()
            .with_name(name.to_string()),
    )
}

/// Submits `cmd` and polls until it completes.
fn run(qp: &mut dyn QueuePair, cmd: IoCommand) -> Status {
    let tag = cmd.tag;
    // SAFETY: the caller keeps the command's buffer alive until this returns.
    unsafe { qp.submit(cmd) }.unwrap();
    let start = Instant::now();
    let mut cpl = [Completion::default(); 4];
    loop {
        let n = qp.poll(&mut cpl);
        if let Some(c) = cpl[..n].iter().find(|c| c.tag == tag) {
            return c.status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "tag {tag} hung");
        std::thread::yield_now();
    }
}

/// A crash: new devices holding exactly what the legs hold now (nothing more gets written).
fn crash_images(legs: &[Arc<FaultyDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    legs.iter()
        .enumerate()
        .map(|(i, f)| {
            let mut image = read_all(&**f.inner()).unwrap();
            let dev = mem(&format!("mem://crash{i}"));
            for (n, chunk) in image.chunks_mut(1 << 20).enumerate() {
                raw_write(&*dev, (n as u64) << 20, chunk);
            }
            dev as Arc<dyn BlockDevice>
        })
        .collect()
}

#[test]
fn a_crash_right_after_a_flush_that_failed_on_a_leg_resyncs_that_whole_leg() {
    let legs: Vec<Arc<FaultyDevice>> = (0..2)
        .map(|i| Arc::new(FaultyDevice::wrap(mem(&format!("mem://flush{i}")))))
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = legs
        .iter()
        .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
        .collect();
    let vol = Volume::format("flush", devs, cfg(), false).unwrap();
    let regions = vol.metadata_layout().unwrap().regions;
    let mut qp = vol.open_qpair(8).unwrap();
    let mut data = vec![0x5au8; 4096];
    let buf = IoBuf::from_slice(&mut data);
    let write = IoCommand::with_buf(IoOp::Write, 0, 8, buf, 1);
    assert!(run(&mut *qp, write).is_success());
    // Leg 0's bitmap page writes hang (its superblock and data keep working), and leg 1
    // fails the next command it gets: the host's Flush.
    let layout = vol.metadata_layout().unwrap();
    let pages = legs[0].injector().arm(Fault::HangRange {
        ops: OpFilter::Writes,
        slba: layout.bitmap_offset / u64::from(LBA),
        nlb: layout.bitmap_len / u64::from(LBA),
    });
    legs[1].injector().arm(Fault::FailAfter {
        n: 0,
        status: Status::WRITE_FAULT,
    });
    let tag = 2;
    let flush = IoCommand::with_buf(IoOp::Flush, 0, 1, IoBuf::EMPTY, tag);
    // SAFETY: a flush has no buffer.
    unsafe { qp.submit(flush) }.unwrap();
    // While the whole-volume marks are not on leg 0's bitmap, the Flush is not acknowledged;
    // were it, a crash at that moment must still resync every region of leg 1.
    let mut cpl = [Completion::default(); 4];
    let start = Instant::now();
    let mut acked = None;
    while acked.is_none() && start.elapsed() < Duration::from_secs(1) {
        let n = qp.poll(&mut cpl);
        acked = cpl[..n].iter().find(|c| c.tag == tag).map(|c| c.status);
        std::thread::yield_now();
    }
    let early = acked.is_some();
    if !early {
        legs[0].injector().clear(pages);
        while acked.is_none() {
            assert!(start.elapsed() < Duration::from_secs(20), "the flush hung");
            let n = qp.poll(&mut cpl);
            acked = cpl[..n].iter().find(|c| c.tag == tag).map(|c| c.status);
            std::thread::yield_now();
        }
    }
    let status = acked.unwrap();
    // Acknowledged: leg 0 flushed. The power goes now, before any further poll.
    let images = crash_images(&legs);
    assert!(status.is_success(), "{status}");
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    drop(qp);
    legs[0].injector().clear_all();
    drop(vol);
    let vol = Volume::open_persistent("flush", images, cfg()).unwrap();
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    let missed = vol.regions_to_resync(1).unwrap();
    assert_eq!(
        missed.len() as u64,
        regions,
        "after a crash right after the Flush ack (acknowledged while leg 0's bitmap page \
         write hung: {early}) leg 1 resyncs {} of {regions} regions, though its flush failed",
        missed.len()
    );
}
