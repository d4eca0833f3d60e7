//! The fake controller driven register by register, as a device would be by a driver with
//! bugs: each validation a real controller (and QEMU's `hw/nvme`) performs answers with the
//! status the spec names.

use super::*;
use crate::backend::pcie::cmd::{self, op};
use crate::spec::opcode::NvmOpcode;

/// An enabled fake with a 4-entry admin queue, and a tiny admin driver over it.
struct Bench {
    fake: FakeController,
    asq: DmaRegion,
    acq: DmaRegion,
    data: DmaRegion,
    tail: u16,
    head: u16,
}

impl Bench {
    fn new() -> Self {
        let fake = FakeController::new(FakeConfig::default());
        let asq = fake.alloc_dma(4096).unwrap();
        let acq = fake.alloc_dma(4096).unwrap();
        let data = fake.alloc_dma(64 << 10).unwrap();
        fake.write32(regs::AQA, (3 << 16) | 3);
        fake.write64(regs::ASQ, asq.iova());
        fake.write64(regs::ACQ, acq.iova());
        fake.write32(regs::CC, regs::cc_enable());
        assert_eq!(fake.read32(regs::CSTS) & csts::RDY, 1);
        Self {
            fake,
            asq,
            acq,
            data,
            tail: 0,
            head: 0,
        }
    }

    /// Submits one admin command and returns its CQE (the fake completes on the doorbell).
    fn admin(&mut self, mut sqe: SubmissionQueueEntry) -> CompletionQueueEntry {
        sqe.cid = self.tail;
        self.asq
            .write_bytes(usize::from(self.tail) * 64, &sqe.to_bytes());
        self.tail = (self.tail + 1) % 4;
        self.fake
            .write32(regs::sq_tail_doorbell(0, 0), u32::from(self.tail));
        let mut raw = [0u8; 16];
        self.acq.read_bytes(usize::from(self.head) * 16, &mut raw);
        self.head = (self.head + 1) % 4;
        self.fake
            .write32(regs::cq_head_doorbell(0, 0), u32::from(self.head));
        let cqe = CompletionQueueEntry::from_bytes(&raw);
        assert_eq!(cqe.cid, sqe.cid);
        cqe
    }

    fn status(&mut self, sqe: SubmissionQueueEntry) -> Status {
        let s = self.admin(sqe).status();
        Status::from_raw(s.raw() & !Status::SUCCESS.with_dnr().raw())
    }
}

fn queue(opcode: u8, qid: u16, entries: u32, cdw11: u32, base: u64) -> SubmissionQueueEntry {
    SubmissionQueueEntry {
        opcode,
        dptr: [base, 0],
        cdw10: ((entries - 1) << 16) | u32::from(qid),
        cdw11,
        ..Default::default()
    }
}

#[test]
fn phase_tags_flip_when_the_completion_queue_wraps() {
    let mut b = Bench::new();
    let mut phases = Vec::new();
    for _ in 0..6 {
        let cqe = b.admin(SubmissionQueueEntry {
            opcode: op::GET_FEATURES,
            cdw10: 7,
            ..Default::default()
        });
        phases.push(cqe.phase());
        assert!(cqe.status().is_success());
    }
    assert_eq!(phases, [true, true, true, true, false, false]);
}

#[test]
fn queue_management_is_validated_like_a_controller() {
    let mut b = Bench::new();
    let cq = b.fake.alloc_dma(4096).unwrap();
    let sq = b.fake.alloc_dma(4096).unwrap();
    let pc = cmd::QUEUE_PC;
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 0, 4, pc, cq.iova())),
        cmd::INVALID_QUEUE_ID
    );
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 99, 4, pc, cq.iova())),
        cmd::INVALID_QUEUE_ID
    );
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 1, 1, pc, cq.iova())),
        cmd::INVALID_QUEUE_SIZE
    );
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 1, 4, 0, cq.iova())),
        Status::INVALID_FIELD
    );
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 1, 4, pc, cq.iova() + 8)),
        cmd::INVALID_PRP_OFFSET
    );
    // An SQ needs an existing CQ.
    let sq_on = |cqid: u32| queue(op::CREATE_IO_SQ, 1, 4, (cqid << 16) | pc, sq.iova());
    assert_eq!(b.status(sq_on(1)), cmd::COMPLETION_QUEUE_INVALID);
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 1, 4, pc, cq.iova())),
        Status::SUCCESS
    );
    assert_eq!(
        b.status(queue(op::CREATE_IO_CQ, 1, 4, pc, cq.iova())),
        cmd::INVALID_QUEUE_ID
    );
    assert_eq!(b.status(sq_on(1)), Status::SUCCESS);
    // Number of Queues only before I/O queues exist.
    let noq = SubmissionQueueEntry {
        opcode: op::SET_FEATURES,
        cdw10: 7,
        ..Default::default()
    };
    assert_eq!(b.status(noq), Status::COMMAND_SEQUENCE_ERROR);
    // A CQ with an SQ on it cannot go; the SQ first.
    let del = |opcode| SubmissionQueueEntry {
        opcode,
        cdw10: 1,
        ..Default::default()
    };
    assert_eq!(b.status(del(op::DELETE_IO_CQ)), cmd::INVALID_QUEUE_DELETION);
    assert_eq!(b.status(del(op::DELETE_IO_SQ)), Status::SUCCESS);
    assert_eq!(b.status(del(op::DELETE_IO_SQ)), cmd::INVALID_QUEUE_ID);
    assert_eq!(b.status(del(op::DELETE_IO_CQ)), Status::SUCCESS);
    assert_eq!(
        b.status(SubmissionQueueEntry {
            opcode: 0x7f,
            ..Default::default()
        }),
        Status::INVALID_OPCODE
    );
    // Identify of a namespace that does not exist, and of an unknown CNS.
    let idn = |nsid, cns| SubmissionQueueEntry {
        opcode: op::IDENTIFY,
        nsid,
        dptr: [b.data.iova(), 0],
        cdw10: cns,
        ..Default::default()
    };
    let (bad_ns, bad_cns) = (idn(5, 0), idn(1, 0x42));
    assert_eq!(b.status(bad_ns), Status::INVALID_NAMESPACE);
    assert_eq!(b.status(bad_cns), Status::INVALID_FIELD);
}

/// An I/O queue pair of 8 entries on queue 1, and a way to run one I/O command.
fn io_queue(
    b: &mut Bench,
) -> (
    DmaRegion,
    DmaRegion,
    impl FnMut(&FakeController, SubmissionQueueEntry) -> CompletionQueueEntry,
) {
    let cq = b.fake.alloc_dma(4096).unwrap();
    let sq = b.fake.alloc_dma(4096).unwrap();
    let pc = cmd::QUEUE_PC;
    assert!(b
        .status(queue(op::CREATE_IO_CQ, 1, 8, pc, cq.iova()))
        .is_success());
    assert!(b
        .status(queue(op::CREATE_IO_SQ, 1, 8, (1 << 16) | pc, sq.iova()))
        .is_success());
    let (sq_at, cq_at) = (sq.iova(), cq.iova());
    let mut tail = 0u16;
    let run = move |fake: &FakeController, mut sqe: SubmissionQueueEntry| {
        sqe.cid = tail;
        // SAFETY: the test's SQ and CQ regions are alive for the closure's use.
        unsafe { device_write(sq_at + u64::from(tail) * 64, &sqe.to_bytes()) };
        let slot = tail;
        tail = (tail + 1) % 8;
        fake.write32(regs::sq_tail_doorbell(1, 0), u32::from(tail));
        let mut raw = [0u8; 16];
        // SAFETY: as above.
        unsafe { device_read(cq_at + u64::from(slot) * 16, &mut raw) };
        let cqe = CompletionQueueEntry::from_bytes(&raw);
        if cqe.phase() {
            fake.write32(regs::cq_head_doorbell(1, 0), u32::from(tail));
        }
        cqe
    };
    (cq, sq, run)
}

#[test]
fn prps_outside_the_iommu_or_misaligned_are_refused() {
    let mut b = Bench::new();
    let (_cq, _sq, mut run) = io_queue(&mut b);
    let data = b.data.iova();
    let rw = |dptr: [u64; 2], nlb: u32| {
        let mut s = SubmissionQueueEntry {
            opcode: NvmOpcode::Read as u8,
            nsid: 1,
            dptr,
            ..Default::default()
        };
        s.set_lba_range(0, nlb);
        s
    };
    let f = &b.fake;
    assert!(run(f, rw([data, 0], 8)).status().is_success());
    // Memory the IOMMU does not map: a DMA fault, not a write to it.
    let stray = vec![0u8; 8192];
    assert_eq!(
        run(f, rw([stray.as_ptr() as u64, 0], 8)).status(),
        Status::DATA_TRANSFER_ERROR
    );
    // PRP1 not dword aligned; PRP2 of a two-page transfer not page aligned.
    assert_eq!(
        run(f, rw([data + 2, 0], 8)).status(),
        cmd::INVALID_PRP_OFFSET
    );
    assert_eq!(
        run(f, rw([data, data + 4096 + 512], 16)).status(),
        cmd::INVALID_PRP_OFFSET
    );
    // A PRP list whose entry is not page aligned.
    b.data.write_u64(32768, data + 4096 + 8);
    b.data.write_u64(32776, data + 8192);
    assert_eq!(
        run(f, rw([data, data + 32768], 24)).status(),
        cmd::INVALID_PRP_OFFSET
    );
    // Past MDTS (5: 128 KiB), past the namespace, another namespace.
    assert_eq!(
        run(f, rw([data, data + 32768], 512)).status(),
        Status::INVALID_FIELD.with_dnr()
    );
    let mut far = rw([data, 0], 8);
    far.set_lba_range(u64::MAX - 2, 8);
    assert_eq!(run(f, far).status(), Status::LBA_OUT_OF_RANGE.with_dnr());
    let mut other = rw([data, 0], 8);
    other.nsid = 2;
    assert_eq!(run(f, other).status(), Status::INVALID_NAMESPACE.with_dnr());
}

#[test]
fn abort_completes_a_held_command_and_reset_drops_queues() {
    let mut b = Bench::new();
    let (cq, _sq, mut run) = io_queue(&mut b);
    b.fake.inject(FakeFault::Hang { count: 1 });
    let flush = SubmissionQueueEntry {
        opcode: NvmOpcode::Flush as u8,
        nsid: 1,
        ..Default::default()
    };
    // The held command posts nothing: its CQE slot still has phase 0.
    assert!(!run(&b.fake, flush).phase());
    assert_eq!(b.fake.held(), 1);
    let abort = SubmissionQueueEntry {
        opcode: op::ABORT,
        cdw10: 1,
        ..Default::default()
    };
    let cqe = b.admin(abort);
    assert!(cqe.status().is_success());
    assert_eq!(cqe.dw0 & 1, 0, "aborted");
    assert_eq!(b.fake.held(), 0);
    let mut raw = [0u8; 16];
    cq.read_bytes(0, &mut raw);
    let held = CompletionQueueEntry::from_bytes(&raw);
    assert!(held.phase() && held.status() == Status::ABORT_REQUESTED);
    assert_eq!(b.admin(abort).dw0 & 1, 1, "nothing left to abort");
    // CC.EN = 0 drops every queue; doorbells then go nowhere.
    b.fake.write32(regs::CC, 0);
    assert_eq!(b.fake.read32(regs::CSTS) & csts::RDY, 0);
    assert_eq!(b.fake.io_queues(), 0);
    assert_eq!(b.fake.stats().resets, 1);
    b.fake.inject(FakeFault::Remove);
    assert_eq!(b.fake.read32(regs::CSTS), u32::MAX);
    assert_eq!(b.fake.read64(regs::CAP), u64::MAX);
}
