//! Through the mirror: a volume whose remote leg (`nvme-tcp://`, nvmirror's target over a
//! namespace that hangs writes) times a write out, then closes its queue pair (a host
//! disconnect). The remote still holds the write, so the leg stays busy — no resync may copy
//! the region — until the close fence says the write is over; the late write does land, and
//! the resync after the fence repairs the region with the newer data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{Error, JobState, LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};

use super::harness::start_with;

const LBA: usize = 512;

fn mem() -> Arc<MemDevice> {
    Arc::new(MemDevice::new(4 << 20, LBA as u32, LatencyModel::None).unwrap())
}

/// Writes 8 blocks of `buf` at LBA 0 and waits (at most 5 s) for the host's completion.
fn write(qp: &mut dyn QueuePair, buf: &mut [u8], tag: u64) -> Option<Status> {
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(buf), tag);
    // SAFETY: the caller keeps `buf` until the command's fence (the close fence, at worst).
    unsafe { qp.submit(cmd) }.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = [Completion::default(); 4];
    while Instant::now() < deadline {
        let n = qp.poll(&mut c);
        if let Some(c) = c[..n].iter().find(|c| c.tag == tag) {
            return Some(c.status);
        }
        std::thread::yield_now();
    }
    None
}

fn busy(vol: &Volume) -> bool {
    matches!(vol.attach_leg(1), Err(Error::LegBusy { .. }))
}

#[test]
fn a_timed_out_remote_write_keeps_its_leg_busy_until_the_close_fence() {
    let remote_mem = mem();
    let hanging = Arc::new(FaultyDevice::wrap(
        Arc::clone(&remote_mem) as Arc<dyn BlockDevice>
    ));
    let t = start_with(vec![Arc::clone(&hanging) as Arc<dyn BlockDevice>], |_| {});
    let local = mem();
    let remote: Arc<dyn BlockDevice> = Arc::new(t.connect("").unwrap());
    let cfg = VolumeConfig {
        io_timeout: Duration::from_millis(200),
        ..VolumeConfig::default()
    };
    let devs = vec![Arc::clone(&local) as Arc<dyn BlockDevice>, remote];
    let vol = Volume::new("close", devs, cfg).unwrap();

    // The remote's namespace holds writes; nvmirror's target cannot abort them.
    let hang = hanging.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut qp = vol.open_qpair(8).unwrap();
    let mut old = vec![1u8; 8 * LBA];
    assert_eq!(
        write(&mut *qp, &mut old, 1),
        Some(Status::SUCCESS),
        "the local leg has it; the remote leg timed out"
    );
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);

    // A host disconnect closes the queue pair while the remote holds the write.
    let fence = qp.close();
    assert!(
        !fence.is_done(),
        "the remote still holds the timed-out write"
    );
    assert!(
        busy(&vol),
        "a resync now could be overtaken by the late write"
    );
    // A newer write to the same blocks goes to the in-sync leg only.
    let mut qp2 = vol.open_qpair(8).unwrap();
    let mut new = vec![2u8; 8 * LBA];
    assert_eq!(write(&mut *qp2, &mut new, 2), Some(Status::SUCCESS));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fence.is_done());
    assert!(busy(&vol));

    // The remote finishes the old write: only now is it over.
    hanging.injector().clear(hang);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fence.is_done() {
        assert!(Instant::now() < deadline, "the close fence never ended");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(old);
    assert!(
        read_all(&*remote_mem).unwrap()[..8 * LBA]
            .iter()
            .all(|&b| b == 1),
        "the late write landed on the remote"
    );
    let status = vol.attach_leg(1).expect("free once fenced").run_blocking();
    assert_eq!(status.state, JobState::Done);
    drop(qp2);
    let (a, b) = (read_all(&*local).unwrap(), read_all(&*remote_mem).unwrap());
    assert!(a[..8 * LBA].iter().all(|&x| x == 2));
    assert!(a == b, "the resync repaired what the late write overwrote");
}
