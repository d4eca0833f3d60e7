//! Objects built at run time through `nvmirror serve`'s RPCs: a volume, a subsystem, a
//! namespace and a listener made by RPC are served to a host (the project's NVMe/TCP
//! initiator), `save_config` writes them out, and a restart with the saved configuration
//! brings the same namespace back with its data and legs. The live configuration file brings
//! them back after a plain restart, until the configuration is edited. Changes the file would
//! refuse are refused with the field named, and a namespace removed under a connected host
//! fails its I/O with Invalid Namespace.

use std::path::Path;

use serde_json::{json, Value};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::spec::admin::{cns, log_page};
use nvmirror_nvme::spec::ana::{aen, aer_dw0, AER_TYPE_NOTICE, NOTICE_NAMESPACE_ATTRIBUTE};
use nvmirror_nvme::spec::SubmissionQueueEntry;
use nvmirror_nvme::{open_leg, BlockDevice, QueuePair, Status};

mod common;
mod serve_rig;
use common::{Host, Received};
use serve_rig::{file_leg, read, try_write, write, Server};

const NQN1: &str = "nqn.2026-11.io.nvmirror:built";
const SIZE: &str = "16MiB";

/// A configuration with the RPC socket and an NVMe/TCP listener, and no volume.
fn empty_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("base.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{d}\"\n\n[rpc]\nsocket = \"{d}/nvmirror.sock\"\n\n[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

fn serve(config: &Path) -> Server {
    Server::spawn(&["--config".into(), config.display().to_string()], &[])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn call(server: &Server, method: &str, params: Value) -> Value {
    server
        .call(method, params.clone())
        .unwrap_or_else(|e| panic!("{method} {params}: {e}"))
}

fn refused(server: &Server, method: &str, params: Value) -> String {
    match server.call(method, params.clone()) {
        Ok(v) => panic!("{method} {params} was accepted: {v}"),
        Err(e) => e,
    }
}

fn connect(addr: &str, nqn: &str) -> (std::sync::Arc<dyn BlockDevice>, Box<dyn QueuePair>) {
    let dev = open_leg(&format!("nvme-tcp://{addr}/{nqn}?nsid=1")).unwrap();
    let qp = dev.open_qpair(8).unwrap();
    (dev, qp)
}

/// volume → subsystem → namespace → listener, by RPC; returns the listener's address and
/// the legs.
fn build(server: &Server, dir: &Path) -> (String, Vec<String>) {
    let legs = vec![file_leg(dir, "a", SIZE), file_leg(dir, "b", SIZE)];
    // A generous I/O timeout: the first write's bitmap update waits on fsync, which a loaded
    // machine can hold for seconds.
    let st = call(
        server,
        "volume_create",
        json!({"name": "built", "legs": legs, "io_timeout": "60s"}),
    );
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
    call(server, "subsystem_create", json!({"nqn": NQN1}));
    let ns = call(
        server,
        "namespace_add",
        json!({"nqn": NQN1, "volume": "built"}),
    );
    assert_eq!(ns["nsid"], 1, "{ns}");
    let l = call(server, "listener_add", json!({"listen": "127.0.0.1:0"}));
    let addr = l["listen"].as_str().unwrap().to_string();
    assert_ne!(addr, "127.0.0.1:0", "the bound port is reported: {l}");
    (addr, legs)
}

fn leg_uris(server: &Server, volume: &str) -> Vec<String> {
    let st = call(server, "volume_status", json!({"name": volume}));
    st["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["state"], "in_sync", "{st}");
            l["uri"].as_str().unwrap().to_string()
        })
        .collect()
}

fn write_pattern(addr: &str) {
    let (_dev, mut qp) = connect(addr, NQN1);
    let mut pool = DmaPool::new(1, 65536);
    for (i, slba) in [0u64, 777, 20000].into_iter().enumerate() {
        write(&mut *qp, &mut pool, slba, 16, 0x40 + i as u8);
    }
    check_pattern_on(&mut *qp, &mut pool);
}

fn check_pattern_on(qp: &mut dyn QueuePair, pool: &mut DmaPool) {
    for (i, slba) in [0u64, 777, 20000].into_iter().enumerate() {
        let data = read(qp, pool, slba, 16);
        assert!(
            data.iter().all(|&b| b == 0x40 + i as u8),
            "block {slba} lost its data"
        );
    }
}

fn check_pattern(addr: &str) {
    let (_dev, mut qp) = connect(addr, NQN1);
    let mut pool = DmaPool::new(1, 65536);
    check_pattern_on(&mut *qp, &mut pool);
}

#[test]
fn an_rpc_built_volume_is_served_saved_and_back_after_a_restart_with_the_saved_config() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let server = serve(&empty_config(d));
    let (addr, legs) = build(&server, d);
    write_pattern(&addr);
    // A leg added at run time is part of what is saved.
    let c = file_leg(d, "c", SIZE);
    call(&server, "leg_add", json!({"volume": "built", "uri": c}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while call(&server, "volume_status", json!({"name": "built"}))["legs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["state"] != "in_sync")
    {
        assert!(std::time::Instant::now() < deadline, "leg c never in sync");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let all_legs = [legs.clone(), vec![c]].concat();
    assert_eq!(leg_uris(&server, "built"), all_legs);

    // Printed, and written where asked.
    let printed = call(&server, "save_config", json!({}));
    let text = printed["config"].as_str().unwrap();
    assert!(text.contains(NQN1) && text.contains("b.img"), "{text}");
    let saved = d.join("saved.toml");
    call(
        &server,
        "save_config",
        json!({"path": saved.display().to_string()}),
    );
    let saved_text = std::fs::read_to_string(&saved).unwrap();
    assert!(saved_text.contains(&addr), "{saved_text}");
    server.stop();

    let server = serve(&saved);
    assert_eq!(leg_uris(&server, "built"), all_legs);
    check_pattern(&addr);
    let subs = call(&server, "nvmf_get_subsystems", json!({"nqn": NQN1}));
    assert!(subs.to_string().contains("built"), "{subs}");
    server.stop();
}

#[test]
fn the_live_file_brings_rpc_changes_back_until_the_config_is_edited() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let config = empty_config(d);
    let server = serve(&config);
    let (addr, legs) = build(&server, d);
    write_pattern(&addr);
    server.stop();
    assert!(d.join("nvmirror.live.toml").exists());

    // The same configuration: the live file is used.
    let server = serve(&config);
    assert_eq!(leg_uris(&server, "built"), legs);
    check_pattern(&addr);
    // Removing the listener is remembered too.
    call(&server, "listener_remove", json!({"listen": addr}));
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still listens"
    );
    server.stop();
    let server = serve(&config);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} came back"
    );
    let list = call(&server, "volume_list", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    server.stop();

    // The operator edited the configuration since: it wins.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("# edited\n");
    std::fs::write(&config, text).unwrap();
    let server = serve(&config);
    let list = call(&server, "volume_list", json!({}));
    assert_eq!(list, json!([]), "the edited configuration has no volume");
    server.stop();
}

#[test]
fn changes_the_file_would_refuse_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let server = serve(&empty_config(d));
    let (addr, _) = build(&server, d);

    let e = refused(
        &server,
        "volume_create",
        json!({"name": "built", "legs": [file_leg(d, "z", SIZE)]}),
    );
    assert!(
        e.contains("volume[1] (built).name") && e.contains("used by two volumes"),
        "{e}"
    );
    let e = refused(
        &server,
        "volume_create",
        json!({"name": "v2", "legs": ["ftp://nowhere"]}),
    );
    assert!(e.contains("volume[1] (v2).legs[0]"), "{e}");
    // A file leg outside `[rpc] leg_dirs` (by default the data directory and the configured
    // legs' directories) is refused before anything is created.
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let e = refused(
        &server,
        "volume_create",
        json!({"name": "v2", "legs": [file_leg(outside.path(), "x", SIZE)]}),
    );
    assert!(e.contains("legs[0]") && e.contains("leg_dirs"), "{e}");
    assert!(!outside.path().join("x.img").exists(), "nothing created");
    let e = refused(
        &server,
        "volume_create",
        json!({"name": "v2", "legs": [file_leg(d, "a", SIZE)]}),
    );
    assert!(
        e.contains("volume[1] (v2).legs[0]") && e.contains("used twice"),
        "{e}"
    );
    let e = refused(
        &server,
        "volume_create",
        json!({"name": "v2", "legs": ["mem://16MiB"], "colour": "red"}),
    );
    assert!(e.contains("colour"), "{e}");
    let e = refused(&server, "subsystem_create", json!({"nqn": NQN1}));
    assert!(
        e.contains("subsystem[1].nqn") && e.contains("used twice"),
        "{e}"
    );
    let e = refused(&server, "subsystem_create", json!({"nqn": "not-an-nqn"}));
    assert!(e.contains("subsystem[1].nqn"), "{e}");
    let e = refused(
        &server,
        "namespace_add",
        json!({"nqn": NQN1, "volume": "nope"}),
    );
    assert!(
        e.contains("subsystem[0].namespaces") && e.contains("nope"),
        "{e}"
    );
    let e = refused(&server, "listener_add", json!({"listen": "localhost"}));
    assert!(e.contains("nvme_tcp.listener[1].listen"), "{e}");
    let e = refused(
        &server,
        "leg_add",
        json!({"volume": "built", "uri": file_leg(d, "b", SIZE)}),
    );
    assert!(
        e.contains("volume[0] (built).legs[2]") && e.contains("used twice"),
        "{e}"
    );
    let e = refused(&server, "volume_delete", json!({"name": "built"}));
    assert!(
        e.contains("exported by subsystem") && e.contains(NQN1),
        "{e}"
    );
    // Nothing refused reached the live file.
    let live = std::fs::read_to_string(d.join("nvmirror.live.toml")).unwrap();
    assert!(
        !live.contains("v2") && !live.contains("not-an-nqn"),
        "{live}"
    );

    // A connected host: the subsystem is kept unless forced; a namespace removed under it
    // fails its I/O with Invalid Namespace.
    let (_dev, mut qp) = connect(&addr, NQN1);
    let mut pool = DmaPool::new(1, 65536);
    write(&mut *qp, &mut pool, 0, 8, 0x11);
    let e = refused(&server, "subsystem_delete", json!({"nqn": NQN1}));
    assert!(
        e.contains("connected controller") && e.contains("force"),
        "{e}"
    );
    call(&server, "namespace_remove", json!({"nqn": NQN1, "nsid": 1}));
    let st = try_write(&mut *qp, &mut pool, 0, 8, 0x22);
    assert_eq!(
        st.sc(),
        Status::INVALID_NAMESPACE.sc(),
        "write after removal: {st}"
    );
    // No longer exported: it can go, and it is gone from the live configuration.
    call(&server, "volume_delete", json!({"name": "built"}));
    call(
        &server,
        "subsystem_delete",
        json!({"nqn": NQN1, "force": true}),
    );
    let live = std::fs::read_to_string(d.join("nvmirror.live.toml")).unwrap();
    assert!(!live.contains("built"), "{live}");
    server.stop();
}

/// The NSIDs an Identify Active Namespace List returns.
fn active(admin: &mut Host) -> Vec<u32> {
    let (st, page) = admin.identify(cns::ACTIVE_NAMESPACES, 0);
    assert!(st.is_success(), "{st}");
    page.chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .take_while(|&id| id != 0)
        .collect()
}

#[test]
fn a_namespace_removed_under_a_connected_host_raises_the_notice_and_fails_its_io() {
    const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d4d4d4d4-d4d4-d4d4-d4d4-d4d4d4d4d4d4";
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let server = serve(&empty_config(d));
    let (addr, _) = build(&server, d);
    let second = [file_leg(d, "s0", SIZE)];
    call(
        &server,
        "volume_create",
        json!({"name": "second", "legs": second}),
    );
    let ns = call(
        &server,
        "namespace_add",
        json!({"nqn": NQN1, "volume": "second"}),
    );
    assert_eq!(ns["nsid"], 2, "{ns}");

    let (mut admin, mut io, _) =
        Host::bring_up_as(addr.parse().unwrap(), NQN1, HOSTNQN, [0xd4; 16]);
    assert_eq!(active(&mut admin), [1, 2]);
    assert!(io.write(2, 0, &[7u8; 512], 512, true).is_success());
    // Namespace Attribute notices on, one AER outstanding.
    let (c, _) = admin.admin(0x09, 0, 0x0b, aen::NAMESPACE_ATTRIBUTE, 0);
    assert!(c.status().is_success(), "{}", c.status());
    let aer = admin.cid();
    admin.send_cmd(
        SubmissionQueueEntry {
            opcode: 0x0c,
            cid: aer,
            ..Default::default()
        },
        &[],
        true,
        0,
    );

    call(
        &server,
        "namespace_remove",
        json!({"nqn": NQN1, "volume": "second"}),
    );
    let c = match admin.recv() {
        Received::Resp(c) => c,
        other => panic!("expected the AER completion, got {other:?}"),
    };
    assert_eq!(c.cid, aer);
    assert_eq!(
        c.dw0,
        aer_dw0(
            AER_TYPE_NOTICE,
            NOTICE_NAMESPACE_ATTRIBUTE,
            log_page::CHANGED_NAMESPACES
        )
    );
    // The Changed Namespace List names it; it left the active list; its I/O is refused
    // while namespace 1 keeps working on the same queue.
    let (c, page) = admin.admin(
        0x02,
        0xffff_ffff,
        u32::from(log_page::CHANGED_NAMESPACES) | (1023 << 16),
        0,
        4096,
    );
    assert!(c.status().is_success(), "{}", c.status());
    assert_eq!(
        u32::from_le_bytes(page[0..4].try_into().unwrap()),
        2,
        "changed list"
    );
    assert_eq!(active(&mut admin), [1]);
    let st = io.write(2, 0, &[8u8; 512], 512, true);
    assert_eq!(
        (st.sc(), st.dnr()),
        (Status::INVALID_NAMESPACE.sc(), true),
        "{st}"
    );
    assert!(io.write(1, 0, &[9u8; 512], 512, true).is_success());
    let (st, _) = admin.identify(cns::NAMESPACE, 2);
    assert!(!st.is_success(), "Identify Namespace 2 after removal: {st}");
    // The removed namespace is gone from the configuration.
    let saved = call(&server, "save_config", json!({}));
    let text = saved["config"].as_str().unwrap();
    assert!(text.contains("namespaces = [\"built\"]"), "{text}");
    server.stop();
}
