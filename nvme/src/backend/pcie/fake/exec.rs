//! Command execution of the fake controller: admin commands (queue management, Identify,
//! features, Abort) and NVM I/O commands over the in-memory namespace, with the PRP walk
//! (NVMe Base 2.0 §4.1.1) a real controller's DMA engine performs.

use super::{pages, Cq, FakeFault, Held, Sq, State};
use crate::backend::pcie::cmd::{self, op};
use crate::backend::pcie::regs::PAGE_SIZE;
use crate::spec::admin::{cns, feature, lba_format, oncs, IdentifyController, IdentifyNamespace};
use crate::spec::opcode::DSM_ATTR_DEALLOCATE;
use crate::spec::{NvmOpcode, Status, SubmissionQueueEntry};

type Done = (Status, u32);

impl State {
    /// The data segments (bus address, length) PRP1/PRP2 describe for `len` bytes, reading
    /// PRP lists (and following their chain pointers) through the IOMMU.
    pub(super) fn prp_segments(
        &mut self,
        prp1: u64,
        prp2: u64,
        len: usize,
    ) -> Result<Vec<(u64, usize)>, Status> {
        if prp1 & 0x3 != 0 {
            return Err(cmd::INVALID_PRP_OFFSET);
        }
        let first = len.min(PAGE_SIZE - (prp1 as usize % PAGE_SIZE));
        let mut segs = vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return Ok(segs);
        }
        if left <= PAGE_SIZE {
            if prp2 as usize % PAGE_SIZE != 0 {
                return Err(cmd::INVALID_PRP_OFFSET);
            }
            segs.push((prp2, left));
            return Ok(segs);
        }
        // PRP2 points at a PRP list (qword aligned; may start inside a page).
        let mut list = prp2;
        if list & 0x7 != 0 {
            return Err(cmd::INVALID_PRP_OFFSET);
        }
        while left > 0 {
            let slots = (PAGE_SIZE - list as usize % PAGE_SIZE) / 8;
            let mut raw = vec![0u8; slots * 8];
            if !self.dma_read(list, &mut raw) {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            self.stats.prp_list_pages += 1;
            let mut next = None;
            for i in 0..slots {
                let e = u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                if i == slots - 1 && left > PAGE_SIZE {
                    // The last entry of a list page that cannot hold the rest chains on.
                    if e & 0x7 != 0 {
                        return Err(cmd::INVALID_PRP_OFFSET);
                    }
                    next = Some(e);
                    break;
                }
                if e as usize % PAGE_SIZE != 0 {
                    return Err(cmd::INVALID_PRP_OFFSET);
                }
                let n = left.min(PAGE_SIZE);
                segs.push((e, n));
                left -= n;
                if left == 0 {
                    break;
                }
            }
            match next {
                Some(n) => list = n,
                None if left == 0 => break,
                None => return Err(cmd::INVALID_PRP_OFFSET),
            }
        }
        Ok(segs)
    }

    /// Copies `data` to host memory through the PRPs.
    fn dma_to_host(&mut self, sqe: &SubmissionQueueEntry, data: &[u8]) -> Result<(), Status> {
        let segs = self.prp_segments(sqe.dptr[0], sqe.dptr[1], data.len())?;
        let mut off = 0;
        for (iova, n) in segs {
            if !self.dma_write(iova, &data[off..off + n]) {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            off += n;
        }
        Ok(())
    }

    /// Copies `len` bytes from host memory through the PRPs.
    fn dma_from_host(&mut self, sqe: &SubmissionQueueEntry, len: usize) -> Result<Vec<u8>, Status> {
        let segs = self.prp_segments(sqe.dptr[0], sqe.dptr[1], len)?;
        let mut data = vec![0u8; len];
        let mut off = 0;
        for (iova, n) in segs {
            if !self.dma_read(iova, &mut data[off..off + n]) {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            off += n;
        }
        Ok(data)
    }

    pub(super) fn admin(&mut self, sqe: &SubmissionQueueEntry) -> Done {
        let ok = |dw0| (Status::SUCCESS, dw0);
        let qid = (sqe.cdw10 & 0xffff) as u16;
        let qsize = ((sqe.cdw10 >> 16) & 0xffff) + 1;
        let io_qid_ok = |s: &State| qid != 0 && usize::from(qid) < s.sqs.len();
        match sqe.opcode {
            op::IDENTIFY => {
                let mut page = vec![0u8; 4096];
                match (sqe.cdw10 & 0xff) as u8 {
                    cns::CONTROLLER => {
                        let mut id = IdentifyController::zeroed();
                        id.vid = 0x1b36;
                        id.ssvid = 0x1af4;
                        id.sn = *b"NVMIRRORFAKE0001    ";
                        id.mn[..24].copy_from_slice(b"nvmirror fake controller");
                        id.mn[24..].fill(b' ');
                        id.fr = *b"1.0     ";
                        id.mdts = self.cfg.mdts;
                        id.ver = 0x0002_0000;
                        id.sqes = 0x66;
                        id.cqes = 0x44;
                        id.nn = 1;
                        id.oncs = oncs::DATASET_MANAGEMENT | oncs::WRITE_ZEROES;
                        id.write_to(&mut page);
                    }
                    cns::NAMESPACE => {
                        if sqe.nsid != 1 {
                            return (Status::INVALID_NAMESPACE.with_dnr(), 0);
                        }
                        let mut id = IdentifyNamespace::zeroed();
                        let blocks = self.cfg.bytes / u64::from(self.cfg.lba_size);
                        id.nsze = blocks;
                        id.ncap = blocks;
                        id.nuse = blocks;
                        id.dlfeat = 1;
                        id.lbaf[0] = lba_format(self.cfg.lba_size);
                        id.write_to(&mut page);
                    }
                    _ => return (Status::INVALID_FIELD.with_dnr(), 0),
                }
                match self.dma_to_host(sqe, &page) {
                    Ok(()) => ok(0),
                    Err(s) => (s, 0),
                }
            }
            op::SET_FEATURES | op::GET_FEATURES => {
                if (sqe.cdw10 & 0xff) as u8 != feature::NUMBER_OF_QUEUES {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                let max = self.cfg.max_io_queues;
                if sqe.opcode == op::GET_FEATURES {
                    let n = u32::from(self.granted.unwrap_or(max) - 1);
                    return ok(n | (n << 16));
                }
                let nsqr = sqe.cdw11 & 0xffff;
                let ncqr = sqe.cdw11 >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                if self.sqs.iter().skip(1).any(|q| q.is_some()) {
                    // Only before any I/O queue exists.
                    return (Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
                }
                let n = (nsqr.min(ncqr) + 1).min(u32::from(max)) as u16;
                self.granted = Some(n);
                let a = u32::from(n - 1);
                ok(a | (a << 16))
            }
            op::CREATE_IO_CQ => {
                if !io_qid_ok(self)
                    || self.cqs[usize::from(qid)].is_some()
                    || qid > self.granted.unwrap_or(self.cfg.max_io_queues)
                {
                    return (cmd::INVALID_QUEUE_ID.with_dnr(), 0);
                }
                if qsize < 2 || qsize > self.cap.mqes {
                    return (cmd::INVALID_QUEUE_SIZE.with_dnr(), 0);
                }
                if sqe.cdw11 & cmd::QUEUE_PC == 0 {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                let base = sqe.dptr[0];
                if base == 0 || base as usize % PAGE_SIZE != 0 {
                    return (cmd::INVALID_PRP_OFFSET.with_dnr(), 0);
                }
                self.cqs[usize::from(qid)] = Some(Cq {
                    base,
                    size: qsize as u16,
                    head: 0,
                    tail: 0,
                    phase: true,
                });
                ok(0)
            }
            op::CREATE_IO_SQ => {
                if !io_qid_ok(self)
                    || self.sqs[usize::from(qid)].is_some()
                    || qid > self.granted.unwrap_or(self.cfg.max_io_queues)
                {
                    return (cmd::INVALID_QUEUE_ID.with_dnr(), 0);
                }
                if qsize < 2 || qsize > self.cap.mqes {
                    return (cmd::INVALID_QUEUE_SIZE.with_dnr(), 0);
                }
                if sqe.cdw11 & cmd::QUEUE_PC == 0 {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                let cqid = (sqe.cdw11 >> 16) as u16;
                if cqid == 0
                    || self
                        .cqs
                        .get(usize::from(cqid))
                        .map_or(true, |c| c.is_none())
                {
                    return (cmd::COMPLETION_QUEUE_INVALID.with_dnr(), 0);
                }
                let base = sqe.dptr[0];
                if base == 0 || base as usize % PAGE_SIZE != 0 {
                    return (cmd::INVALID_PRP_OFFSET.with_dnr(), 0);
                }
                self.sqs[usize::from(qid)] = Some(Sq {
                    base,
                    size: qsize as u16,
                    head: 0,
                    tail: 0,
                    cqid,
                });
                ok(0)
            }
            op::DELETE_IO_SQ => {
                if !io_qid_ok(self) || self.sqs[usize::from(qid)].is_none() {
                    return (cmd::INVALID_QUEUE_ID.with_dnr(), 0);
                }
                self.sqs[usize::from(qid)] = None;
                self.held.retain(|h| h.sqid != qid);
                ok(0)
            }
            op::DELETE_IO_CQ => {
                if !io_qid_ok(self) || self.cqs[usize::from(qid)].is_none() {
                    return (cmd::INVALID_QUEUE_ID.with_dnr(), 0);
                }
                if self.sqs.iter().flatten().any(|s| s.cqid == qid) {
                    return (cmd::INVALID_QUEUE_DELETION.with_dnr(), 0);
                }
                self.cqs[usize::from(qid)] = None;
                ok(0)
            }
            op::ABORT => {
                let sqid = qid;
                let cid = (sqe.cdw10 >> 16) as u16;
                match self
                    .held
                    .iter()
                    .position(|h| h.sqid == sqid && h.cid == cid)
                {
                    Some(i) => {
                        let h = self.held.swap_remove(i);
                        self.post(h.sqid, h.cid, Status::ABORT_REQUESTED, 0);
                        // DW0 bit 0 clear: the command was aborted.
                        ok(0)
                    }
                    None => ok(1),
                }
            }
            _ => (Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    /// Executes an I/O command; `None` when an injected hang holds it.
    pub(super) fn io(&mut self, sqid: u16, sqe: &SubmissionQueueEntry) -> Option<Done> {
        match self.faults.front_mut() {
            Some(FakeFault::Hang { count }) => {
                *count -= 1;
                if *count == 0 {
                    self.faults.pop_front();
                }
                self.held.push(Held { sqid, cid: sqe.cid });
                return None;
            }
            Some(FakeFault::Status { status, count }) => {
                let status = *status;
                *count -= 1;
                if *count == 0 {
                    self.faults.pop_front();
                }
                return Some((status, 0));
            }
            _ => {}
        }
        Some((self.nvm(sqe), 0))
    }

    fn nvm(&mut self, sqe: &SubmissionQueueEntry) -> Status {
        let Some(opcode) = NvmOpcode::from_u8(sqe.opcode) else {
            return Status::INVALID_OPCODE.with_dnr();
        };
        if sqe.nsid != 1 {
            return Status::INVALID_NAMESPACE.with_dnr();
        }
        let lba = self.cfg.lba_size as usize;
        let blocks = self.cfg.bytes / lba as u64;
        let (slba, nlb) = (sqe.slba(), sqe.nlb());
        let in_range = slba
            .checked_add(u64::from(nlb))
            .is_some_and(|e| e <= blocks);
        // Only used once `in_range` holds, so it cannot overflow.
        let span = || (slba as usize * lba)..((slba as usize + nlb as usize) * lba);
        match opcode {
            NvmOpcode::Flush => Status::SUCCESS,
            NvmOpcode::Read | NvmOpcode::Write => {
                let len = nlb as usize * lba;
                if self.cfg.mdts != 0 && len > (PAGE_SIZE << self.cfg.mdts) {
                    return Status::INVALID_FIELD.with_dnr();
                }
                if !in_range {
                    return Status::LBA_OUT_OF_RANGE.with_dnr();
                }
                self.stats.max_pages = self.stats.max_pages.max(pages(sqe.dptr[0], len));
                if opcode == NvmOpcode::Read {
                    let data = self.ns[span()].to_vec();
                    match self.dma_to_host(sqe, &data) {
                        Ok(()) => Status::SUCCESS,
                        Err(s) => s,
                    }
                } else {
                    match self.dma_from_host(sqe, len) {
                        Ok(data) => {
                            self.ns[span()].copy_from_slice(&data);
                            Status::SUCCESS
                        }
                        Err(s) => s,
                    }
                }
            }
            NvmOpcode::WriteZeroes => {
                if !in_range {
                    return Status::LBA_OUT_OF_RANGE.with_dnr();
                }
                self.ns[span()].fill(0);
                Status::SUCCESS
            }
            NvmOpcode::DatasetManagement => {
                let nr = (sqe.cdw10 & 0xff) as usize + 1;
                let raw = match self.dma_from_host(sqe, nr * 16) {
                    Ok(r) => r,
                    Err(s) => return s,
                };
                let ranges: Vec<(u64, u64)> = raw
                    .chunks_exact(16)
                    .map(|r| {
                        let n = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes"));
                        let s = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
                        (s, u64::from(n))
                    })
                    .collect();
                if ranges
                    .iter()
                    .any(|&(s, n)| s.checked_add(n).map_or(true, |e| e > blocks))
                {
                    return Status::LBA_OUT_OF_RANGE.with_dnr();
                }
                if sqe.cdw11 & DSM_ATTR_DEALLOCATE != 0 {
                    for (s, n) in ranges {
                        self.ns[s as usize * lba..(s + n) as usize * lba].fill(0);
                    }
                }
                Status::SUCCESS
            }
        }
    }
}
