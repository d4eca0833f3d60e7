//! Leg membership through `nvmirror serve`, as an operator changes it: a volume grows from one
//! leg to four with `leg_add` (each new leg fully copied while the host keeps writing), the
//! data path and `/metrics` stay alive after every copy, each change survives a restart, and
//! a leg removed with `leg_remove` stays removed.

use std::path::Path;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, BlockDevice, QueuePair};

mod serve_rig;
use serve_rig::{blocks, file_leg, read, write, Server, NQN};

const SIZE: &str = "16MiB";

fn connect(server: &Server) -> (std::sync::Arc<dyn BlockDevice>, Box<dyn QueuePair>) {
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let qp = dev.open_qpair(8).unwrap();
    (dev, qp)
}

/// Writes a block pattern of generation `gen`, then reads everything back through the host.
fn write_and_check(server: &Server, gen: u8) {
    let (_dev, mut qp) = connect(server);
    let mut pool = DmaPool::new(1, 65536);
    for (i, slba) in [0u64, 2048, 9000, 20000].into_iter().enumerate() {
        write(&mut *qp, &mut pool, slba, 64, gen.wrapping_add(i as u8));
    }
    for (i, slba) in [0u64, 2048, 9000, 20000].into_iter().enumerate() {
        let data = read(&mut *qp, &mut pool, slba, 64);
        assert!(
            data.iter().all(|&b| b == gen.wrapping_add(i as u8)),
            "block {slba} lost generation {gen}"
        );
    }
}

fn states(server: &Server) -> Vec<String> {
    server.status()["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_string())
        .collect()
}

/// The data areas of the named images are byte-identical.
fn assert_identical(dir: &Path, data_offset: u64, names: &[&str]) {
    let nlb = ((16u64 << 20) - data_offset) / 512;
    let first = blocks(&dir.join(format!("{}.img", names[0])), data_offset, 0, nlb);
    for n in &names[1..] {
        let other = blocks(&dir.join(format!("{n}.img")), data_offset, 0, nlb);
        assert!(first == other, "leg image {n} differs from {}", names[0]);
    }
}

#[test]
fn legs_added_one_by_one_up_to_four_keep_serving_and_survive_restarts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let configured = vec![file_leg(d, "leg0", SIZE)];
    let mut server = Server::with_legs(d, &configured, &[]);
    assert_eq!(states(&server), ["in_sync"]);
    write_and_check(&server, 0x10);
    let data_offset = server.status()["bitmap"]["data_offset"].as_u64().unwrap();

    for n in 1..4u8 {
        let uri = file_leg(d, &format!("leg{n}"), SIZE);
        let st = server.rpc_ok("leg_add", &format!(r#"{{"volume":"vol0","uri":"{uri}"}}"#));
        assert_eq!(st["legs"].as_array().unwrap().len(), n as usize + 1, "{st}");
        server.wait_in_sync();
        // The copy finished: the host's data path and the metrics endpoint still answer.
        write_and_check(&server, 0x20 + n * 8);
        let text = server.scrape();
        assert!(
            text.contains(&format!("leg=\"{n}\"")) && text.contains(&format!("leg{n}.img")),
            "metrics lack leg {n}"
        );
        // A restart brings the new member back, in sync, with the same configuration.
        server.stop();
        server = Server::with_legs(d, &configured, &[]);
        let st = server.wait_in_sync();
        assert_eq!(st["legs"].as_array().unwrap().len(), n as usize + 1, "{st}");
        assert_eq!(st["legs"][n as usize]["uri"], uri.as_str(), "{st}");
        write_and_check(&server, 0x21 + n * 8);
    }
    assert_eq!(states(&server), ["in_sync"; 4]);

    // Removing leg 2 retires it for good: a restart keeps it removed and never opens it.
    let st = server.rpc_ok("leg_remove", r#"{"volume":"vol0","leg":2}"#);
    assert_eq!(st["legs"][2]["state"], "removed", "{st}");
    write_and_check(&server, 0x60);
    server.stop();
    std::fs::remove_file(d.join("leg2.img")).unwrap();
    let server = Server::with_legs(d, &configured, &[]);
    assert_eq!(
        states(&server),
        ["in_sync", "in_sync", "removed", "in_sync"]
    );
    write_and_check(&server, 0x70);
    server.stop();
    assert_identical(d, data_offset, &["leg0", "leg1", "leg3"]);
}

#[test]
fn leg_add_refuses_a_device_of_another_volume_and_a_short_one() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    // A leg of another volume (formatted by another serve), in a directory `leg_add` may use.
    let other = file_leg(&a, "other", SIZE);
    Server::with_legs(&b, std::slice::from_ref(&other), &[]).stop();

    let server = Server::with_legs(&a, &[file_leg(&a, "leg0", SIZE)], &[]);
    let (ok, err) = server.rpc(
        "leg_add",
        &format!(r#"{{"volume":"vol0","uri":"{other}"}}"#),
    );
    assert!(!ok && err.contains("of volume"), "{err}");
    // A device as large as the exported namespace but without room for the metadata.
    let exported = server.status()["capacity_bytes"].as_u64().unwrap();
    let short = format!("file://{}/short.img?create={exported}", a.display());
    let (ok, err) = server.rpc(
        "leg_add",
        &format!(r#"{{"volume":"vol0","uri":"{short}"}}"#),
    );
    assert!(!ok && err.contains("the volume needs"), "{err}");
    assert_eq!(states(&server), ["in_sync"]);
    server.stop();
}

#[test]
fn removing_the_primary_then_a_crash_keeps_it_removed_and_serves_the_other_legs_data() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let configured: Vec<String> = (0..3)
        .map(|n| file_leg(d, &format!("leg{n}"), SIZE))
        .collect();
    let server = Server::with_legs(d, &configured, &[]);
    server.wait_in_sync();
    write_and_check(&server, 0x30);
    let data_offset = server.status()["bitmap"]["data_offset"].as_u64().unwrap();

    // Slot 0 is the primary, which `leg_remove` refuses; detaching it first hands the
    // primary to another in-sync leg.
    let (ok, err) = server.rpc("leg_remove", r#"{"volume":"vol0","leg":0}"#);
    assert!(!ok && err.contains("is the primary"), "{err}");
    let st = server.rpc_ok("leg_detach", r#"{"volume":"vol0","leg":0}"#);
    assert_ne!(st["primary"], 0, "{st}");
    let st = server.rpc_ok("leg_remove", r#"{"volume":"vol0","leg":0}"#);
    assert_eq!(st["legs"][0]["state"], "removed", "{st}");
    assert_ne!(st["primary"], 0, "{st}");
    write_and_check(&server, 0x40);

    // A crash, not a clean stop; the removed device is gone before the restart.
    server.kill9();
    std::fs::remove_file(d.join("leg0.img")).unwrap();
    let server = Server::with_legs(d, &configured, &[]);
    let st = server.wait_in_sync();
    assert_eq!(states(&server), ["removed", "in_sync", "in_sync"], "{st}");
    assert_ne!(
        st["primary"], 0,
        "the removed slot must never be primary: {st}"
    );
    // The data written before and after the removal is served from the remaining legs
    // (a removed slot read as a placeholder would return zeros).
    let (_dev, mut qp) = connect(&server);
    let mut pool = DmaPool::new(1, 65536);
    for (i, slba) in [0u64, 2048, 9000, 20000].into_iter().enumerate() {
        let data = read(&mut *qp, &mut pool, slba, 64);
        assert!(
            data.iter().all(|&b| b == 0x40u8.wrapping_add(i as u8)),
            "block {slba} lost its data after the restart"
        );
    }
    drop(qp);
    write_and_check(&server, 0x50);
    server.stop();
    assert_identical(d, data_offset, &["leg1", "leg2"]);
}
