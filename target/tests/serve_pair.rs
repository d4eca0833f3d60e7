//! The active/standby pair through etcd (`[cluster]`, docs/pair.md), with a real etcd
//! (Debian's `etcd-server`, started here): node A serves `vol0` mirrored onto B's raw leg and
//! holds the volume's key; B is a standby. Killing A lets B's lease watch see the key expire,
//! take it, promote (fencing A's reservation with the next epoch) and serve, with every write A
//! acknowledged intact. Cutting A off from etcd only (the host still reaches it) makes A stop
//! acknowledging before B can take the key: never two writers. `cluster_resign` on A hands
//! the volume to B at once.
//!
//! Built only with the `cluster` feature; skipped (with a message) when `etcd` is missing,
//! unless `NVMIRROR_REQUIRE_TOOLS=1`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, QueuePair};

mod serve_rig;
use serve_rig::{free_port, read, try_write, Server, NQN};

const NQN_B: &str = "nqn.2026-11.io.nvmirror:siteb";
const NQN_A_MIRROR: &str = "nqn.2026-11.io.nvmirror:sitea";
const NLB: u32 = 8;

/// etcd on free loopback ports, in its own data directory; killed when dropped.
struct Etcd {
    child: Child,
    port: u16,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd(dir: &Path) -> Option<Etcd> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(bin) = bin else {
        assert!(
            std::env::var("NVMIRROR_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "etcd is required (NVMIRROR_REQUIRE_TOOLS=1) but missing"
        );
        eprintln!("skipping: etcd not found (Debian etcd-server)");
        return None;
    };
    let (port, peer) = (free_port(), free_port());
    let c = format!("http://127.0.0.1:{port}");
    let p = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("t={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let e = Etcd { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(e)
}

/// A TCP proxy to etcd for one node: cutting it drops its connections and refuses new ones
/// (a partition between that node and etcd only).
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

fn proxy(to: u16) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cut);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            if c.load(Ordering::Acquire) {
                drop(s);
                continue;
            }
            let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            for (mut from, mut to) in [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)] {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
                    let mut buf = [0u8; 16384];
                    loop {
                        if c.load(Ordering::Acquire) {
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        }
    });
    Proxy { port, cut }
}

fn cluster(node: &str, etcd_port: u16) -> String {
    format!(
        "[cluster]\nendpoints = [\"http://127.0.0.1:{etcd_port}\"]\nnode = \"{node}\"\nvolume = \"vol0\"\nttl = \"2s\"\nmargin = \"1s\"\n\n"
    )
}

fn serve_at(dir: &Path, toml: &str, port: u16) -> Server {
    let cfg = dir.join("nvmirror.toml");
    std::fs::write(&cfg, toml).unwrap();
    let args = [
        "--config".into(),
        cfg.display().to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    Server::spawn_at(&args, &[], &format!("127.0.0.1:{port}")).unwrap_or_else(|e| panic!("{e}"))
}

/// Site B: its leg exported raw (`siteb`, what A mirrors onto) and `vol0` standby over it.
fn site_b(dir: &Path, port: u16, a_port: u16, etcd_port: u16) -> Server {
    serve_at(
        dir,
        &format!(
            "{}[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"siteb\"\nbitmap = false\nlegs = [\"file://{d}/b.img?create=64MiB\"]\n\n\
             [[volume]]\nname = \"vol0\"\nstandby = true\nio_timeout = \"2s\"\n\
             legs = [\"nvme-tcp://127.0.0.1:{a_port}/{NQN_A_MIRROR}?kato=2s&reconnect_delay=100ms\", \"volume://siteb\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_B}\"\nnamespaces = [\"siteb\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            cluster("b", etcd_port),
            d = dir.display()
        ),
        port,
    )
}

/// Site A: `vol0` over a local leg and B's raw export.
fn site_a(dir: &Path, port: u16, bytes: u64, b_port: u16, etcd_port: u16) -> Server {
    serve_at(
        dir,
        &format!(
            "{}[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nio_timeout = \"2s\"\n\
             legs = [\"file://{d}/a.img?create={bytes}\", \"nvme-tcp://127.0.0.1:{b_port}/{NQN_B}?kato=2s&reconnect_delay=100ms\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            cluster("a", etcd_port),
            d = dir.display()
        ),
        port,
    )
}

/// The ANA state of `vol0`'s group through the node's listener (`listener_list`: it answers
/// for a standby volume too).
fn ana(srv: &Server) -> String {
    let l = srv.rpc_ok("listener_list", "{}");
    l["ana"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .and_then(|s| s["state"].as_str())
        .unwrap_or("none")
        .to_string()
}

fn wait(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Pair {
    _dir: tempfile::TempDir,
    _etcd: Etcd,
    a: Option<Server>,
    b: Server,
    a_proxy: Proxy,
    b_port: u16,
}

/// A active (holding the key, ANA optimized), B standby and in sync as A's mirror.
fn pair() -> Option<Pair> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let e = etcd(dir.path())?;
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let (a_proxy, b_proxy) = (proxy(e.port), proxy(e.port));
    // B starts first, with the key free: it holds no copy yet, so it must not campaign.
    let b = site_b(&db, b_port, a_port, b_proxy.port);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        ana(&b),
        "inaccessible",
        "a standby without a copy took the key"
    );
    let bytes = b.rpc_ok("volume_status", r#"{"name":"siteb"}"#)["capacity_bytes"]
        .as_u64()
        .unwrap();
    let a = site_a(&da, a_port, bytes, b_port, a_proxy.port);
    wait(Duration::from_secs(20), "A active", || {
        ana(&a) == "optimized"
    });
    a.wait_in_sync();
    std::mem::forget(b_proxy);
    Some(Pair {
        _dir: dir,
        _etcd: e,
        a: Some(a),
        b,
        a_proxy,
        b_port,
    })
}

/// A host's device and queue pair on `vol0` of a node.
type Host = (Arc<dyn nvmirror_nvme::BlockDevice>, Box<dyn QueuePair>);

fn host(srv_addr: &str) -> Host {
    try_host(srv_addr).unwrap_or_else(|e| panic!("connect to {srv_addr}: {e}"))
}

/// A host connection, or why not (a standby's export opens no I/O queue).
fn try_host(srv_addr: &str) -> Result<Host, String> {
    let dev = open_leg(&format!("nvme-tcp://{srv_addr}/{NQN}")).map_err(|e| e.to_string())?;
    let qp = dev.open_qpair(4).map_err(|e| e.to_string())?;
    Ok((dev, qp))
}

#[test]
fn a_killed_active_node_fails_over_to_the_standby_with_every_acked_write() {
    let Some(mut p) = pair() else { return };
    let a = p.a.take().unwrap();
    let (_d, mut qp) = host(&a.nvme_tcp);
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    let mut acked = Vec::new();
    for i in 0..64u64 {
        assert!(try_write(&mut *qp, &mut pool, i * 64, NLB, i as u8 + 1).is_success());
        acked.push(i);
    }
    drop(qp);
    assert_eq!(
        ana(&p.b),
        "inaccessible",
        "B is a standby while A holds the key"
    );
    let killed = Instant::now();
    a.kill9();
    // B sees the key expire (TTL 2 s), takes it, promotes, serves.
    wait(Duration::from_secs(30), "B promoted and optimized", || {
        ana(&p.b) == "optimized"
    });
    let (_d, mut qp) = host(&p.b.nvme_tcp);
    let pause = loop {
        if try_write(&mut *qp, &mut pool, 8000, NLB, 0xee).is_success() {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("failover pause (kill to the first write at B): {pause:?}");
    for i in acked {
        let got = read(&mut *qp, &mut pool, i * 64, NLB);
        assert!(got.iter().all(|&x| x == i as u8 + 1), "write {i} lost at B");
    }
    let st = p.b.status();
    assert_eq!(st["epoch"], 1, "the promotion bumped the epoch: {st}");
    let _ = p.b_port;
}

#[test]
fn an_active_node_cut_off_from_etcd_stops_before_the_standby_takes_over() {
    let Some(mut p) = pair() else { return };
    let a = p.a.take().unwrap();
    let (_d, mut qp) = host(&a.nvme_tcp);
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    let mut acked = Vec::new();
    for i in 0..16u64 {
        assert!(try_write(&mut *qp, &mut pool, i * 64, NLB, 0x40 + i as u8).is_success());
        acked.push(i);
    }
    // The partition: A can no longer reach etcd; the host still reaches A. A second host
    // probes B at the same time.
    let cut = Instant::now();
    p.a_proxy.cut.store(true, Ordering::Release);
    let b_addr = p.b.nvme_tcp.clone();
    let prober = std::thread::spawn(move || {
        let mut pool = DmaPool::new(1, NLB as usize * 512);
        let mut b_host = None;
        loop {
            if b_host.is_none() {
                b_host = try_host(&b_addr).ok();
            }
            if let Some((_, bqp)) = b_host.as_mut() {
                if try_write(&mut **bqp, &mut pool, 9000, NLB, 0xbb).is_success() {
                    return Instant::now();
                }
            }
            assert!(cut.elapsed() < Duration::from_secs(30), "B never took over");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut i = 16u64;
    let a_stopped = loop {
        let s = try_write(&mut *qp, &mut pool, i * 64, NLB, 0x40 + i as u8);
        if !s.is_success() {
            break Instant::now();
        }
        acked.push(i);
        i += 1;
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "A kept acknowledging writes"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let b_started = prober.join().unwrap();
    eprintln!(
        "partition: A stopped {:?} after the cut, B served {:?} after it",
        a_stopped - cut,
        b_started - cut
    );
    // A stopped by itself (its lease may have run out), well before B could take the key
    // and preempt it: not merely because B's reservation refused its writes.
    let st = a.status();
    let why = st["fenced"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("lease"),
        "A was not stopped by its lease: {st}"
    );
    assert_eq!(ana(&a), "inaccessible");
    assert!(
        a_stopped + Duration::from_millis(500) < b_started,
        "A stopped {:?} after the cut, B served {:?} after it",
        a_stopped - cut,
        b_started - cut
    );
    // A's later writes are refused; every write A acknowledged is at B.
    assert!(!try_write(&mut *qp, &mut pool, 0, NLB, 0x99).is_success());
    let (_d, mut bqp) = host(&p.b.nvme_tcp);
    for &i in &acked {
        let got = read(&mut *bqp, &mut pool, i * 64, NLB);
        assert!(
            got.iter().all(|&x| x == 0x40 + i as u8),
            "write {i} lost at B"
        );
    }
    drop(a);
}

#[test]
fn a_planned_handover_moves_the_volume_to_the_standby_without_waiting_for_the_lease() {
    let Some(mut p) = pair() else { return };
    let a = p.a.take().unwrap();
    let (_d, mut qp) = host(&a.nvme_tcp);
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    for i in 0..16u64 {
        assert!(try_write(&mut *qp, &mut pool, i * 64, NLB, 0x60 + i as u8).is_success());
    }
    let asked = Instant::now();
    let r = a.rpc_ok("cluster_resign", "{}");
    assert_eq!(r["resigning"], true, "{r}");
    wait(
        Duration::from_secs(20),
        "B optimized after the handover",
        || ana(&p.b) == "optimized",
    );
    let took = asked.elapsed();
    eprintln!("handover (cluster_resign to B optimized): {took:?}");
    // A revoked its lease: B did not wait for the 2 s TTL to run out.
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(ana(&a), "inaccessible");
    assert!(!try_write(&mut *qp, &mut pool, 0, NLB, 0x99).is_success());
    let (_d, mut bqp) = host(&p.b.nvme_tcp);
    for i in 0..16u64 {
        let got = read(&mut *bqp, &mut pool, i * 64, NLB);
        assert!(
            got.iter().all(|&x| x == 0x60 + i as u8),
            "write {i} lost at B"
        );
    }
    assert!(try_write(&mut *bqp, &mut pool, 4000, NLB, 0x77).is_success());
}

/// Site A restarted in the pair's standby shape (as B is configured): its leg exported raw
/// where B's leg 0 points, `vol0` standby over it and B's raw export.
fn site_a_standby(dir: &Path, port: u16, b_port: u16, etcd_port: u16) -> Server {
    serve_at(
        dir,
        &format!(
            "{}[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"sitea\"\nbitmap = false\nlegs = [\"file://{d}/a.img\"]\n\n\
             [[volume]]\nname = \"vol0\"\nstandby = true\nio_timeout = \"2s\"\n\
             legs = [\"volume://sitea\", \"nvme-tcp://127.0.0.1:{b_port}/{NQN_B}?kato=2s&reconnect_delay=100ms\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_A_MIRROR}\"\nnamespaces = [\"sitea\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            cluster("a", etcd_port),
            d = dir.display()
        ),
        port,
    )
}

#[test]
fn after_a_failover_the_old_active_rejoins_as_mirror_and_takes_the_volume_back() {
    let Some(mut p) = pair() else { return };
    let a = p.a.take().unwrap();
    let a_port = a.port();
    let data_offset = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    let (_d, mut qp) = host(&a.nvme_tcp);
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    // What each written block should hold at the end: A's writes, then B's (some over A's).
    let mut expect = std::collections::BTreeMap::new();
    for i in 0..32u64 {
        assert!(try_write(&mut *qp, &mut pool, i * 64, NLB, 0x10 + i as u8).is_success());
        expect.insert(i * 64, 0x10 + i as u8);
    }
    drop(qp);
    a.kill9();
    wait(Duration::from_secs(30), "B promoted and optimized", || {
        ana(&p.b) == "optimized"
    });
    let (_d, mut bqp) = host(&p.b.nvme_tcp);
    for i in 0..32u64 {
        let slba = if i % 4 == 0 { i * 64 } else { 4096 + i * 64 };
        assert!(try_write(&mut *bqp, &mut pool, slba, NLB, 0x80 + i as u8).is_success());
        expect.insert(slba, 0x80 + i as u8);
    }
    // B's only other copy is A's leg, faulted since the kill: B must not hand the volume
    // back while that copy lacks what B acknowledged.
    let (ok, text) = p.b.rpc("cluster_resign", "{}");
    assert!(!ok && text.contains("not in sync"), "{text}");
    assert_eq!(ana(&p.b), "optimized", "a refused resign changed nothing");

    // A comes back in the standby shape: B's leg 0 reconnects to A's raw export and is
    // resynced (B's record of the regions it wrote, and A's own bitmap).
    let a = site_a_standby(&p._dir.path().join("a"), a_port, p.b_port, p.a_proxy.port);
    let st = p.b.wait_in_sync();
    assert!(
        st["resync"]["regions_copied"].as_u64().unwrap() >= 1,
        "B resynced A's leg: {st}"
    );
    assert_eq!(
        ana(&a),
        "inaccessible",
        "A is a standby while B holds the key"
    );

    // Failback: B hands the volume back; A takes the key, promotes (epoch 2) and serves.
    let asked = Instant::now();
    let r = p.b.rpc_ok("cluster_resign", "{}");
    assert_eq!(r["resigning"], true, "{r}");
    wait(
        Duration::from_secs(20),
        "A optimized after the failback",
        || ana(&a) == "optimized",
    );
    eprintln!(
        "failback (cluster_resign at B to A optimized): {:?}",
        asked.elapsed()
    );
    assert!(!try_write(&mut *bqp, &mut pool, 0, NLB, 0x99).is_success());
    let (_d, mut qp) = host(&a.nvme_tcp);
    for (&slba, &fill) in &expect {
        let got = read(&mut *qp, &mut pool, slba, NLB);
        assert!(
            got.iter().all(|&x| x == fill),
            "LBA {slba} at A after failback"
        );
    }
    for i in 0..8u64 {
        let slba = 8192 + i * 64;
        assert!(try_write(&mut *qp, &mut pool, slba, NLB, 0xd0 + i as u8).is_success());
    }
    let st = a.wait_in_sync();
    assert_eq!(st["epoch"], 2, "each promotion is a new epoch: {st}");
    // Both sites' copies are byte-identical.
    let image = |p: &Path| std::fs::read(p).unwrap()[data_offset as usize..].to_vec();
    let (ia, ib) = (
        image(&p._dir.path().join("a/a.img")),
        image(&p._dir.path().join("b/b.img")),
    );
    let diff = ia.iter().zip(&ib).position(|(x, y)| x != y);
    assert_eq!(
        diff, None,
        "the sites differ at byte {diff:?} of the data area"
    );
}
