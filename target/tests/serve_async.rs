//! An `async-journal` leg through `nvmirror serve`: site A mirrors synchronously to a local
//! file and asynchronously, through a journal, to site B (another `nvmirror serve` reached
//! over NVMe/TCP). A host writes through A; `volume_status`, `nvmirror status` and `/metrics`
//! show the lag; while B refuses writes A keeps acknowledging from the journal; when B comes
//! back the journal drains and B's image equals A's. A restart of A with writes still in the
//! journal ships them. Bad `async_legs` entries are refused with the field named.

use std::path::Path;
use std::time::Duration;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{assert_prefix, read, stamped_writes, write, Server, NQN};

fn config(da: &Path, a_bytes: u64, b_port: u16, extra: &str) -> String {
    format!(
        "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [[volume]]\nname = \"vol0\"\nio_timeout = \"2s\"\n\
         legs = [\"file://{d}/a.img?create={a_bytes}\", \"nvme-tcp://127.0.0.1:{b_port}/{NQN}\"]\n\n\
         [[volume.async_legs]]\nleg = 1\njournal = \"file://{d}/vol0.journal?create=32MiB\"\n{extra}\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
        d = da.display()
    )
}

/// Site B with its NVMe/TCP listener on `port` (0: a free one); a restart at the same port
/// is the same site to A.
fn site_b_at(db: &Path, port: u16) -> Server {
    let toml = format!(
        "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [[volume]]\nname = \"vol0\"\nlegs = [\"file://{}/b.img?create=64MiB\"]\n\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
        db.display()
    );
    Server::with_config_at(db, &toml, &format!("127.0.0.1:{port}"))
}

/// The two sites of a test: B started (on `b_port`, 0 for a free one) in `dir/b`, and A's
/// configuration (its async leg entry extended by `extra`) for `dir/a`.
struct Sites {
    _dir: tempfile::TempDir,
    da: std::path::PathBuf,
    db: std::path::PathBuf,
    b: Server,
    b_bytes: u64,
    a_cfg: String,
}

fn sites(b_port: u16, extra: &str) -> Sites {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (db, da) = (dir.path().join("b"), dir.path().join("a"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let b = site_b_at(&db, b_port);
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let a_cfg = config(&da, b_bytes, b.port(), extra);
    Sites {
        _dir: dir,
        da,
        db,
        b,
        b_bytes,
        a_cfg,
    }
}

fn wait_drained(a: &Server) -> serde_json::Value {
    a.wait_for(Duration::from_secs(30), "journal drained", |st| {
        st["legs"][1]["replication"]["lag_writes"] == 0
    })
}

#[test]
fn an_async_leg_lags_behind_the_host_and_catches_up_to_an_identical_image() {
    let Sites {
        da,
        db,
        b,
        b_bytes,
        a_cfg,
        _dir: _tmp,
    } = sites(0, "");
    let a = Server::with_config(&da, &a_cfg);
    let st = a.status();
    assert_eq!(
        st["legs"][1]["replication"]["mode"], "async-journal",
        "{st}"
    );
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    // An async-journal leg ships no cycles: the volume has none to end.
    let (ok, why) = a.rpc("cycle_now", r#"{"volume":"vol0"}"#);
    assert!(!ok && why.contains("has no async-cycle leg"), "{why}");

    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(4, 64 << 10);
    for i in 0..64u64 {
        write(&mut *qp, &mut pool, i * 128, 128, i as u8 + 1);
    }
    let st = wait_drained(&a);
    let r = &st["legs"][1]["replication"];
    assert_eq!(r["state"], "replicating", "{st}");
    assert_eq!(r["consistent"], true, "{st}");
    assert!(r["error"].is_null(), "{st}");
    assert!(r["consistent_point"]["seq"].as_u64().unwrap() >= 64, "{st}");
    assert_eq!(r["rpo_seconds"], 0.0);

    // B refuses writes (its leg is failed by RPC): A keeps acknowledging from the journal.
    let armed = b.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":0,"fault":"fail_writes"}"#,
    );
    for i in 0..32u64 {
        write(&mut *qp, &mut pool, i * 128, 128, 0xa0 + i as u8);
    }
    let st = a.wait_for(Duration::from_secs(10), "the far side refusing", |st| {
        st["legs"][1]["replication"]["state"] == "retrying"
    });
    let r = &st["legs"][1]["replication"];
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not take journal segment")),
        "{st}"
    );
    assert!(r["lag_writes"].as_u64().unwrap() > 0, "{st}");
    assert!(r["lag_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["legs"][1]["state"], "in_sync", "{st}");
    // What the host reads comes from the in-sync local leg, not the lagging one.
    assert!(read(&mut *qp, &mut pool, 0, 128).iter().all(|&x| x == 0xa0));
    let text = a.scrape();
    assert!(
        text.contains("nvmirror_leg_lag_writes{volume=\"vol0\",leg=\"1\""),
        "{text}"
    );
    assert!(text.contains("nvmirror_leg_rpo_seconds{"), "{text}");
    let out = std::process::Command::new(serve_rig::NVMIRROR)
        .args(["status", "--socket", &a.socket])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("async-journal: retrying"), "{shown}");

    // B takes writes again: the journal drains.
    b.rpc_ok(
        "leg_fault_clear",
        &format!(r#"{{"volume":"vol0","leg":0,"id":{}}}"#, armed["id"]),
    );
    wait_drained(&a);
    drop(qp);
    a.stop();
    b.stop();
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let b_img = std::fs::read(db.join("b.img")).unwrap();
    // B's export holds A's leg as it is (metadata area included) after B's own metadata.
    let b_meta = b_img.len() as u64 - b_bytes;
    assert_eq!(
        &a_img[data_offset as usize..],
        &b_img[(b_meta + data_offset) as usize..],
        "the far image equals the local one"
    );
}

#[test]
fn a_restart_ships_what_the_journal_still_holds() {
    let Sites {
        da,
        db,
        b,
        b_bytes,
        a_cfg: cfg,
        _dir: _tmp,
    } = sites(0, "");
    let a = Server::with_config(&da, &cfg);
    let armed = b.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":0,"fault":"fail_writes"}"#,
    );
    {
        let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
        let mut qp = host.open_qpair(8).unwrap();
        let mut pool = DmaPool::new(2, 64 << 10);
        for i in 0..16u64 {
            write(&mut *qp, &mut pool, 4096 + i * 128, 128, 0x51);
        }
    }
    let st = a.wait_for(
        Duration::from_secs(10),
        "writes held in the journal",
        |st| st["legs"][1]["replication"]["lag_writes"].as_u64() > Some(0),
    );
    let held = st["legs"][1]["replication"]["lag_writes"].as_u64().unwrap();
    a.kill9();
    b.rpc_ok(
        "leg_fault_clear",
        &format!(r#"{{"volume":"vol0","leg":0,"id":{}}}"#, armed["id"]),
    );
    let a = Server::with_config(&da, &cfg);
    let st = wait_drained(&a);
    assert!(
        st["legs"][1]["replication"]["consistent_point"]["seq"].as_u64() >= Some(held),
        "{st}"
    );
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    a.stop();
    b.stop();
    let b_img = std::fs::read(db.join("b.img")).unwrap();
    let b_meta = b_img.len() as u64 - b_bytes;
    let at = (b_meta + data_offset + 4096 * 512) as usize;
    assert!(
        b_img[at..at + 16 * 128 * 512].iter().all(|&x| x == 0x51),
        "the writes held in the journal reached B after the restart"
    );
}

#[test]
fn bad_async_leg_entries_are_refused_with_the_field() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    for (entry, field) in [
        ("leg = 0\njournal = \"mem://16MiB\"", "async_legs[0].leg"),
        ("leg = 5\njournal = \"mem://16MiB\"", "async_legs[0].leg"),
        (
            "leg = 1\nmode = \"async-cycle\"\njournal = \"mem://16MiB\"",
            "async_legs[0].staging",
        ),
        (
            "leg = 1\nmode = \"async-mirror\"\njournal = \"mem://16MiB\"",
            "async_legs[0].mode",
        ),
        (
            "leg = 1\nstaging = \"mem://16MiB\"\njournal = \"mem://16MiB\"",
            "async_legs[0].staging",
        ),
        (
            "leg = 1\nmode = \"async-journal\"\nstaging = \"mem://8MiB\"\ncycle = \"5s\"\njournal = \"mem://16MiB\"",
            "async_legs[0].cycle",
        ),
        (
            "leg = 1\ncycle = \"5s\"\njournal = \"mem://16MiB\"",
            "async_legs[0].cycle",
        ),
        (
            "leg = 1\nfar_apply = true\njournal = \"mem://16MiB\"",
            "async_legs[0].far_apply",
        ),
        (
            "leg = 1\nmode = \"async-cycle\"\nstaging = \"mem://8MiB\"\ncycle = \"1ms\"\njournal = \"mem://16MiB\"",
            "async_legs[0].cycle",
        ),
        (
            "leg = 1\nmode = \"async-cycle\"\nstaging = \"mem://8MiB\"\ncycle = \"30s\"\nmax_lag = \"40s\"\njournal = \"mem://16MiB\"",
            "async_legs[0].max_lag",
        ),
        ("leg = 1\njournal = \"bogus://x\"", "async_legs[0].journal"),
        (
            "leg = 1\njournal = \"mem://16MiB\"\nmax_bytes = \"1MiB\"",
            "async_legs[0].max_bytes",
        ),
        (
            "leg = 1\njournal = \"mem://16MiB\"\nmax_lag = \"soon\"",
            "async_legs[0].max_lag",
        ),
    ] {
        let toml = format!(
            "[[volume]]\nname = \"vol0\"\nlegs = [\"mem://64MiB\", \"mem://64MiB\"]\n\n\
             [[volume.async_legs]]\n{entry}\n"
        );
        let err = match Server::try_with_config(d, &toml) {
            Ok(_) => panic!("accepted: {entry}"),
            Err(e) => e,
        };
        assert!(err.contains(field), "{entry}: {err}");
    }
}

#[test]
fn leg_set_mode_switches_a_journaled_leg_and_a_restart_keeps_the_mode() {
    let Sites {
        da,
        b,
        a_cfg: cfg,
        _dir: _tmp,
        ..
    } = sites(0, "mode = \"sync\"\n");
    let a = Server::with_config(&da, &cfg);
    assert_eq!(a.status()["legs"][1]["replication"]["mode"], "sync");
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    // Synchronous: B refusing writes fails the leg at once (the journal takes nothing).
    let armed = b.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":0,"fault":"fail_writes"}"#,
    );
    write(&mut *qp, &mut pool, 0, 128, 1);
    let st = a.status();
    assert_eq!(st["legs"][1]["state"], "faulted", "{st}");
    assert_eq!(st["legs"][1]["replication"]["host_bytes"], 0, "{st}");
    b.rpc_ok(
        "leg_fault_clear",
        &format!(r#"{{"volume":"vol0","leg":0,"id":{}}}"#, armed["id"]),
    );
    a.rpc_ok("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    a.wait_in_sync();

    // Asynchronous: B refusing writes leaves the leg in sync, the journal holds them.
    let r = a.rpc_ok(
        "leg_set_mode",
        r#"{"volume":"vol0","leg":1,"mode":"async-journal"}"#,
    );
    assert_eq!(r["replication"]["mode"], "async-journal", "{r}");
    let armed = b.rpc_ok(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":0,"fault":"fail_writes"}"#,
    );
    for i in 0..8 {
        write(&mut *qp, &mut pool, i * 128, 128, 2);
    }
    let st = a.status();
    assert_eq!(st["legs"][1]["state"], "in_sync", "{st}");
    assert!(
        st["legs"][1]["replication"]["lag_writes"].as_u64() > Some(0),
        "{st}"
    );
    // Back to sync cannot drain while B refuses: refused, and the leg stays asynchronous.
    let (ok, text) = a.rpc(
        "leg_set_mode",
        r#"{"volume":"vol0","leg":1,"mode":"sync","timeout_s":0.2}"#,
    );
    assert!(!ok && text.contains("did not drain"), "{text}");
    assert_eq!(
        a.status()["legs"][1]["replication"]["mode"],
        "async-journal"
    );
    b.rpc_ok(
        "leg_fault_clear",
        &format!(r#"{{"volume":"vol0","leg":0,"id":{}}}"#, armed["id"]),
    );
    a.rpc_ok("leg_set_mode", r#"{"volume":"vol0","leg":1,"mode":"sync"}"#);
    assert_eq!(a.status()["legs"][1]["replication"]["mode"], "sync");
    // A leg without a journal cannot switch.
    let (ok, text) = a.rpc(
        "leg_set_mode",
        r#"{"volume":"vol0","leg":0,"mode":"async-journal"}"#,
    );
    assert!(!ok && text.contains("has no journal"), "{text}");
    // The mode set last is kept across a restart.
    a.rpc_ok(
        "leg_set_mode",
        r#"{"volume":"vol0","leg":1,"mode":"async-journal"}"#,
    );
    drop(qp);
    a.stop();
    let a = Server::with_config(&da, &cfg);
    assert_eq!(
        a.status()["legs"][1]["replication"]["mode"],
        "async-journal"
    );
    a.stop();
    b.stop();
}

#[test]
fn a_killed_receiver_leaves_a_consistent_prefix_and_catches_up_after_its_restart() {
    use rand::SeedableRng;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Sites {
        da,
        db,
        b,
        b_bytes,
        a_cfg,
        _dir: _tmp,
    } = sites(port, "");
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let a = Server::with_config(&da, &a_cfg);
    let data_offset = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 150, 512, &mut writes);
    b.kill9();
    // A acknowledges from the journal while B is gone.
    stamped_writes(&mut *qp, &mut pool, &mut rng, 150, 512, &mut writes);
    let st = a.status();
    assert_eq!(st["legs"][1]["state"], "in_sync", "{st}");
    assert!(
        st["legs"][1]["replication"]["lag_writes"].as_u64() > Some(0),
        "{st}"
    );
    let far_data = |db: &Path| {
        let img = std::fs::read(db.join("b.img")).unwrap();
        let at = (b_meta + data_offset) as usize;
        img[at..at + 512 * 512].to_vec()
    };
    let k = assert_prefix(&far_data(&db), &writes);
    assert!(
        k < 300,
        "B was killed before every write reached it (k = {k})"
    );
    // B comes back at the same address: A reconnects and the journal drains.
    let b = site_b_at(&db, port);
    stamped_writes(&mut *qp, &mut pool, &mut rng, 50, 512, &mut writes);
    a.wait_for(
        Duration::from_secs(60),
        "journal drained after B's restart",
        |st| st["legs"][1]["replication"]["lag_writes"] == 0,
    );
    drop(qp);
    a.stop();
    b.stop();
    assert_eq!(assert_prefix(&far_data(&db), &writes), 350);
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let at = data_offset as usize;
    assert_eq!(far_data(&db), a_img[at..at + 512 * 512].to_vec());
}
