//! Promotion and failback in the engine (docs/promotion.md): a volume opened on the
//! surviving leg raises its epoch; the old primary's leg, rejoining at the older epoch, gets
//! the regions of its own bitmap added to those it missed; a fenced start keeps its own
//! leg in sync although the promoted leg's superblock names it stale.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nvmirror_mirror::superblock::Superblock;
use nvmirror_mirror::{LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{BlockDevice, Completion, Geometry, IoCommand, IoOp, LinkStatus, QueuePair};

/// A local device that reports a network link, as an `nvme-tcp://` leg does, and can be
/// unreachable.
#[derive(Debug)]
struct Remote {
    dev: Arc<dyn BlockDevice>,
    up: AtomicBool,
}

impl Remote {
    fn new(dev: &Arc<dyn BlockDevice>, up: bool) -> Arc<Self> {
        Arc::new(Self {
            dev: Arc::clone(dev),
            up: AtomicBool::new(up),
        })
    }
}

impl BlockDevice for Remote {
    fn geometry(&self) -> Geometry {
        self.dev.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        if !self.up.load(Ordering::Acquire) {
            return Err(nvmirror_nvme::Error::QueuePair("unreachable".into()));
        }
        self.dev.open_qpair(depth)
    }
    fn name(&self) -> &str {
        "remote"
    }
    fn link(&self) -> Option<LinkStatus> {
        let up = self.up.load(Ordering::Acquire);
        Some(LinkStatus {
            connected: up,
            generation: u64::from(up),
            ..LinkStatus::default()
        })
    }
}

const REGION_BLOCKS: u64 = (1 << 20) / 512;

fn run(qp: &mut dyn QueuePair, op: IoOp, lba: u64, nlb: u32, buf: &mut DmaBuf) {
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(IoCommand::with_buf(op, lba, nlb, buf.io_buf(), 1)) }.unwrap();
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {
        std::hint::spin_loop();
    }
    assert!(c[0].status.is_success(), "{op:?} at {lba}: {}", c[0].status);
}

fn write_region(vol: &Volume, region: u64, pool: &mut DmaPool) {
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(region as u8 + 1);
    let mut qp = vol.open_qpair(4).unwrap();
    run(&mut *qp, IoOp::Write, region * REGION_BLOCKS, 8, &mut buf);
    pool.put(buf);
}

fn superblock(dev: &Arc<dyn BlockDevice>, pool: &mut DmaPool) -> Superblock {
    let mut buf = pool.get().unwrap();
    let mut qp = dev.open_qpair(1).unwrap();
    run(&mut *qp, IoOp::Read, 0, 8, &mut buf);
    let sb = Superblock::decode(buf.as_slice()).unwrap();
    pool.put(buf);
    sb
}

#[test]
fn the_old_primarys_leg_rejoins_with_the_union_of_both_records() {
    let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|_| {
            Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let mut pool = DmaPool::new(1, 4096);
    // Site A: leg 0 local, leg 1 remote. Region 1 written in sync; then leg 1 is taken
    // out and region 3 is written on leg 0 alone: only A's bitmap names it.
    let a_legs: Vec<Arc<dyn BlockDevice>> = vec![Arc::clone(&legs[0]), Remote::new(&legs[1], true)];
    let a = Volume::format("vol0", a_legs, VolumeConfig::default(), false).unwrap();
    write_region(&a, 1, &mut pool);
    a.detach_leg(1).unwrap();
    write_region(&a, 3, &mut pool);
    drop(a);

    // Site B promotes its leg (leg 1); A's leg is unreachable.
    let a_leg = Remote::new(&legs[0], false);
    let b_legs: Vec<Arc<dyn BlockDevice>> = vec![a_leg.clone(), Arc::clone(&legs[1])];
    let b = Volume::open_persistent("vol0", b_legs, VolumeConfig::default()).unwrap();
    assert!(b.fenced().is_none(), "{:?}", b.fenced());
    assert_eq!(b.leg_states()[1].state, LegState::InSync);
    assert_eq!(b.leg_states()[0].state, LegState::Faulted);
    assert_eq!(b.bump_epoch().unwrap(), 1);
    assert_eq!(superblock(&legs[1], &mut pool).epoch, 1);
    write_region(&b, 5, &mut pool);
    assert!(b.region_missed(0, 5).unwrap(), "B records its own writes");
    assert!(!b.region_missed(0, 3).unwrap(), "B never saw region 3");

    // A's leg comes back at epoch 0: its own bitmap's regions join what it missed.
    a_leg.up.store(true, Ordering::Release);
    let job = b.attach_leg(0).unwrap();
    for r in [3, 5] {
        assert!(b.region_missed(0, r).unwrap(), "region {r} is not resynced");
    }
    assert_eq!(
        b.absorb_older_epoch_bitmap(1).unwrap(),
        0,
        "a leg at the volume's epoch adds nothing"
    );
    drop(job);
}

#[test]
fn a_fenced_start_keeps_its_own_leg_in_sync() {
    let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|_| {
            Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    let mut pool = DmaPool::new(1, 4096);
    let a = Volume::format("vol0", legs.clone(), VolumeConfig::default(), false).unwrap();
    drop(a);
    // B promotes leg 1 with leg 0 unreachable: leg 1's superblock names leg 0 stale, with a
    // higher event counter, at epoch 1.
    let b_legs: Vec<Arc<dyn BlockDevice>> =
        vec![Remote::new(&legs[0], false), Arc::clone(&legs[1])];
    let b = Volume::open_persistent("vol0", b_legs, VolumeConfig::default()).unwrap();
    b.bump_epoch().unwrap();
    drop(b);
    let (s0, s1) = (
        superblock(&legs[0], &mut pool),
        superblock(&legs[1], &mut pool),
    );
    assert!(s1.event_counter > s0.event_counter && s1.epoch == 1);

    // A restarts: fenced, its local leg still in sync (its bitmap kept), B's untouched.
    let a_legs: Vec<Arc<dyn BlockDevice>> = vec![Arc::clone(&legs[0]), Remote::new(&legs[1], true)];
    let a = Volume::open_persistent("vol0", a_legs, VolumeConfig::default()).unwrap();
    assert!(a.fenced().is_some());
    assert_eq!(a.leg_states()[0].state, LegState::InSync);
    drop(a);
    let after = superblock(&legs[1], &mut pool);
    assert_eq!((after.epoch, after.event_counter), (1, s1.event_counter));
}
