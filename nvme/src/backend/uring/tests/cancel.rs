//! Cancelling and closing with commands the kernel cannot finish: a read from an empty pipe
//! stays in the kernel until data arrives or it is cancelled, like a hung device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::super::qpair::{QueueConfig, UringQueuePair};
use super::*;
use crate::dma::IoBuf;
use crate::queue::IoOp;
use crate::spec::Geometry;
use crate::Fence;

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A queue pair whose "device" is the read end of `fd`: every read hangs until data comes.
fn stalled_qpair(fd: &OwnedFd) -> UringQueuePair {
    UringQueuePair::new(&QueueConfig {
        fd: fd.as_raw_fd(),
        geo: Geometry::from_bytes(1 << 20, 512).unwrap(),
        depth: 4,
        sqpoll: None,
        mem_align: 1,
        fallocate: false,
    })
    .unwrap()
}

/// Polls `qp` until one completion arrives (10 s at most).
fn wait_one(qp: &mut dyn QueuePair) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cpl = [Completion::default()];
    loop {
        if qp.poll(&mut cpl) == 1 {
            return cpl[0];
        }
        assert!(Instant::now() < deadline, "no completion");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (polling, so this thread runs the ring's task work) until `fence` is done.
fn wait_fence(fence: &Fence) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fence.is_done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn a_hung_read_is_cancelled_with_abort_requested() {
    let (rx, _tx) = pipe();
    let mut qp = stalled_qpair(&rx);
    let mut data = vec![0u8; 512];
    let buf = IoBuf::from_slice(&mut data);
    // SAFETY: `data` outlives the command, which is reaped below.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, 0, 1, buf, 7)) }.unwrap();
    let mut cpl = [Completion::default()];
    for _ in 0..20 {
        assert_eq!(qp.poll(&mut cpl), 0, "an empty pipe cannot answer");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(qp.cancel(&[99]), 0, "an unknown tag is ignored");
    assert_eq!(qp.cancel(&[7]), 1);
    assert_eq!(qp.cancel(&[7]), 0, "one cancel per command");
    let c = wait_one(&mut qp);
    assert_eq!((c.tag, c.status), (7, Status::ABORT_REQUESTED));
    assert_eq!(qp.outstanding(), 0);
    assert!(Box::new(qp).close().is_done(), "nothing left in the kernel");
}

#[test]
fn closing_with_a_hung_command_returns_at_once_and_the_fence_ends_it() {
    let (rx, _tx) = pipe();
    let mut qp = Box::new(stalled_qpair(&rx));
    let mut data = vec![0u8; 512];
    let buf = IoBuf::from_slice(&mut data);
    // SAFETY: `data` is kept until the fence below is done.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, 0, 1, buf, 1)) }.unwrap();
    let _ = qp.poll(&mut [Completion::default()]);
    // Closing on another thread, so a close that blocks fails the test instead of hanging it.
    let (done, closed) = mpsc::channel();
    std::thread::spawn(move || {
        let fence = (qp as Box<dyn QueuePair>).close();
        let _ = done.send(fence);
    });
    let fence = closed
        .recv_timeout(Duration::from_secs(10))
        .expect("close blocked on a command the kernel still holds");
    assert!(
        wait_fence(&fence),
        "the reaper never saw the cancelled read"
    );
    drop(data);
}

#[test]
fn dropping_with_a_hung_command_does_not_block() {
    let (rx, _tx) = pipe();
    let (done, dropped) = mpsc::channel();
    let data = Box::leak(vec![0u8; 512].into_boxed_slice());
    let buf = IoBuf::from_slice(data);
    std::thread::spawn(move || {
        let mut qp = stalled_qpair(&rx);
        // SAFETY: the buffer is leaked: it outlives any reaper.
        unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, 0, 1, buf, 1)) }.unwrap();
        let _ = qp.poll(&mut [Completion::default()]);
        drop(qp);
        let _ = done.send(());
        // Keep the thread (the ring's submitter, which runs its task work) alive a while.
        std::thread::sleep(Duration::from_millis(200));
    });
    dropped
        .recv_timeout(Duration::from_secs(10))
        .expect("drop blocked on a command the kernel still holds");
}
