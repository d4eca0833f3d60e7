//! Closing an NVMe/TCP queue pair with a write the controller holds (`QueuePair::close`): the
//! command gets an Abort and the close fence is done only once the controller answered it —
//! or, when the link dies or the controller stays silent, once the link-loss fence
//! (KATO + `FENCE_QUIESCE`) says the remote can no longer execute it.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::spec::{NvmOpcode, Status};
use nvmirror_nvme::{open_leg, BlockDevice, Completion, Fence, IoCommand, IoOp, QueuePair};

use super::fake::{self, Aborts, FakeConfig};
use super::harness::{backing, pattern, start_with};

/// What the holding controller does with the write it holds.
const HOLD: u8 = 0;
const ANSWER: u8 = 1;
const HANG_UP: u8 = 2;

/// The test's handle on the write the controller holds.
#[derive(Default)]
struct Gate {
    /// Writes received.
    received: AtomicU32,
    /// CID of the last one.
    cid: AtomicU32,
    /// `HOLD`, `ANSWER` (Command Abort Requested) or `HANG_UP` (close the I/O connection).
    release: AtomicU8,
    hung_up_at: Mutex<Option<Instant>>,
}

/// A controller that holds every write until the test releases it (or 20 s pass).
fn holding_fake(gate: &Arc<Gate>, aborts: &Aborts) -> fake::Fake {
    let g = Arc::clone(gate);
    fake::start_with_aborts(
        FakeConfig::default(),
        Arc::new(move |c, sqe, _| {
            assert_eq!(sqe.opcode, NvmOpcode::Write as u8);
            g.cid.store(u32::from(sqe.cid), Ordering::SeqCst);
            g.received.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while g.release.load(Ordering::SeqCst) == HOLD && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if g.release.load(Ordering::SeqCst) == HANG_UP {
                *g.hung_up_at.lock().unwrap() = Some(Instant::now());
                c.hang_up();
            } else {
                c.resp(sqe.cid, Status::ABORT_REQUESTED, 0);
            }
        }),
        Arc::clone(aborts),
    )
}

/// Waits until `cond` holds, for at most `limit`.
fn eventually(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// Submits a 4 KiB write of `buf` and checks the controller holds it (no completion).
fn submit_held_write(qp: &mut dyn QueuePair, buf: &mut [u8], gate: &Gate) {
    let cmd = IoCommand::with_buf(IoOp::Write, 16, 8, IoBuf::from_slice(buf), 5);
    // SAFETY: the test keeps `buf` until the close fence is done.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut c = [Completion::default()];
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert_eq!(qp.poll(&mut c), 0, "the controller holds the write");
        std::thread::yield_now();
    }
    assert_eq!(gate.received.load(Ordering::SeqCst), 1);
}

/// The Abort that reached the controller names the held write on an I/O queue.
fn assert_aborted(aborts: &Aborts, gate: &Gate) {
    assert!(
        eventually(Duration::from_secs(5), || !aborts
            .lock()
            .unwrap()
            .is_empty()),
        "an Abort reached the controller"
    );
    let sent = aborts.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:x?}");
    assert_ne!(sent[0] & 0xffff, 0, "SQID names the I/O queue");
    assert_eq!(
        sent[0] >> 16,
        gate.cid.load(Ordering::SeqCst),
        "CID of the write"
    );
}

/// Opens a device on `f` with `query` and one queue pair.
fn open(f: &fake::Fake, query: &str) -> (Arc<dyn BlockDevice>, Box<dyn QueuePair>) {
    let dev = open_leg(&f.uri(query)).unwrap();
    let qp = dev.open_qpair(4).unwrap();
    (dev, qp)
}

#[test]
fn a_closed_queue_pair_is_fenced_until_the_controller_answers_the_held_write() {
    let gate = Arc::new(Gate::default());
    let aborts = Aborts::default();
    let f = holding_fake(&gate, &aborts);
    let (_dev, mut qp) = open(&f, "");
    let mut buf = vec![0x5au8; 4096];
    submit_held_write(&mut *qp, &mut buf, &gate);

    let fence: Fence = qp.close();
    assert!(!fence.is_done(), "the controller still holds the write");
    assert_aborted(&aborts, &gate);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !fence.is_done(),
        "the Abort went out but the controller has not answered"
    );

    gate.release.store(ANSWER, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || fence.is_done()),
        "done once the controller answered"
    );
    drop(buf);
}

#[test]
fn a_close_on_a_link_that_then_dies_stays_pending_until_the_kato_fence() {
    let gate = Arc::new(Gate::default());
    let aborts = Aborts::default();
    let f = holding_fake(&gate, &aborts);
    let (dev, mut qp) = open(&f, "kato=1s&reconnect_delay=60s");
    let mut buf = vec![0xa5u8; 4096];
    submit_held_write(&mut *qp, &mut buf, &gate);

    let fence = qp.close();
    assert_aborted(&aborts, &gate);
    gate.release.store(HANG_UP, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(5), || gate
        .hung_up_at
        .lock()
        .unwrap()
        .is_some()));
    let hung_up = gate.hung_up_at.lock().unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !dev.link().unwrap().connected),
        "the dead I/O connection takes the association down"
    );
    // KATO (1 s) + FENCE_QUIESCE (1 s) from the moment the loss was noticed: not before.
    let check = hung_up + Duration::from_millis(1800);
    while Instant::now() < check {
        assert!(
            !fence.is_done(),
            "done {:?} after the link died, before the KATO fence",
            hung_up.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        eventually(Duration::from_secs(5), || fence.is_done()),
        "done once the KATO fence is over"
    );
    drop(buf);
}

#[test]
fn a_controller_that_never_answers_a_closed_queue_pair_loses_the_association() {
    let gate = Arc::new(Gate::default());
    let aborts = Aborts::default();
    let f = holding_fake(&gate, &aborts);
    let (dev, mut qp) = open(&f, "kato=1s&reconnect_delay=60s");
    let mut buf = vec![0x3cu8; 4096];
    submit_held_write(&mut *qp, &mut buf, &gate);

    let closed = Instant::now();
    let fence = qp.close();
    assert_aborted(&aborts, &gate);
    // The close bound (KATO, 1 s) gives the association up; the fence is KATO + 1 s later.
    assert!(
        eventually(Duration::from_secs(5), || !dev.link().unwrap().connected),
        "the association is given up"
    );
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "not before the close bound: {:?}",
        closed.elapsed()
    );
    let why = dev.link().unwrap().last_error.unwrap_or_default();
    assert!(why.contains("closed queue pair"), "{why}");
    while closed.elapsed() < Duration::from_millis(2800) {
        assert!(
            !fence.is_done(),
            "done {:?} after the close",
            closed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        eventually(Duration::from_secs(5), || fence.is_done()),
        "done once the KATO fence is over"
    );
    gate.release.store(HANG_UP, Ordering::SeqCst);
    drop(buf);
}

#[test]
fn closing_with_nothing_on_the_wire_is_done_at_once() {
    let gate = Arc::new(Gate::default());
    let aborts = Aborts::default();
    let f = holding_fake(&gate, &aborts);
    let (_dev, qp) = open(&f, "");
    assert!(qp.close().is_done());
    assert!(aborts.lock().unwrap().is_empty());
}

/// nvmirror's own target cannot abort an I/O command its back end has: the close fence ends
/// when the write completes there with its own result, and the data is on the namespace.
#[test]
fn a_write_nvmirrors_target_is_running_ends_the_close_fence_when_it_completes() {
    let slow: Arc<dyn BlockDevice> = Arc::new(
        MemDevice::new(
            4 << 20,
            512,
            LatencyModel::Fixed(Duration::from_millis(700)),
        )
        .unwrap(),
    );
    let t = start_with(vec![Arc::clone(&slow)], |_| {});
    let dev = t.connect("").unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut buf = pattern(4096, 3);
    let cmd = IoCommand::with_buf(IoOp::Write, 64, 8, IoBuf::from_slice(&mut buf), 1);
    // SAFETY: `buf` is kept until the close fence is done.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut c = [Completion::default()];
    let submitted = Instant::now();
    while submitted.elapsed() < Duration::from_millis(100) {
        assert_eq!(qp.poll(&mut c), 0);
        std::thread::yield_now();
    }
    let fence = qp.close();
    assert!(
        !fence.is_done(),
        "the target's back end still has the write"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!fence.is_done());
    assert!(eventually(Duration::from_secs(5), || fence.is_done()));
    assert!(submitted.elapsed() >= Duration::from_millis(700));
    assert_eq!(backing(&*slow, 64 * 512, 4096), buf, "the write landed");
}
