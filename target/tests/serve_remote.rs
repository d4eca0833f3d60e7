//! A remote (`nvme-tcp://`) leg's life cycle through two `nvmirror serve` processes, as a user
//! runs them: site B exports a file leg over NVMe/TCP; site A mirrors a local file leg onto
//! B's namespace; a verifying host writes through A. B is killed and restarted, then frozen
//! (SIGSTOP) and thawed: each time A's remote leg faults within the I/O timeout while the host
//! keeps writing, A reconnects by itself, waits out the fence, and resyncs only the regions
//! the leg missed; at the end both legs hold byte-identical data and no acknowledged write is
//! lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, BlockDevice, QueuePair};

mod serve_rig;
use serve_rig::{blocks, read, site_b, write, Server, NQN};

/// Blocks per 1 MiB region.
const REGION_BLOCKS: u64 = 2048;
/// Blocks written per host write.
const NLB: u32 = 16;

/// The images live in RAM where the machine has a tmpfs that takes O_DIRECT (Linux 6.6+),
/// so a disk shared with other work does not decide the test's timing.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let d = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
    };
    d.unwrap()
}

/// Site A: a local file leg of `bytes` and B's namespace as the mirror leg.
fn site_a(dir: &Path, bytes: u64, b_port: u16) -> Server {
    let legs = [
        format!("file://{}/a.img?create={bytes}", dir.display()),
        format!("nvme-tcp://127.0.0.1:{b_port}/{NQN}?kato=1s&reconnect_delay=100ms"),
    ];
    Server::with_legs(dir, &legs, &[])
}

struct Host {
    _dev: std::sync::Arc<dyn BlockDevice>,
    qp: Box<dyn QueuePair>,
    pool: DmaPool,
    /// What every written block range must read back as.
    written: BTreeMap<u64, u8>,
}

impl Host {
    fn connect(a: &Server) -> Self {
        let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
        let qp = dev.open_qpair(4).unwrap();
        Self {
            _dev: dev,
            qp,
            pool: DmaPool::new(1, NLB as usize * 512),
            written: BTreeMap::new(),
        }
    }

    /// Writes `fill` at the start of `region`; returns how long the ack took.
    fn write_region(&mut self, region: u64, fill: u8) -> Duration {
        let slba = region * REGION_BLOCKS;
        let t = Instant::now();
        write(&mut *self.qp, &mut self.pool, slba, NLB, fill);
        self.written.insert(slba, fill);
        t.elapsed()
    }

    fn verify(&mut self) {
        let written: Vec<(u64, u8)> = self.written.iter().map(|(&s, &f)| (s, f)).collect();
        for (slba, fill) in written {
            let data = read(&mut *self.qp, &mut self.pool, slba, NLB);
            assert!(
                data.iter().all(|&b| b == fill),
                "acknowledged write at block {slba} (fill {fill}) lost"
            );
        }
    }
}

fn leg1(st: &Value) -> &Value {
    &st["legs"][1]
}

/// Waits until leg 1 is back in sync after a loss; returns the resync's copied bytes.
fn wait_resynced(a: &Server, missed: u64) -> u64 {
    let st = a.wait_for(Duration::from_secs(60), "leg 1 resynced", |st| {
        leg1(st)["state"] == "in_sync" && st["resync"]["state"] != "running"
    });
    let link = &leg1(&st)["link"];
    assert_eq!(link["connected"], true, "{st}");
    assert!(link["reconnect_attempts"].as_u64().unwrap() >= 1, "{st}");
    assert!(link["rtt_us"].as_f64().is_some(), "{st}");
    let copied = st["resync"]["bytes_copied"].as_u64().unwrap();
    let region = st["region_size"].as_u64().unwrap();
    assert!(
        copied >= missed * region && copied <= (missed + 1) * region,
        "copied {copied} bytes for {missed} missed regions of {region}: {st}"
    );
    assert!(
        copied * 8 < st["capacity_bytes"].as_u64().unwrap(),
        "far less than the device: {st}"
    );
    copied
}

/// Waits until leg 1 has stayed in sync on one connection for 3 s. A site resumed after a
/// SIGSTOP tears down its stale association when its own timers catch up, and on a loaded
/// machine a keep-alive of the new one can miss its 1 s KATO: the link may flap once more
/// (fault, reconnect, resync) after the resync the test waited for. A clean stop in that
/// window cannot flush the leg and is, rightly, not clean.
fn settle(a: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = a.wait_for(Duration::from_secs(60), "leg 1 in sync", |st| {
            leg1(st)["state"] == "in_sync" && leg1(st)["link"]["connected"] == true
        });
        let reconnects = leg1(&st)["link"]["reconnects"].clone();
        std::thread::sleep(Duration::from_secs(3));
        let now = a.status();
        if leg1(&now)["state"] == "in_sync" && leg1(&now)["link"]["reconnects"] == reconnects {
            return;
        }
        assert!(Instant::now() < deadline, "leg 1 never settled: {now}");
    }
}

#[test]
fn a_remote_leg_reconnects_and_resyncs_only_what_it_missed_after_its_site_restarts_or_hangs() {
    let dir = scratch();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();

    let b = site_b(&db, "127.0.0.1:0");
    let b_listen = b.nvme_tcp.clone();
    let b_st = b.status();
    let b_bytes = b_st["capacity_bytes"].as_u64().unwrap();
    let b_data = b_st["bitmap"]["data_offset"].as_u64().unwrap();
    let a = site_a(&da, b_bytes, b.port());
    let mut host = Host::connect(&a);
    let st = a.status();
    assert_eq!(leg1(&st)["state"], "in_sync", "{st}");
    assert_eq!(leg1(&st)["link"]["connected"], true, "{st}");
    let io_timeout = Duration::from_secs(5);
    for r in 0..8 {
        host.write_region(r, 1);
    }

    // 1. B is killed: the leg faults at once, the host goes on writing.
    eprintln!("killing site B");
    b.kill9();
    for r in 10..15 {
        let took = host.write_region(r, 2);
        assert!(
            took < io_timeout,
            "a write waited {took:?} for the lost leg"
        );
    }
    let st = a.wait_for(Duration::from_secs(5), "leg 1 faulted", |st| {
        leg1(st)["state"] == "faulted"
    });
    assert_eq!(leg1(&st)["link"]["connected"], false, "{st}");
    assert!(leg1(&st)["link"]["last_error"].is_string(), "{st}");
    let missed = leg1(&st)["missed_regions"].as_u64().unwrap();
    assert!((5..=6).contains(&missed), "missed {missed}: {st}");

    // B comes back on its address: A reconnects, waits out the fence, resyncs the 5 regions.
    eprintln!("restarting site B");
    let b = site_b(&db, &b_listen);
    wait_resynced(&a, missed);
    host.verify();

    // 2. B hangs (SIGSTOP): keep-alive (KATO 1 s) or the I/O timeout faults the leg; the host
    // never waits longer than the I/O timeout.
    eprintln!("stopping site B");
    b.signal(libc::SIGSTOP);
    for r in 20..23 {
        let took = host.write_region(r, 3);
        assert!(
            took < io_timeout + Duration::from_millis(500),
            "a write waited {took:?}"
        );
    }
    let st = a.wait_for(Duration::from_secs(10), "leg 1 faulted on a hang", |st| {
        leg1(st)["state"] == "faulted"
    });
    assert_eq!(leg1(&st)["link"]["connected"], false, "{st}");
    b.signal(libc::SIGCONT);
    let missed = a.status()["legs"][1]["missed_regions"].as_u64().unwrap();
    assert!((3..=4).contains(&missed), "missed {missed}");
    wait_resynced(&a, missed);
    host.verify();

    // The legs are identical: A's local image and A's data area inside B's namespace.
    let a_data = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    drop(host);
    settle(&a);
    a.stop();
    b.stop();
    let nlb = 32 * REGION_BLOCKS;
    let local = blocks(&da.join("a.img"), a_data, 0, nlb);
    let remote = blocks(&db.join("b.img"), b_data + a_data, 0, nlb);
    assert!(local == remote, "the legs differ after the resyncs");
    assert!(local[..512].iter().all(|&x| x == 1));
}

#[test]
fn a_site_restarted_while_its_remote_is_down_resyncs_only_the_missed_regions_when_it_returns() {
    let dir = scratch();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let b = site_b(&db, "127.0.0.1:0");
    let (b_listen, b_port) = (b.nvme_tcp.clone(), b.port());
    let b_st = b.status();
    let b_bytes = b_st["capacity_bytes"].as_u64().unwrap();
    let b_data = b_st["bitmap"]["data_offset"].as_u64().unwrap();
    let a = site_a(&da, b_bytes, b_port);
    let mut host = Host::connect(&a);
    for r in 0..4 {
        host.write_region(r, 1);
    }
    // Those regions are on both legs: once the bitmap has cleared them, only what B misses
    // from now on stays marked.
    a.wait_for(Duration::from_secs(30), "bitmap cleared", |st| {
        st["bitmap"]["dirty_regions"] == 0
    });
    b.kill9();
    for r in 10..13 {
        host.write_region(r, 2);
    }
    a.wait_for(Duration::from_secs(5), "leg 1 faulted", |st| {
        leg1(st)["state"] == "faulted"
    });
    let written = std::mem::take(&mut host.written);
    drop(host);

    // A restarts while B is still down: it comes up with the remote leg faulted and keeps
    // serving from its local leg.
    a.stop();
    let a = site_a(&da, b_bytes, b_port);
    let st = a.status();
    assert_eq!(leg1(&st)["state"], "faulted", "{st}");
    assert_eq!(leg1(&st)["link"]["connected"], false, "{st}");
    let mut host = Host::connect(&a);
    host.written = written;
    for r in 20..22 {
        host.write_region(r, 3);
    }
    host.verify();
    let missed = leg1(&a.status())["missed_regions"].as_u64().unwrap();
    assert!((5..=6).contains(&missed), "missed {missed}");

    // B returns: only the regions written while it was away are copied.
    let b = site_b(&db, &b_listen);
    wait_resynced(&a, missed);
    host.verify();
    let a_data = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    drop(host);
    a.stop();
    b.stop();
    let nlb = 32 * REGION_BLOCKS;
    let local = blocks(&da.join("a.img"), a_data, 0, nlb);
    let remote = blocks(&db.join("b.img"), b_data + a_data, 0, nlb);
    assert!(local == remote, "the legs differ after the resync");
}
