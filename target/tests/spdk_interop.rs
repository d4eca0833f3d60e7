//! What SPDK's initiator and tools (`spdk_nvme_perf`, `spdk_nvme_identify`, the `abort`
//! example) need of the target: an empty host NQN, the mandatory features, the SMART /
//! Health page and Abort as the spec defines it.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::{start, Host, Received, HOSTNQN, SUBNQN};
use nvmirror_nvme::spec::admin::{cns, log_page};
use nvmirror_nvme::spec::fabrics::{property, status as fstatus, ConnectParam, CNTLID_DYNAMIC};
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

/// Everything the target logs in this test binary, for the tests that check a log line.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needle: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&log().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// ICReq, admin Connect with `hostnqn`, CC.EN = 1. Returns the host and the completion.
fn admin_queue(addr: std::net::SocketAddr, hostnqn: &str) -> (Host, u16) {
    let mut h = Host::connect(addr);
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, hostnqn, CNTLID_DYNAMIC);
    assert!(c.status().is_success(), "admin connect: {}", c.status());
    assert!(h.prop_set(property::CC, 0x46_0001).is_success());
    (h, c.dw0 as u16)
}

#[test]
fn empty_host_nqn_is_accepted_where_any_host_may_connect() {
    let t = start(|_| {});
    let (_admin, cntlid) = admin_queue(t.addr, "");
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 63, 0, SUBNQN, "", cntlid);
    assert!(c.status().is_success(), "I/O connect: {}", c.status());
    let data = common::pattern(4096, 7);
    assert!(io.write(1, 8, &data, 512, true).is_success());
    let (st, back) = io.read(1, 8, 8, 512);
    assert!(st.is_success());
    assert_eq!(back, data);
    // The I/O queue must name the same (empty) host as its controller.
    let mut other = Host::connect(t.addr);
    other.icreq(false, false);
    let c = other.fabrics_connect(2, 63, 0, SUBNQN, HOSTNQN, cntlid);
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(c.dw0, ConnectParam::HOSTNQN.dw0());
}

#[test]
fn refused_connects_are_logged_with_peer_subsystem_host_and_reason() {
    log();
    let t = start(|c| c.subsystems[0].allowed_hosts = vec![HOSTNQN.into()]);
    // Empty host NQN where hosts are listed: Connect Invalid Parameters, host NQN field.
    let mut h = Host::connect(t.addr);
    h.icreq(false, false);
    let peer = h.sock.local_addr().unwrap().to_string();
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, "", CNTLID_DYNAMIC);
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(c.dw0, ConnectParam::HOSTNQN.dw0(), "IATTR data, IPO 512");
    // A host not on the list: Connect Invalid Host.
    let mut h2 = Host::connect(t.addr);
    h2.icreq(false, false);
    let peer2 = h2.sock.local_addr().unwrap().to_string();
    let c = h2.fabrics_connect(
        0,
        31,
        0,
        SUBNQN,
        "nqn.2014-08.org.example:stranger",
        CNTLID_DYNAMIC,
    );
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_HOST.with_dnr());
    // An unknown subsystem.
    let mut h3 = Host::connect(t.addr);
    h3.icreq(false, false);
    let c = h3.fabrics_connect(
        0,
        31,
        0,
        "nqn.2024-01.io.nvmirror:nope",
        HOSTNQN,
        CNTLID_DYNAMIC,
    );
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(c.dw0, ConnectParam::SUBNQN.dw0());
    // The listed host still connects; a second Connect on its queue is refused too.
    let (mut ok, _) = admin_queue(t.addr, HOSTNQN);
    let c = ok.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert_eq!(c.status(), Status::COMMAND_SEQUENCE_ERROR);

    let lines = log_lines_with("Connect refused");
    let find = |peer: &str, what: &str| {
        lines
            .iter()
            .find(|l| l.contains(peer) && l.contains(what))
            .unwrap_or_else(|| panic!("no refusal line for {peer} with '{what}' in {lines:#?}"))
            .clone()
    };
    let l = find(&peer, "empty host NQN");
    assert!(l.contains("WARN"), "{l}");
    assert!(l.contains(SUBNQN), "{l}");
    let l = find(&peer2, "allowed hosts");
    assert!(l.contains("stranger") && l.contains(SUBNQN), "{l}");
    find(
        &h3.sock.local_addr().unwrap().to_string(),
        "no such subsystem",
    );
}

fn get_feature(h: &mut Host, fid: u8, cdw11: u32) -> (Status, u32) {
    let (c, _) = h.admin(0x0a, 0, u32::from(fid), cdw11, 0);
    (c.status(), c.dw0)
}

fn set_feature(h: &mut Host, fid: u8, cdw11: u32) -> Status {
    h.admin(0x09, 0, u32::from(fid), cdw11, 0).0.status()
}

fn smart_log(h: &mut Host) -> Vec<u8> {
    let numd = 512 / 4 - 1;
    let (c, d) = h.admin(
        0x02,
        0xffff_ffff,
        u32::from(log_page::SMART) | (numd << 16),
        0,
        512,
    );
    assert!(c.status().is_success(), "SMART log: {}", c.status());
    assert_eq!(d.len(), 512);
    d
}

#[test]
fn mandatory_features_answer_and_keep_their_values_per_controller() {
    let t = start(|_| {});
    let (mut h, _) = Host::bring_up_admin(t.addr, false, false, 0);
    let invalid = Status::INVALID_FIELD.with_dnr();
    // Arbitration: round robin, burst 1 by default; a set value is kept.
    assert_eq!(get_feature(&mut h, 0x01, 0), (Status::SUCCESS, 0));
    assert!(set_feature(&mut h, 0x01, 0x0403_0203).is_success());
    assert_eq!(get_feature(&mut h, 0x01, 0), (Status::SUCCESS, 0x0403_0203));
    // Power Management: power state 0 only.
    assert_eq!(get_feature(&mut h, 0x02, 0), (Status::SUCCESS, 0));
    assert_eq!(set_feature(&mut h, 0x02, 1), invalid);
    assert!(
        set_feature(&mut h, 0x02, 0x20).is_success(),
        "workload hint"
    );
    assert_eq!(get_feature(&mut h, 0x02, 0), (Status::SUCCESS, 0x20));
    // Temperature Threshold: composite sensor, over 85 °C and under 0 K by default.
    assert_eq!(get_feature(&mut h, 0x04, 0), (Status::SUCCESS, 358));
    assert_eq!(
        get_feature(&mut h, 0x04, 1 << 20),
        (Status::SUCCESS, 1 << 20),
        "under-temperature threshold, THSEL echoed"
    );
    assert_eq!(
        get_feature(&mut h, 0x04, 1 << 16).0,
        invalid,
        "sensor 1 is absent"
    );
    assert_eq!(
        get_feature(&mut h, 0x04, 2 << 20).0,
        invalid,
        "THSEL 2 is reserved"
    );
    // SMART / Health: 298 K, no warning; crossing the over threshold raises bit 1.
    let d = smart_log(&mut h);
    assert_eq!(
        u16::from_le_bytes([d[1], d[2]]),
        298,
        "composite temperature in K"
    );
    assert_eq!(d[0], 0, "critical warning");
    assert_eq!(d[3], 100, "available spare");
    assert!(set_feature(&mut h, 0x04, 290).is_success());
    assert_eq!(get_feature(&mut h, 0x04, 0), (Status::SUCCESS, 290));
    assert_eq!(smart_log(&mut h)[0] & 2, 2, "temperature warning");
    assert!(
        set_feature(&mut h, 0x04, (0xf << 16) | 400).is_success(),
        "all sensors"
    );
    assert_eq!(get_feature(&mut h, 0x04, 0), (Status::SUCCESS, 400));
    assert_eq!(smart_log(&mut h)[0], 0);
    // Error Recovery: TLER kept, DULBE refused.
    assert_eq!(get_feature(&mut h, 0x05, 0), (Status::SUCCESS, 0));
    assert!(set_feature(&mut h, 0x05, 30).is_success());
    assert_eq!(get_feature(&mut h, 0x05, 0), (Status::SUCCESS, 30));
    assert_eq!(set_feature(&mut h, 0x05, 1 << 16), invalid);
    // Identify reports the warning and critical temperatures.
    let (_, id) = h.identify(cns::CONTROLLER, 0);
    assert_eq!(u16::from_le_bytes([id[266], id[267]]), 358, "WCTEMP");
    assert_eq!(u16::from_le_bytes([id[268], id[269]]), 368, "CCTEMP");
    // Another controller starts from the defaults.
    let (mut h2, _) = Host::bring_up_admin(t.addr, false, false, 0);
    assert_eq!(get_feature(&mut h2, 0x01, 0), (Status::SUCCESS, 0));
    assert_eq!(get_feature(&mut h2, 0x04, 0), (Status::SUCCESS, 358));
    assert_eq!(get_feature(&mut h2, 0x05, 0), (Status::SUCCESS, 0));
}

fn abort(h: &mut Host, sqid: u16, cid: u16) -> SubmissionQueueEntry {
    let sqe = SubmissionQueueEntry {
        opcode: 0x08,
        cid: h.cid(),
        cdw10: u32::from(sqid) | (u32::from(cid) << 16),
        ..Default::default()
    };
    h.send_cmd(sqe, &[], true, 0);
    sqe
}

#[test]
fn abort_aborts_a_held_event_request_and_reports_others_not_aborted() {
    let t = start(|_| {});
    let (mut h, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let aer = SubmissionQueueEntry {
        opcode: 0x0c,
        cid: 900,
        ..Default::default()
    };
    h.send_cmd(aer, &[], true, 0);
    // Not outstanding: success, DW0 bit 0 = 1 (not aborted).
    let a = abort(&mut h, 0, 901);
    let (c, _) = h.finish(a.cid, &[]);
    assert!(c.status().is_success());
    assert_eq!(c.dw0 & 1, 1);
    // An I/O queue's command that already completed, and a queue that does not exist.
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    assert!(io.write(1, 0, &[1u8; 512], 512, true).is_success());
    for sqid in [1, 7] {
        let a = abort(&mut h, sqid, 1);
        let (c, _) = h.finish(a.cid, &[]);
        assert!(c.status().is_success(), "sqid {sqid}: {}", c.status());
        assert_eq!(c.dw0 & 1, 1, "sqid {sqid}");
    }
    // The held AER: it completes with Command Abort Requested, the Abort with DW0 bit 0 = 0.
    let a = abort(&mut h, 0, 900);
    let mut aer_done = None;
    let mut abort_done = None;
    while abort_done.is_none() || aer_done.is_none() {
        match h.recv() {
            Received::Resp(c) if c.cid == 900 => aer_done = Some(c),
            Received::Resp(c) if c.cid == a.cid => abort_done = Some(c),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (aer_c, abort_c) = (aer_done.unwrap(), abort_done.unwrap());
    assert_eq!(aer_c.status(), Status::ABORT_REQUESTED);
    assert!(abort_c.status().is_success());
    assert_eq!(abort_c.dw0 & 1, 0, "aborted");
    // Its AER slot is free again: four more can be held (AERL + 1 = 4).
    for cid in 910..914 {
        let aer = SubmissionQueueEntry {
            opcode: 0x0c,
            cid,
            ..Default::default()
        };
        h.send_cmd(aer, &[], true, 0);
    }
    let (c, _) = h.admin(0x18, 0, 0, 0, 0);
    assert!(c.status().is_success(), "keep alive after four held AERs");
    // The same CID again: nothing left to abort.
    let a = abort(&mut h, 0, 900);
    let (c, _) = h.finish(a.cid, &[]);
    assert_eq!(c.dw0 & 1, 1);
}
