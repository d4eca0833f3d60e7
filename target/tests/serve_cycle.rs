//! An `async-cycle` leg through `nvmirror serve`: site A mirrors synchronously to a local file
//! and in cycles to site B, which exports the image (namespace 1) and the staging area
//! (namespace 2) over NVMe/TCP. A host writes through A's NVMe/TCP listener; B's image moves
//! only at cycle boundaries (`cycle_now`, or the period), `volume_status`, `nvmirror status`
//! and `/metrics` show the cycles, a kill -9 of A leaves B at the last cut, and the restarted A
//! ships the rest. `nvmirror cycle-recover` reads B's staging area as the far site would; a
//! kill -9 of both sites in the middle of a cycle leaves B, once recovered, at a cut.

use std::path::Path;
use std::time::Duration;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{assert_prefix, stamped_writes, two_sites, Server, NQN, NVMIRROR};

/// Site B: the image `b.img` (a persistent volume) and the raw staging area `s.img`, two
/// namespaces of one subsystem.
fn site_b(db: &Path, port: u16) -> Server {
    site_b_with(db, port, "")
}

/// [`site_b`] with `extra` appended to its configuration.
fn site_b_with(db: &Path, port: u16, extra: &str) -> Server {
    let toml = format!(
        "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [[volume]]\nname = \"vol0\"\nlegs = [\"file://{d}/b.img?create=64MiB\"]\n\n\
         [[volume]]\nname = \"stg0\"\nbitmap = false\nlegs = [\"file://{d}/s.img?create=32MiB\"]\n\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\", \"stg0\"]\n{extra}",
        d = db.display()
    );
    Server::with_config_at(db, &toml, &format!("127.0.0.1:{port}"))
}

fn site_a_config(da: &Path, a_bytes: u64, b_port: u16, cycle: &str) -> String {
    site_a_config_with(da, a_bytes, b_port, cycle, "")
}

/// [`site_a_config`] with `extra` in the async leg's entry.
fn site_a_config_with(da: &Path, a_bytes: u64, b_port: u16, cycle: &str, extra: &str) -> String {
    format!(
        "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [[volume]]\nname = \"vol0\"\nio_timeout = \"5s\"\n\
         legs = [\"file://{d}/a.img?create={a_bytes}\", \"nvme-tcp://127.0.0.1:{b_port}/{NQN}\"]\n\n\
         [[volume.async_legs]]\nleg = 1\nmode = \"async-cycle\"\ncycle = \"{cycle}\"\n\
         journal = \"file://{d}/vol0.journal?create=32MiB\"\n\
         staging = \"nvme-tcp://127.0.0.1:{b_port}/{NQN}?nsid=2\"\n{extra}\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
        d = da.display()
    )
}

/// Blocks of the volume the writers touch.
const AREA: u64 = 512;

#[test]
fn a_served_cycle_leg_moves_the_far_image_from_cut_to_cut() {
    use rand::SeedableRng;
    let (_dir, da, db) = two_sites();
    let b = site_b(&db, 0);
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let cfg = site_a_config(&da, b_bytes, b.port(), "3600s");
    let a = Server::with_config(&da, &cfg);
    // Opening the volume wrote its metadata: one cycle ships it, so the image starts at a
    // known cut.
    let c0 = a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#)["legs"][0]["cycle"]
        .as_u64()
        .unwrap();
    let st = a.status();
    let r = &st["legs"][1]["replication"];
    assert_eq!(r["mode"], "async-cycle", "{st}");
    assert_eq!(r["cycle"]["cycle"], c0, "{st}");
    assert_eq!(r["lag_writes"], 0, "{st}");
    assert_eq!(r["cycle"]["interval_s"], 3600.0, "{st}");
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let far_data = || {
        let img = std::fs::read(db.join("b.img")).unwrap();
        let at = (b_meta + data_offset) as usize;
        img[at..at + AREA as usize * 512].to_vec()
    };

    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(16);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
    // Within the hour-long cycle nothing reaches the image.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(assert_prefix(&far_data(), &writes), 0);
    let got = a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    assert_eq!(got["legs"][0]["leg"], 1, "{got}");
    assert_eq!(got["legs"][0]["cycle"], c0 + 1, "{got}");
    let st = a.status();
    assert_eq!(assert_prefix(&far_data(), &writes), 200, "{got} {st}");
    let c = &st["legs"][1]["replication"]["cycle"];
    assert_eq!(c["cycle"], c0 + 1, "{st}");
    let distinct: std::collections::BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(s, n)| s..s + u64::from(n))
        .collect();
    // The cycle carries each block once: the distinct blocks written, plus the volume's
    // own metadata blocks (its bitmap) on the leg.
    let (cycle_bytes, distinct) = (
        c["cycle_bytes"].as_u64().unwrap(),
        distinct.len() as u64 * 512,
    );
    assert!(
        (distinct..=distinct + 16 * 1024).contains(&cycle_bytes),
        "{cycle_bytes} bytes in the cycle for {distinct} distinct bytes written: {st}"
    );
    let text = std::process::Command::new(NVMIRROR)
        .args(["status", "--socket", &a.socket])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("cycle #{} (every 3600 s)", c0 + 1)),
        "{text}"
    );
    let metrics = a.scrape();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("nvmirror_leg_cycle{volume=\"vol0\",leg=\"1\""))
        .unwrap_or_else(|| panic!("no nvmirror_leg_cycle: {metrics}"));
    assert!(line.ends_with(&format!("}} {}", c0 + 1)), "{line}");
    // Refused: a cycle of a volume without such a leg, a switch to async-journal.
    assert!(!a.rpc("cycle_now", r#"{"volume":"vol0","leg":0}"#).0);
    let (ok, why) = a.rpc(
        "leg_set_mode",
        r#"{"volume":"vol0","leg":1,"mode":"async-journal"}"#,
    );
    assert!(!ok && why.contains("async-cycle"), "{why}");

    // A dies mid-cycle: B stays at the cut of cycle 1.
    stamped_writes(&mut *qp, &mut pool, &mut rng, 100, AREA, &mut writes);
    drop(qp);
    a.kill9();
    assert_eq!(assert_prefix(&far_data(), &writes), 200);
    // The far site reads its staging area: cycle 1, applied, nothing to roll forward.
    let out = std::process::Command::new(NVMIRROR)
        .args([
            "cycle-recover",
            "--image",
            &format!("nvme-tcp://127.0.0.1:{}/{NQN}", b.port()),
            "--staging",
            &format!("nvme-tcp://127.0.0.1:{}/{NQN}?nsid=2", b.port()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["cycle"], c0 + 1, "{rec}");
    assert_eq!(rec["rolled_forward"], false, "{rec}");

    // A restarts with a short period: the journal's rest ships in the next cycle.
    let cfg = site_a_config(&da, b_bytes, b.port(), "100ms");
    let a = Server::with_config(&da, &cfg);
    a.wait_for(Duration::from_secs(30), "the next cycle applied", |st| {
        st["legs"][1]["replication"]["lag_writes"] == 0
            && st["legs"][1]["replication"]["cycle"]["cycle"].as_u64() > Some(c0 + 1)
    });
    a.stop();
    b.stop();
    assert_eq!(assert_prefix(&far_data(), &writes), 300);
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let at = data_offset as usize;
    assert_eq!(far_data(), a_img[at..at + AREA as usize * 512].to_vec());
}

/// `nvmirror cycle-recover` against site B's exports; its JSON line.
fn cycle_recover(port: u16) -> serde_json::Value {
    let out = std::process::Command::new(NVMIRROR)
        .args([
            "cycle-recover",
            "--image",
            &format!("nvme-tcp://127.0.0.1:{port}/{NQN}"),
            "--staging",
            &format!("nvme-tcp://127.0.0.1:{port}/{NQN}?nsid=2"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn both_sites_killed_mid_cycle_leave_the_far_image_at_a_cut() {
    use rand::SeedableRng;
    let (_dir, da, db) = two_sites();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut b = site_b(&db, port);
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let cfg = site_a_config(&da, b_bytes, port, "3600s");
    let mut a = Server::with_config(&da, &cfg);
    a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    let data_offset = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    let far_data = || {
        let img = std::fs::read(db.join("b.img")).unwrap();
        let at = (b_meta + data_offset) as usize;
        img[at..at + AREA as usize * 512].to_vec()
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut writes: Vec<(u64, u32)> = Vec::new();
    let (mut rolled, mut cuts) = (0, std::collections::BTreeSet::new());
    for round in 0..4u64 {
        let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
        let mut qp = host.open_qpair(4).unwrap();
        stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
        drop(qp);
        // A cycle starts; both sites die somewhere in it (staging, commit or apply).
        let asked = a.rpc_in_background("cycle_now", serde_json::json!({"volume": "vol0"}));
        std::thread::sleep(Duration::from_millis(round * 4));
        b.kill9();
        a.kill9();
        let _ = asked.join();
        // The far site alone: recover, then the image is the host's as of some write.
        b = site_b(&db, port);
        let rec = cycle_recover(port);
        rolled += usize::from(rec["rolled_forward"] == true);
        let k = assert_prefix(&far_data(), &writes);
        cuts.insert(k);
        // The local site comes back and ships what the far image lacks.
        a = Server::with_config(&da, &cfg);
        a.rpc_ok("cycle_now", r#"{"volume":"vol0","timeout_s":30}"#);
        let st = a.status();
        assert_eq!(
            assert_prefix(&far_data(), &writes),
            writes.len() as u64,
            "round {round}: {st}"
        );
    }
    eprintln!("far-site recoveries: {rolled} rolled a committed cycle forward; cuts {cuts:?}");
    a.stop();
    b.stop();
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let at = data_offset as usize;
    assert_eq!(far_data(), a_img[at..at + AREA as usize * 512].to_vec());
}

#[test]
fn a_far_site_applier_takes_the_apply_so_the_link_carries_each_block_once() {
    let (_dir, da, db) = two_sites();
    let b = site_b_with(
        &db,
        0,
        "\n[[cycle_apply]]\nimage = \"vol0\"\nstaging = \"stg0\"\n",
    );
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let cfg = site_a_config_with(&da, b_bytes, b.port(), "3600s", "far_apply = true\n");
    let a = Server::with_config(&da, &cfg);
    a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    let data_offset = a.status()["bitmap"]["data_offset"].as_u64().unwrap();
    let image_ops = |b: &Server| b.status()["legs"][0]["bytes"].as_u64().unwrap();
    let before = image_ops(&b);
    // A hot spot: 8 blocks of 4 KiB, each rewritten 50 times.
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    for round in 0..50u8 {
        for i in 0..8u64 {
            serve_rig::write(
                &mut *qp,
                &mut pool,
                i * 64,
                8,
                round.wrapping_mul(8).wrapping_add(i as u8 + 1),
            );
        }
    }
    drop(qp);
    let got = a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    let st = a.status();
    let c = &st["legs"][1]["replication"]["cycle"];
    assert_eq!(c["far_apply"], true, "{st}");
    assert_eq!(c["image_bytes"], 0, "A wrote B's image itself: {st}");
    let distinct = 8 * 4096u64;
    let cycle_bytes = c["cycle_bytes"].as_u64().unwrap();
    assert!(
        (distinct..=distinct + 16 * 1024).contains(&cycle_bytes),
        "{cycle_bytes} bytes in the cycle for {distinct} distinct: {got} {st}"
    );
    // B's image leg got the cycle's blocks once, from B's own applier, which says so.
    let bst = b.wait_for(Duration::from_secs(5), "the applier's status", |st| {
        st["cycle_apply"]["cycle"] == got["legs"][0]["cycle"]
    });
    let applied = image_ops(&b) - before;
    assert_eq!(applied, cycle_bytes, "{bst}");
    let ca = &bst["cycle_apply"];
    assert_eq!(ca["staging"], "stg0", "{bst}");
    assert!(ca["applied_bytes"].as_u64() >= Some(cycle_bytes), "{bst}");
    assert!(ca["last_error"].is_null(), "{bst}");
    let text = std::process::Command::new(NVMIRROR)
        .args(["status", "--socket", &b.socket])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "cycle apply from stg0: image at cycle #{}",
            got["legs"][0]["cycle"]
        )),
        "{text}"
    );
    a.stop();
    b.stop();
    let b_img = std::fs::read(db.join("b.img")).unwrap();
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let at = data_offset as usize;
    let n = 8 * 64 * 512;
    assert_eq!(
        &b_img[(b_meta + data_offset) as usize..][..n],
        &a_img[at..at + n],
        "B's image holds the last round"
    );
}

/// A catch-up larger than the journal, through serve: leg 1 is detached while the host
/// writes the area and marks 16 more regions (about 17 MiB to copy against a 4 MiB journal
/// bound). `leg_attach` resyncs it through the journal, which is staged in pieces at site B
/// while B's image stays at the last cycle; site A is killed -9 in the middle, restarted,
/// resynced again, and the next cycle brings B's image to every write, with no step-down.
#[test]
fn a_catch_up_larger_than_the_journal_survives_a_kill_and_lands_in_one_cycle() {
    use rand::SeedableRng;
    let (_dir, da, db) = two_sites();
    let b = site_b(&db, 0);
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let cfg = site_a_config_with(
        &da,
        b_bytes,
        b.port(),
        "100ms",
        "max_bytes = \"4MiB\"\nmax_lag = \"30s\"\n\n[resync]\nmax_rate = \"4MiB\"\nadaptive = false\n",
    );
    let a = Server::with_config(&da, &cfg);
    a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#);
    let st = a.status();
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    let region = st["bitmap"]["region_size"].as_u64().unwrap();
    let far = |from: u64, len: u64| {
        let img = std::fs::read(db.join("b.img")).unwrap();
        let at = (b_meta + data_offset + from) as usize;
        img[at..at + len as usize].to_vec()
    };
    let far_data = || far(0, AREA * 512);
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(18);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
    let c = a.rpc_ok("cycle_now", r#"{"volume":"vol0"}"#)["legs"][0]["cycle"]
        .as_u64()
        .unwrap();
    assert_eq!(assert_prefix(&far_data(), &writes), 200, "{}", a.status());

    a.rpc_ok("leg_detach", r#"{"volume":"vol0","leg":1}"#);
    stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
    for r in 1..=16u64 {
        serve_rig::write(&mut *qp, &mut pool, r * region / 512, 8, r as u8);
    }
    let staged = |st: &serde_json::Value| {
        st["legs"][1]["replication"]["cycle"]["staged_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = staged(&a.status());
    a.rpc_ok("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    // The host writes on; B's image stays at cycle `c` while pieces are staged.
    let mut samples = 0;
    loop {
        stamped_writes(&mut *qp, &mut pool, &mut rng, 5, AREA, &mut writes);
        let st = a.status();
        let r = &st["legs"][1]["replication"];
        assert_eq!(r["state"], "catching-up", "the copy ended early: {st}");
        assert_eq!(r["cycle"]["cycle"], c, "{st}");
        assert_eq!(r["step_downs"], 0, "{st}");
        assert_eq!(assert_prefix(&far_data(), &writes), 200, "{st}");
        samples += 1;
        if staged(&st) >= before + (2 << 20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(qp);
    a.kill9();
    assert_eq!(assert_prefix(&far_data(), &writes), 200);
    let rec = cycle_recover(b.port());
    assert_eq!(
        (rec["cycle"].as_u64(), rec["rolled_forward"].as_bool()),
        (Some(c), Some(false)),
        "the pieces are not a cycle: {rec}"
    );

    // A restarts: its leg is still out of sync, its cuts held; a resync makes it whole and
    // the next cycle holds it all.
    let a = Server::with_config(&da, &cfg);
    let st = a.status();
    assert_eq!(st["legs"][1]["replication"]["state"], "catching-up", "{st}");
    if st["resync"]["state"] != "running" {
        // The start may begin the resync itself a moment after that status.
        let (ok, why) = a.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#);
        assert!(ok || why.contains("already running"), "{why}");
    }
    a.wait_for(Duration::from_secs(60), "leg 1 in sync", |st| {
        st["legs"][1]["state"] == "in_sync" && st["resync"]["state"] != "running"
    });
    let got = a.rpc_ok("cycle_now", r#"{"volume":"vol0","timeout_s":30}"#);
    assert!(got["legs"][0]["cycle"].as_u64() > Some(c), "{got}");
    let st = a.status();
    assert_eq!(st["legs"][1]["replication"]["step_downs"], 0, "{st}");
    assert!(st["legs"][1]["replication"]["error"].is_null(), "{st}");
    a.stop();
    b.stop();
    assert_eq!(
        assert_prefix(&far_data(), &writes),
        writes.len() as u64,
        "after {samples} samples: {st}"
    );
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let len = 17 * region;
    let at = data_offset as usize;
    assert!(
        far(0, len) == a_img[at..at + len as usize],
        "B's image differs from A's"
    );
}

/// An `async-journal` leg with a staging area, through serve: it ships segment by segment
/// while it keeps up; a catch-up (`leg_detach`, host writes, `leg_attach`) is staged at site
/// B, in pieces, while B's image stays the prefix it held; then it lands whole.
#[test]
fn a_served_journal_leg_with_a_staging_area_keeps_its_far_image_a_prefix_through_a_catch_up() {
    staged_journal_catch_up(false);
}

/// As above, with site B applying the batches (`far_apply`, its `[[cycle_apply]]`).
#[test]
fn a_served_journal_leg_whose_far_site_applies_the_batches_keeps_a_prefix_through_a_catch_up() {
    staged_journal_catch_up(true);
}

fn staged_journal_catch_up(far_apply: bool) {
    use rand::SeedableRng;
    let (_dir, da, db) = two_sites();
    let b = if far_apply {
        site_b_with(
            &db,
            0,
            "\n[[cycle_apply]]\nimage = \"vol0\"\nstaging = \"stg0\"\n",
        )
    } else {
        site_b(&db, 0)
    };
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let b_meta = 64 * 1024 * 1024 - b_bytes;
    let cfg = site_a_config_with(
        &da,
        b_bytes,
        b.port(),
        "1s",
        &format!(
            "far_apply = {far_apply}\nmax_bytes = \"8MiB\"\n\n[resync]\nmax_rate = \"4MiB\"\nadaptive = false\n"
        ),
    )
    .replace(
        "mode = \"async-cycle\"\ncycle = \"1s\"\n",
        "mode = \"async-journal\"\n",
    );
    let a = Server::with_config(&da, &cfg);
    let st = a.status();
    let r = &st["legs"][1]["replication"];
    assert_eq!(r["mode"], "async-journal", "{st}");
    assert_eq!(r["cycle"]["interval_s"], 0.0, "{st}");
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    let region = st["bitmap"]["region_size"].as_u64().unwrap();
    let far = |from: u64, len: u64| {
        let img = std::fs::read(db.join("b.img")).unwrap();
        let at = (b_meta + data_offset + from) as usize;
        img[at..at + len as usize].to_vec()
    };
    let far_data = || far(0, AREA * 512);
    let drained = |a: &Server| {
        a.wait_for(Duration::from_secs(30), "journal drained", |st| {
            st["legs"][1]["replication"]["lag_writes"] == 0
        })
    };
    let host = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qp = host.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(19);
    let mut writes = Vec::new();
    stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
    // No cycle to wait for: the journal ships as it comes.
    let st = drained(&a);
    assert_eq!(assert_prefix(&far_data(), &writes), 200, "{st}");
    let batches = st["legs"][1]["replication"]["cycle"]["cycle"]
        .as_u64()
        .unwrap();

    a.rpc_ok("leg_detach", r#"{"volume":"vol0","leg":1}"#);
    stamped_writes(&mut *qp, &mut pool, &mut rng, 200, AREA, &mut writes);
    for r in 1..=16u64 {
        serve_rig::write(&mut *qp, &mut pool, r * region / 512, 8, r as u8);
    }
    a.rpc_ok("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    // The host writes on through the copy (about 17 MiB at 4 MiB/s, staged in pieces past
    // the 8 MiB bound). While the copy is held nothing touches B's image: a look at it
    // between two statuses that both say so finds the prefix before the detach. (Outside
    // the hold a batch may be half applied: B's image is then a prefix only once rolled
    // forward from its staging area, as `nvmirror cycle-recover` does.)
    let held = |st: &serde_json::Value| st["legs"][1]["replication"]["state"] == "catching-up";
    let mut samples = 0;
    loop {
        stamped_writes(&mut *qp, &mut pool, &mut rng, 5, AREA, &mut writes);
        let before = a.status();
        let r = &before["legs"][1]["replication"];
        assert_eq!(r["consistent"], true, "{before}");
        assert_eq!(r["step_downs"], 0, "{before}");
        if !held(&before) {
            if before["legs"][1]["state"] == "in_sync" && before["resync"]["state"] != "running" {
                break;
            }
            continue;
        }
        let image = far_data();
        if held(&a.status()) {
            assert_eq!(assert_prefix(&image, &writes), 200, "{before}");
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(samples > 5, "only {samples} samples during the copy");
    let st = drained(&a);
    let r = &st["legs"][1]["replication"];
    assert!(r["cycle"]["cycle"].as_u64().unwrap() > batches, "{st}");
    assert!(r["error"].is_null(), "{st}");
    assert_eq!(r["cycle"]["far_apply"], far_apply, "{st}");
    if far_apply {
        // A staged the batches; B rolled them onto its image.
        assert_eq!(r["cycle"]["image_bytes"], 0, "{st}");
        let bst = b.status();
        assert!(
            bst["cycle_apply"]["applied_cycles"].as_u64() > Some(0),
            "{bst}"
        );
    }
    let text = std::process::Command::new(NVMIRROR)
        .args(["status", "--socket", &a.socket])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("(batches of a backlog)"), "{text}");
    drop(qp);
    a.stop();
    b.stop();
    assert_eq!(assert_prefix(&far_data(), &writes), writes.len() as u64);
    let a_img = std::fs::read(da.join("a.img")).unwrap();
    let len = 17 * region;
    let at = data_offset as usize;
    assert!(
        far(0, len) == a_img[at..at + len as usize],
        "B's image differs from A's"
    );
}
