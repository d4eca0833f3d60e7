//! Network input cannot crash the NBD server: arbitrary bytes during the handshake or after
//! it end, at worst, in that connection closing; the server keeps serving others.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nvmirror_nvme::open_leg;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::nbd::{NbdConfig, NbdServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A piece of client input: raw bytes, or a request header (valid magic or not) with
/// chosen fields, followed by some payload.
#[derive(Clone, Debug)]
enum Piece {
    Raw(Vec<u8>),
    Request {
        magic_ok: bool,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: Vec<u8>,
    },
}

fn piece() -> impl Strategy<Value = Piece> {
    let offset = prop_oneof![0u64..(2 << 20), any::<u64>(), Just(u64::MAX - 511)];
    let len = prop_oneof![
        0u32..70_000,
        Just(32 << 20),
        Just((32 << 20) + 1),
        any::<u32>()
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Piece::Raw),
        (
            prop::bool::weighted(0.9),
            prop_oneof![Just(0u16), 0u16..4, any::<u16>()],
            prop_oneof![0u16..8, any::<u16>()],
            offset,
            len,
            prop::collection::vec(any::<u8>(), 0..1024),
        )
            .prop_map(|(magic_ok, flags, kind, offset, len, payload)| {
                Piece::Request {
                    magic_ok,
                    flags,
                    kind,
                    offset,
                    len,
                    payload,
                }
            }),
    ]
}

fn encode(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Raw(b) => out.extend_from_slice(b),
            Piece::Request {
                magic_ok,
                flags,
                kind,
                offset,
                len,
                payload,
            } => {
                let magic: u32 = if *magic_ok { 0x2560_9513 } else { 0x2560_9512 };
                out.extend_from_slice(&magic.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&7u64.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(payload);
            }
        }
    }
    out
}

fn connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s
}

/// Completes the handshake with NBD_OPT_GO on `vol0`.
fn go(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&10u32.to_be_bytes());
    m.extend_from_slice(&4u32.to_be_bytes());
    m.extend_from_slice(b"vol0");
    m.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&m).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        if u32::from_be_bytes(h[12..16].try_into().unwrap()) == 1 {
            return s;
        }
    }
}

/// Sends `input`, closes the sending side and reads until the server closes.
fn send_and_expect_close(mut s: TcpStream, input: &[u8]) -> Result<(), TestCaseError> {
    // The server may close first (a bad magic): a failed write is fine.
    let _ = s.write_all(input);
    let _ = s.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        prop_assert!(Instant::now() < deadline, "server did not close");
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("read: {e}"))),
        }
    }
}

/// A fresh connection can still write and read.
fn still_serving(addr: SocketAddr) -> Result<(), TestCaseError> {
    let mut s = go(addr);
    let mut m = Vec::new();
    for (kind, handle) in [(1u16, 1u64), (0, 2)] {
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&(3u64 << 20).to_be_bytes());
        m.extend_from_slice(&512u32.to_be_bytes());
        if kind == 1 {
            m.extend_from_slice(&[0x5a; 512]);
        }
    }
    s.write_all(&m).unwrap();
    let mut replies = vec![0u8; 16 + 16 + 512];
    s.read_exact(&mut replies).unwrap();
    prop_assert_eq!(&replies[4..8], &[0, 0, 0, 0]);
    prop_assert_eq!(&replies[20..24], &[0, 0, 0, 0]);
    prop_assert!(replies[32..].iter().all(|&b| b == 0x5a));
    Ok(())
}

#[test]
fn arbitrary_bytes_never_crash_the_server() {
    let idle = IdlePolicy::SpinThenSleep {
        spin: Duration::from_micros(200),
        sleep: Duration::from_micros(100),
    };
    // One reactor: every connection shares it, so a panic would stop all of them.
    let pool = ReactorPool::start(ReactorConfig::unpinned(1).with_idle(idle)).unwrap();
    let cfg = NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        exports: vec![("vol0".into(), open_leg("mem://4MiB").unwrap())],
    };
    let server = NbdServer::start(cfg, &pool.handle()).unwrap();
    let addr = server.local_addr();
    // A crashed reactor shows up as timeouts, so shrinking is kept short.
    let mut runner = TestRunner::new(Config {
        cases: 96,
        max_shrink_iters: 8,
        ..Config::default()
    });
    let strategy = (
        any::<bool>(),
        prop::collection::vec(piece(), 1..8),
        prop::collection::vec(any::<u8>(), 0..256),
    );
    runner
        .run(&strategy, |(after_handshake, pieces, handshake_junk)| {
            if after_handshake {
                send_and_expect_close(go(addr), &encode(&pieces))?;
            } else {
                // Client flags and options made of junk, or of request-shaped bytes.
                let mut input = handshake_junk;
                input.extend_from_slice(&encode(&pieces));
                send_and_expect_close(connect(addr), &input)?;
            }
            still_serving(addr)
        })
        .unwrap();
    assert!(server.shutdown());
}
