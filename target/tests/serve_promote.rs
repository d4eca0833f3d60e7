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
use serve_rig::{blocks, site_b, try_write, write, Server, NQN};

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
