//! ANA through `nvmirror serve`: a serve with two listeners (two NVM subsystem ports), a
//! host on each; `listener_set_ana_state` on one port completes the outstanding
//! Asynchronous Event Request with the ANA Change notice, the ANA log page shows the new
//! state and a bumped change count, I/O through that port gets the path-related status and
//! the other port keeps working; the event stays masked until the host reads the page. And
//! two serves over copies of one volume export the same namespace identity with controller
//! IDs from disjoint ranges, so a multipath host sees one namespace behind two controllers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nvmirror_nvme::spec::admin::{cns, nidt};
use nvmirror_nvme::spec::ana::{AnaGroupDescriptor, AnaLogHeader};
use nvmirror_nvme::spec::{CompletionQueueEntry, Status, SubmissionQueueEntry};
use serde_json::{json, Value};

mod common;
mod serve_rig;
use common::{pattern, Host, Received};
use serve_rig::{file_leg, Server, NQN};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:c3c3c3c3-c3c3-c3c3-c3c3-c3c3c3c3c3c3";
const HOSTID: [u8; 16] = [0xc3; 16];
/// Set Features Asynchronous Event Configuration: ANA Change Notices.
const AEC_ANA: u32 = 1 << 11;

/// A serve of `vol0` on `legs` with its first listener optimized and a second one
/// non-optimized, controller IDs `cntlid`.
fn serve(dir: &Path, legs: [String; 2], cntlid: (u16, u16)) -> Server {
    Server::with_config(
        dir,
        &format!(
            "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\ncntlid_min = {}\ncntlid_max = {}\n\n\
             [[nvme_tcp.listener]]\nlisten = \"127.0.0.1:0\"\nana_state = \"non-optimized\"\n\n\
             [rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nlegs = [\"{}\", \"{}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            cntlid.0, cntlid.1, legs[0], legs[1]
        ),
    )
}

fn legs(dir: &Path) -> [String; 2] {
    [
        file_leg(dir, "primary", "64MiB"),
        file_leg(dir, "mirror", "64MiB"),
    ]
}

/// Both listeners' addresses, port 0 first.
fn listeners(server: &Server) -> Vec<SocketAddr> {
    let l = server.call("listener_list", json!({})).unwrap();
    l["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect()
}

fn set_state(server: &Server, listener: SocketAddr, state: &str) -> Value {
    server
        .call(
            "listener_set_ana_state",
            json!({"listener": listener.to_string(), "group": 1, "state": state}),
        )
        .unwrap()
}

/// Get Log Page `lid` of `len` bytes at `offset`; `cdw10_flags` adds RGO/RAE.
fn log_page(
    admin: &mut Host,
    lid: u8,
    cdw10_flags: u32,
    offset: u64,
    len: u32,
) -> (Status, Vec<u8>) {
    let sqe = SubmissionQueueEntry {
        opcode: 0x02,
        cid: admin.cid(),
        nsid: 0xffff_ffff,
        cdw10: u32::from(lid) | cdw10_flags | ((len / 4 - 1) << 16),
        cdw12: offset as u32,
        cdw13: (offset >> 32) as u32,
        ..Default::default()
    };
    let (c, d) = admin.run(sqe, &[], true, len);
    (c.status(), d)
}

/// The ANA log page: header and the descriptor of group 1.
fn ana_log(admin: &mut Host) -> (AnaLogHeader, AnaGroupDescriptor, u32) {
    let (st, p) = log_page(admin, 0x0c, 0, 0, 4096);
    assert!(st.is_success(), "ANA log: {st}");
    let nsid = u32::from_le_bytes(p[48..52].try_into().unwrap());
    (
        AnaLogHeader::read_from(&p),
        AnaGroupDescriptor::read_from(&p[16..]),
        nsid,
    )
}

fn send_aer(admin: &mut Host) -> u16 {
    let cid = admin.cid();
    admin.send_cmd(
        SubmissionQueueEntry {
            opcode: 0x0c,
            cid,
            ..Default::default()
        },
        &[],
        true,
        0,
    );
    cid
}

/// The next completion on the admin queue.
fn next_completion(admin: &mut Host) -> CompletionQueueEntry {
    match admin.recv() {
        Received::Resp(c) => c,
        other => panic!("expected a completion, got {other:?}"),
    }
}

/// A Keep Alive: its completion must be the next one (a held AER stays held).
fn assert_aer_still_held(admin: &mut Host, aer: u16) {
    let cid = admin.cid();
    admin.send_cmd(
        SubmissionQueueEntry {
            opcode: 0x18,
            cid,
            ..Default::default()
        },
        &[],
        true,
        0,
    );
    let c = next_completion(admin);
    assert_eq!(
        c.cid, cid,
        "the AER (cid {aer}) completed although it should be held"
    );
}

fn is(st: Status, sct: u8, sc: u8) -> bool {
    st.sct() as u8 == sct && st.sc() == sc && !st.dnr()
}

#[test]
fn listener_state_change_fires_the_ana_event_and_fences_io_on_that_port() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = serve(dir.path(), legs(dir.path()), (1, 0xffef));
    let ports = listeners(&server);
    assert_eq!(ports.len(), 2);
    let (mut admin_a, mut io_a, _) = Host::bring_up_as(ports[0], NQN, HOSTNQN, HOSTID);
    let (mut admin_b, mut io_b, _) = Host::bring_up_as(ports[1], NQN, HOSTNQN, HOSTID);

    // What a multipath host looks at: CMIC (multi-controller, ANA), OAES, ANATT, ANACAP,
    // ANAGRPMAX, NANAGRPID, MNAN; the namespace's ANAGRPID.
    let (st, id) = admin_a.identify(cns::CONTROLLER, 0);
    assert!(st.is_success());
    assert_eq!(id[76] & 0b1010, 0b1010, "CMIC bits 1 and 3");
    let oaes = u32::from_le_bytes(id[92..96].try_into().unwrap());
    assert_eq!(oaes & (1 << 11 | 1 << 8), 1 << 11 | 1 << 8, "OAES");
    assert!(id[342] > 0, "ANATT");
    assert_eq!(id[343] & 0x1f, 0x1f, "ANACAP: all five states");
    assert_eq!(u32::from_le_bytes(id[344..348].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(id[348..352].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_le_bytes(id[540..544].try_into().unwrap()),
        1,
        "MNAN"
    );
    let (st, ns) = admin_a.identify(cns::NAMESPACE, 1);
    assert!(st.is_success());
    assert_eq!(
        u32::from_le_bytes(ns[92..96].try_into().unwrap()),
        1,
        "ANAGRPID"
    );

    // Each port reports its own state; nothing has changed yet.
    let (h, g, nsid) = ana_log(&mut admin_a);
    assert_eq!((h.chgcnt, h.ngrps), (0, 1));
    assert_eq!(
        (g.grpid, g.nnsids, g.chgcnt, g.state, nsid),
        (1, 1, 0, 0x01, 1)
    );
    let (_, g, _) = ana_log(&mut admin_b);
    assert_eq!(g.state, 0x02, "the second listener starts non-optimized");
    // A partial read at an offset is the same bytes; Return Groups Only drops the NSIDs.
    let (_, whole) = log_page(&mut admin_a, 0x0c, 0, 0, 52);
    let (st, part) = log_page(&mut admin_a, 0x0c, 0, 16, 32);
    assert!(st.is_success());
    assert_eq!(part, whole[16..48]);
    let (_, rgo) = log_page(&mut admin_a, 0x0c, 1 << 8, 0, 52);
    assert_eq!(AnaGroupDescriptor::read_from(&rgo[16..]).nnsids, 0);
    assert_eq!(&rgo[48..52], &[0; 4], "nothing after the descriptor");
    let (st, _) = log_page(&mut admin_a, 0x0c, 0, 4096, 16);
    assert_eq!(st, Status::INVALID_FIELD.with_dnr(), "offset past the page");

    // The host enables ANA notices and leaves an AER outstanding, as Linux does.
    let (c, _) = admin_a.admin(0x09, 0, 0x0b, AEC_ANA, 0);
    assert!(c.status().is_success());
    let aer = send_aer(&mut admin_a);
    assert!(io_a.write(1, 8, &pattern(4096, 1), 512, true).is_success());

    let out = set_state(&server, ports[0], "inaccessible");
    assert_eq!(out["changed"], json!([NQN]));
    let c = next_completion(&mut admin_a);
    assert_eq!(c.cid, aer);
    assert!(c.status().is_success());
    assert_eq!(c.dw0, 0x000c_0302, "notice, ANA change, log page 0Ch");

    // I/O through this port now gets ANA Inaccessible (no DNR: retry on another path).
    let st = io_a.write(1, 8, &pattern(4096, 2), 512, true);
    assert!(is(st, 3, 0x02), "write through an inaccessible port: {st}");
    let (st, _) = io_a.read(1, 8, 8, 512);
    assert!(is(st, 3, 0x02), "read: {st}");
    // The other port is untouched and serves the data.
    let (st, data) = io_b.read(1, 8, 8, 512);
    assert!(st.is_success(), "{st}");
    assert_eq!(data, pattern(4096, 1), "the refused write changed nothing");
    assert!(io_b.write(1, 16, &pattern(4096, 3), 512, true).is_success());
    let (h, _, _) = ana_log(&mut admin_b);
    assert_eq!(h.chgcnt, 0);

    // Before the host reads the page, another change: the event stays masked.
    let aer = send_aer(&mut admin_a);
    set_state(&server, ports[0], "persistent-loss");
    assert_aer_still_held(&mut admin_a, aer);
    // Reading with Retain Asynchronous Event keeps it masked.
    let (st, _) = log_page(&mut admin_a, 0x0c, 1 << 15, 0, 64);
    assert!(st.is_success());
    set_state(&server, ports[0], "change");
    assert_aer_still_held(&mut admin_a, aer);
    let (h, g, _) = ana_log(&mut admin_a);
    assert_eq!((h.chgcnt, g.chgcnt, g.state), (3, 3, 0x0f));
    let st = io_a.write(1, 8, &pattern(4096, 4), 512, true);
    assert!(is(st, 3, 0x03), "ANA Transition: {st}");
    // Read without RAE: the next change fires again.
    set_state(&server, ports[0], "optimized");
    let c = next_completion(&mut admin_a);
    assert_eq!((c.cid, c.dw0), (aer, 0x000c_0302));
    assert!(io_a.write(1, 8, &pattern(4096, 5), 512, true).is_success());
    let (h, g, _) = ana_log(&mut admin_a);
    assert_eq!((h.chgcnt, g.state), (4, 0x01));

    // A state equal to the current one changes nothing and raises nothing.
    let out = set_state(&server, ports[0], "optimized");
    assert_eq!(out["changed"], json!([]));

    // volume_status reports both ports.
    let st = server.status();
    let ana = st["ana"].as_array().unwrap();
    assert_eq!(ana.len(), 2, "{st}");
    assert_eq!(ana[0]["state"], "optimized");
    assert_eq!(ana[1]["state"], "non-optimized");
    assert_eq!(ana[1]["listener"], ports[1].to_string());
}

/// Linux reads the ANA log while it sets a controller up and enables ANA notices only after
/// its I/O queues are connected. A change in between must still reach it once it enables
/// them, or the path keeps the state it read (the failback of the pair drill: the returning
/// node promotes itself while the host is connecting to it, and the host never uses it).
#[test]
fn an_ana_change_before_the_host_enables_notices_is_reported_once_it_does() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = serve(dir.path(), legs(dir.path()), (1, 0xffef));
    let ports = listeners(&server);
    let (mut admin, mut io, _) = Host::bring_up_as(ports[1], NQN, HOSTNQN, HOSTID);
    let (_, g, _) = ana_log(&mut admin);
    assert_eq!(g.state, 0x02, "read while setting up: non-optimized");
    set_state(&server, ports[1], "optimized");
    let (c, _) = admin.admin(0x09, 0, 0x0b, AEC_ANA, 0);
    assert!(c.status().is_success());
    let aer = send_aer(&mut admin);
    let c = next_completion(&mut admin);
    assert_eq!(
        (c.cid, c.dw0),
        (aer, 0x000c_0302),
        "the change the host has not read is reported when it enables the notice"
    );
    let (_, g, _) = ana_log(&mut admin);
    assert_eq!(g.state, 0x01);
    assert!(io.write(1, 8, &pattern(4096, 1), 512, true).is_success());

    // A host that read the page after the change has it: nothing more is sent.
    let (mut admin, _io, _) = Host::bring_up_as(ports[0], NQN, HOSTNQN, HOSTID);
    set_state(&server, ports[0], "non-optimized");
    let (_, g, _) = ana_log(&mut admin);
    assert_eq!(g.state, 0x02);
    let (c, _) = admin.admin(0x09, 0, 0x0b, AEC_ANA, 0);
    assert!(c.status().is_success());
    let aer = send_aer(&mut admin);
    assert_aer_still_held(&mut admin, aer);
}

#[test]
fn bad_ana_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = serve(dir.path(), legs(dir.path()), (1, 0xffef));
    let ports = listeners(&server);
    let p = ports[0].to_string();
    for (params, want) in [
        (
            json!({"listener": "127.0.0.1:1", "group": 1, "state": "inaccessible"}),
            "no listener",
        ),
        (
            json!({"listener": "nowhere", "group": 1, "state": "inaccessible"}),
            "'listener'",
        ),
        (
            json!({"listener": p, "group": 0, "state": "inaccessible"}),
            "'group'",
        ),
        (
            json!({"listener": p, "group": 2, "state": "inaccessible"}),
            "no ANA group 2",
        ),
        (
            json!({"listener": p, "group": 1, "state": "standby"}),
            "'state'",
        ),
        (json!({"listener": p, "group": 1}), "'state'"),
        (
            json!({"listener": p, "group": 1, "state": "inaccessible", "nqn": "nqn.x:y"}),
            "no subsystem",
        ),
    ] {
        let e = server
            .call("listener_set_ana_state", params.clone())
            .unwrap_err();
        assert!(e.contains(want), "{params}: {e}");
    }
    let st = server.status();
    assert_eq!(st["ana"][0]["state"], "optimized", "{st}");
    assert_eq!(st["ana"][1]["state"], "non-optimized", "{st}");
    // `nvmirror status` shows them.
    let out = std::process::Command::new(serve_rig::NVMIRROR)
        .args(["status", "--socket", &server.socket])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "ana: {} optimized, {} non-optimized",
            ports[0], ports[1]
        )),
        "{text}"
    );
}

/// NGUID and UUID of namespace 1 and the controller ID, through `addr`.
fn identity(addr: SocketAddr) -> ([u8; 16], [u8; 16], u16) {
    let (mut admin, _io, cntlid) = Host::bring_up_as(addr, NQN, HOSTNQN, HOSTID);
    let (st, d) = admin.identify(cns::NS_ID_DESCRIPTORS, 1);
    assert!(st.is_success());
    let (mut nguid, mut uuid) = ([0u8; 16], [0u8; 16]);
    let mut o = 0;
    while o + 4 <= d.len() && d[o] != 0 {
        let (t, l) = (d[o], usize::from(d[o + 1]));
        let v = &d[o + 4..o + 4 + l];
        match t {
            nidt::NGUID => nguid.copy_from_slice(v),
            nidt::UUID => uuid.copy_from_slice(v),
            _ => {}
        }
        o += 4 + l;
    }
    let (_, ns) = admin.identify(cns::NAMESPACE, 1);
    assert_eq!(&ns[104..120], &nguid, "Identify Namespace NGUID");
    (nguid, uuid, cntlid)
}

#[test]
fn two_serves_of_one_volume_share_namespace_identity_with_disjoint_cntlids() {
    let a = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let b = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // The volume is formatted once; the second node holds copies of its legs (what a
    // replica of the same volume is), so both name the same volume UUID.
    {
        let mut first = serve(a.path(), legs(a.path()), (1, 99));
        first.signal(libc::SIGTERM);
        assert!(first.wait_exit(Duration::from_secs(30)).is_some());
    }
    for leg in ["primary", "mirror"] {
        let img = format!("{leg}.img");
        std::fs::copy(a.path().join(&img), b.path().join(&img)).unwrap();
    }
    let node_a = serve(a.path(), legs(a.path()), (1, 99));
    let node_b = serve(b.path(), legs(b.path()), (100, 199));
    let (addr_a, addr_b) = (listeners(&node_a)[0], listeners(&node_b)[0]);
    let (nguid_a, uuid_a, c1) = identity(addr_a);
    let (nguid_b, uuid_b, c2) = identity(addr_b);
    assert_ne!(nguid_a, [0; 16]);
    assert_eq!(nguid_a, nguid_b, "same NGUID on both nodes");
    assert_eq!(uuid_a, uuid_b, "same UUID on both nodes");
    assert!((1..=99).contains(&c1), "node A cntlid {c1}");
    assert!((100..=199).contains(&c2), "node B cntlid {c2}");
    // Controllers keep coming from each node's own range.
    let (_, _, c3) = identity(listeners(&node_b)[1]);
    assert!((100..=199).contains(&c3) && c3 != c2, "{c3}");
}

#[test]
fn discovery_lists_every_port_and_a_controller_stays_on_its_own() {
    use nvmirror_nvme::spec::admin::DiscoveryLogEntry;
    use nvmirror_nvme::spec::fabrics::{connect_sqe, property, CNTLID_DYNAMIC, DISCOVERY_NQN};
    use nvmirror_nvme::spec::wire::nul_padded_str;

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = serve(dir.path(), legs(dir.path()), (1, 0xffef));
    let ports = listeners(&server);
    let mut d = Host::connect(ports[1]);
    d.icreq(false, false);
    let c = d.fabrics_connect(0, 31, 0, DISCOVERY_NQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success());
    assert!(d.prop_set(property::CC, 0x46_0001).is_success());
    let (c, page) = d.admin(0x02, 0, 0x70 | ((3 * 1024 / 4 - 1) << 16), 0, 3 * 1024);
    assert!(c.status().is_success());
    assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), 2);
    for (k, port) in ports.iter().enumerate() {
        let e = DiscoveryLogEntry::read_from(&page[1024 * (k + 1)..]);
        assert_eq!(nul_padded_str(&e.subnqn), Some(NQN));
        assert_eq!(e.portid as usize, k + 1);
        assert_eq!(
            nul_padded_str(&e.trsvcid),
            Some(port.port().to_string().as_str())
        );
    }

    // An I/O queue of the controller on port 0 cannot connect through port 1.
    let (mut admin, _io, cntlid) = Host::bring_up_as(ports[0], NQN, HOSTNQN, HOSTID);
    // Number of Queues: four I/O queues.
    let (c, _) = admin.admin(0x09, 0, 0x07, 0x0003_0003, 0);
    assert!(c.status().is_success());
    let mut io = Host::connect(ports[1]);
    io.icreq(false, false);
    let cid = io.cid();
    let data = Host::connect_data_as(NQN, HOSTNQN, HOSTID, cntlid);
    let c = io.run(connect_sqe(cid, 2, 31, 0), &data, true, 0).0;
    assert!(
        !c.status().is_success(),
        "I/O queue on another port accepted"
    );
    let mut io = Host::connect(ports[0]);
    io.icreq(false, false);
    let cid = io.cid();
    let c = io.run(connect_sqe(cid, 2, 31, 0), &data, true, 0).0;
    assert!(c.status().is_success(), "on its own port: {}", c.status());
}
