//! Leg-state superblocks through `nvmirror serve` (docs/bitmap.md, "Superblock protocol"):
//! when the surviving leg cannot record that the other leg is stale, the host's writes are
//! not acknowledged; once it can, they are, and a restart after a crash keeps every one of
//! them (the election never takes the stale leg).

use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{file_leg, read, try_write, Server, NQN};

/// 64 KiB per write.
const NLB: u32 = 128;

#[test]
fn writes_fail_while_the_survivor_cannot_record_the_fault_and_a_restart_keeps_the_acked_ones() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let legs = [
        file_leg(dir.path(), "a", "16MiB"),
        file_leg(dir.path(), "b", "16MiB"),
    ];
    let server = Server::with_legs(dir.path(), &legs, &[]);
    let st = server.status();
    let data_lba = st["bitmap"]["data_offset"].as_u64().expect("persistent") / 512;
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(1, 65536);
    assert!(try_write(&mut *qp, &mut pool, 0, NLB, 0x01).is_success());

    // Leg 1's superblock (the first 4 KiB of the image) cannot be written; leg 0's data
    // blocks cannot either.
    let sb = server.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":1,"fault":"fail_writes","slba":0,"nlb":8}"#,
    );
    server.rpc_ok(
        "leg_fault_inject",
        &format!(r#"{{"volume":"vol0","leg":0,"fault":"fail_writes","slba":{data_lba}}}"#),
    );
    let first = try_write(&mut *qp, &mut pool, 1024, NLB, 0x11);
    assert!(
        !first.is_success(),
        "acknowledged, but the survivor's superblock does not name leg 0 stale"
    );
    let st = server.status();
    assert_eq!(st["legs"][0]["state"], "faulted", "{st}");
    assert_eq!(st["legs"][1]["state"], "in_sync", "{st}");
    let second = try_write(&mut *qp, &mut pool, 2048, NLB, 0x22);
    assert!(
        !second.is_success(),
        "a write leg 0 missed was acknowledged while the superblocks call it in sync"
    );
    assert_eq!(read(&mut *qp, &mut pool, 0, NLB), vec![0x01; 65536]);

    // Leg 1's superblock heals: the states are recorded and writes go through again.
    server.rpc_ok(
        "leg_fault_clear",
        &format!(r#"{{"volume":"vol0","leg":1,"id":{}}}"#, sb["id"]),
    );
    let start = Instant::now();
    while !try_write(&mut *qp, &mut pool, 2048, NLB, 0x33).is_success() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "writes never recovered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(try_write(&mut *qp, &mut pool, 3072, NLB, 0x44).is_success());
    drop(qp);
    drop(dev);

    // A crash, and a start on the same legs: leg 1 is the freshest.
    server.kill9();
    let server = Server::with_legs(dir.path(), &legs, &[]);
    let st = server.status();
    assert_eq!(st["legs"][1]["role"], "primary", "{st}");
    // Leg 0 comes up stale; auto_resync may already have copied what it missed.
    assert!(
        st["legs"][0]["state"] != "in_sync" || st["resync"]["leg"] == 0,
        "leg 0 came up in sync without a resync: {st}"
    );
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(8).unwrap();
    assert_eq!(read(&mut *qp, &mut pool, 2048, NLB), vec![0x33; 65536]);
    assert_eq!(read(&mut *qp, &mut pool, 3072, NLB), vec![0x44; 65536]);
    assert_eq!(read(&mut *qp, &mut pool, 0, NLB), vec![0x01; 65536]);
    drop(qp);
    drop(dev);
    server.wait_in_sync();
    server.stop();
}
