//! The controller: bring-up (NVMe Base 2.0 §3.5.1), the admin queue, the admin commands the
//! driver sends, and the reset that faults every queue pair when the controller fails.

use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cmd::{op, QUEUE_PC};
use super::region::DmaRegion;
use super::regs::{self, cc, csts, Capabilities, PAGE_SIZE};
use super::{PciFunction, PcieOptions};
use crate::spec::admin::{cns, feature, IdentifyController, IdentifyNamespace};
use crate::spec::{CompletionQueueEntry, Geometry, Status, SubmissionQueueEntry};
use crate::{Error, Result};

/// Admin queue entries.
const ADMIN_ENTRIES: u16 = 32;

/// Controller health, shared by every queue pair (one relaxed load per poll).
const LIVE: u8 = 0;
/// Reset after CSTS.CFS or a command timeout; every queue pair fails its commands.
const FAILED: u8 = 1;
/// Registers read all-ones: the device is gone (surprise removal).
const GONE: u8 = 2;

/// Why the controller stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// CSTS.CFS was set.
    Fatal,
    /// A command did not complete in time.
    Timeout,
    /// Registers read all-ones.
    Gone,
}

#[derive(Debug)]
struct AdminQueue {
    sq: DmaRegion,
    cq: DmaRegion,
    /// 4 KiB for Identify data.
    data: DmaRegion,
    tail: u16,
    head: u16,
    phase: bool,
    cid: u16,
}

/// A brought-up controller and namespace.
#[derive(Debug)]
pub(crate) struct Controller {
    pub func: Arc<dyn PciFunction>,
    pub name: String,
    pub cap: Capabilities,
    pub geo: Geometry,
    pub nsid: u32,
    /// Largest transfer of one command, bytes (MDTS, capped by the `max_transfer` option).
    pub max_transfer: usize,
    pub timeout: Duration,
    /// Entries of each I/O queue at most (CAP.MQES, capped by `queue_size`).
    pub queue_entries: u16,
    pub model: String,
    pub serial: String,
    /// Identify Controller VWC bit 0: the controller has a volatile write cache.
    pub volatile_cache: bool,
    health: AtomicU8,
    admin: Mutex<AdminQueue>,
    free_qids: Mutex<Vec<u16>>,
}

fn step_err(name: &str, step: &str, reason: impl Into<String>) -> Error {
    Error::Pcie {
        device: name.to_string(),
        step: step.to_string(),
        reason: reason.into(),
    }
}

impl Controller {
    /// Brings the controller up (§3.5.1) and identifies namespace `opts.nsid`.
    pub fn init(func: Arc<dyn PciFunction>, name: &str, opts: &PcieOptions) -> Result<Self> {
        let err = |step: &str, reason: String| step_err(name, step, reason);
        // §3.5.1 step 1: read CAP; all-ones means nothing answers at BAR0.
        let raw_cap = func.read64(regs::CAP);
        if raw_cap == u64::MAX {
            return Err(err(
                "read CAP",
                "registers read all-ones: the device is gone".into(),
            ));
        }
        let cap = Capabilities::decode(raw_cap);
        if !cap.css_nvm {
            return Err(err(
                "check CAP.CSS",
                "the NVM command set is not supported".into(),
            ));
        }
        if cap.mpsmin != 0 {
            return Err(err(
                "check CAP.MPSMIN",
                format!(
                    "minimum page size {} KiB; 4 KiB pages required",
                    4 << cap.mpsmin
                ),
            ));
        }
        // Step 2: reset: CC.EN = 0, wait for CSTS.RDY = 0 (at most CAP.TO).
        let cur = func.read32(regs::CC);
        if cur & cc::EN != 0 {
            func.write32(regs::CC, cur & !cc::EN);
        }
        wait_ready(&*func, false, cap.ready_timeout())
            .map_err(|r| err("wait for CSTS.RDY=0 after CC.EN=0", r))?;
        // Step 3: admin queues: AQA, ASQ, ACQ.
        let entries = ADMIN_ENTRIES.min(cap.mqes as u16);
        let alloc = |len| func.alloc_dma(len);
        let sq = alloc(usize::from(entries) * SubmissionQueueEntry::SIZE)?;
        let cq = alloc(usize::from(entries) * CompletionQueueEntry::SIZE)?;
        let data = alloc(PAGE_SIZE)?;
        let n = u32::from(entries - 1);
        func.write32(regs::AQA, (n << 16) | n);
        func.write64(regs::ASQ, sq.iova());
        func.write64(regs::ACQ, cq.iova());
        // Steps 4–6: CC (command set, page size, arbitration, entry sizes), then EN = 1 and
        // wait for CSTS.RDY = 1 (at most CAP.TO).
        func.write32(regs::CC, regs::cc_enable());
        wait_ready(&*func, true, cap.ready_timeout())
            .map_err(|r| err("wait for CSTS.RDY=1 after CC.EN=1", r))?;
        let mut ctrl = Self {
            func,
            name: name.to_string(),
            cap,
            geo: Geometry {
                lba_size: 512,
                num_blocks: 0,
            },
            nsid: opts.nsid,
            max_transfer: opts.max_transfer,
            timeout: opts.timeout,
            queue_entries: (cap.mqes.min(u32::from(opts.queue_size))) as u16,
            model: String::new(),
            serial: String::new(),
            volatile_cache: true,
            health: AtomicU8::new(LIVE),
            admin: Mutex::new(AdminQueue {
                sq,
                cq,
                data,
                tail: 0,
                head: 0,
                phase: true,
                cid: 0,
            }),
            free_qids: Mutex::new(Vec::new()),
        };
        // Step 7 (§3.5.1): Identify Controller, then the namespace.
        let idc = ctrl.identify(cns::CONTROLLER, 0, "Identify Controller")?;
        let idc = IdentifyController::read_from(&idc);
        if idc.mdts != 0 {
            let mdts = PAGE_SIZE << (idc.mdts + cap.mpsmin);
            ctrl.max_transfer = ctrl.max_transfer.min(mdts);
        }
        ctrl.model = String::from_utf8_lossy(&idc.mn).trim().to_string();
        ctrl.serial = String::from_utf8_lossy(&idc.sn).trim().to_string();
        ctrl.volatile_cache = idc.vwc & 1 != 0;
        let step = format!("Identify Namespace {}", opts.nsid);
        let idn = IdentifyNamespace::read_from(&ctrl.identify(cns::NAMESPACE, opts.nsid, &step)?);
        let fmt = idn.lbaf[usize::from(idn.flbas & 0xf)];
        let lbads = (fmt >> 16) & 0xff;
        if fmt & 0xffff != 0 || !(9..=12).contains(&lbads) || lbads == 10 || lbads == 11 {
            return Err(err(
                &step,
                format!("LBA format {fmt:#x}: only 512 or 4096-byte blocks without metadata"),
            ));
        }
        if idn.nsze == 0 {
            return Err(err(&step, "the namespace is not active (size 0)".into()));
        }
        ctrl.geo = Geometry {
            lba_size: 1 << lbads,
            num_blocks: idn.nsze,
        };
        ctrl.max_transfer = (ctrl.max_transfer / ctrl.geo.lba_size as usize
            * ctrl.geo.lba_size as usize)
            .max(ctrl.geo.lba_size as usize);
        // Step 8: Set Features Number of Queues (§5.27.1.5); the grant is 0's based.
        let want = u32::from(opts.io_queues - 1);
        let cqe = ctrl.admin_cmd(
            SubmissionQueueEntry {
                opcode: op::SET_FEATURES,
                cdw10: u32::from(feature::NUMBER_OF_QUEUES),
                cdw11: (want << 16) | want,
                ..Default::default()
            },
            "Set Features Number of Queues",
        )?;
        let granted = ((cqe.dw0 & 0xffff).min(cqe.dw0 >> 16) + 1).min(want + 1) as u16;
        *ctrl.free_qids.lock().unwrap_or_else(|p| p.into_inner()) = (1..=granted).rev().collect();
        Ok(ctrl)
    }

    fn identify(&self, cns: u8, nsid: u32, step: &str) -> Result<Vec<u8>> {
        let mut page = vec![0u8; PAGE_SIZE];
        let admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let data = admin.data.iova();
        drop(admin);
        self.admin_cmd(
            SubmissionQueueEntry {
                opcode: op::IDENTIFY,
                nsid,
                dptr: [data, 0],
                cdw10: u32::from(cns),
                ..Default::default()
            },
            step,
        )?;
        let admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        admin.data.read_bytes(0, &mut page);
        Ok(page)
    }

    /// Runs one admin command to completion; an error status, a timeout or a dead controller
    /// is an error naming `step`. A timeout fails the controller.
    pub fn admin_cmd(
        &self,
        mut sqe: SubmissionQueueEntry,
        step: &str,
    ) -> Result<CompletionQueueEntry> {
        let err = |reason: String| step_err(&self.name, step, reason);
        if let Some(f) = self.failure() {
            return Err(err(format!("the controller is {f:?}")));
        }
        let mut q = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let dstrd = self.cap.dstrd;
        q.cid = q.cid.wrapping_add(1);
        sqe.cid = q.cid;
        let tail = usize::from(q.tail);
        q.sq.write_bytes(tail * SubmissionQueueEntry::SIZE, &sqe.to_bytes());
        q.tail = (q.tail + 1) % ADMIN_ENTRIES.min(self.cap.mqes as u16);
        fence(Ordering::SeqCst);
        self.func
            .write32(regs::sq_tail_doorbell(0, dstrd), u32::from(q.tail));
        let deadline = Instant::now() + self.timeout;
        loop {
            let off = usize::from(q.head) * CompletionQueueEntry::SIZE;
            if (q.cq.read_u16(off + 14) & 1 != 0) == q.phase {
                fence(Ordering::Acquire);
                let mut raw = [0u8; 16];
                q.cq.read_bytes(off, &mut raw);
                let cqe = CompletionQueueEntry::from_bytes(&raw);
                let entries = ADMIN_ENTRIES.min(self.cap.mqes as u16);
                q.head += 1;
                if q.head == entries {
                    q.head = 0;
                    q.phase = !q.phase;
                }
                self.func
                    .write32(regs::cq_head_doorbell(0, dstrd), u32::from(q.head));
                if cqe.cid != sqe.cid {
                    continue;
                }
                let status = cqe.status();
                if !status.is_success() {
                    return Err(err(format!("status {status}")));
                }
                return Ok(cqe);
            }
            let st = self.func.read32(regs::CSTS);
            if st == u32::MAX {
                drop(q);
                self.fail(Failure::Gone);
                return Err(err("registers read all-ones: the device is gone".into()));
            }
            if st & csts::CFS != 0 {
                drop(q);
                self.fail(Failure::Fatal);
                return Err(err("controller fatal status (CSTS.CFS)".into()));
            }
            if Instant::now() > deadline {
                drop(q);
                self.fail(Failure::Timeout);
                return Err(err(format!("no completion within {:?}", self.timeout)));
            }
            std::hint::spin_loop();
        }
    }

    /// Creates I/O CQ and SQ `qid` of `entries` over `cq`/`sq` (§5.4, §5.5): polled, no
    /// interrupts.
    pub fn create_io_queues(
        &self,
        qid: u16,
        entries: u16,
        cq: &DmaRegion,
        sq: &DmaRegion,
    ) -> Result<()> {
        let cdw10 = (u32::from(entries - 1) << 16) | u32::from(qid);
        self.admin_cmd(
            SubmissionQueueEntry {
                opcode: op::CREATE_IO_CQ,
                dptr: [cq.iova(), 0],
                cdw10,
                cdw11: QUEUE_PC,
                ..Default::default()
            },
            &format!("Create I/O Completion Queue {qid}"),
        )?;
        let sq_res = self.admin_cmd(
            SubmissionQueueEntry {
                opcode: op::CREATE_IO_SQ,
                dptr: [sq.iova(), 0],
                cdw10,
                cdw11: (u32::from(qid) << 16) | QUEUE_PC,
                ..Default::default()
            },
            &format!("Create I/O Submission Queue {qid}"),
        );
        if sq_res.is_err() {
            let _ = self.delete_queue(op::DELETE_IO_CQ, qid);
        }
        sq_res.map(|_| ())
    }

    /// Delete I/O SQ or CQ `qid` (§5.7, §5.6).
    pub fn delete_queue(&self, opcode: u8, qid: u16) -> Result<()> {
        self.admin_cmd(
            SubmissionQueueEntry {
                opcode,
                cdw10: u32::from(qid),
                ..Default::default()
            },
            &format!("Delete I/O queue {qid}"),
        )
        .map(|_| ())
    }

    /// Takes a free I/O queue id.
    pub fn take_qid(&self) -> Option<u16> {
        self.free_qids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
    }

    /// Gives an I/O queue id back.
    pub fn put_qid(&self, qid: u16) {
        self.free_qids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(qid);
    }

    /// `None` while the controller is live.
    #[inline]
    pub fn failure(&self) -> Option<Failure> {
        match self.health.load(Ordering::Relaxed) {
            LIVE => None,
            FAILED => Some(Failure::Fatal),
            _ => Some(Failure::Gone),
        }
    }

    /// The status every command of a failed controller completes with.
    pub fn failure_status(&self) -> Status {
        match self.failure() {
            Some(Failure::Gone) => Status::HOST_PATHING_ERROR.with_dnr(),
            _ => Status::INTERNAL_PATH_ERROR.with_dnr(),
        }
    }

    /// Marks the controller failed and, unless it is gone, resets it (CC.EN = 0, then waits
    /// up to CAP.TO for CSTS.RDY = 0): once reset, the controller no longer touches any
    /// queue or data buffer, so queue pairs may complete their commands with an error and
    /// their callers reuse the buffers. Only the first failure acts.
    pub fn fail(&self, why: Failure) {
        let to = if why == Failure::Gone { GONE } else { FAILED };
        if self
            .health
            .compare_exchange(LIVE, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        tracing::error!(device = %self.name, ?why, "PCIe NVMe controller failed; resetting it and failing its commands");
        if why != Failure::Gone {
            let cur = self.func.read32(regs::CC);
            if cur != u32::MAX {
                self.func.write32(regs::CC, cur & !cc::EN);
                if let Err(e) = wait_ready(&*self.func, false, self.cap.ready_timeout()) {
                    tracing::error!(device = %self.name, "controller reset: {e}");
                }
            }
        }
    }

    /// Normal shutdown (§3.6.1): CC.SHN = 01b, then waits for CSTS.SHST = 10b.
    fn shutdown(&self) {
        if self.failure().is_some() {
            return;
        }
        let cur = self.func.read32(regs::CC);
        self.func.write32(regs::CC, cur | cc::SHN_NORMAL);
        let deadline = Instant::now() + self.cap.ready_timeout();
        while Instant::now() < deadline {
            let st = self.func.read32(regs::CSTS);
            if st == u32::MAX || st & csts::SHST_MASK == csts::SHST_COMPLETE {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.func.write32(regs::CC, 0);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until CSTS.RDY reads `ready`, for at most `timeout` (CAP.TO). CSTS.CFS while
/// waiting for RDY = 1, or all-ones, is an error at once.
fn wait_ready(
    func: &dyn PciFunction,
    ready: bool,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = func.read32(regs::CSTS);
        if st == u32::MAX {
            return Err("registers read all-ones: the device is gone".into());
        }
        if ready && st & csts::CFS != 0 {
            return Err("controller fatal status (CSTS.CFS)".into());
        }
        if (st & csts::RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "CSTS.RDY did not become {} within CAP.TO ({timeout:?})",
                u8::from(ready)
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
