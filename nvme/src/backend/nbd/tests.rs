//! Unit tests against small scripted servers on loopback: the handshake fallback, replies
//! cut into pieces, server errors and protocol violations. The initiator runs against the
//! real NBD server in `target/tests/nbd_initiator.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::dma::IoBuf;
use crate::queue::{Completion, IoCommand, IoOp};
use crate::spec::nbd::{
    be16, be32, be64, command, errno, info, option, reply, RequestHeader, SimpleReply, IHAVEOPT,
    NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_LEN, SIMPLE_REPLY_MAGIC,
};
use crate::spec::Status;

const SIZE: u64 = 1 << 20;

/// A scripted server: accepts one connection and runs `script` on it.
fn server(script: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        script(s);
    });
    (addr, t)
}

/// Greeting (fixed newstyle, no zeroes) and the client's flags; returns the first option.
fn greet(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&g).unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).unwrap();
    assert_eq!(be32(&f), 3, "fixed newstyle and no zeroes");
    read_option(s)
}

fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h), IHAVEOPT);
    let mut d = vec![0u8; be32(&h[12..16]) as usize];
    s.read_exact(&mut d).unwrap();
    (be32(&h[8..12]), d)
}

fn option_reply(s: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) {
    let mut m = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Answers `NBD_OPT_GO` with the export's size and `flags`, no block sizes.
fn go(s: &mut TcpStream, flags: u16) {
    let (opt, data) = greet(s);
    assert_eq!(opt, option::GO);
    let name_len = be32(&data) as usize;
    assert_eq!(&data[4..4 + name_len], b"exp");
    assert_eq!(be16(&data[4 + name_len..]), 1, "one information request");
    assert_eq!(be16(&data[6 + name_len..]), info::BLOCK_SIZE);
    let mut e = info::EXPORT.to_be_bytes().to_vec();
    e.extend_from_slice(&SIZE.to_be_bytes());
    e.extend_from_slice(&flags.to_be_bytes());
    option_reply(s, option::GO, reply::INFO, &e);
    option_reply(s, option::GO, reply::ACK, &[]);
}

fn request(s: &mut TcpStream) -> RequestHeader {
    let mut b = [0u8; REQUEST_LEN];
    s.read_exact(&mut b).unwrap();
    RequestHeader::parse(&b)
}

fn reply_bytes(error: u32, handle: u64) -> [u8; 16] {
    SimpleReply {
        magic: SIMPLE_REPLY_MAGIC,
        error,
        handle,
    }
    .encode()
}

/// Polls until `n` completions arrived or 10 s passed.
fn wait(qp: &mut NbdQueuePair, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = [Completion::default(); 8];
    while got.len() < n {
        assert!(Instant::now() < deadline, "timed out with {got:?}");
        let k = qp.poll(&mut c);
        got.extend_from_slice(&c[..k]);
        if k == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    got
}

mod close;

const FLAGS: u16 = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    let (addr, t) = server(|mut s| {
        let (opt, _) = greet(&mut s);
        assert_eq!(opt, option::GO);
        option_reply(&mut s, option::GO, reply::ERR_UNSUP, b"old server");
        let (opt, name) = read_option(&mut s);
        assert_eq!((opt, &name[..]), (option::EXPORT_NAME, &b"exp"[..]));
        s.write_all(&SIZE.to_be_bytes()).unwrap();
        s.write_all(&(tf::HAS_FLAGS | tf::READ_ONLY).to_be_bytes())
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let info = *dev.export_info();
    assert!(info.used_export_name);
    assert_eq!(info.size, SIZE);
    assert!(info.has(tf::READ_ONLY));
    assert_eq!(dev.geometry(), Geometry::from_bytes(SIZE, 512).unwrap());
    let mut qp = dev.open_nbd_qpair(4).unwrap();
    let mut buf = vec![0u8; 512];
    // SAFETY: `buf` outlives the command, which completes at submit (nothing is sent).
    unsafe {
        let b = IoBuf::from_slice(&mut buf);
        qp.submit(IoCommand::with_buf(IoOp::Write, 0, 1, b, 7))
            .unwrap();
    }
    let c = wait(&mut qp, 1);
    assert_eq!(c[0].status, Status::NAMESPACE_WRITE_PROTECTED);
    drop(qp);
    drop(dev);
    t.join().unwrap();
}

#[test]
fn unknown_export_is_a_clear_error() {
    let (addr, t) = server(|mut s| {
        greet(&mut s);
        option_reply(&mut s, option::GO, reply::ERR_UNKNOWN, b"not here");
    });
    let e = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("NBD_OPT_GO") && m.contains("no export named 'exp'"),
        "{m}"
    );
    assert!(m.contains("not here"), "{m}");
    t.join().unwrap();
}

#[test]
fn replies_cut_into_pieces_are_reassembled() {
    let (addr, t) = server(|mut s| {
        go(&mut s, FLAGS);
        let a = request(&mut s);
        let b = request(&mut s);
        assert_eq!((a.kind, a.offset, a.len), (command::READ, 4096, 4096));
        assert_eq!((b.kind, b.len), (command::FLUSH, 0));
        // Replies out of order, the read's header and data dribbled in odd pieces.
        s.write_all(&reply_bytes(0, b.handle)).unwrap();
        let mut bytes = reply_bytes(0, a.handle).to_vec();
        bytes.extend((0..4096u32).map(|i| (i * 7 % 251) as u8));
        for piece in bytes.chunks(333) {
            for part in piece.chunks(piece.len().div_ceil(2).max(1)) {
                s.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let disc = request(&mut s);
        assert_eq!(disc.kind, command::DISC);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(4).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the command, which is reaped by `wait` before it is read.
    unsafe {
        let b = IoBuf::from_slice(&mut buf);
        qp.submit(IoCommand::with_buf(IoOp::Read, 8, 8, b, 1))
            .unwrap();
        qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 2)).unwrap();
    }
    let c = wait(&mut qp, 2);
    assert_eq!(c.iter().map(|c| c.tag).collect::<Vec<_>>(), [2, 1]);
    assert!(c.iter().all(|c| c.status.is_success()), "{c:?}");
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u32 * 7 % 251) as u8));
    drop(qp);
    t.join().unwrap();
}

#[test]
fn server_errors_map_to_statuses_and_keep_the_stream_in_sync() {
    let (addr, t) = server(|mut s| {
        go(&mut s, FLAGS);
        let r = request(&mut s);
        s.write_all(&reply_bytes(errno::EIO, r.handle)).unwrap();
        let w = request(&mut s);
        let mut payload = vec![0u8; w.len as usize];
        s.read_exact(&mut payload).unwrap();
        s.write_all(&reply_bytes(errno::ENOSPC, w.handle)).unwrap();
        let z = request(&mut s);
        assert_eq!(z.kind, command::WRITE_ZEROES);
        s.write_all(&reply_bytes(errno::EINVAL, z.handle)).unwrap();
        let r = request(&mut s);
        s.write_all(&reply_bytes(0, r.handle)).unwrap();
        s.write_all(&[0x5a; 512]).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(8).unwrap();
    let mut buf = vec![0u8; 512];
    let b = IoBuf::from_slice(&mut buf);
    let mut statuses = Vec::new();
    for cmd in [
        IoCommand::with_buf(IoOp::Read, 0, 1, b, 0),
        IoCommand::with_buf(IoOp::Write, 0, 1, b, 1),
        IoCommand::new(IoOp::WriteZeroes, 0, 1, 2),
        IoCommand::with_buf(IoOp::Read, 1, 1, b, 3),
    ] {
        // SAFETY: `buf` outlives each command, which is reaped before the next.
        unsafe { qp.submit(cmd) }.unwrap();
        statuses.push(wait(&mut qp, 1)[0].status);
    }
    assert_eq!(
        statuses,
        [
            Status::UNRECOVERED_READ_ERROR,
            Status::CAPACITY_EXCEEDED,
            Status::INVALID_FIELD,
            Status::SUCCESS
        ]
    );
    assert!(buf.iter().all(|&b| b == 0x5a));
    assert!(!dev.is_gone());
    drop(qp);
    t.join().unwrap();
}

#[test]
fn what_the_export_does_not_allow_never_reaches_the_wire() {
    let (addr, t) = server(|mut s| {
        go(&mut s, tf::HAS_FLAGS);
        // The only request is the disconnect.
        assert_eq!(request(&mut s).kind, command::DISC);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(8).unwrap();
    let mut small = vec![0u8; 256];
    // SAFETY: nothing is sent; every command completes at submit.
    unsafe {
        qp.submit(IoCommand::new(IoOp::Deallocate, 0, 1, 1))
            .unwrap();
        qp.submit(IoCommand::new(IoOp::WriteZeroes, 0, 1, 2))
            .unwrap();
        qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 3)).unwrap();
        qp.submit(IoCommand::new(IoOp::Read, SIZE / 512, 1, 4))
            .unwrap();
        let b = IoBuf::from_slice(&mut small);
        qp.submit(IoCommand::with_buf(IoOp::Read, 0, 1, b, 5))
            .unwrap();
    }
    let mut c = wait(&mut qp, 5);
    c.sort_by_key(|c| c.tag);
    let st: Vec<Status> = c.iter().map(|c| c.status).collect();
    assert_eq!(
        st,
        [
            Status::INVALID_OPCODE,
            Status::INVALID_OPCODE,
            Status::SUCCESS,
            Status::LBA_OUT_OF_RANGE,
            Status::DATA_SGL_LENGTH_INVALID
        ]
    );
    drop(qp);
    t.join().unwrap();
}

#[test]
fn a_reply_for_no_outstanding_command_kills_the_connection() {
    let (addr, t) = server(|mut s| {
        go(&mut s, FLAGS);
        let r = request(&mut s);
        let _second = request(&mut s);
        s.write_all(&reply_bytes(0, r.handle ^ (1 << 40))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let dev = NbdDevice::connect(&addr.to_string(), &NbdOptions::new("exp")).unwrap();
    let mut qp = dev.open_nbd_qpair(8).unwrap();
    // SAFETY: commands without data.
    unsafe {
        qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 1)).unwrap();
        qp.submit(IoCommand::new(IoOp::Deallocate, 0, 8, 2))
            .unwrap();
    }
    let c = wait(&mut qp, 2);
    assert!(
        c.iter().all(|c| c.status == Status::HOST_PATHING_ERROR),
        "{c:?}"
    );
    assert!(qp.dead_reason().unwrap().contains("not outstanding"));
    assert!(dev.is_gone());
    assert!(dev.lost_reason().unwrap().contains("protocol violation"));
    // SAFETY: no data.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 3)).unwrap() };
    assert_eq!(wait(&mut qp, 1)[0].status, Status::HOST_PATHING_ERROR);
    drop(qp);
    t.join().unwrap();
}

#[test]
fn a_silent_server_times_out() {
    let (addr, t) = server(|mut s| {
        go(&mut s, FLAGS);
        let _ = request(&mut s);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let opts = NbdOptions {
        timeout: Duration::from_millis(200),
        ..NbdOptions::new("exp")
    };
    let dev = NbdDevice::connect(&addr.to_string(), &opts).unwrap();
    let mut qp = dev.open_nbd_qpair(2).unwrap();
    // SAFETY: no data.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 1)).unwrap() };
    let started = Instant::now();
    let c = wait(&mut qp, 1);
    assert_eq!(c[0].status, Status::HOST_PATHING_ERROR);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(qp.dead_reason().unwrap().contains("no reply"));
    drop(qp);
    t.join().unwrap();
}

#[test]
fn geometry_follows_the_block_sizes() {
    let mut i = ExportInfo {
        size: SIZE + 100,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
        used_export_name: false,
    };
    assert_eq!(
        geometry(&i, None),
        Ok(Geometry::from_bytes(SIZE, 512).unwrap())
    );
    assert_eq!(geometry(&i, Some(4096)).unwrap().lba_size, 4096);
    i.min_block = 4096;
    assert_eq!(geometry(&i, None).unwrap().lba_size, 4096);
    assert!(geometry(&i, Some(512)).unwrap_err().contains("lba=512"));
    i.min_block = 8192;
    assert!(geometry(&i, None).unwrap_err().contains("8192"));
    i.min_block = 512;
    i.size = 100;
    assert!(geometry(&i, None)
        .unwrap_err()
        .contains("less than one block"));
}
