//! Controller bring-up over the admin queue (NVMe-oF 1.1 §3.3, Base §3.5.1 "Controller
//! Initialization"): Connect, CAP/VS, CC.EN, CSTS.RDY, Identify Controller and Namespace,
//! Number of Queues — and the Connect of each I/O queue. Every failure names its step.

use std::time::{Duration, Instant};

use super::auth;
use super::control::{ControlConn, Peer, COMMAND_TIMEOUT};
use super::NvmeTcpOptions;
use crate::spec::admin::{
    cns, cntrltype, feature, AdminOpcode, IdentifyController, IdentifyNamespace, IDENTIFY_LEN,
};
use crate::spec::auth::{CONNECT_AUTHREQ_ASCR, CONNECT_AUTHREQ_ATR};
use crate::spec::fabrics::{
    connect_sqe, property, property_get_sqe, property_set_sqe, ConnectData, CNTLID_DYNAMIC,
};
use crate::spec::status::StatusCodeType;
use crate::spec::wire::put_nul_padded;
use crate::spec::{CompletionQueueEntry, Geometry, Status, SubmissionQueueEntry};
use crate::Result;

/// Admin queue entries (SQSIZE 31), as Linux hosts use.
const ADMIN_QUEUE_SIZE: u16 = 32;
/// I/O queues asked for with Set Features Number of Queues.
const REQUESTED_IO_QUEUES: u32 = 64;
/// Largest transfer of one command this initiator does, whatever MDTS allows: it bounds the
/// receive buffer, which must hold a whole C2HData PDU.
pub(super) const MAX_TRANSFER_CAP: u32 = 1 << 20;
/// Largest in-capsule data used for writes, whatever IOCCSZ allows.
const MAX_IN_CAPSULE_CAP: u32 = 64 * 1024;
/// I/O command set entry sizes for CC (Base §3.1.3.5): 64-byte SQEs, 16-byte CQEs.
const CC_IOSQES_IOCQES: u32 = (6 << 16) | (4 << 20);
/// CC.SHN: normal shutdown.
const CC_SHN_NORMAL: u32 = 1 << property::CC_SHN_SHIFT;

/// What the controller told us during bring-up.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// Controller ID the admin Connect returned.
    pub cntlid: u16,
    /// VS property.
    pub version: u32,
    /// Entries an I/O queue may have (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Commands outstanding per queue the controller allows (MAXCMD; 0: not reported).
    pub maxcmd: u16,
    /// In-capsule data an I/O write may carry, in bytes (from IOCCSZ; 0: none).
    pub in_capsule: u32,
    /// Largest transfer of one command, in bytes (from MDTS, capped at 1 MiB).
    pub max_transfer: u32,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues: u16,
    /// Model and serial number (trimmed).
    pub model: String,
    pub serial: String,
    /// Identify Controller VWC bit 0: the controller has a volatile write cache.
    pub volatile_cache: bool,
    /// CC as written to enable the controller (for the shutdown notification).
    pub(super) cc: u32,
}

/// The 1024-byte Connect data.
pub(super) fn connect_data(
    subnqn: &str,
    hostnqn: &str,
    hostid: [u8; 16],
    cntlid: u16,
) -> [u8; ConnectData::SIZE] {
    let mut d = ConnectData::zeroed();
    d.hostid = hostid;
    d.cntlid = cntlid;
    put_nul_padded(&mut d.subnqn, subnqn);
    put_nul_padded(&mut d.hostnqn, hostnqn);
    let mut b = [0u8; ConnectData::SIZE];
    d.write_to(&mut b);
    b
}

/// Why a Connect failed, in words (NVMe-oF §3.3 "Connect Response").
pub(super) fn connect_failure(st: Status, dw0: u32, subnqn: &str, hostnqn: &str) -> String {
    if st.sct() != StatusCodeType::CommandSpecific {
        return format!("NVMe status {st}");
    }
    let code = format!("sct 0x1, sc {:#04x}", st.sc());
    match st.sc() {
        0x80 => format!("incompatible format ({code})"),
        0x81 => format!("controller busy ({code})"),
        0x82 => {
            let data = dw0 & (1 << 16) != 0;
            let what = match (data, dw0 & 0xffff) {
                (true, 16) => "controller ID".to_string(),
                (true, 256) => format!("subsystem NQN '{subnqn}' (not exported there?)"),
                (true, 512) => format!("host NQN '{hostnqn}'"),
                (false, 40) => "record format".into(),
                (false, 42) => "queue ID".into(),
                (false, 44) => "queue size (SQSIZE)".into(),
                (d, off) => format!(
                    "the field at byte {off} of the Connect {}",
                    if d { "data" } else { "command" }
                ),
            };
            format!("invalid Connect parameter: {what} ({code})")
        }
        0x83 => format!("restart discovery ({code})"),
        0x84 => format!(
            "invalid host: the target does not allow host NQN '{hostnqn}' on '{subnqn}' ({code})"
        ),
        0x85 => format!("invalid queue type ({code})"),
        _ => format!("NVMe status {st}"),
    }
}

/// Runs a command with no data out and checks its status.
fn admin_cmd(
    conn: &mut ControlConn,
    step: &str,
    sqe: SubmissionQueueEntry,
    data_in: usize,
    timeout: Duration,
) -> Result<(CompletionQueueEntry, Vec<u8>)> {
    let (c, data) = conn.command(step, sqe, &[], data_in, timeout)?;
    if !c.status().is_success() {
        return Err(conn.peer.err(step, format!("NVMe status {}", c.status())));
    }
    Ok((c, data))
}

fn prop_get(conn: &mut ControlConn, step: &str, offset: u32, size: u32) -> Result<u64> {
    let (c, _) = admin_cmd(
        conn,
        step,
        property_get_sqe(0, offset, size),
        0,
        COMMAND_TIMEOUT,
    )?;
    Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
}

pub(super) fn prop_set(
    conn: &mut ControlConn,
    step: &str,
    offset: u32,
    value: u32,
    timeout: Duration,
) -> Result<()> {
    let sqe = property_set_sqe(0, offset, 4, u64::from(value));
    admin_cmd(conn, step, sqe, 0, timeout).map(|_| ())
}

fn identify(conn: &mut ControlConn, step: &str, cns: u8, nsid: u32) -> Result<Vec<u8>> {
    let sqe = SubmissionQueueEntry {
        opcode: AdminOpcode::Identify as u8,
        nsid,
        cdw10: u32::from(cns),
        ..Default::default()
    };
    let (_, page) = admin_cmd(conn, step, sqe, IDENTIFY_LEN, COMMAND_TIMEOUT)?;
    if page.len() != IDENTIFY_LEN {
        return Err(conn.peer.err(
            step,
            format!(
                "{} bytes of Identify data, expected {IDENTIFY_LEN}",
                page.len()
            ),
        ));
    }
    Ok(page)
}

/// Connects the admin queue and brings the controller up; returns the admin connection
/// (for keep-alive), what the controller reported and the namespace geometry.
pub(super) fn bring_up(
    peers: &[Peer],
    opts: &NvmeTcpOptions,
    hostnqn: &str,
    hostid: [u8; 16],
) -> Result<(ControlConn, ControllerInfo, Geometry)> {
    let mut conn = ControlConn::open(peers, opts.hdgst, opts.ddgst, "admin queue")?;

    let step = "admin Connect";
    let kato_ms = opts.kato.as_millis().min(u128::from(u32::MAX)) as u32;
    let sqe = connect_sqe(0, 0, ADMIN_QUEUE_SIZE - 1, kato_ms);
    let data = connect_data(&opts.subnqn, hostnqn, hostid, CNTLID_DYNAMIC);
    let (c, _) = conn.command(step, sqe, &data, 0, COMMAND_TIMEOUT)?;
    if !c.status().is_success() {
        let why = connect_failure(c.status(), c.dw0, &opts.subnqn, hostnqn);
        return Err(conn.peer.err(step, why));
    }
    let cntlid = c.dw0 as u16;
    authenticate_if_asked(&mut conn, opts, hostnqn, "admin queue", 0, c.dw0)?;

    let cap = prop_get(&mut conn, "Property Get CAP", property::CAP, 8)?;
    let version = prop_get(&mut conn, "Property Get VS", property::VS, 4)? as u32;
    if cap & property::CAP_CSS_NVM == 0 {
        return Err(conn.peer.err(
            "Property Get CAP",
            "the controller does not support the NVM command set (CAP.CSS)",
        ));
    }
    let mpsmin = ((cap >> property::CAP_MPSMIN_SHIFT) & 0xf) as u32;
    let max_queue_entries = (cap & 0xffff) as u32 + 1;
    let ready_timeout = Duration::from_millis(500 * ((cap >> property::CAP_TO_SHIFT) & 0xff))
        .max(Duration::from_secs(1));

    let cc = property::CC_EN | CC_IOSQES_IOCQES | (mpsmin << 7);
    prop_set(
        &mut conn,
        "Property Set CC.EN=1",
        property::CC,
        cc,
        COMMAND_TIMEOUT,
    )?;
    wait_ready(&mut conn, ready_timeout)?;

    let step = "Identify Controller";
    let id = IdentifyController::read_from(&identify(&mut conn, step, cns::CONTROLLER, 0)?);
    if id.cntrltype == cntrltype::DISCOVERY {
        return Err(conn.peer.err(
            step,
            "this NQN names a discovery controller, not an I/O controller",
        ));
    }
    let in_capsule = if id.icdoff != 0 || id.ioccsz < 4 {
        0
    } else {
        (id.ioccsz * 16 - 64).min(MAX_IN_CAPSULE_CAP)
    };
    let page = 4096u64 << mpsmin;
    let max_transfer = match id.mdts {
        0 => MAX_TRANSFER_CAP,
        m if m >= 20 => MAX_TRANSFER_CAP,
        m => (page << m).min(u64::from(MAX_TRANSFER_CAP)) as u32,
    };

    let geo = identify_namespace(&mut conn, opts.nsid)?;

    let step = "Set Features Number of Queues";
    let n = REQUESTED_IO_QUEUES - 1;
    let sqe = SubmissionQueueEntry {
        opcode: AdminOpcode::SetFeatures as u8,
        cdw10: u32::from(feature::NUMBER_OF_QUEUES),
        cdw11: n | (n << 16),
        ..Default::default()
    };
    let (c, _) = admin_cmd(&mut conn, step, sqe, 0, COMMAND_TIMEOUT)?;
    let io_queues = ((c.dw0 & 0xffff).min(c.dw0 >> 16) + 1).min(0xffff) as u16;

    let info = ControllerInfo {
        cntlid,
        version,
        max_queue_entries,
        maxcmd: id.maxcmd,
        in_capsule,
        max_transfer,
        io_queues,
        model: String::from_utf8_lossy(&id.mn).trim().to_string(),
        serial: String::from_utf8_lossy(&id.sn).trim().to_string(),
        volatile_cache: id.vwc & 1 != 0,
        cc,
    };
    Ok((conn, info, geo))
}

/// Polls CSTS until RDY (or CFS, or the CAP.TO timeout).
fn wait_ready(conn: &mut ControlConn, timeout: Duration) -> Result<()> {
    let step = "wait for CSTS.RDY";
    let start = Instant::now();
    loop {
        let csts = prop_get(conn, step, property::CSTS, 4)? as u32;
        if csts & property::CSTS_CFS != 0 {
            return Err(conn
                .peer
                .err(step, "the controller reports a fatal status (CSTS.CFS)"));
        }
        if csts & property::CSTS_RDY != 0 {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(conn.peer.err(
                step,
                format!("not ready after {timeout:?} (CAP.TO); CSTS = {csts:#x}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Identify Namespace `nsid` → geometry; refuses inactive namespaces and formats with
/// metadata or block sizes other than 512 and 4096 bytes.
fn identify_namespace(conn: &mut ControlConn, nsid: u32) -> Result<Geometry> {
    let step = format!("Identify Namespace {nsid}");
    let ns = IdentifyNamespace::read_from(&identify(conn, &step, cns::NAMESPACE, nsid)?);
    geometry_of(&ns).map_err(|why| conn.peer.err(&step, why))
}

/// The geometry an Identify Namespace page describes, or why it cannot be used.
pub(super) fn geometry_of(ns: &IdentifyNamespace) -> std::result::Result<Geometry, String> {
    if ns.nsze == 0 {
        return Err("the namespace is not active (NSZE 0)".into());
    }
    let index = usize::from(ns.flbas & 0xf) | (usize::from((ns.flbas >> 5) & 3) << 4);
    if index > usize::from(ns.nlbaf) {
        return Err(format!(
            "FLBAS selects LBA format {index}, but only {} exist",
            usize::from(ns.nlbaf) + 1
        ));
    }
    let lbaf = ns.lbaf[index];
    let ms = lbaf & 0xffff;
    let lbads = (lbaf >> 16) & 0xff;
    if ms != 0 {
        return Err(format!(
            "LBA format {index} carries {ms} bytes of metadata per block; \
             formats with metadata are not supported"
        ));
    }
    if lbads != 9 && lbads != 12 {
        return Err(format!(
            "LBA format {index} has 2^{lbads}-byte blocks; only 512 and 4096 are supported"
        ));
    }
    Ok(Geometry {
        lba_size: 1 << lbads,
        num_blocks: ns.nsze,
    })
}

/// The outcome of an I/O queue Connect the controller answered.
#[derive(Debug)]
pub(super) enum IoQueueConnect {
    Connected(ControlConn),
    /// The controller rejected the queue ID: a queue that is still closing on its side may
    /// hold it.
    QidBusy(crate::Error),
}

/// Connects I/O queue `qid` of `size` entries to controller `cntlid`.
pub(super) fn connect_io_queue(
    peer: &Peer,
    opts: &NvmeTcpOptions,
    ids: (&str, [u8; 16]),
    cntlid: u16,
    qid: u16,
    size: u32,
) -> Result<IoQueueConnect> {
    let (hostnqn, hostid) = ids;
    let what = format!("I/O queue {qid}");
    let mut conn = ControlConn::open(std::slice::from_ref(peer), opts.hdgst, opts.ddgst, &what)?;
    let step = format!("{what} Connect");
    let sqe = connect_sqe(0, qid, (size - 1) as u16, 0);
    let data = connect_data(&opts.subnqn, hostnqn, hostid, cntlid);
    let (c, _) = conn.command(&step, sqe, &data, 0, COMMAND_TIMEOUT)?;
    if !c.status().is_success() {
        let why = connect_failure(c.status(), c.dw0, &opts.subnqn, hostnqn);
        let err = conn.peer.err(&step, why);
        if is_qid_in_use(c.status(), c.dw0) {
            return Ok(IoQueueConnect::QidBusy(err));
        }
        return Err(err);
    }
    authenticate_if_asked(&mut conn, opts, hostnqn, &what, qid, c.dw0)?;
    Ok(IoQueueConnect::Connected(conn))
}

/// Authenticates the queue when its Connect response set ATR (Connect DW0 bit 17). A host
/// that must check the controller (a controller secret is set) refuses a controller that does
/// not ask, and secure channel concatenation (ASCR) is refused: it needs TLS.
fn authenticate_if_asked(
    conn: &mut ControlConn,
    opts: &NvmeTcpOptions,
    hostnqn: &str,
    what: &str,
    qid: u16,
    dw0: u32,
) -> Result<()> {
    let step = format!("{what} DH-HMAC-CHAP");
    if dw0 & CONNECT_AUTHREQ_ASCR != 0 {
        return Err(conn.peer.err(
            &step,
            "the target requires secure channel concatenation (TLS), which is not supported",
        ));
    }
    if dw0 & CONNECT_AUTHREQ_ATR == 0 {
        if opts.dhchap.as_ref().is_some_and(|k| k.ctrl.is_some()) {
            return Err(conn.peer.err(
                &step,
                "dhchap_ctrl_secret_file is set but the target did not ask to authenticate, \
                 so it cannot prove the controller secret",
            ));
        }
        return Ok(());
    }
    let q = auth::Queue {
        what,
        hostnqn,
        subnqn: &opts.subnqn,
        tid: qid,
    };
    auth::authenticate(conn, &q, opts.dhchap.as_ref())
}

/// Tells the controller the host is going away (CC.SHN = normal) and waits briefly for
/// CSTS.SHST; best effort.
pub(super) fn shutdown(conn: &mut ControlConn, cc: u32) {
    let t = Duration::from_secs(1);
    if prop_set(conn, "shutdown", property::CC, cc | CC_SHN_NORMAL, t).is_err() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < t {
        match prop_get(conn, "shutdown", property::CSTS, 4) {
            Ok(csts) if csts as u32 & property::CSTS_SHST_MASK == property::SHST_COMPLETE => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return,
        }
    }
}

/// True when a failed Connect rejected the queue ID (it may still be held by a queue that
/// is closing on the target side).
fn is_qid_in_use(st: Status, dw0: u32) -> bool {
    st.sct() == StatusCodeType::CommandSpecific && st.sc() == 0x82 && dw0 == 42
}
