//! One I/O queue: a TCP connection of its own, driven without blocking.
//!
//! [`submit`](QueuePair::submit) encodes the command capsule straight into the send buffer
//! (write data up to the IOCCSZ limit in the capsule, else none and the data follows on R2T;
//! in-capsule data of 2 KiB or more is sent from the caller's buffer, not copied).
//! [`poll`](QueuePair::poll) does at most one `recv` — parsing every complete PDU it brings:
//! C2HData is copied into the command's buffer, R2Ts queue H2CData, responses complete
//! commands — then encodes queued capsules and H2CData and does at most one `send`. Command
//! IDs are indices into a fixed [`SlotTable`]; no command allocates.
//!
//! A read or write larger than the controller's MDTS (capped at 1 MiB) is split: its pieces
//! of MDTS go out one after another under the command's ID, the next when the previous one
//! succeeded, and the caller sees one completion — the first failure, or success.
//! The LBA range is checked by the controller, whose status the completion carries; only
//! what cannot be put on the wire (no blocks, more than 65536, a buffer shorter than the
//! transfer) completes at once with Invalid Field or Data SGL Length Invalid.
//!
//! Any protocol violation by the controller sends an H2CTermReq; that, a C2HTermReq, a closed
//! socket or a lost controller (keep-alive failed) kills the queue: every outstanding command
//! completes with [`Status::HOST_PATHING_ERROR`], and so does every later one until the device
//! has reconnected (`reconnect`): a dying queue marks the whole association lost, and once a
//! new one is up the queue pair takes the replacement I/O queue the reconnect thread opened
//! for it, at its next `submit` or `poll`. With `fast_io_fail_tmo` set, commands submitted
//! while dead are held (not sent) for that long waiting for the reconnect.
//!
//! [`close`](QueuePair::close) aborts what the controller has and leaves the queue to a reaper
//! thread until every command is answered or the link-loss fence covers it (`close`).

mod close;
mod receive;

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::ControlConn;
use super::reconnect::{Revival, Supervisor};
use super::slot::{Direction, SlotState, SlotTable};
use super::stream::{RxBuf, TxBuf, GATHER_MIN};
use super::Link;
use crate::dma::IoBuf;
use crate::queue::{Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::fabrics::{sgl_in_capsule, sgl_transport};
use crate::spec::opcode::{dsm_range, DSM_ATTR_DEALLOCATE, DSM_RANGE_LEN};
use crate::spec::tcp::{self, flags, DataPdu, Digests, PduLimits, PduType, TERM_REQ_MAX_PLEN};
use crate::spec::{NvmOpcode, Status, SubmissionQueueEntry};
use crate::{Error, Result};

/// Largest H2CData PDU this initiator sends, whatever MAXH2CDATA allows.
const H2C_CHUNK_CAP: u32 = 128 * 1024;
/// Receive-buffer room beyond one largest PDU.
const RX_SLACK: usize = 256 * 1024;
/// Room for a C2HData header, its digest and CPDA padding.
const PDU_OVERHEAD: usize = 256;
/// Room for a command capsule's header and header digest.
const CAPSULE_HEADER_ROOM: usize = 128;

/// How an I/O queue is set up.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueueParams {
    pub qid: u16,
    /// Commands outstanding at once (the caller's depth, at most the queue size).
    pub depth: u32,
    pub nsid: u32,
    pub lba_shift: u32,
    /// In-capsule write data limit in bytes.
    pub in_capsule: u32,
    pub max_transfer: u32,
}

/// A queue pair on an [`NvmeTcpDevice`](super::NvmeTcpDevice): one I/O queue, one socket.
#[derive(Debug)]
pub struct TcpQueuePair {
    link: Arc<Link>,
    sock: TcpStream,
    p: QueueParams,
    dg: Digests,
    lim: PduLimits,
    h2c_chunk: u32,
    outstanding: u32,
    /// Commands in the `Sent` or `H2C` state.
    in_flight: u32,
    table: SlotTable,
    /// Slots whose capsule did not fit in the send buffer yet, in submission order.
    unsent: VecDeque<u16>,
    /// R2Ts being answered: slot and its generation.
    h2c: VecDeque<(u16, u32)>,
    /// Complete slots, in completion order.
    done: VecDeque<u16>,
    tx: TxBuf,
    rx: RxBuf,
    /// Why the queue died; every command completes with a path error from then on.
    dead: Option<String>,
    /// When it died.
    dead_at: Option<Instant>,
    /// This queue pair's claim on a replacement I/O queue after a reconnect.
    revival: Arc<Revival>,
    /// Commands submitted while dead, held for `fast_io_fail_tmo` (capacity = depth; they
    /// count in `outstanding` but hold no slot).
    held: VecDeque<IoCommand>,
    fast_io_fail: Duration,
    /// Commands that were on the wire when the queue died (the link-loss fence covers them).
    lost_in_flight: u32,
    /// Closed: a reaper drives the queue until its commands are over (`close`); it takes no
    /// replacement I/O queue.
    closing: bool,
}

impl TcpQueuePair {
    pub(super) fn new(
        link: Arc<Link>,
        conn: ControlConn,
        p: QueueParams,
        revival: Arc<Revival>,
    ) -> Result<Self> {
        let peer = conn.peer.clone();
        let (sock, dg, maxh2cdata, leftover) = conn.into_parts();
        let step = format!("I/O queue {} socket setup", p.qid);
        sock.set_nonblocking(true)
            .map_err(|e| peer.err(&step, e.to_string()))?;
        let h2c_chunk = maxh2cdata.min(H2C_CHUNK_CAP);
        let capsule_max = tcp::capsule_cmd_len(p.in_capsule as usize, dg);
        let tx_cap = (p.depth as usize * capsule_max)
            .clamp(64 * 1024, 2 << 20)
            .max(capsule_max + tcp::data_pdu_len(h2c_chunk as usize, dg))
            + TERM_REQ_MAX_PLEN;
        let max_pdu = p.max_transfer as usize + PDU_OVERHEAD;
        let depth = p.depth as usize;
        let fast_io_fail = link.opts.fast_io_fail_tmo;
        Ok(Self {
            link,
            sock,
            p,
            dg,
            lim: PduLimits {
                hdgst: dg.hdgst,
                ddgst: dg.ddgst,
                max_icdata: 0,
                maxh2cdata: 0,
                max_c2hdata: p.max_transfer,
            },
            h2c_chunk,
            outstanding: 0,
            in_flight: 0,
            table: SlotTable::new(p.depth),
            unsent: VecDeque::with_capacity(depth),
            h2c: VecDeque::with_capacity(depth),
            done: VecDeque::with_capacity(depth),
            tx: TxBuf::new(tx_cap),
            rx: RxBuf::new(max_pdu, RX_SLACK, &leftover),
            dead: None,
            dead_at: None,
            revival,
            held: VecDeque::with_capacity(depth),
            fast_io_fail,
            lost_in_flight: 0,
            closing: false,
        })
    }

    /// A dead queue pair takes the replacement I/O queue the reconnect thread opened for it,
    /// once every command it failed has been reaped; held commands go out on it. Cold: only
    /// while dead.
    #[cold]
    fn try_revive(&mut self) {
        if self.outstanding != self.held.len() as u32 {
            return;
        }
        let Some((link, conn, qid)) = self.revival.take() else {
            return;
        };
        self.revival.wanted.store(false, Ordering::Release);
        let p = params(&link, self.p.depth, qid);
        let on = Arc::clone(&link);
        match TcpQueuePair::new(link, conn, p, Arc::clone(&self.revival)) {
            Ok(mut q) => {
                tracing::info!(qid, target = %q.link.peer.label, "NVMe/TCP I/O queue reconnected");
                std::mem::swap(&mut q.held, &mut self.held);
                // The old queue (dropped here) releases its queue ID on the old association.
                *self = q;
                self.outstanding = 0;
                while let Some(cmd) = self.held.pop_front() {
                    // SAFETY: the command was submitted to us under the submit contract and
                    // has not completed; it keeps its buffer promise.
                    let _ = unsafe { self.submit(cmd) };
                }
            }
            Err(e) => {
                tracing::warn!(qid, "NVMe/TCP I/O queue could not be reconnected: {e}");
                on.release_qid(qid);
                self.revival.wanted.store(true, Ordering::Release);
            }
        }
    }

    /// The association was lost elsewhere (keep-alive, another I/O queue): this queue dies.
    #[cold]
    fn lose_link(&mut self) {
        let why = self.link.health.reason().unwrap_or_default();
        self.die(format!("controller lost: {why}"));
    }

    /// Held commands whose `fast_io_fail_tmo` ran out fail with a path error.
    #[cold]
    fn expire_held(&mut self, now: Instant) {
        let expired = self
            .dead_at
            .map_or(true, |t| now.duration_since(t) >= self.fast_io_fail);
        if !expired {
            return;
        }
        while let Some(cmd) = self.held.pop_front() {
            self.complete_held(cmd.tag, Status::HOST_PATHING_ERROR);
        }
    }

    /// Completes a command held for the reconnect (it never had a slot) with `status`.
    #[cold]
    fn complete_held(&mut self, tag: u64, status: Status) {
        let i = self.table.alloc().expect("held commands have free slots");
        self.table.slots[usize::from(i)].tag = tag;
        self.complete(i, status);
    }

    /// The queue ID on the controller.
    pub fn qid(&self) -> u16 {
        self.p.qid
    }

    /// Why the queue is dead, if it is.
    pub fn dead_reason(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    /// Whether a command submitted while dead is held for the reconnect.
    #[cold]
    fn holds(&self) -> bool {
        !self.fast_io_fail.is_zero()
            && self
                .dead_at
                .is_some_and(|t| t.elapsed() < self.fast_io_fail)
    }

    /// Fills slot `i` for `cmd`; an error status completes the command without sending it.
    #[inline]
    fn prepare(&mut self, i: u16, cmd: &IoCommand) -> std::result::Result<(), Status> {
        let shift = self.p.lba_shift;
        let slot = &mut self.table.slots[usize::from(i)];
        slot.tag = cmd.tag;
        slot.op = cmd.op;
        slot.slba = cmd.slba;
        slot.nlb = if cmd.op == IoOp::Flush { 0 } else { cmd.nlb };
        slot.host_buf = IoBuf::EMPTY;
        slot.fua = cmd.wants_fua();
        slot.done_blocks = 0;
        slot.status = Status::SUCCESS;
        slot.cancelled = false;
        if cmd.op != IoOp::Flush && !(1..=65536).contains(&cmd.nlb) {
            return Err(Status::INVALID_FIELD);
        }
        if cmd.op.has_data() {
            if (cmd.buf.len() as u64) < u64::from(cmd.nlb) << shift {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            slot.host_buf = cmd.buf;
        }
        self.prepare_piece(i);
        Ok(())
    }

    /// Builds the SQE of slot `i`'s next piece: the caller's range from `done_blocks` on, at
    /// most MDTS of it for reads and writes.
    #[inline]
    fn prepare_piece(&mut self, i: u16) {
        let p = self.p;
        let slot = &mut self.table.slots[usize::from(i)];
        slot.gen = slot.gen.wrapping_add(1);
        slot.dir = Direction::None;
        slot.buf = IoBuf::EMPTY;
        slot.dsm = None;
        slot.len = 0;
        slot.in_capsule = false;
        slot.c2h_received = 0;
        slot.r2t_next = 0;
        let mut sqe = SubmissionQueueEntry {
            cid: i,
            nsid: p.nsid,
            ..Default::default()
        };
        let rest = slot.nlb - slot.done_blocks;
        let slba = slot.slba.wrapping_add(u64::from(slot.done_blocks));
        match slot.op {
            IoOp::Read | IoOp::Write => {
                let blocks = rest.min(p.max_transfer >> p.lba_shift);
                let bytes = blocks << p.lba_shift;
                slot.piece_blocks = blocks;
                sqe.set_lba_range(slba, blocks);
                slot.buf = slot
                    .host_buf
                    .offset((slot.done_blocks as usize) << p.lba_shift);
                slot.len = bytes;
                if slot.op == IoOp::Read {
                    sqe.opcode = NvmOpcode::Read as u8;
                    slot.dir = Direction::ControllerToHost;
                    sgl_transport(&mut sqe, bytes);
                } else {
                    sqe.opcode = NvmOpcode::Write as u8;
                    slot.dir = Direction::HostToController;
                    slot.in_capsule = bytes <= p.in_capsule;
                    if slot.in_capsule {
                        sgl_in_capsule(&mut sqe, bytes);
                    } else {
                        sgl_transport(&mut sqe, bytes);
                    }
                }
            }
            IoOp::Flush => {
                slot.piece_blocks = 0;
                sqe.opcode = NvmOpcode::Flush as u8;
                sgl_transport(&mut sqe, 0);
            }
            IoOp::WriteZeroes => {
                slot.piece_blocks = rest;
                sqe.opcode = NvmOpcode::WriteZeroes as u8;
                sqe.set_lba_range(slba, rest);
                sgl_transport(&mut sqe, 0);
            }
            IoOp::Deallocate => {
                slot.piece_blocks = rest;
                // One range (NR 0's based = 0): context attributes, length, starting LBA.
                let range = dsm_range(slba, rest);
                sqe.opcode = NvmOpcode::DatasetManagement as u8;
                sqe.cdw11 = DSM_ATTR_DEALLOCATE;
                slot.dsm = Some(range);
                slot.len = DSM_RANGE_LEN as u32;
                slot.dir = Direction::HostToController;
                slot.in_capsule = DSM_RANGE_LEN as u32 <= p.in_capsule;
                if slot.in_capsule {
                    sgl_in_capsule(&mut sqe, slot.len);
                } else {
                    sgl_transport(&mut sqe, slot.len);
                }
            }
        }
        sqe.set_fua(slot.fua);
        slot.sqe = sqe;
    }

    /// Encodes slot `i`'s capsule into the send buffer; false if it does not fit yet.
    #[inline]
    fn encode_capsule(&mut self, i: u16) -> bool {
        let slot = &self.table.slots[usize::from(i)];
        let icd = if slot.in_capsule { slot.len } else { 0 };
        // SAFETY: the command is outstanding (not reaped) and `icd <= slot.len`.
        let data = unsafe { slot.h2c_bytes(0, icd) };
        if data.len() >= GATHER_MIN && slot.dsm.is_none() && self.tx.can_gather() {
            // The data goes from the caller's buffer: only the header (and the digest) here.
            let Some(out) = self.tx.space(CAPSULE_HEADER_ROOM + self.dg.dd()) else {
                return false;
            };
            // The header, then (after the gathered data in the stream) the data digest.
            let n = tcp::write_capsule_cmd_header(out, &slot.sqe, data.len(), self.dg);
            let dd = if self.dg.ddgst {
                tcp::write_data_digest(&mut out[n..], data)
            } else {
                0
            };
            self.tx.commit(n);
            // SAFETY: the buffer is the command's, valid and unmodified until it completes
            // (the submit contract); a response before `sent_total` passed the data is a
            // protocol violation that kills the queue (`on_response`), which clears the send
            // buffer before the command completes.
            unsafe { self.tx.gather(data.as_ptr(), data.len()) };
            self.tx.commit(dd);
        } else {
            let Some(out) = self.tx.space(tcp::capsule_cmd_len(icd as usize, self.dg)) else {
                return false;
            };
            let n = tcp::write_capsule_cmd(out, &slot.sqe, data, self.dg);
            self.tx.commit(n);
        }
        let until = self.tx.queued_total();
        let slot = &mut self.table.slots[usize::from(i)];
        slot.tx_until = until;
        slot.state = SlotState::Sent;
        self.in_flight += 1;
        true
    }

    /// Finishes slot `i` with `status`; it is reaped by the next `poll`.
    #[inline]
    fn complete(&mut self, i: u16, status: Status) {
        let slot = &mut self.table.slots[usize::from(i)];
        if matches!(slot.state, SlotState::Sent | SlotState::H2C) {
            self.in_flight -= 1;
        }
        slot.state = SlotState::Complete;
        slot.status = status;
        self.done.push_back(i);
    }

    /// The current piece of slot `i` finished: the command completes on failure or after its
    /// last piece, else its next piece is queued (sent by this poll's `send`).
    #[inline]
    fn piece_done(&mut self, i: u16, status: Status) {
        let slot = &mut self.table.slots[usize::from(i)];
        slot.done_blocks += slot.piece_blocks;
        if !status.is_success() || slot.done_blocks >= slot.nlb {
            self.complete(i, status);
            return;
        }
        if slot.cancelled {
            self.complete(i, Status::ABORT_REQUESTED);
            return;
        }
        slot.state = SlotState::Unsent;
        self.in_flight -= 1;
        self.prepare_piece(i);
        self.unsent.push_back(i);
    }

    /// Kills the queue: every command not yet complete fails with a path error.
    fn die(&mut self, reason: String) {
        if self.dead.is_some() {
            return;
        }
        tracing::warn!(qid = self.p.qid, target = %self.link.peer.label, "NVMe/TCP I/O queue lost: {reason}");
        let _ = self.sock.shutdown(Shutdown::Both);
        // What was on the wire may still be executed by the remote: it fences the leg.
        self.revival
            .fenced
            .fetch_add(self.in_flight, Ordering::Relaxed);
        self.lost_in_flight = self.in_flight;
        // One dead queue takes the association down (as Linux's error recovery does); the
        // reconnect thread then opens this queue pair a replacement.
        self.link
            .health
            .lose(format!("I/O queue {}: {reason}", self.p.qid));
        if !self.closing && !self.revival.ready.load(Ordering::Acquire) {
            self.revival.wanted.store(true, Ordering::Release);
        }
        self.dead_at = Some(Instant::now());
        for i in 0..self.table.slots.len() {
            if matches!(
                self.table.slots[i].state,
                SlotState::Unsent | SlotState::Sent | SlotState::H2C
            ) {
                self.complete(i as u16, Status::HOST_PATHING_ERROR);
            }
        }
        self.unsent.clear();
        self.h2c.clear();
        self.tx.clear();
        self.rx.clear();
        self.dead = Some(reason);
    }

    /// Encodes queued capsules while the send buffer has room.
    #[inline]
    fn encode_unsent(&mut self) {
        while let Some(&i) = self.unsent.front() {
            if !self.encode_capsule(i) {
                break;
            }
            self.unsent.pop_front();
        }
    }

    /// Encodes H2CData PDUs for the R2Ts being answered while the send buffer has room.
    #[inline]
    fn encode_h2c(&mut self) {
        while let Some(&(i, gen)) = self.h2c.front() {
            let slot = &self.table.slots[usize::from(i)];
            if slot.state != SlotState::H2C || slot.gen != gen {
                // Completed (or reused) while its R2T was queued: nothing left to send.
                self.h2c.pop_front();
                continue;
            }
            let n = self.h2c_chunk.min(slot.h2c_end - slot.h2c_off);
            let last = slot.h2c_off + n == slot.h2c_end;
            let Some(out) = self.tx.space(tcp::data_pdu_len(n as usize, self.dg)) else {
                break;
            };
            let d = DataPdu {
                ty: PduType::H2CData,
                flags: if last { flags::LAST_PDU } else { 0 },
                cccid: i,
                ttag: slot.ttag,
                datao: slot.h2c_off,
                datal: n,
            };
            // SAFETY: the command is outstanding and `h2c_off + n <= h2c_end <= len`.
            let bytes = unsafe { slot.h2c_bytes(slot.h2c_off, n) };
            let w = tcp::write_data_pdu(out, &d, bytes, self.dg);
            self.tx.commit(w);
            let slot = &mut self.table.slots[usize::from(i)];
            slot.h2c_off += n;
            if last {
                slot.state = SlotState::Sent;
                self.h2c.pop_front();
            }
        }
    }

    /// One `recv` and its PDUs, then one `send` of everything encodable.
    #[inline]
    fn progress(&mut self) {
        if self.in_flight > 0 {
            match self.rx.recv(&mut self.sock) {
                Ok(0) => {}
                Ok(_) => self.process_rx(),
                Err(e) => {
                    self.die(format!("recv failed: {e}"));
                    return;
                }
            }
            if self.dead.is_some() {
                return;
            }
        }
        self.encode_unsent();
        self.encode_h2c();
        if let Err(e) = self.tx.send(&mut self.sock) {
            self.die(format!("send failed: {e}"));
        }
    }
}

impl TcpQueuePair {
    /// Cancels one command (see [`QueuePair::cancel`]): one not on the wire yet — held for a
    /// reconnect, or queued behind a full send buffer — completes with Command Abort
    /// Requested at the next poll; one the controller has gets an NVMe Abort on the admin
    /// queue, sends no further piece, and completes when the controller answers it. False
    /// when `tag` is not outstanding or the Abort could not be sent.
    #[cold]
    fn cancel_one(&mut self, tag: u64) -> bool {
        if let Some(k) = self.held.iter().position(|c| c.tag == tag) {
            self.held.remove(k);
            self.complete_held(tag, Status::ABORT_REQUESTED);
            return true;
        }
        let found = self.table.slots.iter().position(|s| {
            s.tag == tag
                && matches!(
                    s.state,
                    SlotState::Unsent | SlotState::Sent | SlotState::H2C
                )
        });
        let Some(i) = found else {
            return false;
        };
        let i = i as u16;
        if self.table.slots[usize::from(i)].state == SlotState::Unsent {
            self.unsent.retain(|&u| u != i);
            self.complete(i, Status::ABORT_REQUESTED);
            return true;
        }
        self.table.slots[usize::from(i)].cancelled = true;
        self.link.admin.abort(self.p.qid, i)
    }
}

impl QueuePair for TcpQueuePair {
    fn depth(&self) -> u32 {
        self.p.depth
    }

    fn cancel(&mut self, tags: &[u64]) -> usize {
        tags.iter().filter(|&&t| self.cancel_one(t)).count()
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Aborts what the controller has and leaves it to a reaper thread; the fence is done
    /// once the controller answered every command, or once the link-loss fence covers them
    /// (`close`).
    fn close(self: Box<Self>) -> crate::Fence {
        (*self).close_fenced()
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        if self.dead.is_none() && self.link.health.is_lost() {
            // An idle queue pair on a lost association: its replacement may be ready.
            self.lose_link();
        }
        if self.dead.is_some() {
            self.try_revive();
        }
        if self.outstanding >= self.p.depth {
            return Err(SubmitError::QueueFull);
        }
        let Some(i) = self.table.alloc() else {
            return Err(SubmitError::QueueFull);
        };
        self.outstanding += 1;
        if self.dead.is_some() && self.holds() {
            self.table.release(i);
            self.held.push_back(cmd);
            return Ok(());
        }
        match self.prepare(i, &cmd) {
            Err(status) => self.complete(i, status),
            Ok(()) if self.dead.is_some() => self.complete(i, Status::HOST_PATHING_ERROR),
            Ok(()) => {
                self.table.slots[usize::from(i)].state = SlotState::Unsent;
                if !self.unsent.is_empty() || !self.encode_capsule(i) {
                    self.unsent.push_back(i);
                }
            }
        }
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.dead.is_some() {
            self.try_revive();
        }
        if self.dead.is_none() {
            if self.link.health.is_lost() {
                self.lose_link();
                self.try_revive();
            } else {
                self.progress();
            }
        }
        if !self.held.is_empty() {
            self.expire_held(Instant::now());
        }
        let n = out.len().min(self.done.len());
        for o in &mut out[..n] {
            let i = self.done.pop_front().expect("n <= done.len()");
            let slot = &self.table.slots[usize::from(i)];
            *o = Completion {
                tag: slot.tag,
                status: slot.status,
            };
            self.table.release(i);
        }
        self.outstanding -= n as u32;
        n
    }
}

impl Drop for TcpQueuePair {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.link.release_qid(self.p.qid);
    }
}

/// The queue parameters for a queue pair of `depth` on `link`'s controller, queue `qid`.
fn params(link: &Link, depth: u32, qid: u16) -> QueueParams {
    let info = &link.info;
    QueueParams {
        qid,
        depth: depth.min(queue_size(link, depth)),
        nsid: link.opts.nsid,
        lba_shift: link.geo.lba_shift(),
        in_capsule: info.in_capsule,
        max_transfer: info.max_transfer,
    }
}

/// Wire queue entries for `depth` on `link`'s controller.
fn queue_size(link: &Link, depth: u32) -> u32 {
    let info = &link.info;
    let mut limit = link.opts.queue_size.min(info.max_queue_entries);
    if info.maxcmd > 0 {
        limit = limit.min(u32::from(info.maxcmd));
    }
    depth.clamp(2, limit.clamp(2, 65536))
}

/// Opens I/O queue connections on a controller; see [`super::NvmeTcpDevice::open_tcp_qpair`].
pub(super) fn open(sup: &Supervisor, link: &Arc<Link>, depth: u32) -> Result<TcpQueuePair> {
    if depth == 0 {
        return Err(Error::QueuePair(format!("{}: depth 0", link.peer.label)));
    }
    let size = queue_size(link, depth);
    let conn = super::connect_io_queue(link, size)?;
    let qid = conn.1;
    let revival = Arc::new(Revival::new(size));
    match TcpQueuePair::new(Arc::clone(link), conn.0, params(link, depth, qid), revival) {
        Ok(q) => {
            sup.register(&q.revival);
            Ok(q)
        }
        Err(e) => {
            link.release_qid(qid);
            Err(e)
        }
    }
}
