//! A volume whose remote leg carries a newer fencing epoch than its local legs was promoted
//! elsewhere (docs/promotion.md): it opens fenced, and every host command fails with
//! Reservation Conflict before reaching a leg. The same legs all local open normally.

use std::sync::Arc;

use nvmirror_mirror::fencing::{is_conflict, FENCED_STATUS};
use nvmirror_mirror::superblock::Superblock;
use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{BlockDevice, Completion, Geometry, IoCommand, IoOp, LinkStatus, QueuePair};

/// A local device that reports a network link, as an `nvme-tcp://` leg does.
#[derive(Debug)]
struct Remote(Arc<dyn BlockDevice>);

impl BlockDevice for Remote {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        self.0.open_qpair(depth)
    }
    fn name(&self) -> &str {
        "remote"
    }
    fn link(&self) -> Option<LinkStatus> {
        Some(LinkStatus {
            connected: true,
            generation: 1,
            ..LinkStatus::default()
        })
    }
}

fn run(
    qp: &mut dyn QueuePair,
    op: IoOp,
    lba: u64,
    nlb: u32,
    buf: &mut nvmirror_nvme::dma::DmaBuf,
) -> nvmirror_nvme::Status {
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(IoCommand::with_buf(op, lba, nlb, buf.io_buf(), 1)) }.unwrap();
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {
        std::hint::spin_loop();
    }
    c[0].status
}

#[test]
fn a_remote_leg_at_a_newer_epoch_opens_the_volume_fenced() {
    let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|_| {
            Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let vol = Volume::format("vol0", legs.clone(), VolumeConfig::default(), false).unwrap();
    assert_eq!(vol.epoch(), 0);
    assert!(vol.fenced().is_none());
    drop(vol);

    // Leg 1 is promoted elsewhere: its superblock moves to epoch 1.
    let mut pool = DmaPool::new(1, 4096);
    let mut buf = pool.get().unwrap();
    let mut qp = legs[1].open_qpair(1).unwrap();
    assert!(run(&mut *qp, IoOp::Read, 0, 8, &mut buf).is_success());
    let mut sb = Superblock::decode(buf.as_slice()).unwrap();
    sb.epoch = 1;
    buf.as_mut_slice()[..256].copy_from_slice(&sb.encode());
    assert!(run(&mut *qp, IoOp::Write, 0, 8, &mut buf).is_success());
    drop(qp);

    // All legs local: the node's epoch is its legs' newest, nothing is fenced.
    let vol = Volume::open_persistent("vol0", legs.clone(), VolumeConfig::default()).unwrap();
    assert_eq!(vol.epoch(), 1);
    let sb1 = {
        let mut qp = legs[1].open_qpair(1).unwrap();
        assert!(run(&mut *qp, IoOp::Read, 0, 8, &mut buf).is_success());
        Superblock::decode(buf.as_slice()).unwrap()
    };
    assert!(vol.fenced().is_none(), "{:?}", vol.fenced());
    drop(vol);

    // Put back at 0 on leg 0 only and leg 1 remote at 1: this node was promoted away from.
    let mut qp = legs[0].open_qpair(1).unwrap();
    assert!(run(&mut *qp, IoOp::Read, 0, 8, &mut buf).is_success());
    let mut sb0 = Superblock::decode(buf.as_slice()).unwrap();
    sb0.epoch = 0;
    buf.as_mut_slice()[..256].copy_from_slice(&sb0.encode());
    assert!(run(&mut *qp, IoOp::Write, 0, 8, &mut buf).is_success());
    drop(qp);
    let mixed: Vec<Arc<dyn BlockDevice>> = vec![legs[0].clone(), Arc::new(Remote(legs[1].clone()))];
    let vol = Volume::open_persistent("vol0", mixed, VolumeConfig::default()).unwrap();
    assert_eq!(vol.epoch(), 0);
    let why = vol.fenced().expect("fenced at open");
    assert!(why.contains("epoch 1"), "{why}");
    let mut qp = vol.open_qpair(4).unwrap();
    for op in [IoOp::Write, IoOp::Read] {
        let s = run(&mut *qp, op, 0, 8, &mut buf);
        assert!(
            is_conflict(s) && s.sc() == FENCED_STATUS.sc(),
            "{op:?}: {s}"
        );
    }
    drop(qp);
    drop(vol);
    // The fenced start left the new primary's superblock at its epoch.
    let mut qp = legs[1].open_qpair(1).unwrap();
    assert!(run(&mut *qp, IoOp::Read, 0, 8, &mut buf).is_success());
    let after = Superblock::decode(buf.as_slice()).unwrap();
    assert_eq!(
        after.epoch, 1,
        "the fenced node rewrote the promoted leg's superblock"
    );
    assert_eq!(after.event_counter, sb1.event_counter, "{after:?}");
}
