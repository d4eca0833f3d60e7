//! Fabrics commands (NVMe-oF 1.1 §3.3): Connect, Property Get/Set, Disconnect.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nvmirror_nvme::spec::auth::CONNECT_AUTHREQ_ATR;
use nvmirror_nvme::spec::fabrics::{
    property, status as fstatus, ConnectCommand, ConnectData, ConnectParam, FabricsCommandType,
    PropertyGetCommand, PropertySetCommand, CNTLID_DYNAMIC, NQN_MAX_LEN,
};
use nvmirror_nvme::spec::wire::nul_padded_str;
use nvmirror_nvme::spec::Status;

use super::admin::AdminState;
use super::connection::{Connection, Phase};
use super::request::SlotTable;
use super::subsystem::SubsystemRef;
use super::ADMIN_IN_CAPSULE;

/// Controller timeout advertised in CAP.TO, in 500 ms units.
const CAP_TO: u64 = 30;

/// Runs the fabrics command in slot `i`; the caller completes it.
pub(super) fn execute(conn: &mut Connection, i: u16, now: Instant) {
    let sqe = conn.slots.slots[usize::from(i)].sqe;
    let fctype = FabricsCommandType::from_u8(FabricsCommandType::of(&sqe));
    let result = match (fctype, conn.phase) {
        (Some(FabricsCommandType::Connect), Phase::AwaitConnect) => {
            connect(conn, i, now).map_err(|r| refuse_connect(conn, i, r))
        }
        (Some(FabricsCommandType::Connect), _) => Err(refuse_connect(
            conn,
            i,
            refused(
                Status::COMMAND_SEQUENCE_ERROR,
                0,
                "the queue is connected already",
            ),
        )),
        (Some(FabricsCommandType::AuthenticationSend), Phase::Admin | Phase::Io) => {
            super::auth::auth_send(conn, i)
        }
        (Some(FabricsCommandType::AuthenticationReceive), Phase::Admin | Phase::Io) => {
            super::auth::auth_receive(conn, i)
        }
        (Some(FabricsCommandType::PropertyGet | FabricsCommandType::PropertySet), _)
            if !conn.authenticated() =>
        {
            Err((fstatus::AUTHENTICATION_REQUIRED, 0))
        }
        (Some(FabricsCommandType::PropertyGet), Phase::Admin) => {
            property_get(conn, &PropertyGetCommand::from_sqe(&sqe))
        }
        (Some(FabricsCommandType::PropertySet), Phase::Admin) => {
            property_set(conn, &PropertySetCommand::from_sqe(&sqe)).map(|()| 0)
        }
        (Some(FabricsCommandType::Disconnect), Phase::Admin | Phase::Io) => {
            conn.close_after_flush = true;
            Ok(0)
        }
        (Some(_), _) => Err((Status::INVALID_FIELD, 0)),
        (None, _) => Err((Status::INVALID_OPCODE, 0)),
    };
    if let Some(a) = conn.admin.as_mut() {
        a.touch(now);
    }
    let slot = &mut conn.slots.slots[usize::from(i)];
    match result {
        Ok(v) => {
            slot.dw0 = v as u32;
            slot.dw1 = (v >> 32) as u32;
        }
        Err((st, dw0)) => {
            slot.fail(st);
            slot.dw0 = dw0;
        }
    }
}

/// DW0 and DW1 of the completion (as one value), or the failure and its DW0.
type FabricsResult = Result<u64, (Status, u32)>;

/// Why a Connect was refused: the completion's status and DW0, and a reason for the log.
#[derive(Debug)]
struct Refusal {
    status: Status,
    dw0: u32,
    reason: &'static str,
}

fn refused(status: Status, dw0: u32, reason: &'static str) -> Refusal {
    Refusal {
        status,
        dw0,
        reason,
    }
}

/// Connect Invalid Parameters with the attributes of the offending field.
fn invalid(p: ConnectParam, reason: &'static str) -> Refusal {
    refused(
        fstatus::CONNECT_INVALID_PARAMETERS.with_dnr(),
        p.dw0(),
        reason,
    )
}

/// Logs a refused Connect with what the host asked for, and turns it into the completion.
fn refuse_connect(conn: &Connection, i: u16, r: Refusal) -> (Status, u32) {
    let slot = &conn.slots.slots[usize::from(i)];
    let (subnqn, hostnqn) = if slot.received >= ConnectData::SIZE as u32 {
        let data = ConnectData::read_from(slot.buf.as_slice());
        let s = |b: &[u8]| nul_padded_str(b).unwrap_or("<not a string>").to_string();
        (s(&data.subnqn), s(&data.hostnqn))
    } else {
        (String::new(), String::new())
    };
    let qid = ConnectCommand::from_sqe(&slot.sqe).qid;
    tracing::warn!(
        peer = %conn.peer,
        subsystem = %subnqn,
        host = %hostnqn,
        qid,
        status = %r.status,
        "Connect refused: {}",
        r.reason
    );
    (r.status, r.dw0)
}

fn connect(conn: &mut Connection, i: u16, now: Instant) -> Result<u64, Refusal> {
    let slot = &conn.slots.slots[usize::from(i)];
    let cmd = ConnectCommand::from_sqe(&slot.sqe);
    if slot.received < ConnectData::SIZE as u32 {
        return Err(refused(
            Status::DATA_SGL_LENGTH_INVALID.with_dnr(),
            0,
            "Connect data shorter than 1024 bytes",
        ));
    }
    let data = ConnectData::read_from(slot.buf.as_slice());
    if cmd.recfmt != 0 {
        return Err(refused(
            fstatus::INCOMPATIBLE_FORMAT.with_dnr(),
            0,
            "record format other than 0",
        ));
    }
    let subnqn = nul_padded_str(&data.subnqn)
        .filter(|s| !s.is_empty() && s.len() <= NQN_MAX_LEN)
        .ok_or(invalid(
            ConnectParam::SUBNQN,
            "subsystem NQN empty, unterminated or too long",
        ))?;
    // An empty host NQN is what SPDK's initiator sends by default: allowed where the
    // subsystem admits any host, refused where it lists hosts.
    let hostnqn = nul_padded_str(&data.hostnqn)
        .filter(|s| s.len() <= NQN_MAX_LEN)
        .ok_or(invalid(
            ConnectParam::HOSTNQN,
            "host NQN unterminated or too long",
        ))?
        .to_string();
    let shared = std::sync::Arc::clone(&conn.shared);
    let subsys = shared
        .find_subsystem(subnqn)
        .ok_or(invalid(ConnectParam::SUBNQN, "no such subsystem"))?;
    let mut auth_keys = None;
    if let Some(s) = shared.subsystem(subsys).as_deref() {
        auth_keys = s.host_secrets.get(&hostnqn).cloned();
        if hostnqn.is_empty() && !s.allows_any_host() {
            return Err(invalid(
                ConnectParam::HOSTNQN,
                "empty host NQN, and the subsystem admits only listed hosts",
            ));
        }
        if !s.allows(&hostnqn) {
            return Err(refused(
                fstatus::CONNECT_INVALID_HOST.with_dnr(),
                ConnectParam::HOSTNQN.dw0(),
                "host not in the subsystem's allowed hosts",
            ));
        }
    }
    let cfg = &shared.cfg;
    // An admin queue is bounded by ASQSZ (discovery log), an I/O queue by CAP.MQES.
    let (max_queue_size, limit) = if cmd.qid == 0 {
        (
            cfg.effective_max_admin_queue_size(),
            "admin queue size 1 or above the advertised maximum (ASQSZ)",
        )
    } else {
        (
            cfg.effective_max_queue_size(),
            "queue size 1 or above the advertised maximum (CAP.MQES)",
        )
    };
    if cmd.sqsize == 0 || u32::from(cmd.sqsize) >= u32::from(max_queue_size) {
        return Err(invalid(ConnectParam::SQSIZE, limit));
    }
    let size = cmd.sqsize + 1;
    let sqflow_disabled = cmd.cattr & ConnectCommand::CATTR_DISABLE_SQFLOW != 0;
    if cmd.qid == 0 {
        if data.cntlid != CNTLID_DYNAMIC {
            return Err(invalid(
                ConnectParam::CNTLID,
                "admin queue Connect without the dynamic controller ID",
            ));
        }
        let admin_slots = SlotTable::try_new(size, cfg.admin_transfer()).ok_or(refused(
            fstatus::CONTROLLER_BUSY,
            0,
            "cannot allocate the admin queue's buffers",
        ))?;
        let ctrl = shared
            .create_controller(subsys, &hostnqn, data.hostid, shared.port_of(conn.local))
            .ok_or(refused(
                fstatus::CONTROLLER_BUSY,
                0,
                "every controller ID is in use",
            ))?;
        let cntlid = ctrl.cntlid;
        tracing::info!(peer = %conn.peer, cntlid, subsystem = subnqn, host = %hostnqn, "admin queue connected");
        conn.queue.ctrl = Some(ctrl);
        conn.admin = Some(AdminState::new(
            (cmd.kato > 0).then(|| Duration::from_millis(u64::from(cmd.kato))),
            now,
        ));
        conn.phase = Phase::Admin;
        conn.set_max_icdata(ADMIN_IN_CAPSULE);
        conn.next_slots = Some(admin_slots);
        conn.reserve_lists(size);
        conn.queue.size = size;
        conn.queue.sq_head = 1 % size;
        conn.queue.sqflow_disabled = sqflow_disabled;
        return Ok(require_auth(conn, auth_keys, &hostnqn, subnqn, cntlid));
    }
    let ctrl = shared
        .controller(data.cntlid)
        .ok_or(invalid(ConnectParam::CNTLID, "no such controller"))?;
    if ctrl.subsys != subsys {
        return Err(invalid(
            ConnectParam::SUBNQN,
            "controller belongs to another subsystem",
        ));
    }
    if ctrl.hostnqn != hostnqn {
        return Err(invalid(
            ConnectParam::HOSTNQN,
            "controller belongs to another host",
        ));
    }
    if shared.port_of(conn.local) != ctrl.port {
        return Err(invalid(
            ConnectParam::CNTLID,
            "controller belongs to another port",
        ));
    }
    if subsys == SubsystemRef::Discovery {
        return Err(invalid(
            ConnectParam::QID,
            "discovery controllers have no I/O queues",
        ));
    }
    if !ctrl.enabled.load(Ordering::Acquire) {
        return Err(refused(
            Status::COMMAND_SEQUENCE_ERROR,
            0,
            "controller not enabled (CC.EN = 0)",
        ));
    }
    if cmd.qid > ctrl.io_queues.load(Ordering::Acquire) || !ctrl.claim_queue(cmd.qid) {
        return Err(invalid(
            ConnectParam::QID,
            "queue ID not granted or already connected",
        ));
    }
    // The per-connection buffer budget bounds size x MDTS (CAP.MQES is advertised from it).
    let Some(io_slots) = SlotTable::try_new(size, cfg.max_transfer()) else {
        ctrl.release_queue(cmd.qid);
        return Err(refused(
            fstatus::CONTROLLER_BUSY,
            0,
            "cannot allocate the I/O queue's buffers",
        ));
    };
    let namespaces = &ctrl.subsystem().expect("NVM subsystem").namespaces;
    let mut qpairs = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        // A removed namespace's slot keeps its index with a queue pair that is never used
        // (its commands fail with Invalid Namespace before they reach it).
        let Some(ns) = ns.as_ref().filter(|n| !n.is_removed()) else {
            match nvmirror_nvme::backend::NullDevice::new(4096, 512)
                .and_then(|d| nvmirror_nvme::BlockDevice::open_qpair(&d, 2))
            {
                Ok(q) => qpairs.push(q),
                Err(e) => {
                    tracing::error!("cannot open a placeholder queue pair: {e}");
                    ctrl.release_queue(cmd.qid);
                    return Err(refused(
                        Status::INTERNAL_ERROR,
                        0,
                        "cannot open a placeholder queue pair",
                    ));
                }
            }
            continue;
        };
        match ns.dev.open_qpair(u32::from(size)) {
            Ok(q) => qpairs.push(q),
            Err(e) => {
                tracing::error!(device = ns.dev.name(), "cannot open a queue pair: {e}");
                ctrl.release_queue(cmd.qid);
                return Err(refused(
                    Status::INTERNAL_ERROR,
                    0,
                    "a namespace cannot open a queue pair",
                ));
            }
        }
    }
    tracing::debug!(peer = %conn.peer, cntlid = ctrl.cntlid, qid = cmd.qid, size, "I/O queue connected");
    conn.resv_access = vec![super::reservation::AccessCache::STALE; qpairs.len()];
    conn.qpairs = qpairs;
    conn.queue.ctrl = Some(ctrl);
    conn.queue.qid = cmd.qid;
    conn.queue.size = size;
    conn.queue.sq_head = 1 % size;
    conn.queue.sqflow_disabled = sqflow_disabled;
    conn.phase = Phase::Io;
    conn.set_max_icdata(cfg.in_capsule_data_size);
    conn.next_slots = Some(io_slots);
    conn.reserve_lists(size);
    Ok(require_auth(conn, auth_keys, &hostnqn, subnqn, data.cntlid))
}

/// Sets up authentication for a host with secrets: the Connect response's DW0 gets ATR.
fn require_auth(
    conn: &mut Connection,
    keys: Option<super::HostSecrets>,
    hostnqn: &str,
    subnqn: &str,
    cntlid: u16,
) -> u64 {
    let atr = if keys.is_some() {
        CONNECT_AUTHREQ_ATR
    } else {
        0
    };
    conn.auth = keys.map(|k| super::auth::QueueAuth::new(k, hostnqn, subnqn));
    u64::from(u32::from(cntlid) | atr)
}

/// CAP (Base §3.1.3.1).
fn cap(conn: &Connection) -> u64 {
    u64::from(conn.shared.cfg.effective_max_queue_size() - 1)
        | property::CAP_CQR
        | (CAP_TO << property::CAP_TO_SHIFT)
        | property::CAP_CSS_NVM
}

/// The version this target reports (VS).
pub(super) const VERSION: u32 = property::version(1, 3);

fn property_get(conn: &Connection, cmd: &PropertyGetCommand) -> FabricsResult {
    let a = conn.admin.as_ref().expect("admin queue");
    let (value, size) = match cmd.offset {
        property::CAP => (cap(conn), 8),
        property::VS => (u64::from(VERSION), 4),
        property::CC => (u64::from(a.cc), 4),
        property::CSTS => (u64::from(a.csts), 4),
        _ => return Err((Status::INVALID_FIELD.with_dnr(), 0)),
    };
    if size == 8 && cmd.size() == 8 {
        Ok(value)
    } else {
        // A 4-byte read returns the low half.
        Ok(value & 0xffff_ffff)
    }
}

fn property_set(conn: &mut Connection, cmd: &PropertySetCommand) -> Result<(), (Status, u32)> {
    if cmd.offset != property::CC || cmd.size() != 4 {
        return Err((Status::INVALID_FIELD.with_dnr(), 0));
    }
    let new = cmd.value as u32;
    let ctrl = conn
        .queue
        .ctrl
        .clone()
        .expect("admin queue has a controller");
    let a = conn.admin.as_mut().expect("admin queue");
    let was_enabled = a.cc & property::CC_EN != 0;
    let enable = new & property::CC_EN != 0;
    a.cc = new;
    if enable && !was_enabled {
        a.csts = (a.csts & !property::CSTS_SHST_MASK) | property::CSTS_RDY;
        ctrl.enabled.store(true, Ordering::Release);
    } else if !enable && was_enabled {
        // Controller reset: its I/O queues go away.
        a.csts &= !property::CSTS_RDY;
        ctrl.enabled.store(false, Ordering::Release);
    }
    if new & property::CC_SHN_MASK != 0 {
        a.csts = (a.csts & !property::CSTS_SHST_MASK) | property::SHST_COMPLETE;
    }
    Ok(())
}
