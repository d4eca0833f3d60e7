//! Cancelling commands of an NVMe/TCP queue pair (`QueuePair::cancel`): a command the
//! controller holds gets an NVMe Abort on the admin queue (Base §5.1 "Abort command") and
//! completes with the controller's answer; no further piece of a split command goes out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::spec::tcp::flags;
use nvmirror_nvme::spec::{NvmOpcode, Status};
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp, QueuePair};

use super::fake::{self, Aborts, FakeConfig};

/// Polls until one command completes, for at most `limit`.
fn completion(qp: &mut dyn QueuePair, limit: Duration) -> Option<Completion> {
    let deadline = Instant::now() + limit;
    let mut c = [Completion::default()];
    while Instant::now() < deadline {
        if qp.poll(&mut c) == 1 {
            return Some(c[0]);
        }
        std::thread::yield_now();
    }
    None
}

/// A controller that holds every read until an Abort names it or 10 s pass. On the Abort it
/// completes the read with `on_abort` (success: "too late to abort", with the data). Every
/// read it receives is counted in `received`.
fn holding_fake(
    aborts: &Aborts,
    received: &Arc<std::sync::atomic::AtomicU32>,
    on_abort: Status,
) -> fake::Fake {
    let seen = Arc::clone(aborts);
    let received = Arc::clone(received);
    fake::start_with_aborts(
        FakeConfig::default(),
        Arc::new(move |c, sqe, _| {
            assert_eq!(sqe.opcode, NvmOpcode::Read as u8);
            received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let data = vec![0u8; sqe.nlb() as usize * 512];
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let named = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|&dw| (dw >> 16) as u16 == sqe.cid);
                if named {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if on_abort.is_success() {
                c.c2h(sqe.cid, 0, &data, flags::LAST_PDU);
            }
            c.resp(sqe.cid, on_abort, 0);
        }),
        Arc::clone(aborts),
    )
}

#[test]
fn a_cancelled_command_the_controller_holds_is_aborted_on_the_admin_queue() {
    let aborts = Aborts::default();
    let received = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let f = holding_fake(&aborts, &received, Status::ABORT_REQUESTED);
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut buf = vec![0u8; 4096];
    let cmd = IoCommand::with_buf(IoOp::Read, 8, 8, IoBuf::from_slice(&mut buf), 41);
    // SAFETY: `buf` outlives the command, reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    assert!(
        completion(&mut *qp, Duration::from_millis(200)).is_none(),
        "the controller holds the read"
    );
    assert_eq!(
        qp.cancel(&[41, 99]),
        1,
        "one outstanding command, one unknown tag"
    );
    let c = completion(&mut *qp, Duration::from_secs(5)).expect("the Abort ended the read");
    assert_eq!((c.tag, c.status), (41, Status::ABORT_REQUESTED));
    let sent = aborts.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:x?}");
    assert_ne!(
        sent[0] & 0xffff,
        0,
        "SQID names the I/O queue, not the admin queue"
    );
    assert_eq!(qp.outstanding(), 0);
    assert_eq!(received.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// A read over MDTS travels in pieces (the fake's MDTS is 32 KiB): cancelled while its first
/// piece is with the controller, which finishes that piece anyway, it sends no second piece
/// and completes as aborted.
#[test]
fn a_cancelled_split_command_sends_no_further_piece() {
    let aborts = Aborts::default();
    let received = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let f = holding_fake(&aborts, &received, Status::SUCCESS);
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    let cmd = IoCommand::with_buf(IoOp::Read, 0, 256, IoBuf::from_slice(&mut buf), 7);
    // SAFETY: `buf` outlives the command, reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    assert!(completion(&mut *qp, Duration::from_millis(100)).is_none());
    assert_eq!(qp.cancel(&[7]), 1);
    let c = completion(&mut *qp, Duration::from_secs(5)).expect("the Abort ended the read");
    assert_eq!((c.tag, c.status), (7, Status::ABORT_REQUESTED));
    // No later piece reached the controller.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(aborts.lock().unwrap().len(), 1);
    assert_eq!(received.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(qp.outstanding(), 0);
}
