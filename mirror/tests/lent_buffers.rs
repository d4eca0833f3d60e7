//! Buffer lending (C2): a host command completed while a leg may still fill or read its
//! buffer keeps that buffer lent until the leg's command is reaped, so a front end never
//! hands it to the next command while a late DMA can land in it.

mod common;

use std::time::{Duration, Instant};

use common::{short_timeout, LBA};
use nvmirror_mirror::Volume;
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use std::sync::Arc;

fn legs(n: usize) -> Vec<Arc<FaultyDevice>> {
    (0..n)
        .map(|i| {
            let mem = MemDevice::new(4 << 20, LBA as u32, LatencyModel::None)
                .unwrap()
                .with_name(format!("mem://leg{i}"));
            let leg = FaultyDevice::wrap(Arc::new(mem));
            // A back end that cannot cancel: an abandoned command stays with the leg.
            leg.injector().refuse_cancels(true);
            Arc::new(leg)
        })
        .collect()
}

fn volume(faults: &[Arc<FaultyDevice>]) -> Volume {
    let devs = faults
        .iter()
        .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
        .collect();
    Volume::new("vol", devs, short_timeout()).unwrap()
}

fn wait(qp: &mut dyn QueuePair) -> Completion {
    let mut c = [Completion::default()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while qp.poll(&mut c) == 0 {
        assert!(Instant::now() < deadline, "no completion");
    }
    c[0]
}

fn released(qp: &mut dyn QueuePair, within: Duration) -> Vec<u64> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut tags = [0u64; 8];
    let mut c = [Completion::default(); 8];
    while Instant::now() < deadline {
        qp.poll(&mut c);
        let n = qp.poll_released(&mut tags);
        out.extend_from_slice(&tags[..n]);
        if !out.is_empty() {
            break;
        }
    }
    out
}

/// The README's drill: `hang` on the primary under reads, then `leg_fault_clear`. The read
/// that timed out fails (the host retries it) instead of being retried into the same buffer,
/// its buffer stays lent while the hung command may still fill it, and comes back once the
/// late completion is reaped.
#[test]
fn a_timed_out_read_lends_its_buffer_until_the_hung_leg_answers() {
    let faults = legs(2);
    let vol = volume(&faults);
    let mut qp = vol.open_qpair(8).unwrap();
    // Known data on both legs.
    let mut data = vec![0x5au8; 8 * LBA];
    let w = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut data), 1);
    // SAFETY: `data` outlives the queue pair's use of it (waited for below).
    unsafe { qp.submit(w) }.unwrap();
    assert!(wait(&mut *qp).status.is_success());

    let hang = faults[0].injector().arm(Fault::Hang { ops: OpFilter::All });
    let mut buf = vec![0u8; 8 * LBA];
    let r = IoCommand::with_buf(IoOp::Read, 0, 8, IoBuf::from_slice(&mut buf), 7);
    // SAFETY: `buf` is not touched until it is given back (asserted below), and outlives `qp`.
    unsafe { qp.submit(r) }.unwrap();
    let c = wait(&mut *qp);
    assert_eq!(c.tag, 7);
    assert!(!c.status.is_success(), "the read timed out: {}", c.status);
    assert!(qp.buffer_lent(7), "the hung leg may still fill the buffer");
    assert!(!qp.buffer_lent(1));
    assert!(released(&mut *qp, Duration::from_millis(100)).is_empty());

    // The next read goes to the mirror (the primary is faulted); the lent buffer is not used.
    let mut other = vec![0u8; 8 * LBA];
    let r2 = IoCommand::with_buf(IoOp::Read, 0, 8, IoBuf::from_slice(&mut other), 8);
    // SAFETY: as above.
    unsafe { qp.submit(r2) }.unwrap();
    let c2 = wait(&mut *qp);
    assert!(c2.status.is_success(), "{}", c2.status);
    assert!(other.iter().all(|&b| b == 0x5a));

    // The hung command is replayed: it fills the lent buffer, and only then is it given back.
    faults[0].injector().clear(hang);
    assert_eq!(released(&mut *qp, Duration::from_secs(5)), vec![7]);
    assert!(!qp.buffer_lent(7));
    drop(qp);
    drop(buf);
}

/// A write that timed out on every in-sync leg lends its buffer too (a leg may still read it
/// and write whatever the next command put there).
#[test]
fn a_write_abandoned_on_every_leg_lends_its_buffer() {
    let faults = legs(1);
    let vol = volume(&faults);
    let mut qp = vol.open_qpair(8).unwrap();
    let hang = faults[0].injector().arm(Fault::Hang { ops: OpFilter::All });
    let mut data = vec![0x11u8; 4 * LBA];
    let w = IoCommand::with_buf(IoOp::Write, 0, 4, IoBuf::from_slice(&mut data), 3);
    // SAFETY: `data` outlives the queue pair and is not touched until given back.
    unsafe { qp.submit(w) }.unwrap();
    let c = wait(&mut *qp);
    assert!(!c.status.is_success());
    assert!(qp.buffer_lent(3));
    faults[0].injector().clear(hang);
    assert_eq!(released(&mut *qp, Duration::from_secs(5)), vec![3]);
    drop(qp);
    drop(data);
}
