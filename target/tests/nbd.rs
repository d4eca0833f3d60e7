//! Behaviour of the NBD front end, driven by a small NBD client written from the protocol
//! document (its constants are spelled out here, not taken from the server's code).

mod nbd_rig;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nbd_rig::{reactors, serve};
use nvmirror_nvme::{open_leg, read_all};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

struct Client {
    s: TcpStream,
    /// Data length expected in the reply to each read handle.
    reads: HashMap<u64, usize>,
}

impl Client {
    /// Connects and reads the greeting; sends client flags `flags`.
    fn connect(addr: SocketAddr, flags: u32) -> Self {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            0b11,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Self {
            s,
            reads: HashMap::new(),
        }
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (option, reply type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            0x3e889045565a9
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        )
    }

    /// Sends INFO or GO for `name`; returns every reply up to the final one.
    fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> Vec<(u32, Vec<u8>)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        self.send_option(option, &d);
        let mut out = Vec::new();
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, option);
            out.push((kind, data));
            if kind != REP_INFO {
                return out;
            }
        }
    }

    /// A connection in the transmission phase on export `name`; returns it and the size.
    fn go(addr: SocketAddr, name: &str) -> (Self, u64) {
        let mut c = Self::connect(addr, 3);
        let replies = c.info(OPT_GO, name, &[]);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        let size = u64::from_be_bytes(replies[0].1[2..10].try_into().unwrap());
        (c, size)
    }

    fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        if kind == CMD_READ {
            self.reads.insert(handle, len as usize);
        }
        self.s.write_all(&m).unwrap();
    }

    /// The next simple reply: (error, handle, data of a successful read).
    fn reply(&mut self) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = self.reads.remove(&handle).unwrap_or(0);
        let mut data = vec![0u8; if error == 0 { len } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (error, handle, data)
    }

    /// One request, waiting for its reply: (error, read data).
    fn io(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.request(kind, flags, 77, offset, len, data);
        let (error, handle, data) = self.reply();
        assert_eq!(handle, 77);
        (error, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.io(CMD_WRITE, 0, offset, data.len() as u32, data).0
    }

    fn read(&mut self, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.io(CMD_READ, 0, offset, len, &[])
    }

    /// Whether the server closed the connection within 10 s.
    fn closed_by_server(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

#[test]
fn handshake_lists_informs_refuses_and_aborts() {
    let pool = reactors(2);
    let a = open_leg("mem://1MiB").unwrap();
    let b = open_leg("null://1GiB?lba=4096").unwrap();
    let server = serve(&pool, &[("vol0", &a), ("other", &b)]);
    let addr = server.local_addr();

    let mut c = Client::connect(addr, 3);
    c.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, kind, data) = c.option_reply();
        assert_eq!(opt, OPT_LIST);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["vol0", "other"]);

    let info = c.info(OPT_INFO, "other", &[3]);
    assert_eq!(info.last().unwrap().0, REP_ACK);
    let export = info.iter().find(|(_, d)| d[0..2] == [0, 0]).unwrap();
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        1 << 30
    );
    let tflags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN; not
    // read-only.
    assert_eq!(tflags, 1 | 4 | 8 | 32 | 64 | 256);
    let sizes = info.iter().find(|(_, d)| d[0..2] == [0, 3]).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(sizes.1[at..at + 4].try_into().unwrap());
    assert_eq!((be32(2), be32(6), be32(10)), (4096, 4096, 32 << 20));

    for opt in [0x55, OPT_STRUCTURED_REPLY] {
        c.send_option(opt, b"some data");
        let (o, kind, _) = c.option_reply();
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }
    assert_eq!(c.info(OPT_INFO, "nope", &[])[0].0, REP_ERR_UNKNOWN);
    assert_eq!(c.info(OPT_GO, "nope", &[])[0].0, REP_ERR_UNKNOWN);
    c.send_option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed_by_server());

    // GO after a refused GO still works on the same connection.
    let mut c = Client::connect(addr, 1);
    assert_eq!(c.info(OPT_GO, "nope", &[])[0].0, REP_ERR_UNKNOWN);
    assert_eq!(c.info(OPT_GO, "vol0", &[]).last().unwrap().0, REP_ACK);
    assert_eq!(c.write(0, &[9u8; 512]), 0);

    // EXPORT_NAME: size, flags, then 124 zero bytes unless NO_ZEROES was negotiated.
    for (flags, tail) in [(1u32, 124usize), (3, 0)] {
        let mut c = Client::connect(addr, flags);
        c.send_option(OPT_EXPORT_NAME, b"vol0");
        let mut r = vec![0u8; 10 + tail];
        c.s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 1 << 20);
        assert!(r[10..].iter().all(|&b| b == 0));
        let (err, data) = c.read(0, 512);
        assert_eq!(
            (err, data),
            (0, vec![9u8; 512]),
            "same device as the GO connection"
        );
    }
    // EXPORT_NAME cannot report an error: an unknown name closes the connection.
    let mut c = Client::connect(addr, 3);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed_by_server());
    // Unknown client flags close the connection too.
    let mut c = Client::connect(addr, 0x10);
    assert!(c.closed_by_server());
    assert!(server.shutdown());
}

/// A client that floods options and never reads the replies is no longer read once its
/// replies back up: what it can make the server queue is bounded, and another client is
/// served meanwhile.
#[test]
fn an_option_flood_that_never_reads_is_throttled() {
    let pool = reactors(1);
    let a = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &a)]);
    let addr = server.local_addr();
    let mut flood = Client::connect(addr, 3);
    flood.s.set_nonblocking(true).unwrap();
    // OPT_LIST, over and over: 16 bytes in, a larger reply out (an INFO asking for a name
    // many times is answered once, see the negotiation's unit tests).
    let mut m = Vec::new();
    for _ in 0..4096 {
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&OPT_LIST.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
    }
    let (mut sent, mut at) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut blocked_since: Option<Instant> = None;
    while Instant::now() < deadline {
        match flood.s.write(&m[at..]) {
            Ok(n) => {
                sent += n;
                at = (at + n) % m.len();
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("flood write: {e}"),
        }
    }
    assert!(
        blocked_since.is_some(),
        "the server kept reading a client that never reads ({sent} bytes sent)"
    );
    eprintln!("flood: {sent} bytes accepted in 2 s");
    // Socket buffers on both sides plus the server's own queues: megabytes, not gigabytes.
    assert!(sent < 64 << 20, "{sent} bytes accepted");
    let mut other = Client::connect(addr, 3);
    let info = other.info(OPT_INFO, "vol0", &[]);
    assert_eq!(info.last().unwrap().0, REP_ACK);
}

#[test]
fn writes_read_back_across_chunks_and_reach_the_device() {
    let pool = reactors(1);
    let dev = open_leg("mem://64MiB").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, size) = Client::go(server.local_addr(), "vol0");
    assert_eq!(size, 64 << 20);
    let cases: [(u64, usize); 5] = [
        (0, 512),
        (4096, 4096),
        (1 << 20, (128 << 10) + 4096),
        (5 << 20, 1 << 20),
        (size - (32 << 20), 32 << 20),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        assert_eq!(c.write(off, &data), 0, "write {off}+{len}");
        let (err, back) = c.read(off, len as u32);
        assert_eq!(err, 0);
        assert!(back == data, "read back {off}+{len}");
    }
    assert_eq!(c.io(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    let image = read_all(&*dev).unwrap();
    for (i, &(off, len)) in cases.iter().enumerate().skip(1) {
        assert!(image[off as usize..off as usize + len] == pattern(i as u8 + 1, len));
    }
    drop(c);
    assert!(server.shutdown());
}

#[test]
fn trim_and_write_zeroes_read_back_zeroes() {
    let pool = reactors(1);
    let dev = open_leg("mem://4MiB").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    let data = pattern(7, 1 << 20);
    assert_eq!(c.write(0, &data), 0);
    assert_eq!(c.io(CMD_TRIM, 0, 64 << 10, 64 << 10, &[]).0, 0);
    assert_eq!(c.io(CMD_WRITE_ZEROES, 0, 256 << 10, 8192, &[]).0, 0);
    assert_eq!(
        c.io(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 512 << 10, 512, &[]).0,
        0
    );
    // A trim is a hint: an unaligned one covers only the whole blocks inside it.
    assert_eq!(c.io(CMD_TRIM, 0, 700 << 10 | 100, 1000, &[]).0, 0);
    let mut want = data.clone();
    want[64 << 10..128 << 10].fill(0);
    want[256 << 10..(256 << 10) + 8192].fill(0);
    want[512 << 10..(512 << 10) + 512].fill(0);
    want[(700 << 10) + 512..(700 << 10) + 1024].fill(0);
    let (err, back) = c.read(0, 1 << 20);
    assert_eq!(err, 0);
    assert!(
        back == want,
        "zeroed ranges and only those read back as zeroes"
    );
    assert!(server.shutdown());
}

#[test]
fn pipelined_requests_complete_out_of_order_by_handle() {
    let pool = reactors(1);
    let dev = open_leg("mem://16MiB?latency=60us&dist=uniform&spread=50us").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    const N: u64 = 300;
    let mut batch = Vec::new();
    for h in 0..N {
        let d = pattern(h as u8, 4096);
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&(1000 + h).to_be_bytes());
        m.extend_from_slice(&(h * 8192).to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&d);
        batch.extend_from_slice(&m);
    }
    // All requests in one send: more than the server's slots, so it must stall and resume.
    c.s.write_all(&batch).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..N {
        let (err, handle, _) = c.reply();
        assert_eq!(err, 0);
        assert!(seen.insert(handle), "handle {handle} answered twice");
    }
    assert_eq!(seen, (1000..1000 + N).collect());
    for h in 0..N {
        c.request(CMD_READ, 0, h, h * 8192, 4096, &[]);
    }
    let mut order = Vec::new();
    for _ in 0..N {
        let (err, handle, data) = c.reply();
        assert_eq!(err, 0);
        assert!(data == pattern(handle as u8, 4096), "read {handle}");
        order.push(handle);
    }
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "replies follow completion order, not submission order"
    );
    assert!(server.shutdown());
}

#[test]
fn bad_requests_get_errors_and_the_stream_stays_in_sync() {
    let pool = reactors(1);
    let dev = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, size) = Client::go(server.local_addr(), "vol0");
    assert_eq!(c.read(size - 512, 1024).0, EINVAL, "read past the end");
    assert_eq!(c.read(u64::MAX - 511, 512).0, EINVAL, "offset overflow");
    assert_eq!(c.write(size, &[1u8; 512]), ENOSPC, "write past the end");
    assert_eq!(c.io(CMD_WRITE_ZEROES, 0, size, 512, &[]).0, ENOSPC);
    assert_eq!(c.io(CMD_TRIM, 0, size - 512, 1024, &[]).0, ENOSPC);
    assert_eq!(c.read(0, (32 << 20) + 512).0, EOVERFLOW);
    assert_eq!(c.read(0, 0).0, EINVAL, "empty read");
    assert_eq!(c.read(100, 512).0, EINVAL, "unaligned read");
    assert_eq!(c.write(512, &[1u8; 100]), EINVAL, "unaligned write");
    assert_eq!(c.io(CMD_WRITE_ZEROES, 0, 0, 100, &[]).0, EINVAL);
    assert_eq!(c.io(9, 0, 0, 512, &[]).0, EINVAL, "unknown command");
    assert_eq!(
        c.io(CMD_READ, FLAG_FUA, 0, 512, &[]).0,
        EINVAL,
        "FUA is for writes"
    );
    assert_eq!(
        c.io(CMD_WRITE, FLAG_FUA, 0, 512, &[7u8; 512]).0,
        0,
        "a FUA write is taken"
    );
    assert_eq!(c.io(CMD_READ, FLAG_NO_HOLE, 0, 512, &[]).0, EINVAL);
    // The payloads of refused writes were skipped: the next requests parse correctly.
    assert_eq!(c.write(0, &[5u8; 1024]), 0);
    assert_eq!(c.read(0, 1024), (0, vec![5u8; 1024]));
    assert_eq!(read_all(&*dev).unwrap()[..1024], [5u8; 1024]);
    assert!(server.shutdown());
}

#[test]
fn malformed_request_closes_only_that_connection() {
    let pool = reactors(1);
    let dev = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut bad, _) = Client::go(server.local_addr(), "vol0");
    let (mut good, _) = Client::go(server.local_addr(), "vol0");
    assert_eq!(good.write(0, &[3u8; 4096]), 0);
    let mut garbage = [0u8; 28];
    garbage[0..4].copy_from_slice(b"JUNK");
    bad.s.write_all(&garbage).unwrap();
    assert!(bad.closed_by_server());
    assert_eq!(good.read(0, 4096), (0, vec![3u8; 4096]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.connections() != 1 {
        assert!(
            Instant::now() < deadline,
            "{} connections",
            server.connections()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(server.shutdown());
}

#[test]
fn disconnect_answers_what_came_before_it() {
    let pool = reactors(1);
    let dev = open_leg("mem://1MiB?latency=2ms").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    for h in 0..8u64 {
        c.request(CMD_WRITE, 0, h, h * 4096, 4096, &[h as u8 + 1; 4096]);
    }
    c.request(CMD_DISC, 0, 99, 0, 0, &[]);
    c.request(CMD_WRITE, 0, 100, 0, 4096, &[0xee; 4096]);
    let mut handles = HashSet::new();
    for _ in 0..8 {
        let (err, handle, _) = c.reply();
        assert_eq!(err, 0);
        handles.insert(handle);
    }
    assert_eq!(handles, (0..8).collect());
    assert!(c.closed_by_server());
    let image = read_all(&*dev).unwrap();
    for h in 0..8usize {
        assert!(image[h * 4096..(h + 1) * 4096]
            .iter()
            .all(|&b| b == h as u8 + 1));
    }
    assert!(server.shutdown());
}

#[test]
fn shutdown_drains_in_flight_requests() {
    let pool = reactors(2);
    let dev = open_leg("mem://1MiB?latency=100ms").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    for h in 0..16u64 {
        c.request(CMD_WRITE, 0, h, h * 4096, 4096, &[0xa5; 4096]);
    }
    // Wait until the server holds them: the last write is visible at once in the mem store.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_all(&*dev).unwrap()[15 * 4096] != 0xa5 {
        assert!(Instant::now() < deadline, "writes never reached the device");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stopper = std::thread::spawn(move || server.shutdown());
    for _ in 0..16 {
        assert_eq!(c.reply().0, 0, "in-flight writes are answered");
    }
    assert!(c.closed_by_server());
    assert!(
        stopper.join().unwrap(),
        "shutdown saw every connection close"
    );
    c.s.shutdown(Shutdown::Both).ok();
}

#[test]
fn requests_split_across_many_receives_parse_the_same() {
    let pool = reactors(1);
    let dev = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &dev)]);
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    c.s.set_nodelay(true).unwrap();
    let data = pattern(42, 4096 + 512);
    let mut bytes = Vec::new();
    for (kind, handle, offset, len, payload) in [
        (CMD_WRITE, 1u64, 8192u64, data.len() as u32, &data[..]),
        (CMD_WRITE_ZEROES, 2, 8192, 512, &[][..]),
        (CMD_READ, 3, 8192, data.len() as u32, &[][..]),
    ] {
        bytes.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        bytes.extend_from_slice(&0u16.to_be_bytes());
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&handle.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(payload);
    }
    c.reads.insert(3, data.len());
    for piece in bytes.chunks(13) {
        c.s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_micros(50));
    }
    let mut got = HashMap::new();
    for _ in 0..3 {
        let (err, handle, d) = c.reply();
        assert_eq!(err, 0, "handle {handle}");
        got.insert(handle, d);
    }
    // NBD lets a server reorder these; the mem device executes commands in submission
    // order, so the read sees the write and then the zeroes.
    let mut want = data.clone();
    want[..512].fill(0);
    assert!(got[&3] == want, "write, then zeroes over its first block");
    assert!(server.shutdown());
}

#[test]
fn the_connection_buffer_budget_bounds_the_maximum_payload() {
    use nvmirror_target::nbd::{NbdConfig, NbdLimits, NbdServer};
    let pool = reactors(1);
    let dev = open_leg("mem://8MiB").unwrap();
    let cfg = NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        exports: vec![("vol0".into(), dev)],
    };
    let limits = NbdLimits {
        connection_buffer_budget: 1 << 20,
        ..NbdLimits::default()
    };
    let server = NbdServer::start_with_limits(cfg, limits, &pool.handle()).unwrap();
    let (mut c, _) = Client::go(server.local_addr(), "vol0");
    // NBD_INFO_BLOCK_SIZE (type 3): minimum, preferred, maximum payload.
    let mut probe = Client::connect(server.local_addr(), 3);
    let replies = probe.info(OPT_GO, "vol0", &[]);
    let sizes = replies
        .iter()
        .find(|(_, d)| d.len() == 14 && d[..2] == [0, 3])
        .expect("a block size info reply");
    let max = u32::from_be_bytes(sizes.1[10..14].try_into().unwrap());
    assert_eq!(max, 1 << 20, "the advertised maximum payload is the budget");
    // A request of the maximum works; one past it is refused, and the stream stays usable.
    let data = vec![0x5a; 1 << 20];
    assert_eq!(c.write(0, &data), 0);
    assert_eq!(c.read(0, 1 << 20), (0, data));
    assert_eq!(c.read(0, (1 << 20) + 512).0, EOVERFLOW);
    assert_eq!(c.write(0, &vec![1u8; (1 << 20) + 512]), EOVERFLOW);
    assert_eq!(c.read(0, 512).0, 0);
}
