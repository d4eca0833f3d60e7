//! A faithful in-process model of a PCIe NVMe controller, behind the same [`PciFunction`]
//! seam the VFIO function implements, so the driver's whole logic runs in every CI build.
//!
//! The model, in one place:
//! - **Register file**: CAP (MQES, CQR, TO, DSTRD, CSS, MPSMIN/MAX), VS, CC, CSTS, AQA, ASQ,
//!   ACQ and the doorbells at `0x1000 + (2y + {0,1}) * (4 << DSTRD)`.
//! - **Enable/disable** (NVMe Base 2.0 §3.5.1, §3.5.2): CC.EN 0→1 validates AQA/ASQ/ACQ,
//!   MPS and the entry sizes (a bad value sets CSTS.CFS, as QEMU's `hw/nvme` does); CSTS.RDY
//!   follows after [`FakeConfig::ready_delay`] (`None`: never). CC.EN 1→0 drops every queue
//!   and clears RDY at once.
//! - **Queue processing happens on the doorbell write**, synchronously: an SQ tail doorbell
//!   processes every new entry (fetch through the IOMMU table, execute, post the CQE with the
//!   current phase tag); a CQ that is full stalls its SQs until a CQ head doorbell frees room.
//!   Completions therefore appear in memory before the doorbell write returns, which a real
//!   device never promises; the driver does not rely on it (it polls phase tags).
//! - **DMA** goes through an IOMMU table: regions from [`PciFunction::alloc_dma`] and
//!   registered buffers only. A PRP or queue address outside them is a DMA fault: Data
//!   Transfer Error for data, CSTS.CFS for a queue entry.
//! - **Commands**: admin Identify (CNS 00h/01h), Create/Delete I/O CQ/SQ, Set/Get Features
//!   Number of Queues, Abort; I/O Read, Write, Flush, Write Zeroes, Dataset Management over
//!   an in-memory namespace, validated like `hw/nvme` (queue ids and sizes, PC bit, PRP
//!   offsets and lists, MDTS, LBA range, namespace id).
//! - **Error injection** ([`FakeFault`]): fatal status, commands that never complete, a
//!   status error, and surprise removal (all registers read all-ones, nothing is processed).

mod exec;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::region::{device_read, device_write, DmaRegion};
use super::regs::{self, cc, csts, Capabilities, PAGE_SIZE};
use super::PciFunction;
use crate::spec::{CompletionQueueEntry, Status, SubmissionQueueEntry};
use crate::Result;

/// The controller's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeConfig {
    /// Namespace 1's size in bytes.
    pub bytes: u64,
    /// Logical block size: 512 or 4096.
    pub lba_size: u32,
    /// Entries per queue the controller supports (CAP.MQES + 1).
    pub mqes: u32,
    /// CAP.DSTRD.
    pub dstrd: u8,
    /// CAP.TO, in 500 ms units.
    pub to: u8,
    /// Identify Controller MDTS: 2^n pages per command; 0 = no limit.
    pub mdts: u8,
    /// I/O queue pairs the controller can grant.
    pub max_io_queues: u16,
    /// How long CSTS.RDY takes to follow CC.EN; `None`: it never does.
    pub ready_delay: Option<Duration>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            bytes: 16 << 20,
            lba_size: 512,
            mqes: 1024,
            dstrd: 0,
            to: 2,
            mdts: 5,
            max_io_queues: 8,
            ready_delay: Some(Duration::ZERO),
        }
    }
}

/// An injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeFault {
    /// Sets CSTS.CFS now: the controller stops processing until it is disabled.
    Fatal,
    /// The next `count` I/O commands are fetched and never completed (until Abort or reset).
    Hang { count: u32 },
    /// The next `count` I/O commands complete with `status`, touching nothing.
    Status { status: Status, count: u32 },
    /// Surprise removal: every register reads all-ones, writes are lost, nothing completes.
    Remove,
}

/// What the controller saw, for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes.
    pub cq_doorbells: u64,
    /// Doorbell writes naming no queue or a value past the queue's end (ignored).
    pub bad_doorbells: u64,
    /// Admin commands executed.
    pub admin_commands: u64,
    /// I/O commands executed (each split part counts).
    pub io_commands: u64,
    /// Largest number of pages one I/O command transferred.
    pub max_pages: u32,
    /// PRP list pages read (a chained list reads several).
    pub prp_list_pages: u64,
    /// Times the controller went from enabled to disabled.
    pub resets: u64,
}

#[derive(Clone, Copy, Debug)]
struct Sq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Clone, Copy, Debug)]
struct Cq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    phase: bool,
}

impl Cq {
    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }
}

/// A command fetched and held back (injected hang), answerable by Abort.
#[derive(Clone, Copy, Debug)]
struct Held {
    sqid: u16,
    cid: u16,
}

struct State {
    cfg: FakeConfig,
    cap: Capabilities,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    ready_at: Option<Instant>,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// Granted I/O queues (Set Features Number of Queues), 1-based count.
    granted: Option<u16>,
    ns: Vec<u8>,
    /// Mapped DMA ranges: (iova, len).
    iommu: Vec<(u64, usize)>,
    faults: VecDeque<FakeFault>,
    held: Vec<Held>,
    removed: bool,
    stats: FakeStats,
}

/// The fake controller. Clones share one controller.
#[derive(Clone)]
pub struct FakeController {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for FakeController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeController")
            .field("cfg", &self.lock().cfg)
            .finish()
    }
}

impl FakeController {
    /// A controller with namespace 1 of `cfg.bytes`, disabled (CC.EN = 0).
    pub fn new(cfg: FakeConfig) -> Self {
        let cap = Capabilities {
            mqes: cfg.mqes,
            cqr: true,
            to: cfg.to,
            dstrd: cfg.dstrd,
            css_nvm: true,
            mpsmin: 0,
            mpsmax: 4,
        };
        let queues = usize::from(cfg.max_io_queues) + 1;
        let state = State {
            cap,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            ready_at: None,
            sqs: vec![None; queues],
            cqs: vec![None; queues],
            granted: None,
            ns: vec![0; cfg.bytes as usize],
            iommu: Vec::new(),
            faults: VecDeque::new(),
            held: Vec::new(),
            removed: false,
            stats: FakeStats::default(),
            cfg,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a fault; `Fatal` and `Remove` take effect at once.
    pub fn inject(&self, fault: FakeFault) {
        let mut s = self.lock();
        match fault {
            FakeFault::Fatal => s.csts |= csts::CFS,
            FakeFault::Remove => s.removed = true,
            f => s.faults.push_back(f),
        }
    }

    /// What the controller saw so far.
    pub fn stats(&self) -> FakeStats {
        self.lock().stats
    }

    /// A copy of `len` bytes of the namespace at byte `off`.
    pub fn read_media(&self, off: usize, len: usize) -> Vec<u8> {
        self.lock().ns[off..off + len].to_vec()
    }

    /// Commands fetched and held by an injected hang.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// I/O submission queues that exist now.
    pub fn io_queues(&self) -> usize {
        self.lock()
            .sqs
            .iter()
            .skip(1)
            .filter(|q| q.is_some())
            .count()
    }

    /// Bytes of DMA memory mapped now (regions and registered buffers).
    pub fn mapped_bytes(&self) -> usize {
        self.lock().iommu.iter().map(|r| r.1).sum()
    }
}

impl State {
    fn ready(&mut self) -> bool {
        if self.csts & csts::RDY == 0 {
            if let Some(at) = self.ready_at {
                if Instant::now() >= at {
                    self.csts |= csts::RDY;
                }
            }
        }
        self.csts & csts::RDY != 0
    }

    fn mapped(&self, iova: u64, len: usize) -> bool {
        self.iommu.iter().any(|&(base, l)| {
            iova >= base
                && iova
                    .checked_add(len as u64)
                    .is_some_and(|e| e <= base + l as u64)
        })
    }

    /// DMA read of host memory; `false` (nothing copied) outside the IOMMU table.
    fn dma_read(&self, iova: u64, dst: &mut [u8]) -> bool {
        if !self.mapped(iova, dst.len()) {
            return false;
        }
        // SAFETY: the range lies inside a mapping of the table; mappings are removed (under
        // this controller's lock, which is held) before their memory is freed.
        unsafe { device_read(iova, dst) };
        true
    }

    /// DMA write of host memory; `false` (nothing written) outside the IOMMU table.
    fn dma_write(&self, iova: u64, src: &[u8]) -> bool {
        if !self.mapped(iova, src.len()) {
            return false;
        }
        // SAFETY: as in `dma_read`.
        unsafe { device_write(iova, src) };
        true
    }

    fn read_reg(&mut self, off: u32) -> u32 {
        if self.removed {
            return u32::MAX;
        }
        let cap = self.cap.encode();
        match off {
            regs::CAP => cap as u32,
            o if o == regs::CAP + 4 => (cap >> 32) as u32,
            regs::VS => 0x0002_0000,
            regs::CC => self.cc,
            regs::CSTS => {
                self.ready();
                self.csts
            }
            regs::AQA => self.aqa,
            regs::ASQ => self.asq as u32,
            o if o == regs::ASQ + 4 => (self.asq >> 32) as u32,
            regs::ACQ => self.acq as u32,
            o if o == regs::ACQ + 4 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u32, val: u32) {
        if self.removed {
            return;
        }
        match off {
            regs::CC => self.write_cc(val),
            regs::AQA => self.aqa = val & 0x0fff_0fff,
            regs::ASQ => self.asq = (self.asq & !0xffff_ffff) | u64::from(val & !0xfff),
            o if o == regs::ASQ + 4 => self.asq = (self.asq & 0xffff_ffff) | (u64::from(val) << 32),
            regs::ACQ => self.acq = (self.acq & !0xffff_ffff) | u64::from(val & !0xfff),
            o if o == regs::ACQ + 4 => self.acq = (self.acq & 0xffff_ffff) | (u64::from(val) << 32),
            o if o >= regs::DOORBELL_BASE => self.doorbell(o, val),
            _ => {}
        }
    }

    fn write_cc(&mut self, val: u32) {
        let was = self.cc & cc::EN != 0;
        self.cc = val;
        let now = val & cc::EN != 0;
        if was && !now {
            self.disable();
        } else if !was && now {
            self.enable();
        }
        if val & (0b11 << 14) != 0 {
            // Shutdown notification: done at once.
            self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
        }
    }

    /// CC.EN 0→1 (§3.5.1 steps 4–5): validates the admin queue set-up.
    fn enable(&mut self) {
        let mps = (self.cc >> cc::MPS_SHIFT) & 0xf;
        let css = (self.cc >> cc::CSS_SHIFT) & 0x7;
        let asqs = (self.aqa & 0xfff) + 1;
        let acqs = ((self.aqa >> 16) & 0xfff) + 1;
        let sqes = (self.cc >> cc::IOSQES_SHIFT) & 0xf;
        let cqes = (self.cc >> cc::IOCQES_SHIFT) & 0xf;
        let ok = self.asq != 0
            && self.acq != 0
            && asqs >= 2
            && acqs >= 2
            && asqs <= self.cap.mqes
            && acqs <= self.cap.mqes
            && mps >= u32::from(self.cap.mpsmin)
            && mps <= u32::from(self.cap.mpsmax)
            && mps == 0
            && css == 0
            && sqes == regs::IOSQES
            && cqes == regs::IOCQES;
        if !ok {
            self.csts |= csts::CFS;
            return;
        }
        self.sqs[0] = Some(Sq {
            base: self.asq,
            size: asqs as u16,
            head: 0,
            tail: 0,
            cqid: 0,
        });
        self.cqs[0] = Some(Cq {
            base: self.acq,
            size: acqs as u16,
            head: 0,
            tail: 0,
            phase: true,
        });
        self.ready_at = self.cfg.ready_delay.map(|d| Instant::now() + d);
        self.ready();
    }

    /// CC.EN 1→0 (controller reset, §3.7.2): every queue and held command is dropped.
    fn disable(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.held.clear();
        self.granted = None;
        self.ready_at = None;
        self.csts &= !(csts::RDY | csts::CFS | csts::SHST_MASK);
        self.stats.resets += 1;
    }

    fn doorbell(&mut self, off: u32, val: u32) {
        let stride = 4u32 << self.cap.dstrd;
        let rel = off - regs::DOORBELL_BASE;
        let idx = rel / stride;
        let qid = (idx / 2) as usize;
        if rel % stride != 0 || !self.ready() || self.csts & csts::CFS != 0 {
            self.stats.bad_doorbells += u64::from(rel % stride != 0);
            return;
        }
        if idx % 2 == 0 {
            match self.sqs.get_mut(qid).and_then(|q| q.as_mut()) {
                Some(sq) if val < u32::from(sq.size) => {
                    sq.tail = val as u16;
                    self.stats.sq_doorbells += 1;
                    self.process_sq(qid as u16);
                }
                _ => self.stats.bad_doorbells += 1,
            }
        } else {
            match self.cqs.get_mut(qid).and_then(|q| q.as_mut()) {
                Some(cq) if val < u32::from(cq.size) => {
                    cq.head = val as u16;
                    self.stats.cq_doorbells += 1;
                    // SQs stalled on a full CQ go on.
                    for sqid in 0..self.sqs.len() {
                        if self.sqs[sqid].is_some_and(|s| usize::from(s.cqid) == qid) {
                            self.process_sq(sqid as u16);
                        }
                    }
                }
                _ => self.stats.bad_doorbells += 1,
            }
        }
    }

    /// Fetches and executes the SQ's new entries while its CQ has room.
    fn process_sq(&mut self, sqid: u16) {
        loop {
            if self.csts & csts::CFS != 0 || self.removed {
                return;
            }
            let Some(sq) = self.sqs[usize::from(sqid)] else {
                return;
            };
            if sq.head == sq.tail {
                return;
            }
            if self.cqs[usize::from(sq.cqid)].map_or(true, |cq| cq.full()) {
                return;
            }
            let mut raw = [0u8; SubmissionQueueEntry::SIZE];
            let at = sq.base + u64::from(sq.head) * SubmissionQueueEntry::SIZE as u64;
            if !self.dma_read(at, &mut raw) {
                // The controller cannot fetch its own queue: fatal.
                self.csts |= csts::CFS;
                return;
            }
            let head = (sq.head + 1) % sq.size;
            if let Some(q) = self.sqs[usize::from(sqid)].as_mut() {
                q.head = head;
            }
            let sqe = SubmissionQueueEntry::from_bytes(&raw);
            let done = if sqid == 0 {
                self.stats.admin_commands += 1;
                Some(self.admin(&sqe))
            } else {
                self.stats.io_commands += 1;
                self.io(sqid, &sqe)
            };
            if let Some((status, dw0)) = done {
                self.post(sqid, sqe.cid, status, dw0);
            }
        }
    }

    /// Posts a CQE for a command of `sqid` on its CQ, with the CQ's phase tag.
    fn post(&mut self, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let Some(sq) = self.sqs[usize::from(sqid)] else {
            return;
        };
        let Some(cq) = self.cqs[usize::from(sq.cqid)].as_mut() else {
            return;
        };
        let mut cqe = CompletionQueueEntry {
            dw0,
            dw1: 0,
            sq_head: sq.head,
            sq_id: sqid,
            cid,
            status: u16::from(cq.phase),
        };
        cqe.set_status(status);
        let at = cq.base + u64::from(cq.tail) * CompletionQueueEntry::SIZE as u64;
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        if !self.dma_write(at, &cqe.to_bytes()) {
            self.csts |= csts::CFS;
        }
    }
}

impl PciFunction for FakeController {
    fn read32(&self, off: u32) -> u32 {
        self.lock().read_reg(off)
    }

    fn write32(&self, off: u32, val: u32) {
        self.lock().write_reg(off, val);
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        let region = DmaRegion::heap(len)?;
        self.lock().iommu.push((region.iova(), region.len()));
        let state = Arc::downgrade(&self.state);
        Ok(region.on_drop(Box::new(move |iova, len| {
            if let Some(state) = state.upgrade() {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(i) = s.iommu.iter().position(|&r| r == (iova, len)) {
                    s.iommu.swap_remove(i);
                }
            }
        })))
    }

    unsafe fn map_dma(&self, ptr: *mut u8, len: usize) -> Result<()> {
        self.lock().iommu.push((ptr as u64, len));
        Ok(())
    }

    fn unmap_dma(&self, ptr: *mut u8, len: usize) {
        let mut s = self.lock();
        if let Some(i) = s.iommu.iter().position(|&r| r == (ptr as u64, len)) {
            s.iommu.swap_remove(i);
        }
    }

    fn name(&self) -> &str {
        "fake"
    }
}

/// Pages a transfer of `len` bytes starting at `addr` touches.
fn pages(addr: u64, len: usize) -> u32 {
    let off = (addr as usize) % PAGE_SIZE;
    (off + len).div_ceil(PAGE_SIZE) as u32
}
