//! Admin commands (Base §5): Identify, Get Log Page, Set/Get Features, Keep Alive,
//! Asynchronous Event Request and Abort; and the admin side of reservations: the
//! Reservation Notification log page, its mask and the persistence feature, and the
//! asynchronous event that tells the host a notice is waiting; and the ANA side: the
//! Identify fields, the ANA log page and the events that complete held requests
//! ([`deliver_async_event`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nvmirror_nvme::spec::admin::{
    cns, cntrltype, feature, lba_format, log_page, nidt, oncs, sgls, status as astatus,
    AdminOpcode, FirmwareSlotLog, IdentifyController, IdentifyNamespace, NsIdDescriptorHeader,
    SmartLog, CHANGED_NS_LOG_LEN, ERROR_LOG_ENTRY_LEN, IDENTIFY_LEN,
};
use nvmirror_nvme::spec::ana::{
    anacap, CMIC_ANA_REPORTING, CMIC_MULTI_CONTROLLER, GET_LOG_RAE, GET_LOG_RGO, LOG_ANA,
};
use nvmirror_nvme::spec::reservation::{
    ReservationNotificationLog, CTRATT_HOST_ID_128, FEATURE_NOTIFICATION_MASK, FEATURE_PERSISTENCE,
    LOG_RESERVATION_NOTIFICATION, NOTIFICATION_MASK_BITS, ONCS_RESERVATIONS, RESCAP_ALL,
    RESCAP_PTPL,
};
use nvmirror_nvme::spec::wire::{put_ascii_padded, put_nul_padded};
use nvmirror_nvme::spec::Status;

use super::async_event::SUPPORTED_NOTICES;
use super::connection::Connection;
use super::subsystem::{Namespace, Subsystem, SubsystemRef};

/// NSID meaning every namespace (Set Features of a namespace-specific feature).
const NSID_ALL: u32 = 0xffff_ffff;

/// Asynchronous event requests a host may leave outstanding (AERL + 1).
const AER_LIMIT: u8 = 4;
/// Firmware revision reported in Identify and the firmware slot log.
const FIRMWARE_REVISION: &str = env!("CARGO_PKG_VERSION");
/// ANA Transition Time (Identify ANATT), in seconds: the longest a group stays in the
/// change state.
const ANA_TRANSITION_TIME: u8 = 10;
/// Composite temperature reported in the SMART / Health log, in kelvins (25 °C).
const COMPOSITE_TEMPERATURE: u16 = 298;
/// Warning composite temperature threshold (Identify WCTEMP) and the default over-temperature
/// threshold, in kelvins (85 °C).
const WARNING_TEMPERATURE: u16 = 358;
/// Critical composite temperature threshold (Identify CCTEMP), in kelvins (95 °C).
const CRITICAL_TEMPERATURE: u16 = 368;

/// Feature identifiers the spec makes mandatory beyond those in `spec::admin::feature`
/// (Base §5.27.1, Figure "Feature Identifiers").
mod mandatory_feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
}

/// Temperature Threshold CDW11 (Base §5.27.1.4): TMPTH 15:0, TMPSEL 19:16, THSEL 21:20.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TemperatureSelect {
    /// 0: composite temperature; 1..=8: sensor; 0xF: every sensor (Set only).
    tmpsel: u8,
    /// 0: over-temperature threshold; 1: under-temperature threshold.
    under: bool,
}

impl TemperatureSelect {
    /// The selector in `cdw11`, or `None` for a sensor or THSEL value this controller lacks.
    fn of(cdw11: u32, set: bool) -> Option<Self> {
        let tmpsel = ((cdw11 >> 16) & 0xf) as u8;
        let thsel = (cdw11 >> 20) & 0x3;
        let sensor_ok = tmpsel == 0 || (set && tmpsel == 0xf);
        (sensor_ok && thsel <= 1).then_some(Self {
            tmpsel,
            under: thsel == 1,
        })
    }
}

/// Controller state that lives with the admin queue.
#[derive(Debug)]
pub(crate) struct AdminState {
    /// Controller Configuration as last set.
    pub cc: u32,
    /// Controller Status.
    pub csts: u32,
    kato: Option<Duration>,
    /// When the keep-alive timer expires (None: disabled).
    pub keep_alive_deadline: Option<Instant>,
    write_cache: bool,
    aers_held: u8,
    /// Arbitration (feature 0x01) CDW11 as last set: AB 2:0, LPW, MPW, HPW.
    arbitration: u32,
    /// Power Management (feature 0x02) CDW11 as last set: PS 4:0, WH 7:5.
    power_management: u32,
    /// Composite temperature thresholds in kelvins (feature 0x04).
    over_temperature: u16,
    under_temperature: u16,
    /// Error Recovery (feature 0x05) CDW11 as last set: TLER 15:0 (DULBE is not supported).
    error_recovery: u32,
}

impl AdminState {
    pub fn new(kato: Option<Duration>, now: Instant) -> Self {
        Self {
            cc: 0,
            csts: 0,
            kato,
            keep_alive_deadline: kato.map(|k| now + k),
            write_cache: true,
            aers_held: 0,
            // Round robin, arbitration burst 1 (AB = 0); weights are unused without WRR.
            arbitration: 0,
            power_management: 0,
            over_temperature: WARNING_TEMPERATURE,
            under_temperature: 0,
            error_recovery: 0,
        }
    }

    /// Restarts the keep-alive timer (any admin command counts as traffic).
    pub fn touch(&mut self, now: Instant) {
        self.keep_alive_deadline = self.kato.map(|k| now + k);
    }

    fn enabled(&self) -> bool {
        self.csts & 1 != 0
    }
}

/// Runs the admin command in slot `i`. Returns false if the command is held (AER).
pub(super) fn execute(conn: &mut Connection, i: u16, now: Instant) -> bool {
    let sqe = conn.slots.slots[usize::from(i)].sqe;
    let ctrl = conn
        .queue
        .ctrl
        .clone()
        .expect("admin queue has a controller");
    let a = conn.admin.as_mut().expect("admin queue");
    a.touch(now);
    if !a.enabled() {
        conn.slots.slots[usize::from(i)].fail(Status::COMMAND_SEQUENCE_ERROR);
        return true;
    }
    let subsys = ctrl.subsystem();
    let discovery = ctrl.subsys == SubsystemRef::Discovery;
    let op = AdminOpcode::from_u8(sqe.opcode);
    let result: Result<u32, Status> = match op {
        Some(AdminOpcode::Identify) => identify(&sqe, conn, subsys).map(|page| {
            let slot = &mut conn.slots.slots[usize::from(i)];
            let n = (slot.xfer_len as usize)
                .min(IDENTIFY_LEN)
                .min(slot.buf.len());
            slot.buf.as_mut_slice()[..n].copy_from_slice(&page[..n]);
            slot.c2h_len = n as u32;
            0
        }),
        Some(AdminOpcode::GetLogPage) => get_log_page(conn, i, subsys, discovery),
        Some(AdminOpcode::SetFeatures) => set_features(conn, &sqe, &ctrl),
        Some(AdminOpcode::GetFeatures) => get_features(conn, &sqe, &ctrl),
        Some(AdminOpcode::KeepAlive) => Ok(0),
        Some(AdminOpcode::AsyncEventRequest) => {
            let a = conn.admin.as_mut().expect("admin queue");
            if a.aers_held >= AER_LIMIT {
                Err(astatus::ASYNC_EVENT_LIMIT_EXCEEDED)
            } else {
                a.aers_held += 1;
                conn.slots.slots[usize::from(i)].state = super::request::RequestState::Held;
                return false;
            }
        }
        Some(AdminOpcode::Abort) => Ok(abort(conn, i, &sqe)),
        None => Err(Status::INVALID_OPCODE),
    };
    let slot = &mut conn.slots.slots[usize::from(i)];
    match result {
        Ok(dw0) => slot.dw0 = dw0,
        Err(st) => {
            slot.fail(st);
            slot.c2h_len = 0;
        }
    }
    true
}

/// Abort (Base §5.1): CDW10 SQID 15:0, CID 31:16. Only a held Asynchronous Event Request
/// can be aborted (every other command runs to completion without waiting on the host); it
/// completes with Command Abort Requested. The Abort itself always succeeds: DW0 bit 0 is
/// 0 when the command was aborted and 1 when it was not (not outstanding, already running,
/// or on a queue this controller does not have).
fn abort(conn: &mut Connection, i: u16, sqe: &nvmirror_nvme::spec::SubmissionQueueEntry) -> u32 {
    const NOT_ABORTED: u32 = 1;
    let sqid = sqe.cdw10 as u16;
    let cid = (sqe.cdw10 >> 16) as u16;
    if sqid != 0 {
        return NOT_ABORTED;
    }
    let held = conn
        .slots
        .slots
        .iter()
        .position(|s| s.state == super::request::RequestState::Held && s.sqe.cid == cid);
    let Some(j) = held.and_then(|j| u16::try_from(j).ok()).filter(|&j| j != i) else {
        return NOT_ABORTED;
    };
    let a = conn.admin.as_mut().expect("admin queue");
    a.aers_held = a.aers_held.saturating_sub(1);
    let slot = &mut conn.slots.slots[usize::from(j)];
    slot.state = super::request::RequestState::Executing;
    slot.fail(Status::ABORT_REQUESTED);
    slot.c2h_len = 0;
    conn.complete(j);
    0
}

/// The identify page the command asks for.
fn identify(
    sqe: &nvmirror_nvme::spec::SubmissionQueueEntry,
    conn: &Connection,
    subsys: Option<&Subsystem>,
) -> Result<[u8; IDENTIFY_LEN], Status> {
    let cns = sqe.cdw10 as u8;
    let mut page = [0u8; IDENTIFY_LEN];
    match (cns, subsys) {
        (cns::CONTROLLER, _) => {
            identify_controller(conn, subsys).write_to(&mut page);
        }
        (cns::NAMESPACE, Some(s)) => {
            let ns = s
                .namespace(sqe.nsid)
                .ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
            let mut id = IdentifyNamespace::zeroed();
            id.nsze = ns.geo.num_blocks;
            id.ncap = ns.geo.num_blocks;
            id.nuse = ns.geo.num_blocks;
            id.nmic = 1;
            id.rescap = if ns.reservation.persistent() {
                RESCAP_ALL
            } else {
                RESCAP_ALL & !RESCAP_PTPL
            };
            id.lbaf[0] = lba_format(ns.geo.lba_size);
            id.nguid = ns.ids().0;
            // Every namespace is its own ANA group.
            id.anagrpid = sqe.nsid;
            id.write_to(&mut page);
        }
        (cns::ACTIVE_NAMESPACES, Some(s)) => {
            if sqe.nsid >= 0xffff_fffe {
                return Err(Status::INVALID_NAMESPACE.with_dnr());
            }
            let ids = s.active().map(|(id, _)| id).filter(|&id| id > sqe.nsid);
            for (slot, id) in page.chunks_mut(4).zip(ids) {
                slot.copy_from_slice(&id.to_le_bytes());
            }
        }
        (cns::NS_ID_DESCRIPTORS, Some(s)) => {
            let ns = s
                .namespace(sqe.nsid)
                .ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
            let mut o = 0;
            let (nguid, uuid) = ns.ids();
            for (t, id) in [
                (nidt::NGUID, &nguid[..]),
                (nidt::UUID, &uuid[..]),
                (nidt::CSI, &[0u8][..]),
            ] {
                let h = NsIdDescriptorHeader {
                    nidt: t,
                    nidl: id.len() as u8,
                    rsvd: 0,
                };
                o += h.write_to(&mut page[o..]);
                page[o..o + id.len()].copy_from_slice(id);
                o += id.len();
            }
        }
        // The NVM command set's controller page: all limits zero (none).
        (cns::CS_CONTROLLER, Some(_)) if sqe.cdw11 >> 24 == 0 => {}
        _ => return Err(Status::INVALID_FIELD.with_dnr()),
    }
    Ok(page)
}

fn identify_controller(conn: &Connection, subsys: Option<&Subsystem>) -> IdentifyController {
    let cfg = &conn.shared.cfg;
    let ctrl = conn
        .queue
        .ctrl
        .as_ref()
        .expect("admin queue has a controller");
    let mut id = IdentifyController::zeroed();
    let (serial, model, nqn) = match subsys {
        Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str()),
        None => (
            "discovery",
            "nvmirror discovery",
            nvmirror_nvme::spec::fabrics::DISCOVERY_NQN,
        ),
    };
    put_ascii_padded(&mut id.sn, serial);
    put_ascii_padded(&mut id.mn, model);
    put_ascii_padded(&mut id.fr, FIRMWARE_REVISION);
    id.rab = 6;
    id.cmic = CMIC_MULTI_CONTROLLER;
    id.mdts = cfg.mdts;
    id.cntlid = ctrl.cntlid;
    id.ver = super::fabrics::VERSION;
    id.cntrltype = if subsys.is_some() {
        cntrltype::IO
    } else {
        cntrltype::DISCOVERY
    };
    id.acl = 3;
    id.wctemp = WARNING_TEMPERATURE;
    id.cctemp = CRITICAL_TEMPERATURE;
    id.aerl = AER_LIMIT - 1;
    id.frmw = 0x3;
    id.lpa = 1 << 2;
    id.kas = 1;
    id.sqes = 0x66;
    id.cqes = 0x44;
    id.maxcmd = cfg.effective_max_queue_size();
    id.sgls = sgls::SUPPORTED | sgls::OFFSET;
    id.msdbd = 1;
    put_nul_padded(&mut id.subnqn, nqn);
    if let Some(s) = subsys {
        id.nn = s.namespaces.len() as u32;
        id.oncs = oncs::DATASET_MANAGEMENT | oncs::WRITE_ZEROES | ONCS_RESERVATIONS;
        id.ctratt = CTRATT_HOST_ID_128;
        id.vwc = 1;
        id.ioccsz = (64 + cfg.in_capsule_data_size) / 16;
        id.iorcsz = 1;
        id.oaes = SUPPORTED_NOTICES;
        advertise_ana(&mut id, s);
    }
    id
}

/// The ANA fields of Identify Controller. A subsystem without namespaces reports no ANA (a
/// host needs MNAN of at least 1 to use it). ANACAP bit 6 (ANAGRPID never changes) stays
/// clear although it holds: nvme-cli sizes its `ana-log` buffer without the NSID lists
/// when it is set, and then prints NSIDs it never read.
fn advertise_ana(id: &mut IdentifyController, s: &Subsystem) {
    let groups = s.ana.groups();
    if groups == 0 {
        return;
    }
    id.cmic |= CMIC_ANA_REPORTING;
    id.anatt = ANA_TRANSITION_TIME;
    id.anacap = anacap::OPTIMIZED
        | anacap::NON_OPTIMIZED
        | anacap::INACCESSIBLE
        | anacap::PERSISTENT_LOSS
        | anacap::CHANGE;
    id.anagrpmax = groups;
    id.nanagrpid = groups;
    id.mnan = id.nn;
}

fn get_log_page(
    conn: &mut Connection,
    i: u16,
    subsys: Option<&Subsystem>,
    discovery: bool,
) -> Result<u32, Status> {
    let slot = &conn.slots.slots[usize::from(i)];
    let sqe = slot.sqe;
    let lid = sqe.cdw10 as u8;
    let numd = ((sqe.cdw10 >> 16) | ((sqe.cdw11 & 0xffff) << 16)) as u64 + 1;
    let len = numd * 4;
    let offset = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
    if offset % 4 != 0 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    let page: Vec<u8> = match (lid, discovery) {
        (log_page::DISCOVERY, true) => {
            let ctrl = conn
                .queue
                .ctrl
                .as_ref()
                .expect("admin queue has a controller");
            super::discovery::log_page(&conn.shared, &ctrl.hostnqn, conn.local)
        }
        (log_page::ERROR, false) => vec![0; ERROR_LOG_ENTRY_LEN],
        (log_page::SMART, false) => {
            let a = conn.admin.as_ref().expect("admin queue");
            let mut s = SmartLog::zeroed();
            // Critical Warning bit 1: the composite temperature is past a threshold.
            let t = COMPOSITE_TEMPERATURE;
            if t >= a.over_temperature || (a.under_temperature != 0 && t <= a.under_temperature) {
                s.critical_warning |= 1 << 1;
            }
            s.temperature = t.to_le_bytes();
            s.avail_spare = 100;
            s.spare_thresh = 10;
            let mut b = vec![0; SmartLog::SIZE];
            s.write_to(&mut b);
            b
        }
        (log_page::FIRMWARE_SLOT, false) => {
            let mut f = FirmwareSlotLog::zeroed();
            f.afi = 1;
            put_ascii_padded(&mut f.frs[0], FIRMWARE_REVISION);
            let mut b = vec![0; FirmwareSlotLog::SIZE];
            f.write_to(&mut b);
            b
        }
        (log_page::CHANGED_NAMESPACES, false) => {
            let ctrl = conn
                .queue
                .ctrl
                .as_ref()
                .expect("admin queue has a controller");
            let mut b = vec![0; CHANGED_NS_LOG_LEN];
            ctrl.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .changed_namespaces(&mut b);
            b
        }
        (LOG_ANA, false) => {
            let ctrl = conn
                .queue
                .ctrl
                .as_ref()
                .expect("admin queue has a controller");
            let s = subsys.ok_or(astatus::INVALID_LOG_PAGE.with_dnr())?;
            s.ana.log_page(ctrl.port, sqe.cdw10 & GET_LOG_RGO != 0)
        }
        (LOG_RESERVATION_NOTIFICATION, false) => {
            let ctrl = conn
                .queue
                .ctrl
                .as_ref()
                .expect("admin queue has a controller");
            let page = ctrl
                .reservation_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            let mut b = vec![0; ReservationNotificationLog::SIZE];
            page.write_to(&mut b);
            b
        }
        _ => return Err(astatus::INVALID_LOG_PAGE.with_dnr()),
    };
    if offset >= page.len() as u64 && offset != 0 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    if let Some(ctrl) = conn.queue.ctrl.as_ref() {
        ctrl.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_read(lid, sqe.cdw10 & GET_LOG_RAE != 0);
    }
    let slot = &mut conn.slots.slots[usize::from(i)];
    let n = (len.min(u64::from(slot.xfer_len)) as usize).min(slot.buf.len());
    let out = &mut slot.buf.as_mut_slice()[..n];
    out.fill(0);
    let start = offset as usize;
    let avail = page.len().saturating_sub(start).min(n);
    out[..avail].copy_from_slice(&page[start..start + avail]);
    slot.c2h_len = n as u32;
    Ok(0)
}

fn set_features(
    conn: &mut Connection,
    sqe: &nvmirror_nvme::spec::SubmissionQueueEntry,
    ctrl: &super::subsystem::Controller,
) -> Result<u32, Status> {
    if sqe.cdw10 & (1 << 31) != 0 {
        return Err(astatus::FEATURE_NOT_SAVEABLE.with_dnr());
    }
    let max_q = u32::from(conn.shared.cfg.max_io_queues);
    let a = conn.admin.as_mut().expect("admin queue");
    match sqe.cdw10 as u8 {
        feature::NUMBER_OF_QUEUES => {
            let nsqr = sqe.cdw11 & 0xffff;
            let ncqr = sqe.cdw11 >> 16;
            if nsqr == 0xffff || ncqr == 0xffff {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            let n = (nsqr.min(ncqr) + 1).min(max_q);
            ctrl.io_queues.store(n as u16, Ordering::Release);
            Ok((n - 1) | ((n - 1) << 16))
        }
        feature::KEEP_ALIVE_TIMER => {
            a.kato = (sqe.cdw11 > 0).then(|| Duration::from_millis(u64::from(sqe.cdw11)));
            a.keep_alive_deadline = a.kato.map(|k| Instant::now() + k);
            Ok(0)
        }
        feature::ASYNC_EVENT_CONFIG => {
            let raised = ctrl
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_config(sqe.cdw11);
            if raised {
                ctrl.event_pending.store(true, Ordering::Release);
            }
            Ok(0)
        }
        feature::VOLATILE_WRITE_CACHE if ctrl.subsys != SubsystemRef::Discovery => {
            a.write_cache = sqe.cdw11 & 1 != 0;
            Ok(0)
        }
        mandatory_feature::ARBITRATION => {
            a.arbitration = sqe.cdw11;
            Ok(0)
        }
        mandatory_feature::POWER_MANAGEMENT => {
            // Only power state 0 exists (Identify NPSS = 0).
            if sqe.cdw11 & 0x1f != 0 {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            a.power_management = sqe.cdw11 & 0xff;
            Ok(0)
        }
        mandatory_feature::TEMPERATURE_THRESHOLD => {
            let sel =
                TemperatureSelect::of(sqe.cdw11, true).ok_or(Status::INVALID_FIELD.with_dnr())?;
            let tmpth = sqe.cdw11 as u16;
            if sel.under {
                a.under_temperature = tmpth;
            } else {
                a.over_temperature = tmpth;
            }
            Ok(0)
        }
        FEATURE_NOTIFICATION_MASK => {
            let s = ctrl.subsystem();
            reservation_namespaces(s, sqe.nsid)?;
            if sqe.cdw11 & !NOTIFICATION_MASK_BITS != 0 {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            ctrl.reservation_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_mask(sqe.nsid, sqe.cdw11);
            Ok(0)
        }
        FEATURE_PERSISTENCE => {
            let s = ctrl.subsystem();
            let on = sqe.cdw11 & 1 != 0;
            let targets = reservation_namespaces(s, sqe.nsid)?;
            if on && targets.iter().any(|n| !n.reservation.persistent()) {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            for n in targets {
                n.reservation.set_ptpl(on)?;
            }
            Ok(0)
        }
        mandatory_feature::ERROR_RECOVERY => {
            // DULBE (bit 16) needs deallocated-block error reporting, which no namespace has.
            if sqe.cdw11 & (1 << 16) != 0 {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            a.error_recovery = sqe.cdw11 & 0xffff;
            Ok(0)
        }
        _ => Err(Status::INVALID_FIELD.with_dnr()),
    }
}

fn get_features(
    conn: &mut Connection,
    sqe: &nvmirror_nvme::spec::SubmissionQueueEntry,
    ctrl: &super::subsystem::Controller,
) -> Result<u32, Status> {
    let a = conn.admin.as_ref().expect("admin queue");
    match sqe.cdw10 as u8 {
        feature::NUMBER_OF_QUEUES => {
            let n = u32::from(ctrl.io_queues.load(Ordering::Acquire)).max(1) - 1;
            Ok(n | (n << 16))
        }
        feature::KEEP_ALIVE_TIMER => Ok(a.kato.map_or(0, |k| k.as_millis() as u32)),
        feature::ASYNC_EVENT_CONFIG => Ok(ctrl
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()),
        feature::VOLATILE_WRITE_CACHE if ctrl.subsys != SubsystemRef::Discovery => {
            Ok(u32::from(a.write_cache))
        }
        mandatory_feature::ARBITRATION => Ok(a.arbitration),
        mandatory_feature::POWER_MANAGEMENT => Ok(a.power_management),
        mandatory_feature::TEMPERATURE_THRESHOLD => {
            let sel =
                TemperatureSelect::of(sqe.cdw11, false).ok_or(Status::INVALID_FIELD.with_dnr())?;
            let tmpth = if sel.under {
                a.under_temperature
            } else {
                a.over_temperature
            };
            Ok(u32::from(tmpth) | (u32::from(sel.tmpsel) << 16) | (u32::from(sel.under) << 20))
        }
        mandatory_feature::ERROR_RECOVERY => Ok(a.error_recovery),
        FEATURE_NOTIFICATION_MASK => {
            reservation_namespaces(ctrl.subsystem(), sqe.nsid)?;
            Ok(ctrl
                .reservation_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mask(sqe.nsid))
        }
        FEATURE_PERSISTENCE if sqe.nsid != NSID_ALL => {
            let ns = reservation_namespaces(ctrl.subsystem(), sqe.nsid)?;
            Ok(u32::from(ns[0].reservation.ptpl()))
        }
        _ => Err(Status::INVALID_FIELD.with_dnr()),
    }
}

/// The namespaces a namespace-specific reservation feature names: one NSID, or all of them
/// for 0xFFFFFFFF. Invalid Namespace otherwise (and on a discovery controller).
fn reservation_namespaces(s: Option<&Subsystem>, nsid: u32) -> Result<Vec<&Namespace>, Status> {
    let s = s.ok_or(Status::INVALID_FIELD.with_dnr())?;
    if nsid == NSID_ALL {
        return Ok(s.active().map(|(_, n)| n).collect());
    }
    s.namespace(nsid)
        .map(|n| vec![n])
        .ok_or(Status::INVALID_NAMESPACE.with_dnr())
}

/// Completes a held Asynchronous Event Request when an event waits for this controller
/// (admin queues only; one atomic load while none does). Returns whether one completed.
pub(super) fn deliver_async_event(conn: &mut Connection) -> bool {
    let (Some(a), Some(ctrl)) = (conn.admin.as_mut(), conn.queue.ctrl.as_ref()) else {
        return false;
    };
    if a.aers_held == 0 || !ctrl.event_pending.load(Ordering::Acquire) {
        return false;
    }
    let Some(j) = conn
        .slots
        .slots
        .iter()
        .position(|s| s.state == super::request::RequestState::Held)
    else {
        return false;
    };
    let ev = {
        let mut e = ctrl.events.lock().unwrap_or_else(|e| e.into_inner());
        let ev = e.take();
        ctrl.event_pending.store(e.is_pending(), Ordering::Release);
        ev
    };
    let Some(ev) = ev else {
        return false;
    };
    a.aers_held -= 1;
    let slot = &mut conn.slots.slots[j];
    slot.state = super::request::RequestState::Executing;
    slot.dw0 = ev.dw0();
    slot.c2h_len = 0;
    conn.complete(j as u16);
    true
}
