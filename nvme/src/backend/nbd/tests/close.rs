//! Closing a queue pair with a write the server holds: `NBD_CMD_DISC` goes out, and the close
//! fence is done only once the server answered or ended the connection after it — or, for a
//! server that does neither, a further I/O timeout after the close bound gave it up.

use std::io::Read;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

/// Reads the held 4 KiB write and the DISC that the close sends; tells the test when the DISC
/// is in. Returns the write's handle.
fn take_write_and_disc(s: &mut TcpStream, disc_in: &mpsc::Sender<()>) -> u64 {
    go(s, FLAGS);
    let w = request(s);
    assert_eq!((w.kind, w.len), (command::WRITE, 4096));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    let disc = request(s);
    assert_eq!(disc.kind, command::DISC, "the close sends NBD_CMD_DISC");
    disc_in.send(()).unwrap();
    w.handle
}

/// Submits the write the server will hold and checks that nothing completes for a while.
fn submit_held_write(qp: &mut NbdQueuePair, buf: &mut [u8]) {
    // SAFETY: the test keeps `buf` until the close fence is done.
    unsafe {
        qp.submit(IoCommand::with_buf(
            IoOp::Write,
            0,
            8,
            IoBuf::from_slice(buf),
            1,
        ))
        .unwrap();
    }
    let mut c = [Completion::default()];
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert_eq!(qp.poll(&mut c), 0, "the server holds the write");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn eventually(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !cond() {
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

#[test]
fn close_sends_disc_and_the_fence_waits_for_the_held_write() {
    let (disc_tx, disc_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (addr, t) = server(move |mut s| {
        let handle = take_write_and_disc(&mut s, &disc_tx);
        go_rx.recv().unwrap();
        s.write_all(&reply_bytes(0, handle)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(4).unwrap();
    let mut buf = vec![0x5au8; 4096];
    submit_held_write(&mut qp, &mut buf);

    let fence = Box::new(qp).close();
    assert!(!fence.is_done(), "the server holds the write");
    disc_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fence.is_done(), "DISC is in but the write is not answered");
    go_tx.send(()).unwrap();
    assert!(eventually(Duration::from_secs(5), || fence.is_done()));
    assert!(dev.lost_reason().is_none(), "a clean close");
    drop(buf);
    t.join().unwrap();
}

#[test]
fn a_server_that_ends_the_connection_after_disc_ends_the_fence() {
    let (disc_tx, disc_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (addr, t) = server(move |mut s| {
        take_write_and_disc(&mut s, &disc_tx);
        go_rx.recv().unwrap();
        // Handled, unanswered: the server just closes, as DISC allows.
        drop(s);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(4).unwrap();
    let mut buf = vec![0x5au8; 4096];
    submit_held_write(&mut qp, &mut buf);

    let fence = Box::new(qp).close();
    disc_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!fence.is_done());
    go_tx.send(()).unwrap();
    assert!(eventually(Duration::from_secs(5), || fence.is_done()));
    assert!(dev.lost_reason().is_none(), "a clean close");
    drop(buf);
    t.join().unwrap();
}

#[test]
fn a_server_silent_after_disc_is_fenced_for_a_further_timeout() {
    let (disc_tx, disc_rx) = mpsc::channel();
    let (addr, t) = server(move |mut s| {
        take_write_and_disc(&mut s, &disc_tx);
        // Never answers, never closes: reads until the client gives the connection up.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let opts = NbdOptions {
        timeout: Duration::from_millis(500),
        ..NbdOptions::new("exp")
    };
    let dev = NbdDevice::connect(&addr.to_string(), &opts).unwrap();
    let mut qp = dev.open_nbd_qpair(4).unwrap();
    let mut buf = vec![0x5au8; 4096];
    submit_held_write(&mut qp, &mut buf);

    let closed = Instant::now();
    let fence = Box::new(qp).close();
    disc_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // The close bound (500 ms) gives the connection up; the fence is 500 ms after that.
    assert!(
        eventually(Duration::from_secs(5), || dev.lost_reason().is_some()),
        "the connection is given up"
    );
    let why = dev.lost_reason().unwrap();
    assert!(why.contains("closed queue pair"), "{why}");
    while closed.elapsed() < Duration::from_millis(950) {
        assert!(
            !fence.is_done(),
            "done {:?} after the close",
            closed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(eventually(Duration::from_secs(5), || fence.is_done()));
    drop(buf);
    t.join().unwrap();
}

#[test]
fn cancel_cannot_stop_an_nbd_request() {
    let (addr, t) = server(|mut s| {
        go(&mut s, FLAGS);
        let r = request(&mut s);
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(&reply_bytes(0, r.handle)).unwrap();
        assert_eq!(request(&mut s).kind, command::DISC);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(2).unwrap();
    // SAFETY: no data.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 9)).unwrap() };
    assert_eq!(qp.cancel(&[9]), 0);
    let c = wait(&mut qp, 1);
    assert_eq!(
        (c[0].tag, c[0].status),
        (9, Status::SUCCESS),
        "its real result"
    );
    assert!(Box::new(qp).close().is_done(), "nothing left at the server");
    t.join().unwrap();
}
