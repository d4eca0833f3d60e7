//! Promoting the far site of an asynchronous leg with a staging area, through two
//! `nvmirror serve` processes (docs/promotion.md, "Asynchronous legs"). Site B exports its
//! copy raw (`siteb`, namespace 1) and the staging area (`stg0`, namespace 2), pairs them in
//! `[[cycle_apply]]`, and declares `vol0` standby over `volume://siteb`. Site A mirrors
//! `vol0` onto them asynchronously.
//!
//! - A holds its key's reservation on the staging namespace as on the image's.
//! - `volume_promote` at B preempts A on both, stops B's applier, rolls a committed cycle
//!   forward, and serves: B's image is a prefix of A's acknowledged writes.
//! - A, still running, meets Reservation Conflict at its next shipment and fences itself:
//!   its leg says `fenced`, and its host gets Reservation Conflict.

use std::path::Path;
use std::time::{Duration, Instant};

use nvmirror_mirror::fencing::{fence_key, is_conflict};
use nvmirror_mirror::superblock::Superblock;
use nvmirror_nvme::backend::{NvmeTcpDevice, NvmeTcpOptions};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Reservations};
use rand::SeedableRng;

mod serve_rig;
use serve_rig::{
    assert_prefix, free_port, read, stamped_writes, try_write, two_sites, Server, NQN,
};

/// B's raw exports: its copy of A's leg (nsid 1) and the staging area (nsid 2).
const NQN_B: &str = "nqn.2026-11.io.nvmirror:siteb";
/// Blocks of the volume the stamped writes touch.
const AREA: u64 = 512;

/// Site B: `siteb` and `stg0` exported raw, paired (`apply`: B applies the cycles), and
/// `vol0` standby over `siteb` (its other leg, A's, is nowhere yet).
fn site_b(dir: &Path, apply: bool, port: u16) -> Server {
    let nowhere = free_port();
    let toml = format!(
        "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [[volume]]\nname = \"siteb\"\nbitmap = false\nlegs = [\"file://{d}/b.img?create=64MiB\"]\n\n\
         [[volume]]\nname = \"stg0\"\nbitmap = false\nlegs = [\"file://{d}/s.img?create=32MiB\"]\n\n\
         [[volume]]\nname = \"vol0\"\nstandby = true\nio_timeout = \"2s\"\n\
         legs = [\"nvme-tcp://127.0.0.1:{nowhere}/{NQN}-a?kato=2s&reconnect_delay=100ms\", \"volume://siteb\"]\n\n\
         [[subsystem]]\nnqn = \"{NQN_B}\"\nnamespaces = [\"siteb\", \"stg0\"]\n\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n\n\
         [[cycle_apply]]\nimage = \"siteb\"\nstaging = \"stg0\"\napply = {apply}\n",
        d = dir.display()
    );
    Server::with_config_at(dir, &toml, &format!("127.0.0.1:{port}"))
}

/// Site A: `vol0` over a local file and B's raw copy, the latter asynchronous (`leg`: the
/// async leg's settings) with B's staging namespace.
fn site_a(dir: &Path, b_port: u16, leg: &str) -> Server {
    let toml = format!(
        "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [[volume]]\nname = \"vol0\"\nio_timeout = \"2s\"\n\
         legs = [\"file://{d}/a.img?create=64MiB\", \"nvme-tcp://127.0.0.1:{b_port}/{NQN_B}?kato=2s&reconnect_delay=100ms\"]\n\n\
         [[volume.async_legs]]\nleg = 1\n{leg}\
         journal = \"file://{d}/vol0.journal?create=32MiB\"\n\
         staging = \"nvme-tcp://127.0.0.1:{b_port}/{NQN_B}?nsid=2&kato=2s&reconnect_delay=100ms\"\n\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
        d = dir.display()
    );
    Server::with_config(dir, &toml)
}

/// The key holding the reservation of namespace `nsid` of B's raw subsystem.
fn holder(b: &Server, nsid: u32) -> Option<u64> {
    let mut opts = NvmeTcpOptions::new(NQN_B);
    opts.nsid = nsid;
    opts.hostnqn =
        Some("nqn.2014-08.org.nvmexpress:uuid:99999999-2222-4333-8444-555555555555".into());
    let dev = NvmeTcpDevice::connect(&b.nvme_tcp, &opts).unwrap();
    let report = dev.report().unwrap().unwrap();
    report.registrants.iter().find(|r| r.holds).map(|r| r.rkey)
}

/// The first `AREA` blocks of `vol0` as B's promoted export serves them.
fn b_volume(b: &Server) -> Vec<u8> {
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", b.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    let mut pool = DmaPool::new(1, 128 * 512);
    (0..AREA / 128)
        .flat_map(|i| read(&mut *qp, &mut pool, i * 128, 128))
        .collect()
}

#[test]
fn promoting_the_far_site_of_a_staged_journal_leg_fences_the_old_primary_on_both_namespaces() {
    let (_dir, da, db) = two_sites();
    let b = site_b(&db, true, 0);
    let a = site_a(
        &da,
        b.port(),
        "mode = \"async-journal\"\nfar_apply = true\n",
    );
    let st = a.status();
    assert_eq!(st["legs"][1]["fencing"]["state"], "held", "{st}");
    let head = std::fs::read(da.join("a.img")).unwrap();
    let uuid = Superblock::decode(&head[..256]).unwrap().volume_uuid;
    // A holds the staging namespace as it holds the image's: with its volume's key.
    assert_eq!(holder(&b, 1), Some(fence_key(uuid, 0)));
    assert_eq!(holder(&b, 2), Some(fence_key(uuid, 0)));

    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(41);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 300, AREA, &mut writes);
    a.wait_for(Duration::from_secs(30), "journal drained", |st| {
        st["legs"][1]["replication"]["lag_writes"] == 0
    });

    // B is promoted while A runs (a partition, or an operator's failover).
    let got = b.rpc_ok("volume_promote", r#"{"name":"vol0"}"#);
    assert_eq!(got["status"]["epoch"], 1, "{got}");
    assert_eq!(holder(&b, 1), Some(fence_key(uuid, 1)));
    assert_eq!(
        holder(&b, 2),
        Some(fence_key(uuid, 1)),
        "the staging area was not taken over"
    );
    // B's copy holds every write A's journal had shipped.
    assert_eq!(assert_prefix(&b_volume(&b), &writes), 300);

    // A's next shipment meets the conflict: its leg stops, its writes fail, it fences itself.
    // (Writes acknowledged in between are the asynchronous mode's loss, as for any write
    // acknowledged after the far site last took one.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut acked_after = 0;
    let s = loop {
        let s = try_write(&mut *qp, &mut pool, AREA + acked_after * 8, 8, 0x5a);
        if !s.is_success() {
            break s;
        }
        acked_after += 1;
        assert!(Instant::now() < deadline, "A never fenced: {}", a.status());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(is_conflict(s), "A's write failed with {s}: {}", a.status());
    let st = a.status();
    let why = st["fenced"].as_str().unwrap_or_else(|| panic!("{st}"));
    assert!(why.contains("Reservation Conflict"), "{why}");
    let r = &st["legs"][1]["replication"];
    assert_eq!(r["state"], "fenced", "{st}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("Reservation Conflict")),
        "{st}"
    );
    let s = try_write(&mut *qp, &mut pool, 0, 8, 0x33);
    assert!(is_conflict(s), "a write after the fence: {s}");
    // Nothing of A's after the promotion reached B; B serves and takes writes.
    assert_eq!(assert_prefix(&b_volume(&b), &writes), 300);
    let bdev = open_leg(&format!("nvme-tcp://{}/{NQN}", b.nvme_tcp)).unwrap();
    let mut bqp = bdev.open_qpair(2).unwrap();
    assert!(try_write(&mut *bqp, &mut pool, 0, 8, 0x77).is_success());
    eprintln!("A acknowledged {acked_after} writes after the promotion, then fenced");
    drop(qp);
    a.stop();
    b.stop();
}

#[test]
fn a_promotion_rolls_a_cycle_committed_to_the_staging_area_onto_the_image_first() {
    let (_dir, da, db) = two_sites();
    let port = free_port();
    // B applies A's first cycle (the volume's superblock and bitmap), then restarts without
    // its applier: the next cycle stays committed in the staging area, not applied.
    let b = site_b(&db, true, port);
    let a = site_a(
        &da,
        port,
        "mode = \"async-cycle\"\ncycle = \"3600s\"\nfar_apply = true\n",
    );
    a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    b.stop();
    let b = site_b(&db, false, port);
    // A's leg reconnects (and may be resynced: a catch-up refuses cycle_now until it ends).
    a.wait_for(Duration::from_secs(30), "the leg back", |st| {
        st["legs"][1]["link"]["reconnects"].as_u64() >= Some(1)
            && st["legs"][1]["state"] == "in_sync"
            && st["resync"]["state"] != "running"
            && st["legs"][1]["replication"]["state"] == "replicating"
    });
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(51);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 400, AREA, &mut writes);
    drop(qp);
    // It never returns: A is killed while it waits.
    let asked = a.rpc_in_background(
        "cycle_now",
        serde_json::json!({"volume": "vol0", "timeout_s": 30}),
    );
    let st = a.wait_for(
        Duration::from_secs(30),
        "a cycle waiting to be applied",
        |st| {
            st["legs"][1]["replication"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("has not applied cycle"))
        },
    );
    // Site A is lost with its cycle committed at B; nothing of it is on B's image yet.
    a.kill9();
    let _ = asked.join();
    let got = b.rpc_ok("volume_promote", r#"{"name":"vol0"}"#);
    let staged = &got["staging"][0];
    assert_eq!(staged["staging"], "stg0", "{got}");
    assert_eq!(staged["rolled_forward"], true, "{got} (A: {st})");
    assert_eq!(
        assert_prefix(&b_volume(&b), &writes),
        400,
        "the committed cycle is on the promoted image"
    );
    b.stop();
}
