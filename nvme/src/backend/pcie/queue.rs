//! One polled I/O queue pair (an I/O CQ and SQ, NVMe Base 2.0 §3.3.1) per `open_qpair`:
//! batch submission with one SQ tail doorbell per poll, completion by phase tag with one CQ
//! head doorbell per poll, commands split at the transfer limit (MDTS), per-command timeouts.
//!
//! Data reaches the controller either directly (buffers of a pool registered with
//! [`register_buffers`](QueuePair::register_buffers), mapped into the IOMMU) or through this
//! queue pair's bounce memory (one transfer-sized slot per command identifier).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::admin::{Controller, Failure};
use super::cmd::op;
use super::prp;
use super::region::DmaRegion;
use super::regs::{self, csts, PAGE_SIZE};
use crate::dma::DmaPool;
use crate::queue::{Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::opcode::{dsm_range, DSM_ATTR_DEALLOCATE};
use crate::spec::{CompletionQueueEntry, NvmOpcode, Status, SubmissionQueueEntry};
use crate::{Error, Result};

/// Idle polls between two health checks (CSTS read, timeout scan).
const HEALTH_EVERY: u32 = 64;

/// A caller's command, possibly split into several NVMe commands.
#[derive(Clone, Copy, Debug)]
struct Slot {
    cmd: IoCommand,
    /// Bytes (data ops) handed to the SQ so far; non-data ops: 0 until issued, then 1.
    issued: usize,
    /// Total to issue (bytes, or 1 for a command without data).
    total: usize,
    /// NVMe commands of this slot in flight.
    in_flight: u32,
    /// First error status of its parts.
    status: Status,
    /// Data goes straight to the caller's (registered) buffer.
    direct: bool,
    /// Taken by a caller's command not yet reported.
    busy: bool,
    /// Its completion waits in `ready`.
    in_ready: bool,
}

/// One NVMe command identifier (= index) in flight.
#[derive(Clone, Copy, Debug)]
struct Tracker {
    slot: u32,
    /// Offset of this part in the caller's buffer.
    buf_off: usize,
    len: usize,
    busy: bool,
    since: Instant,
}

/// The queue pair.
#[derive(Debug)]
pub(crate) struct PcieQueuePair {
    ctrl: Arc<Controller>,
    qid: u16,
    entries: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    sq_db: u32,
    cq_db: u32,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    /// Bytes one NVMe command transfers at most.
    chunk: usize,
    bounce: DmaRegion,
    lists: DmaRegion,
    list_bytes: usize,
    trackers: Vec<Tracker>,
    free_trackers: Vec<u16>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Slots with parts not yet in the SQ, oldest first.
    pending: VecDeque<u32>,
    /// Completions decided without the controller (invalid commands, a failed controller),
    /// with their slots.
    ready: VecDeque<(u32, Completion)>,
    registered: Option<(usize, usize)>,
    depth: u32,
    idle_polls: u32,
    failed: bool,
}

impl PcieQueuePair {
    pub fn open(ctrl: Arc<Controller>, depth: u32) -> Result<Self> {
        if depth == 0 {
            return Err(Error::QueuePair("depth 0".into()));
        }
        if let Some(f) = ctrl.failure() {
            return Err(Error::QueuePair(format!(
                "{}: the controller is {f:?}",
                ctrl.name
            )));
        }
        let qid = ctrl.take_qid().ok_or_else(|| {
            Error::QueuePair(format!("{}: every granted I/O queue is in use", ctrl.name))
        })?;
        match Self::create(ctrl.clone(), qid, depth) {
            Ok(q) => Ok(q),
            Err(e) => {
                ctrl.put_qid(qid);
                Err(e)
            }
        }
    }

    fn create(ctrl: Arc<Controller>, qid: u16, depth: u32) -> Result<Self> {
        let entries = ctrl.queue_entries.min((depth.min(4095) + 1) as u16).max(2);
        let alloc = |len: usize| ctrl.func.alloc_dma(len);
        let sq = alloc(usize::from(entries) * SubmissionQueueEntry::SIZE)?;
        let cq = alloc(usize::from(entries) * CompletionQueueEntry::SIZE)?;
        let ntrack = usize::from(entries - 1);
        let chunk = ctrl.max_transfer;
        let bounce = alloc(ntrack * chunk)?;
        let list_bytes = prp::list_pages_for(chunk) * PAGE_SIZE;
        let lists = alloc(ntrack * list_bytes)?;
        ctrl.create_io_queues(qid, entries, &cq, &sq)?;
        let now = Instant::now();
        let slot = Slot {
            cmd: IoCommand::new(IoOp::Flush, 0, 0, 0),
            issued: 0,
            total: 0,
            in_flight: 0,
            status: Status::SUCCESS,
            direct: false,
            busy: false,
            in_ready: false,
        };
        let dstrd = ctrl.cap.dstrd;
        Ok(Self {
            qid,
            entries,
            sq,
            cq,
            sq_db: regs::sq_tail_doorbell(qid, dstrd),
            cq_db: regs::cq_head_doorbell(qid, dstrd),
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            chunk,
            bounce,
            lists,
            list_bytes,
            trackers: vec![
                Tracker {
                    slot: 0,
                    buf_off: 0,
                    len: 0,
                    busy: false,
                    since: now,
                };
                ntrack
            ],
            free_trackers: (0..ntrack as u16).rev().collect(),
            slots: vec![slot; depth as usize],
            free_slots: (0..depth).rev().collect(),
            pending: VecDeque::with_capacity(depth as usize),
            ready: VecDeque::with_capacity(depth as usize),
            registered: None,
            depth,
            idle_polls: 0,
            failed: false,
            ctrl,
        })
    }

    #[inline]
    fn sq_full(&self) -> bool {
        (self.sq_tail + 1) % self.entries == self.sq_head
    }

    fn is_direct(&self, cmd: &IoCommand) -> bool {
        let p = cmd.buf.as_ptr() as usize;
        self.registered
            .is_some_and(|(base, len)| p % 4 == 0 && p >= base && p + cmd.buf.len() <= base + len)
    }

    /// Writes SQEs for pending parts while the SQ and the trackers have room; returns how
    /// many were written.
    fn issue(&mut self) -> u32 {
        let mut n = 0;
        let mut now = None;
        while let Some(&si) = self.pending.front() {
            if self.sq_full() {
                break;
            }
            let Some(cid) = self.free_trackers.pop() else {
                break;
            };
            let lba_shift = self.ctrl.geo.lba_shift();
            let slot = &mut self.slots[si as usize];
            let cmd = slot.cmd;
            let mut sqe = SubmissionQueueEntry {
                cid,
                nsid: self.ctrl.nsid,
                ..Default::default()
            };
            let t = usize::from(cid);
            let list_off = t * self.list_bytes;
            let (buf_off, len) = if cmd.op.has_data() {
                let off = slot.issued;
                let len = (slot.total - off).min(self.chunk);
                slot.issued += len;
                let addr = if slot.direct {
                    cmd.buf.as_ptr() as u64 + off as u64
                } else {
                    let b = t * self.chunk;
                    if cmd.op == IoOp::Write {
                        // SAFETY: `check` proved the caller's buffer holds `total` bytes and
                        // the submit contract keeps it valid until completion.
                        unsafe { self.bounce.copy_from(b, cmd.buf.as_ptr().add(off), len) };
                    }
                    self.bounce.iova() + b as u64
                };
                sqe.opcode = if cmd.op == IoOp::Read {
                    NvmOpcode::Read as u8
                } else {
                    NvmOpcode::Write as u8
                };
                sqe.set_lba_range(
                    cmd.slba + (off >> lba_shift) as u64,
                    (len >> lba_shift) as u32,
                );
                sqe.set_fua(cmd.wants_fua());
                let (p1, p2) = prp::build(addr, len, &self.lists, list_off);
                sqe.dptr = [p1, p2];
                (off, len)
            } else {
                slot.issued = 1;
                match cmd.op {
                    IoOp::Flush => sqe.opcode = NvmOpcode::Flush as u8,
                    IoOp::WriteZeroes => {
                        sqe.opcode = NvmOpcode::WriteZeroes as u8;
                        sqe.set_lba_range(cmd.slba, cmd.nlb);
                        sqe.set_fua(cmd.wants_fua());
                    }
                    _ => {
                        // One Dataset Management range (§3.2.3 of the NVM spec): context
                        // attributes, length in blocks, starting LBA; in the list page.
                        let range = dsm_range(cmd.slba, cmd.nlb);
                        self.lists.write_bytes(list_off, &range);
                        sqe.opcode = NvmOpcode::DatasetManagement as u8;
                        sqe.dptr = [self.lists.iova() + list_off as u64, 0];
                        sqe.cdw11 = DSM_ATTR_DEALLOCATE;
                    }
                }
                (0, 0)
            };
            slot.in_flight += 1;
            if slot.issued >= slot.total {
                self.pending.pop_front();
            }
            let since = *now.get_or_insert_with(Instant::now);
            self.trackers[t] = Tracker {
                slot: si,
                buf_off,
                len,
                busy: true,
                since,
            };
            let at = usize::from(self.sq_tail) * SubmissionQueueEntry::SIZE;
            self.sq.write_bytes(at, &sqe.to_bytes());
            self.sq_tail = (self.sq_tail + 1) % self.entries;
            n += 1;
        }
        n
    }

    /// Completes every command of this queue pair with the controller's failure status.
    fn fail_all(&mut self) {
        self.failed = true;
        let status = self.ctrl.failure_status();
        self.pending.clear();
        for t in &mut self.trackers {
            t.busy = false;
        }
        self.free_trackers = (0..self.trackers.len() as u16).rev().collect();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.busy && !slot.in_ready {
                slot.in_ready = true;
                let c = Completion {
                    tag: slot.cmd.tag,
                    status,
                };
                self.ready.push_back((i as u32, c));
            }
        }
    }

    /// Every `HEALTH_EVERY` idle polls with commands in flight: CSTS (all-ones → gone, CFS →
    /// fatal) and the oldest command's age (→ timeout). Any of them fails the controller.
    fn check_health(&mut self) {
        let st = self.ctrl.func.read32(regs::CSTS);
        let why = if st == u32::MAX {
            Some(Failure::Gone)
        } else if st & csts::CFS != 0 {
            Some(Failure::Fatal)
        } else {
            let now = Instant::now();
            let timeout = self.ctrl.timeout;
            self.trackers
                .iter()
                .any(|t| t.busy && now.duration_since(t.since) > timeout)
                .then_some(Failure::Timeout)
        };
        if let Some(why) = why {
            self.ctrl.fail(why);
        }
    }

    fn finish_slot(&mut self, si: u32, status: Status, out: &mut Completion) {
        let slot = &mut self.slots[si as usize];
        *out = Completion {
            tag: slot.cmd.tag,
            status,
        };
        slot.busy = false;
        self.free_slots.push(si);
    }
}

impl QueuePair for PcieQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.depth - self.free_slots.len() as u32
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        let Some(si) = self.free_slots.pop() else {
            return Err(SubmitError::QueueFull);
        };
        let early = if self.failed || self.ctrl.failure().is_some() {
            Err(self.ctrl.failure_status())
        } else {
            cmd.check(&self.ctrl.geo)
        };
        if let Err(status) = early {
            let slot = &mut self.slots[si as usize];
            slot.cmd = cmd;
            slot.busy = true;
            slot.in_ready = true;
            self.ready.push_back((
                si,
                Completion {
                    tag: cmd.tag,
                    status,
                },
            ));
            return Ok(());
        }
        let total = if cmd.op.has_data() {
            (cmd.nlb as usize) << self.ctrl.geo.lba_shift()
        } else {
            1
        };
        self.slots[si as usize] = Slot {
            cmd,
            issued: 0,
            total,
            in_flight: 0,
            status: Status::SUCCESS,
            direct: cmd.op.has_data() && self.is_direct(&cmd),
            busy: true,
            in_ready: false,
        };
        self.pending.push_back(si);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if !self.failed && self.ctrl.failure().is_some() {
            self.fail_all();
        }
        let mut n = 0;
        while n < out.len() {
            let Some((si, c)) = self.ready.pop_front() else {
                break;
            };
            let slot = &mut self.slots[si as usize];
            slot.busy = false;
            slot.in_ready = false;
            self.free_slots.push(si);
            out[n] = c;
            n += 1;
        }
        if self.failed {
            return n;
        }
        if self.issue() > 0 {
            fence(Ordering::SeqCst);
            self.ctrl.func.write32(self.sq_db, u32::from(self.sq_tail));
        }
        let mut reaped = 0u32;
        while n < out.len() {
            let off = usize::from(self.cq_head) * CompletionQueueEntry::SIZE;
            if (self.cq.read_u16(off + 14) & 1 != 0) != self.phase {
                break;
            }
            fence(Ordering::Acquire);
            let mut raw = [0u8; 16];
            self.cq.read_bytes(off, &mut raw);
            let cqe = CompletionQueueEntry::from_bytes(&raw);
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            reaped += 1;
            if cqe.sq_head < self.entries {
                self.sq_head = cqe.sq_head;
            }
            let t = usize::from(cqe.cid);
            if t >= self.trackers.len() || !self.trackers[t].busy {
                tracing::warn!(device = %self.ctrl.name, cid = cqe.cid, "completion for no command in flight");
                continue;
            }
            let tr = self.trackers[t];
            self.trackers[t].busy = false;
            self.free_trackers.push(cqe.cid);
            let status = cqe.status();
            let slot = &mut self.slots[tr.slot as usize];
            if status.is_success() && slot.cmd.op == IoOp::Read && !slot.direct {
                // SAFETY: the caller's buffer holds the whole transfer (`check`) and stays
                // untouched until this command is reaped (submit contract).
                unsafe {
                    self.bounce.copy_to(
                        t * self.chunk,
                        slot.cmd.buf.as_ptr().add(tr.buf_off),
                        tr.len,
                    )
                };
            }
            if !status.is_success() && slot.status.is_success() {
                slot.status = status;
            }
            slot.in_flight -= 1;
            if slot.in_flight == 0 && slot.issued >= slot.total {
                let status = slot.status;
                self.finish_slot(tr.slot, status, &mut out[n]);
                n += 1;
            }
        }
        if reaped > 0 {
            self.ctrl.func.write32(self.cq_db, u32::from(self.cq_head));
            self.idle_polls = 0;
        } else if self.free_trackers.len() < self.trackers.len() {
            self.idle_polls += 1;
            if self.idle_polls % HEALTH_EVERY == 0 {
                self.check_health();
            }
        }
        n
    }

    unsafe fn register_buffers(&mut self, pool: &DmaPool) -> Result<()> {
        let len = pool.buf_size() * pool.count() as usize;
        if let Some((base, len)) = self.registered.take() {
            self.ctrl.func.unmap_dma(base as *mut u8, len);
        }
        // SAFETY: the caller keeps the pool alive while registered (this method's contract);
        // the driver only hands its addresses to the controller, never references it.
        unsafe { self.ctrl.func.map_dma(pool.base(), len) }?;
        self.registered = Some((pool.base() as usize, len));
        Ok(())
    }
}

impl Drop for PcieQueuePair {
    fn drop(&mut self) {
        if self.ctrl.failure().is_none() {
            let sq = self.ctrl.delete_queue(op::DELETE_IO_SQ, self.qid);
            let cq = self.ctrl.delete_queue(op::DELETE_IO_CQ, self.qid);
            if let Err(e) = sq.and(cq) {
                tracing::warn!(device = %self.ctrl.name, "closing queue pair {}: {e}", self.qid);
            }
            self.ctrl.put_qid(self.qid);
        }
        if let Some((base, len)) = self.registered.take() {
            self.ctrl.func.unmap_dma(base as *mut u8, len);
        }
    }
}
