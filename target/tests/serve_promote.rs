//! Fencing of a remote leg with NVMe reservations through two `nvmirror serve` processes
//! (docs/promotion.md): site B exports a file leg; site A mirrors a local leg onto it and
//! holds a Write Exclusive reservation there with its (volume UUID, epoch) key. A newer
//! primary — this test, with the key of the next epoch — takes the reservation over with
//! Preempt and Abort: A's next write meets Reservation Conflict, A fences itself (no write is
//! acknowledged again, nothing reaches B, the leg is not faulted), and a restarted A comes
//! up fenced.

use std::path::Path;
use std::time::Duration;

use nvmirror_mirror::fencing::{fence_key, fence_leg, LegFence};
use nvmirror_mirror::superblock::Superblock;
use nvmirror_nvme::backend::{NvmeTcpDevice, NvmeTcpOptions};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::spec::reservation::ReservationType;
use nvmirror_nvme::{open_leg, Reservations, Status};

mod serve_rig;
use serve_rig::{blocks, free_port, site_b, try_write, write, Server, NQN};

const NLB: u32 = 16;
/// The host ID of the "new primary" this test plays.
const PROMOTED_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555";

fn site_a(dir: &Path, bytes: u64, b_port: u16) -> Server {
    let legs = [
        format!("file://{}/a.img?create={bytes}", dir.display()),
        format!("nvme-tcp://127.0.0.1:{b_port}/{NQN}?kato=2s&reconnect_delay=100ms"),
    ];
    Server::with_legs(dir, &legs, &[])
}

fn is_conflict(s: Status) -> bool {
    nvmirror_mirror::fencing::is_conflict(s)
}

#[test]
fn a_preempted_node_fences_itself_and_stays_fenced_after_a_restart() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let b = site_b(&db, "127.0.0.1:0");
    let b_st = b.status();
    let b_bytes = b_st["capacity_bytes"].as_u64().unwrap();
    let b_data = b_st["bitmap"]["data_offset"].as_u64().unwrap();
    let a = site_a(&da, b_bytes, b.port());

    // A holds the reservation on its remote leg with the epoch-0 key of its volume.
    let st = a.status();
    assert_eq!(st["epoch"], 0, "{st}");
    assert!(st["fenced"].is_null(), "{st}");
    assert_eq!(st["legs"][0]["fencing"]["state"], "local", "{st}");
    assert_eq!(st["legs"][1]["fencing"]["state"], "held", "{st}");
    let a_data = st["bitmap"]["data_offset"].as_u64().unwrap();
    let head = std::fs::read(da.join("a.img")).unwrap();
    let sb = Superblock::decode(&head[..256]).unwrap();
    assert_eq!(sb.epoch, 0);
    let a_key = fence_key(sb.volume_uuid, 0);
    assert_eq!(
        st["legs"][1]["fencing"]["detail"],
        format!("key {a_key:#018x}"),
        "{st}"
    );

    let mut opts = NvmeTcpOptions::new(NQN);
    opts.hostnqn = Some(PROMOTED_HOSTNQN.into());
    let promoted = NvmeTcpDevice::connect(&b.nvme_tcp, &opts).unwrap();
    let report = promoted.report().unwrap().unwrap();
    assert_eq!(report.rtype, Some(ReservationType::WriteExclusive));
    let holder = report
        .registrants
        .iter()
        .find(|r| r.holds)
        .expect("a holder");
    assert_eq!(holder.rkey, a_key, "A holds with its key: {report:?}");

    // The host writes through A: both legs get it.
    let host_dev = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host_dev.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    write(&mut *qp, &mut pool, 0, NLB, 0x11);
    let at_b = |slba: u64| blocks(&db.join("b.img"), b_data + a_data, slba, u64::from(NLB));
    assert!(at_b(0).iter().all(|&x| x == 0x11));

    // A newer primary (epoch 1) preempts A. Without takeover, epoch 0's holder is kept.
    assert!(matches!(
        fence_leg(&promoted, sb.volume_uuid, 1, false),
        LegFence::Lost { .. }
    ));
    let took = fence_leg(&promoted, sb.volume_uuid, 1, true);
    assert_eq!(
        took,
        LegFence::Held {
            key: fence_key(sb.volume_uuid, 1)
        }
    );

    // A's next write meets Reservation Conflict at B and is not acknowledged; A fences itself.
    let s = try_write(&mut *qp, &mut pool, 4096, NLB, 0x22);
    assert!(
        is_conflict(s),
        "the fenced write's status: {s}; A: {}; at B: {:?}",
        a.status(),
        &at_b(4096)[..4]
    );
    let st = a.status();
    let why = st["fenced"]
        .as_str()
        .unwrap_or_else(|| panic!("A not fenced: {st}"));
    assert!(why.contains("Reservation Conflict"), "{why}");
    assert_eq!(
        st["legs"][1]["state"], "in_sync",
        "the leg is not faulted: {st}"
    );
    // Every later command fails, even where only the local leg would be written.
    for slba in [8192, 0] {
        let s = try_write(&mut *qp, &mut pool, slba, NLB, 0x33);
        assert!(is_conflict(s), "write after the fence: {s}");
    }
    assert!(
        at_b(4096).iter().all(|&x| x == 0),
        "a fenced write reached B"
    );
    assert!(
        at_b(0).iter().all(|&x| x == 0x11),
        "B lost an acknowledged write"
    );
    drop(qp);
    drop(host_dev);

    // A restarts: it registers again, finds epoch 1 holding, and comes up fenced.
    a.kill9();
    let a = site_a(&da, b_bytes, b.port());
    let st = a.status();
    assert_eq!(st["legs"][1]["fencing"]["state"], "lost", "{st}");
    assert!(st["fenced"].is_string(), "{st}");
    let host_dev = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host_dev.open_qpair(4).unwrap();
    let s = try_write(&mut *qp, &mut pool, 0, NLB, 0x44);
    assert!(
        is_conflict(s),
        "a restarted fenced node acknowledged a write: {s}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(at_b(0).iter().all(|&x| x == 0x11));
    let report = promoted.report().unwrap().unwrap();
    let holder = report.registrants.iter().find(|r| r.holds).unwrap();
    assert_eq!(holder.rkey, fence_key(sb.volume_uuid, 1), "{report:?}");
}

const SITEA_NQN: &str = "nqn.2026-11.io.nvmirror:sitea";
const SITEB_NQN: &str = "nqn.2026-11.io.nvmirror:siteb";

/// `serve --config` with `toml` written to `dir/nvmirror.toml`, NVMe/TCP on `listen`.
fn serve_config(dir: &Path, toml: &str, listen: &str) -> Server {
    let path = dir.join("nvmirror.toml");
    std::fs::write(&path, toml).unwrap();
    let args = vec!["--config".to_string(), path.display().to_string()];
    Server::spawn_at(&args, &[], listen).unwrap_or_else(|e| panic!("{e}"))
}

/// Promotable site B: its 64 MiB leg exported raw as `siteb` (site A mirrors onto it) and
/// `vol0` declared standby over it, leg 0 being where A exports its leg once it rejoins.
fn promotable_b(dir: &Path, a_mirror_port: u16) -> Server {
    let d = dir.display();
    let toml = format!(
        r#"data_dir = "{d}"
[nvme_tcp]
listen = "127.0.0.1:0"
[rpc]
socket = "@DATA_DIR@/nvmirror.sock"
[[volume]]
name = "siteb"
legs = ["file://{d}/b.img?create=64MiB"]
bitmap = false
[[volume]]
name = "vol0"
legs = ["nvme-tcp://127.0.0.1:{a_mirror_port}/{SITEA_NQN}?kato=2s&reconnect_delay=100ms", "volume://siteb"]
standby = true
io_timeout = "2s"
[[subsystem]]
nqn = "{SITEB_NQN}"
namespaces = ["siteb"]
[[subsystem]]
nqn = "{NQN}"
namespaces = ["vol0"]
"#
    );
    serve_config(dir, &toml, "127.0.0.1:0")
}

/// The old primary back as a mirror: its leg exported raw as `sitea` on `port`.
fn a_as_mirror(dir: &Path, port: u16) -> Server {
    let d = dir.display();
    let toml = format!(
        r#"data_dir = "{d}"
[nvme_tcp]
listen = "127.0.0.1:0"
[rpc]
socket = "@DATA_DIR@/nvmirror.sock"
[[volume]]
name = "sitea"
legs = ["file://{d}/a.img"]
bitmap = false
[[subsystem]]
nqn = "{SITEA_NQN}"
namespaces = ["sitea"]
"#
    );
    serve_config(dir, &toml, &format!("127.0.0.1:{port}"))
}

/// The volume UUID in the superblock of `dir/b.img`.
fn sb_uuid(dir: &Path) -> nvmirror_mirror::superblock::Uuid {
    let head = std::fs::read(dir.join("b.img")).unwrap();
    Superblock::decode(&head[..256]).unwrap().volume_uuid
}

fn read_at(qp: &mut dyn nvmirror_nvme::QueuePair, pool: &mut DmaPool, slba: u64) -> Vec<u8> {
    serve_rig::read(qp, pool, slba, NLB)
}

#[test]
fn promote_at_b_then_the_old_primary_rejoins_by_the_union_of_both_bitmaps() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let a_port = free_port();
    let b = promotable_b(&db, a_port);
    let siteb = b.rpc_ok("volume_status", r#"{"name":"siteb"}"#);
    let b_bytes = siteb["capacity_bytes"].as_u64().unwrap();
    assert!(siteb["bitmap"].is_null(), "B exports its leg raw: {siteb}");
    let (ok, text) = b.rpc("volume_status", r#"{"name":"vol0"}"#);
    assert!(!ok && text.contains("standby"), "{text}");

    let legs = [
        format!("file://{}/a.img?create={b_bytes}", da.display()),
        format!(
            "nvme-tcp://127.0.0.1:{}/{SITEB_NQN}?kato=2s&reconnect_delay=100ms",
            b.port()
        ),
    ];
    let a = Server::with_legs(&da, &legs, &[]);
    let st = a.status();
    assert_eq!(st["legs"][1]["fencing"]["state"], "held", "{st}");
    let data = st["bitmap"]["data_offset"].as_u64().unwrap();
    let region_blocks = st["region_size"].as_u64().unwrap() / 512;

    // Acknowledged with both legs in sync: on B.
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, NLB as usize * 512);
    let (synced, synced2) = (0, 4 * region_blocks);
    write(&mut *qp, &mut pool, synced, NLB, 0x11);
    write(&mut *qp, &mut pool, synced2, NLB, 0x12);
    // Then B's leg fails: A goes on alone (split-brain rule 3). The second local-only write
    // is marked in A's bitmap only.
    a.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":1,"fault":"fail_writes"}"#,
    );
    let (alone, alone2) = (10 * region_blocks, 15 * region_blocks);
    write(&mut *qp, &mut pool, alone, NLB, 0x33);
    a.wait_for(Duration::from_secs(10), "B's leg faulted", |s| {
        s["legs"][1]["state"] == "faulted"
    });
    write(&mut *qp, &mut pool, alone2, NLB, 0x34);
    drop(qp);
    drop(host);
    a.kill9();

    // B is promoted: epoch 1, its own leg in sync, A's leg faulted and recording.
    let out = b.rpc_ok("volume_promote", r#"{"name":"vol0"}"#);
    let st = &out["status"];
    assert_eq!(st["epoch"], 1, "{out}");
    assert!(st["fenced"].is_null(), "{out}");
    assert_eq!(st["legs"][1]["state"], "in_sync", "{out}");
    assert_eq!(st["legs"][0]["state"], "faulted", "{out}");
    assert_eq!(st["bitmap"]["data_offset"], data, "{out}");
    let (ok, text) = b.rpc("volume_promote", r#"{"name":"vol0"}"#);
    assert!(!ok && text.contains("promoted already"), "{text}");
    let head = std::fs::read(db.join("b.img")).unwrap();
    assert_eq!(Superblock::decode(&head[..256]).unwrap().epoch, 1);

    // Every write A acknowledged while B was in sync is at B; A's lone writes are not.
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", b.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    assert!(read_at(&mut *qp, &mut pool, synced)
        .iter()
        .all(|&x| x == 0x11));
    assert!(read_at(&mut *qp, &mut pool, synced2)
        .iter()
        .all(|&x| x == 0x12));
    assert!(read_at(&mut *qp, &mut pool, alone2).iter().all(|&x| x == 0));
    let at_b = 20 * region_blocks;
    write(&mut *qp, &mut pool, at_b, NLB, 0x55);

    // The old primary restarts as it was: fenced, every write refused, nothing reaches B.
    let a = Server::with_legs(&da, &legs, &[]);
    let st = a.status();
    assert!(st["fenced"].is_string(), "{st}");
    let a_host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut a_qp = a_host.open_qpair(4).unwrap();
    let s = try_write(&mut *a_qp, &mut pool, synced, NLB, 0x66);
    assert!(is_conflict(s), "the old primary acknowledged a write: {s}");
    drop(a_qp);
    drop(a_host);
    // B's export of its leg is held by the promoted epoch: a write from anyone else there
    // meets Reservation Conflict.
    let raw = open_leg(&format!("nvme-tcp://{}/{SITEB_NQN}", b.nvme_tcp)).unwrap();
    let mut raw_qp = raw.open_qpair(4).unwrap();
    let s = try_write(&mut *raw_qp, &mut pool, data / 512 + synced, NLB, 0x77);
    assert!(is_conflict(s), "a write to B's raw export: {s}");
    drop(raw_qp);
    drop(raw);
    a.kill9();
    assert!(read_at(&mut *qp, &mut pool, synced)
        .iter()
        .all(|&x| x == 0x11));

    // A rejoins as a mirror of B: its leg exported raw where B's leg 0 points. B resyncs
    // the regions either side wrote since the split, then the two copies are identical.
    let a = a_as_mirror(&da, a_port);
    let st = b.wait_in_sync();
    assert_eq!(st["legs"][0]["state"], "in_sync", "{st}");
    assert_eq!(
        st["legs"][0]["fencing"]["detail"],
        format!("key {:#018x}", fence_key(sb_uuid(&db), 1)),
        "B holds the rejoined leg with its epoch-1 key: {st}"
    );
    let copied = st["resync"]["regions_copied"].as_u64().unwrap();
    assert!(
        copied >= 3,
        "regions 10, 15 (A's bitmap) and 20 (B's): {st}"
    );
    write(&mut *qp, &mut pool, at_b + NLB as u64, NLB, 0x56);
    let image = |p: &Path| std::fs::read(p).unwrap()[data as usize..].to_vec();
    let (ia, ib) = (image(&da.join("a.img")), image(&db.join("b.img")));
    let diff = ia.iter().zip(&ib).position(|(x, y)| x != y);
    assert_eq!(
        diff, None,
        "the sites differ at byte {diff:?} of the data area"
    );
    for (slba, fill) in [(synced, 0x11), (alone, 0), (alone2, 0), (at_b, 0x55)] {
        let at = (slba * 512) as usize;
        assert!(
            ia[at..at + 512].iter().all(|&x| x == fill),
            "A's copy of LBA {slba}: {:?}",
            &ia[at..at + 8]
        );
    }
    b.rpc_ok("verify_start", r#"{"volume":"vol0","repair":false}"#);
    let v = loop {
        let v = b.rpc_ok("verify_status", r#"{"volume":"vol0"}"#);
        if v["state"] != "running" {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["mismatched_regions"], serde_json::json!([]), "{v}");

    // B restarts: standby again; promoted once more it opens both legs at the next epoch and
    // holds A's leg with the new key.
    drop(qp);
    drop(host);
    b.kill9();
    let b = promotable_b(&db, a_port);
    let (ok, text) = b.rpc("volume_status", r#"{"name":"vol0"}"#);
    assert!(!ok && text.contains("standby"), "{text}");
    let out = b.rpc_ok("volume_promote", r#"{"name":"vol0"}"#);
    let st = &out["status"];
    assert_eq!(st["epoch"], 2, "{out}");
    assert_eq!(st["legs"][0]["state"], "in_sync", "{out}");
    assert_eq!(st["legs"][1]["state"], "in_sync", "{out}");
    assert_eq!(
        st["legs"][0]["fencing"]["detail"],
        format!("key {:#018x}", fence_key(sb_uuid(&db), 2)),
        "{out}"
    );
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", b.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    assert!(read_at(&mut *qp, &mut pool, at_b)
        .iter()
        .all(|&x| x == 0x55));
    drop(a);
}
