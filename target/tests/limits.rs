//! Network input limits: connection caps, handshake timeouts, the per-connection buffer
//! budget, and a connection storm and a slow sender next to a host doing I/O.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start, Harness, Host, HOSTNQN, SUBNQN};
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::spec::admin::cns;
use nvmirror_nvme::spec::fabrics::{property, status as fstatus, ConnectParam, CNTLID_DYNAMIC};
use nvmirror_nvme::spec::tcp::{self, Digests};
use nvmirror_nvme::spec::SubmissionQueueEntry;
use nvmirror_nvme::BlockDevice;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::nbd::{NbdConfig, NbdLimits, NbdServer};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

/// Whether the peer closed `sock` within `within` (EOF or reset; bytes before it are skipped).
fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut b = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return true
            }
            Err(_) => return false,
        }
    }
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn connections(t: &Harness) -> usize {
    t.target.as_ref().unwrap().connection_count()
}

/// Raises the soft descriptor limit to the hard one (a storm needs two per connection here).
fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let t = start(|c| {
        c.max_connections = 3;
        c.handshake_timeout = Duration::from_secs(60);
    });
    let mut held: Vec<Host> = (0..3).map(|_| Host::connect(t.addr)).collect();
    wait_for("three connections", Duration::from_secs(5), || {
        connections(&t) == 3
    });
    let mut extra = TcpStream::connect(t.addr).unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(3)),
        "the fourth connection is closed"
    );
    assert_eq!(connections(&t), 3);
    // The connections within the limit work.
    held[0].icreq(false, false);
    // Closing two makes room again.
    held.truncate(1);
    wait_for("one connection", Duration::from_secs(5), || {
        connections(&t) == 1
    });
    let (mut h, _) = Host::bring_up_admin(t.addr, false, false, 0);
    assert!(h.identify(cns::CONTROLLER, 0).0.is_success());
}

#[test]
fn handshake_timeout_closes_silent_and_unconnected_sockets_but_not_queues() {
    let t = start(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut silent = TcpStream::connect(t.addr).unwrap();
    let mut no_connect = Host::connect(t.addr);
    no_connect.icreq(false, false);
    let (mut admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)),
        "no ICReq"
    );
    assert!(
        no_connect.wait_closed(Duration::from_secs(5)),
        "ICReq but no Connect"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert!(admin.admin(0x18, 0, 0, 0, 0).0.status().is_success());
    assert!(io.write(1, 0, &[5u8; 512], 512, true).is_success());
    wait_for("the two handshakes gone", Duration::from_secs(5), || {
        connections(&t) == 2
    });
}

#[test]
fn buffer_budget_caps_the_advertised_queue_size() {
    // 1 MiB of 128 KiB commands: eight entries per I/O queue; of 32 KiB admin entries: 32
    // entries per admin queue (ASQSZ), the least a fabrics controller may offer.
    let t = start(|c| c.connection_buffer_budget = 1 << 20);
    let mut h = Host::connect(t.addr);
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 32, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(c.dw0, ConnectParam::SQSIZE.dw0());
    let mut h = Host::connect(t.addr);
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success(), "{}", c.status());
    let cntlid = c.dw0 as u16;
    assert_eq!(h.prop_get(property::CAP, 8) & 0xffff, 7, "CAP.MQES");
    assert!(h.prop_set(property::CC, 0x46_0001).is_success());
    let (_, id) = h.identify(cns::CONTROLLER, 0);
    assert_eq!(u16::from_le_bytes([id[514], id[515]]), 8, "MAXCMD");
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 63, 0, SUBNQN, HOSTNQN, cntlid);
    assert_eq!(c.dw0, ConnectParam::SQSIZE.dw0(), "{}", c.status());
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 7, 0, SUBNQN, HOSTNQN, cntlid);
    assert!(c.status().is_success(), "{}", c.status());
    let data = common::pattern(128 << 10, 3);
    assert!(io.write(1, 0, &data, 512, false).is_success());
    assert_eq!(io.read(1, 0, 256, 512).1, data);
}

/// The 50th and 99th percentiles.
fn p50_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |q: usize| v[(v.len() * q / 100).min(v.len() - 1)];
    (at(50), at(99))
}

/// A target on one busy-polling reactor: the host and the storm share it, and no idle nap
/// hides in the latencies measured.
fn start_on_one_spinning_reactor(tweak: impl FnOnce(&mut TargetConfig)) -> Harness {
    let namespaces = common::mem_namespaces();
    let mut cfg = TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        subsystems: vec![SubsystemConfig::new(SUBNQN, namespaces.clone())],
        ..TargetConfig::default()
    };
    tweak(&mut cfg);
    let pool = ReactorPool::start(ReactorConfig::unpinned(1).with_idle(IdlePolicy::Spin)).unwrap();
    let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
    Harness {
        addr: target.local_addr(),
        target: Some(target),
        pool: Some(pool),
        namespaces,
    }
}

/// One 4 KiB write and its latency.
fn timed_write(io: &mut Host, lba: u64, data: &[u8]) -> Duration {
    let t0 = Instant::now();
    assert!(io.write(1, lba, data, 512, true).is_success());
    t0.elapsed()
}

#[test]
fn connection_storm_does_not_stall_a_connected_host() {
    const STORM: usize = 1000;
    let fds = raise_fd_limit();
    let t = start_on_one_spinning_reactor(|c| {
        c.handshake_timeout = Duration::from_secs(1);
        c.max_connections = 4096;
    });
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    let data = common::pattern(4096, 9);
    let mut before = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        before.push(timed_write(&mut io, (before.len() as u64 % 64) * 8, &data));
    }

    let addr = t.addr;
    // Half send nothing; half start an ICReq and stop after 10 bytes.
    let storm = std::thread::spawn(move || {
        let mut socks = Vec::with_capacity(STORM);
        let t0 = Instant::now();
        for i in 0..STORM {
            let mut s = TcpStream::connect(addr).expect("storm connect");
            if i % 2 == 1 {
                s.write_all(&tcp::icreq_bytes(0, 0, 0)[..10]).unwrap();
            }
            socks.push(s);
        }
        let opened = t0.elapsed();
        let closed = socks
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(20)))
            .filter(|&c| c)
            .count();
        (opened, closed, t0.elapsed())
    });
    let mut during = Vec::new();
    let mut i = 0;
    let mut peak = 0;
    while !storm.is_finished() {
        during.push(timed_write(&mut io, (i % 64) * 8, &data));
        if i % 64 == 0 {
            peak = peak.max(connections(&t));
        }
        i += 1;
    }
    let (opened, closed, all_closed) = storm.join().unwrap();
    assert_eq!(
        closed, STORM,
        "every storm connection closed by the handshake timeout"
    );
    assert!(!during.is_empty(), "the host's I/O kept completing");
    let writes = during.len();
    let ((b50, b99), (d50, d99)) = (p50_p99(before), p50_p99(during));
    println!(
        "storm: {STORM} connects in {opened:?}, at most {peak} open at once, all closed after \
         {all_closed:?} (fd limit {fds}); the connected host's 4 KiB QD1 writes on the same \
         reactor: p50 {b50:?} / p99 {b99:?} before, p50 {d50:?} / p99 {d99:?} during \
         ({writes} writes), p99 ratio {:.2}",
        d99.as_secs_f64() / b99.as_secs_f64()
    );
    wait_for("the storm gone", Duration::from_secs(10), || {
        connections(&t) == 2
    });
    assert!(io.write(1, 0, &data, 512, true).is_success());
}

#[test]
fn a_slow_sender_does_not_stall_another_host() {
    let t = start(|_| {});
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut slow = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    let mut fast = Host::bring_up_io(t.addr, cntlid, 2, false, false);
    // A write capsule with 512 bytes of in-capsule data, one byte every 2 ms.
    let data = common::pattern(512, 1);
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x01,
        cid: 77,
        nsid: 1,
        ..Default::default()
    };
    sqe.set_lba_range(100, 1);
    nvmirror_nvme::spec::fabrics::sgl_in_capsule(&mut sqe, 512);
    let mut pdu = vec![0u8; tcp::capsule_cmd_len(512, Digests::default())];
    let n = tcp::write_capsule_cmd(&mut pdu, &sqe, &data, Digests::default());
    pdu.truncate(n);
    let mut sock = slow.sock.try_clone().unwrap();
    let dribble = std::thread::spawn(move || {
        for b in &pdu {
            sock.write_all(std::slice::from_ref(b)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let block = common::pattern(4096, 2);
    let mut done = 0u32;
    let mut worst = Duration::ZERO;
    while !dribble.is_finished() {
        worst = worst.max(timed_write(&mut fast, 0, &block));
        done += 1;
    }
    dribble.join().unwrap();
    let (c, _) = slow.finish(77, &[]);
    assert!(c.status().is_success(), "the dribbled write completes");
    assert_eq!(slow.read(1, 100, 1, 512).1, data);
    println!("slow sender: the other host did {done} writes meanwhile, worst {worst:?}");
    assert!(done > 10, "the other host kept doing I/O ({done} writes)");
}

fn nbd_server(limits: NbdLimits) -> (ReactorPool, NbdServer) {
    let pool = ReactorPool::start(ReactorConfig::unpinned(1).with_idle(
        IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(50),
            sleep: Duration::from_millis(1),
        },
    ))
    .unwrap();
    let dev: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(4 << 20, 512, LatencyModel::None).unwrap());
    let cfg = NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        exports: vec![("vol0".into(), dev)],
    };
    let server = NbdServer::start_with_limits(cfg, limits, &pool.handle()).unwrap();
    (pool, server)
}

/// Reads the 18-byte NBD greeting.
fn greeting(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s
}

#[test]
fn nbd_limits_close_excess_and_stalled_handshakes() {
    let (pool, server) = nbd_server(NbdLimits {
        max_connections: 2,
        handshake_timeout: Duration::from_millis(300),
        ..NbdLimits::default()
    });
    let addr = server.local_addr();
    let mut a = greeting(addr);
    let mut b = greeting(addr);
    let mut c = TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(3)),
        "the third connection is closed without a greeting"
    );
    assert!(
        closed_within(&mut a, Duration::from_secs(5)),
        "stalled handshake"
    );
    assert!(
        closed_within(&mut b, Duration::from_secs(5)),
        "stalled handshake"
    );
    wait_for("NBD connections gone", Duration::from_secs(5), || {
        server.connections() == 0
    });
    drop(greeting(addr));
    assert!(server.shutdown());
    pool.shutdown();
}
