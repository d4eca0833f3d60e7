//! Fabrics commands (NVMe-oF 1.1 §3.3): Connect, Property Get/Set, Disconnect.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
        (Some(FabricsCommandType::Connect), Phase::AwaitConnect) => connect(conn, i, now),
        (Some(FabricsCommandType::Connect), _) => Err((Status::COMMAND_SEQUENCE_ERROR, 0)),
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

fn invalid(p: ConnectParam) -> (Status, u32) {
    (fstatus::CONNECT_INVALID_PARAMETERS.with_dnr(), p.dw0())
}

fn connect(conn: &mut Connection, i: u16, now: Instant) -> FabricsResult {
    let slot = &conn.slots.slots[usize::from(i)];
    let cmd = ConnectCommand::from_sqe(&slot.sqe);
    if slot.received < ConnectData::SIZE as u32 {
        return Err((Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0));
    }
    let data = ConnectData::read_from(slot.buf.as_slice());
    if cmd.recfmt != 0 {
        return Err((fstatus::INCOMPATIBLE_FORMAT.with_dnr(), 0));
    }
    let subnqn = nul_padded_str(&data.subnqn)
        .filter(|s| !s.is_empty() && s.len() <= NQN_MAX_LEN)
        .ok_or(invalid(ConnectParam::SUBNQN))?;
    let hostnqn = nul_padded_str(&data.hostnqn)
        .filter(|s| !s.is_empty() && s.len() <= NQN_MAX_LEN)
        .ok_or(invalid(ConnectParam::HOSTNQN))?
        .to_string();
    let shared = std::sync::Arc::clone(&conn.shared);
    let subsys = shared
        .find_subsystem(subnqn)
        .ok_or(invalid(ConnectParam::SUBNQN))?;
    if let Some(s) = shared.subsystem(subsys) {
        if !s.allows(&hostnqn) {
            tracing::warn!(peer = %conn.peer, host = %hostnqn, subsystem = %s.nqn, "host not allowed");
            return Err((
                fstatus::CONNECT_INVALID_HOST.with_dnr(),
                ConnectParam::HOSTNQN.dw0(),
            ));
        }
    }
    let cfg = &shared.cfg;
    if cmd.sqsize == 0 || u32::from(cmd.sqsize) >= u32::from(cfg.max_queue_size) {
        return Err(invalid(ConnectParam::SQSIZE));
    }
    let size = cmd.sqsize + 1;
    let sqflow_disabled = cmd.cattr & ConnectCommand::CATTR_DISABLE_SQFLOW != 0;
    if cmd.qid == 0 {
        if data.cntlid != CNTLID_DYNAMIC {
            return Err(invalid(ConnectParam::CNTLID));
        }
        let ctrl = shared
            .create_controller(subsys, &hostnqn)
            .ok_or((fstatus::CONTROLLER_BUSY, 0))?;
        let cntlid = ctrl.cntlid;
        tracing::info!(peer = %conn.peer, cntlid, subsystem = subnqn, host = %hostnqn, "admin queue connected");
        conn.queue.ctrl = Some(ctrl);
        conn.admin = Some(AdminState::new(
            (cmd.kato > 0).then(|| Duration::from_millis(u64::from(cmd.kato))),
            now,
        ));
        conn.phase = Phase::Admin;
        conn.set_max_icdata(ADMIN_IN_CAPSULE);
        conn.next_slots = Some(SlotTable::new(size, cfg.max_transfer()));
        conn.reserve_lists(size);
        conn.queue.size = size;
        conn.queue.sq_head = 1 % size;
        conn.queue.sqflow_disabled = sqflow_disabled;
        return Ok(u64::from(cntlid));
    }
    let ctrl = shared
        .controller(data.cntlid)
        .ok_or(invalid(ConnectParam::CNTLID))?;
    if ctrl.subsys != subsys {
        return Err(invalid(ConnectParam::SUBNQN));
    }
    if ctrl.hostnqn != hostnqn {
        return Err(invalid(ConnectParam::HOSTNQN));
    }
    if subsys == SubsystemRef::Discovery {
        return Err(invalid(ConnectParam::QID));
    }
    if !ctrl.enabled.load(Ordering::Acquire) {
        return Err((Status::COMMAND_SEQUENCE_ERROR, 0));
    }
    if cmd.qid > ctrl.io_queues.load(Ordering::Acquire) || !ctrl.claim_queue(cmd.qid) {
        return Err(invalid(ConnectParam::QID));
    }
    let namespaces = &shared.subsystem(subsys).expect("NVM subsystem").namespaces;
    let mut qpairs = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        match ns.dev.open_qpair(u32::from(size)) {
            Ok(q) => qpairs.push(q),
            Err(e) => {
                tracing::error!(device = ns.dev.name(), "cannot open a queue pair: {e}");
                ctrl.release_queue(cmd.qid);
                return Err((Status::INTERNAL_ERROR, 0));
            }
        }
    }
    tracing::debug!(peer = %conn.peer, cntlid = ctrl.cntlid, qid = cmd.qid, size, "I/O queue connected");
    conn.qpairs = qpairs;
    conn.queue.ctrl = Some(ctrl);
    conn.queue.qid = cmd.qid;
    conn.queue.size = size;
    conn.queue.sq_head = 1 % size;
    conn.queue.sqflow_disabled = sqflow_disabled;
    conn.phase = Phase::Io;
    conn.set_max_icdata(cfg.in_capsule_data_size);
    conn.next_slots = Some(SlotTable::new(size, cfg.max_transfer()));
    conn.reserve_lists(size);
    Ok(u64::from(data.cntlid))
}

/// CAP (Base §3.1.3.1).
fn cap(conn: &Connection) -> u64 {
    u64::from(conn.shared.cfg.max_queue_size - 1)
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
