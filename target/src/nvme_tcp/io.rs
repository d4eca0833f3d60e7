//! NVM I/O commands (NVM §3): Read, Write, Flush, Write Zeroes and Dataset Management,
//! translated into back-end [`IoCommand`]s on this core's queue pairs; and the reservation
//! commands (Base §7.2-7.5), run against the namespace's shared reservation state.
//!
//! Every read and write is first checked against the namespace's reservation through the
//! queue's [`AccessCache`] (one atomic load while nothing changed): a host the reservation
//! shuts out gets Reservation Conflict. Before that, every command to a namespace whose
//! ANA group is not usable through this queue's port (inaccessible, persistent loss,
//! change) completes with the path-related ANA status, so a multipath host retries it on
//! another path (one atomic load).
//!
//! A command becomes one or more sub-commands (a flush of all namespaces, one per
//! Dataset Management range); they are submitted as the queue pair has room and joined in
//! the slot. Nothing here allocates.

use std::sync::Arc;

use nvmirror_nvme::spec::opcode::DSM_ATTR_DEALLOCATE;
use nvmirror_nvme::spec::reservation::{
    opcode as resv_op, status as resv_status, AcquireCommand, AcquireData, RegisterCommand,
    RegisterData, ReleaseCommand, ReleaseData, ReportCommand,
};
use nvmirror_nvme::spec::{Geometry, NvmOpcode, Status};
use nvmirror_nvme::{IoCommand, IoOp, SubmitError};

use super::connection::Connection;
use super::request::CommandSlot;
use super::reservation::Command;

/// NSID meaning "every namespace" (Flush only).
const NSID_ALL: u32 = 0xffff_ffff;
/// Bytes per Dataset Management range (NVM §3.2.3, figure "Dataset Management – Range").
const DSM_RANGE_LEN: usize = 16;

fn geometry(conn: &Connection, ns: usize) -> Option<Geometry> {
    let ctrl = conn.queue.ctrl.as_ref()?;
    ctrl.subsystem()?.namespace_at(ns).map(|n| n.geo)
}

/// The namespace index an NSID names, for this queue.
fn namespace(conn: &Connection, nsid: u32) -> Result<(usize, Geometry), Status> {
    let ns = (nsid as usize)
        .checked_sub(1)
        .filter(|&n| n < conn.qpairs.len())
        .ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
    let geo = geometry(conn, ns).ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
    Ok((ns, geo))
}

/// Validates a read or write and returns its namespace and byte count.
fn read_write(conn: &Connection, slot: &CommandSlot) -> Result<(usize, u32), Status> {
    let (ns, geo) = namespace(conn, slot.sqe.nsid)?;
    let nlb = slot.sqe.nlb();
    geo.check_range(slot.sqe.slba(), nlb)?;
    let bytes = u64::from(nlb) << geo.lba_shift();
    if bytes > u64::from(conn.shared.cfg.max_transfer()) {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    Ok((ns, bytes as u32))
}

fn dsm_ranges(slot: &CommandSlot) -> u32 {
    (slot.sqe.cdw10 & 0xff) + 1
}

/// The host-to-controller byte count a command needs; checked before any R2T is sent so
/// a bad command never pulls data.
pub(super) fn expected_h2c(conn: &Connection, slot: &CommandSlot) -> Result<u32, Status> {
    let resv_data = match slot.sqe.opcode {
        resv_op::REGISTER => Some(RegisterData::SIZE),
        resv_op::ACQUIRE => Some(AcquireData::SIZE),
        resv_op::RELEASE => Some(ReleaseData::SIZE),
        _ => None,
    };
    if let Some(n) = resv_data {
        namespace(conn, slot.sqe.nsid)?;
        return Ok(n as u32);
    }
    match NvmOpcode::from_u8(slot.sqe.opcode) {
        Some(NvmOpcode::Write) => read_write(conn, slot).map(|(_, b)| b),
        Some(NvmOpcode::DatasetManagement) => {
            namespace(conn, slot.sqe.nsid)?;
            Ok(dsm_ranges(slot) * DSM_RANGE_LEN as u32)
        }
        _ => Err(Status::INVALID_OPCODE.with_dnr()),
    }
}

/// Starts the I/O command in slot `i` (its host data, if any, has arrived).
pub(super) fn start(conn: &mut Connection, i: u16) {
    if let Err(st) = check_ana(conn, conn.slots.slots[usize::from(i)].sqe.nsid) {
        let slot = &mut conn.slots.slots[usize::from(i)];
        slot.fail(st);
        slot.c2h_len = 0;
        conn.complete(i);
        return;
    }
    if matches!(
        conn.slots.slots[usize::from(i)].sqe.opcode,
        resv_op::REGISTER | resv_op::REPORT | resv_op::ACQUIRE | resv_op::RELEASE
    ) {
        if let Err(st) = reservation_command(conn, i) {
            let slot = &mut conn.slots.slots[usize::from(i)];
            slot.fail(st);
            slot.c2h_len = 0;
        }
        conn.complete(i);
        return;
    }
    match plan(conn, i) {
        Ok(()) => submit_more(conn, i),
        Err(st) => {
            conn.slots.slots[usize::from(i)].fail(st);
            conn.complete(i);
        }
    }
}

/// Runs a reservation command (control path: it takes the namespace's reservation lock and,
/// under PTPL, writes the saved state before it completes).
fn reservation_command(conn: &mut Connection, i: u16) -> Result<(), Status> {
    let sqe = conn.slots.slots[usize::from(i)].sqe;
    let (ns, _) = namespace(conn, sqe.nsid)?;
    let ctrl = conn
        .queue
        .ctrl
        .clone()
        .ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
    let shared = Arc::clone(&conn.shared);
    let resv = &ctrl
        .subsystem()
        .and_then(|s| s.namespace_at(ns))
        .ok_or(Status::INVALID_NAMESPACE.with_dnr())?
        .reservation;
    let slot = &mut conn.slots.slots[usize::from(i)];
    let data = &slot.buf.as_slice()[..slot.received as usize];
    let cmd = match sqe.opcode {
        resv_op::REGISTER => Command::Register(RegisterCommand::decode(&sqe, data)?),
        resv_op::ACQUIRE => Command::Acquire(AcquireCommand::decode(&sqe, data)?),
        resv_op::RELEASE => Command::Release(ReleaseCommand::decode(&sqe, data)?),
        _ => {
            let report = ReportCommand::decode(&sqe);
            // Hosts on a fabric have 128-bit host identifiers: only the extended form fits.
            if !report.eds {
                return Err(resv_status::HOST_ID_INCONSISTENT_FORMAT.with_dnr());
            }
            let n = (report.len as usize)
                .min(slot.xfer_len as usize)
                .min(slot.buf.len());
            let out = &mut slot.buf.as_mut_slice()[..n];
            out.fill(0);
            resv.report().write_to(true, out);
            slot.c2h_len = n as u32;
            return Ok(());
        }
    };
    let out = resv.execute(&ctrl.hostid, &cmd);
    shared.notify_reservation(ctrl.subsys, sqe.nsid, &out.notices);
    if out.status.is_success() {
        Ok(())
    } else {
        Err(out.status)
    }
}

/// The ANA status of namespace `nsid` (every namespace for FFFFFFFFh) through this queue's
/// port; an unknown NSID passes (the command's own checks name it).
#[inline]
fn check_ana(conn: &Connection, nsid: u32) -> Result<(), Status> {
    let Some(ctrl) = conn.queue.ctrl.as_ref() else {
        return Ok(());
    };
    let Some(s) = ctrl.subsystem() else {
        return Ok(());
    };
    if nsid == NSID_ALL {
        for g in 1..=s.ana.groups() {
            s.ana.state(ctrl.port, g).io_status()?;
        }
        return Ok(());
    }
    s.ana.state(ctrl.port, nsid).io_status()
}

/// Reservation Conflict unless this queue's host may read (or `write`) namespace `ns`.
#[inline]
fn check_reservation(conn: &mut Connection, ns: usize, write: bool) -> Result<(), Status> {
    let (Some(ctrl), Some(cache)) = (conn.queue.ctrl.as_ref(), conn.resv_access.get_mut(ns)) else {
        return Ok(());
    };
    let Some(n) = ctrl.subsystem().and_then(|s| s.namespace_at(ns)) else {
        return Ok(());
    };
    let a = n.reservation.check(cache, &ctrl.hostid);
    if (write && !a.write) || (!write && !a.read) {
        return Err(resv_status::RESERVATION_CONFLICT.with_dnr());
    }
    Ok(())
}

/// Validates the command and sets up its sub-commands.
fn plan(conn: &mut Connection, i: u16) -> Result<(), Status> {
    let slot = &conn.slots.slots[usize::from(i)];
    let sqe = slot.sqe;
    let (ns, total) = match NvmOpcode::from_u8(sqe.opcode) {
        Some(NvmOpcode::Read) => {
            let (ns, bytes) = read_write(conn, slot)?;
            if slot.xfer_len < bytes {
                return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
            }
            (ns, 1)
        }
        Some(NvmOpcode::Write) => {
            let (ns, bytes) = read_write(conn, slot)?;
            if slot.received < bytes {
                return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
            }
            (ns, 1)
        }
        Some(NvmOpcode::Flush) if sqe.nsid == NSID_ALL => (0, conn.qpairs.len() as u32),
        Some(NvmOpcode::Flush) => (namespace(conn, sqe.nsid)?.0, 1),
        Some(NvmOpcode::WriteZeroes) => {
            let (ns, geo) = namespace(conn, sqe.nsid)?;
            geo.check_range(sqe.slba(), sqe.nlb())?;
            (ns, 1)
        }
        Some(NvmOpcode::DatasetManagement) => {
            let (ns, geo) = namespace(conn, sqe.nsid)?;
            let nr = dsm_ranges(slot);
            if (slot.received as usize) < nr as usize * DSM_RANGE_LEN {
                return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
            }
            if sqe.cdw11 & DSM_ATTR_DEALLOCATE == 0 {
                // Only hints (integral read/write): nothing to do.
                (ns, 0)
            } else {
                for k in 0..nr as usize {
                    let (slba, nlb) = dsm_range(slot, k);
                    if nlb != 0 {
                        geo.check_range(slba, nlb)?;
                    }
                }
                (ns, nr)
            }
        }
        None => return Err(Status::INVALID_OPCODE.with_dnr()),
    };
    // Flush belongs to the write group; a flush of every namespace needs each of them.
    let write = sqe.opcode != NvmOpcode::Read as u8;
    if sqe.opcode == NvmOpcode::Flush as u8 && sqe.nsid == NSID_ALL {
        for k in 0..conn.qpairs.len() {
            check_reservation(conn, k, true)?;
        }
    } else {
        check_reservation(conn, ns, write)?;
    }
    let slot = &mut conn.slots.slots[usize::from(i)];
    slot.ns = ns;
    slot.sub_total = total;
    Ok(())
}

fn dsm_range(slot: &CommandSlot, k: usize) -> (u64, u32) {
    let b = &slot.buf.as_slice()[k * DSM_RANGE_LEN..(k + 1) * DSM_RANGE_LEN];
    let nlb = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[8..16]);
    (u64::from_le_bytes(s), nlb)
}

/// Sub-command `k` of slot `i`: the queue pair (namespace) and the command, or `None`
/// for a range with nothing to do.
fn sub_command(slot: &CommandSlot, i: u16, k: u32) -> Option<(usize, IoCommand)> {
    let sqe = &slot.sqe;
    let tag = u64::from(i);
    Some(match NvmOpcode::from_u8(sqe.opcode)? {
        NvmOpcode::Read | NvmOpcode::Write => {
            let op = if sqe.opcode == NvmOpcode::Read as u8 {
                IoOp::Read
            } else {
                IoOp::Write
            };
            let cmd = IoCommand::with_buf(op, sqe.slba(), sqe.nlb(), slot.buf.io_buf(), tag);
            // Force Unit Access (CDW12 bit 30) goes with a write to every leg; a read's FUA
            // asks for nothing a read from this target does not already do.
            (slot.ns, with_fua(cmd, op == IoOp::Write && sqe.fua()))
        }
        NvmOpcode::Flush => (slot.ns + k as usize, IoCommand::new(IoOp::Flush, 0, 0, tag)),
        NvmOpcode::WriteZeroes => (
            slot.ns,
            with_fua(
                IoCommand::new(IoOp::WriteZeroes, sqe.slba(), sqe.nlb(), tag),
                sqe.fua(),
            ),
        ),
        NvmOpcode::DatasetManagement => {
            let (slba, nlb) = dsm_range(slot, k as usize);
            if nlb == 0 {
                return None;
            }
            (slot.ns, IoCommand::new(IoOp::Deallocate, slba, nlb, tag))
        }
    })
}

fn with_fua(cmd: IoCommand, fua: bool) -> IoCommand {
    if fua {
        cmd.with_fua()
    } else {
        cmd
    }
}

/// Submits the slot's remaining sub-commands while the queue pair has room; parks the
/// slot on the retry list when it is full.
pub(super) fn submit_more(conn: &mut Connection, i: u16) {
    loop {
        let slot = &mut conn.slots.slots[usize::from(i)];
        if slot.sub_next >= slot.sub_total {
            break;
        }
        let k = slot.sub_next;
        let Some((q, cmd)) = sub_command(slot, i, k) else {
            slot.sub_next += 1;
            slot.sub_done += 1;
            continue;
        };
        // SAFETY: the buffer belongs to slot `i`, which stays in the Executing state (never
        // reused or written by us) until every sub-command has been reaped, and the
        // connection drains its queue pairs before the slot table is dropped.
        match unsafe { conn.qpairs[q].submit(cmd) } {
            Ok(()) => slot.sub_next += 1,
            Err(SubmitError::QueueFull) => {
                conn.retry.push_back(i);
                return;
            }
        }
    }
    let slot = &conn.slots.slots[usize::from(i)];
    if slot.sub_done == slot.sub_total {
        finish(conn, i);
    }
}

/// A back-end completion for slot `i`.
pub(super) fn sub_complete(conn: &mut Connection, i: u16, status: Status) {
    let Some(slot) = conn.slots.get_mut(i) else {
        return;
    };
    slot.sub_done += 1;
    if !status.is_success() {
        slot.fail(status);
    }
    if slot.sub_done == slot.sub_total && slot.sub_next == slot.sub_total {
        finish(conn, i);
    }
}

fn finish(conn: &mut Connection, i: u16) {
    let slot = &mut conn.slots.slots[usize::from(i)];
    if slot.sqe.opcode == NvmOpcode::Read as u8 && slot.status.is_success() {
        let geo = geometry(conn, conn.slots.slots[usize::from(i)].ns);
        let slot = &mut conn.slots.slots[usize::from(i)];
        slot.c2h_len = geo.map_or(0, |g| slot.sqe.nlb() << g.lba_shift());
    }
    conn.complete(i);
}
