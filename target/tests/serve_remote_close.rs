//! A remote leg's timed-out write, through two `nvmirror serve` processes (review finding I3):
//! site B exports a volume over NVMe/TCP whose leg hangs (`leg_fault_inject` "hang"; B's own
//! I/O timeout is a minute, so B holds the write); site A mirrors a local file onto B with a
//! 2 s I/O timeout. A host write times out on the remote leg and the host disconnects, so
//! A closes the queue pair with B still holding the write. Until B has answered it, the leg
//! must stay busy — `leg_attach` refused — or a resync could be overtaken by the late write.
//! Once B lets the write go, the leg attaches, resyncs, and both legs agree.

use std::path::Path;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{blocks, write, Server, NQN};

/// `serve --config` with one volume `vol0` of `legs` and I/O timeout `io_timeout`.
fn serve(dir: &Path, io_timeout: &str, legs: &[String]) -> Server {
    let legs: Vec<String> = legs.iter().map(|l| format!("\"{l}\"")).collect();
    Server::with_config(
        dir,
        &format!(
            "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nio_timeout = \"{io_timeout}\"\nlegs = [{}]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            legs.join(", ")
        ),
    )
}

fn attach(a: &Server) -> (bool, String) {
    a.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#)
}

#[test]
fn a_timed_out_remote_write_keeps_the_leg_busy_until_the_remote_answers_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let b = serve(
        &db,
        "60s",
        &[format!("file://{}/b.img?create=64MiB", db.display())],
    );
    let b_st = b.status();
    let b_bytes = b_st["capacity_bytes"].as_u64().unwrap();
    let b_data = b_st["bitmap"]["data_offset"].as_u64().unwrap();
    let a = serve(
        &da,
        "2s",
        &[
            format!("file://{}/a.img?create={b_bytes}", da.display()),
            format!("nvme-tcp://127.0.0.1:{}/{NQN}", b.port()),
        ],
    );
    assert_eq!(a.status()["legs"][1]["state"], "in_sync");

    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 16 * 512);
    write(&mut *qp, &mut pool, 0, 16, 1);
    b.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":0,"fault":"hang"}"#,
    );
    // Leg 0 (local) has it; leg 1 times out after 2 s and is faulted.
    write(&mut *qp, &mut pool, 0, 16, 2);
    let st = a.status();
    assert_eq!(st["legs"][1]["state"], "faulted", "{st}");
    assert_eq!(st["legs"][1]["link"]["connected"], true, "{st}");

    // The host goes away: A closes its queue pair while B still holds the write.
    drop(qp);
    drop(host);
    std::thread::sleep(Duration::from_secs(1));
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let (ok, text) = attach(&a);
        assert!(!ok, "attached while B still holds the timed-out write");
        assert!(text.contains("timed-out command"), "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // B lets the write go: it lands, B answers, A's close fence ends.
    b.rpc_ok("leg_fault_clear", r#"{"volume":"vol0","leg":0}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = attach(&a);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "leg 1 never attached: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.wait_in_sync();
    let a_data = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    a.stop();
    b.stop();
    let local = blocks(&da.join("a.img"), a_data, 0, 16);
    let remote = blocks(&db.join("b.img"), b_data + a_data, 0, 16);
    assert!(local.iter().all(|&x| x == 2));
    assert!(
        local == remote,
        "the resync repaired the late write's blocks"
    );
}
