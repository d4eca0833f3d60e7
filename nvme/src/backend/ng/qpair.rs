//! One core's queue pair on an [`NgDevice`](super::NgDevice): an io_uring with 128-byte SQEs
//! and 32-byte CQEs, the generic char device registered as fixed file 0, and every command an
//! `IORING_OP_URING_CMD` carrying a [`NvmeUringCmd`].
//!
//! Command → NVMe: Read/Write → Read/Write (FUA in CDW12 bit 30), Flush → Flush, Write Zeroes
//! → Write Zeroes (FUA too), Deallocate → Dataset Management with one range and the
//! deallocate attribute, read from the slot's own range buffer. A read or write longer than
//! the device's transfer limit, or a Write Zeroes over 65536 blocks, goes as pieces, one in
//! flight per command, the next sent at the poll that reaps the last.
//!
//! The CQE says how it went: `res` 0 is success, a positive `res` is the NVMe status field
//! the controller returned (passed through unchanged), a negative one an errno from the
//! kernel (mapped as the file back end maps them; `EINTR`, the driver's timeout, is Command
//! Aborted By Host). The command's DW0/DW1 arrive in `big_cqe[0]`; I/O commands do not use
//! them.
//!
//! Cancelling queues an `ASYNC_CANCEL` per command, as the file back end does. The NVMe
//! driver does not cancel a command the controller has, so it usually completes with its
//! real result; a command between two pieces is not continued and completes with Command
//! Abort Requested. Closing never blocks: the ring goes to the shared reaper
//! ([`retire_ring`]) with whatever is still in the kernel.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::cmd::{NvmeUringCmd, NVME_URING_CMD_IO};
use crate::backend::uring::ring::{build_ring, push_cancel, retire_ring};
use crate::backend::uring::status_for_errno;
use crate::dma::IoBuf;
use crate::fence::Fence;
use crate::queue::{Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::opcode::{dsm_range, NvmOpcode, DSM_ATTR_DEALLOCATE, DSM_RANGE_LEN};
use crate::spec::{Geometry, Status, SubmissionQueueEntry};

/// The ring type: SQE128 for the 80-byte command area, CQE32 for the command's result.
pub(super) type PassthroughRing = IoUring<squeue::Entry128, cqueue::Entry32>;

/// The registered file's index.
const FILE: types::Fixed = types::Fixed(0);
/// How often one piece is sent again after `EAGAIN` before the command fails.
const MAX_RETRIES: u16 = 1000;
/// Most blocks one NVMe command covers (NLB is 16 bits, 0's based).
const MAX_NLB: u64 = 65536;

/// What a queue pair is opened with.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueueConfig {
    /// The char device's descriptor; registered, so the ring keeps its own reference.
    pub fd: RawFd,
    pub nsid: u32,
    pub geo: Geometry,
    pub depth: u32,
    /// SQPOLL idle time, if a kernel thread should poll the submission queue.
    pub sqpoll: Option<u32>,
    /// Longest read or write one NVMe command carries, in bytes (a multiple of the block size).
    pub max_transfer: u32,
    /// Per-command timeout handed to the driver; 0 takes its default.
    pub timeout_ms: u32,
}

/// A command in the kernel.
#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    op: IoOp,
    /// First block of the next piece.
    slba: u64,
    /// Blocks still to send, the piece in flight included.
    remaining: u64,
    /// Blocks of the piece in flight.
    piece: u64,
    /// The rest of the caller's buffer, from the piece in flight on (reads and writes).
    buf: IoBuf,
    fua: bool,
    /// In the kernel (from submit until its last CQE is handled).
    busy: bool,
    /// A cancel was issued: no further piece is sent.
    cancelled: bool,
    /// Times the piece in flight was refused with `EAGAIN` and sent again.
    retries: u16,
}

impl Slot {
    const IDLE: Self = Self {
        tag: 0,
        op: IoOp::Flush,
        slba: 0,
        remaining: 0,
        piece: 0,
        buf: IoBuf::EMPTY,
        fua: false,
        busy: false,
        cancelled: false,
        retries: 0,
    };
}

/// What a CQE leads to.
enum Next {
    Done(Status),
    Resubmit(squeue::Entry128),
}

/// Everything but the ring. Goes to the reaper with the ring on close: the range buffers
/// may still be read by the kernel.
struct QueueState {
    geo: Geometry,
    nsid: u32,
    depth: u32,
    /// Commands accepted and not yet returned by `poll`: slots in use plus `rejected`.
    outstanding: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Completions of commands that failed validation, returned by the next poll.
    rejected: VecDeque<Completion>,
    /// Dataset Management range of each slot; the kernel reads it while the command runs.
    ranges: Box<[[u8; DSM_RANGE_LEN]]>,
    /// Most blocks per read or write piece.
    max_rw_blocks: u64,
    timeout_ms: u32,
}

/// One core's NVMe passthrough queue pair: one ring, no locks, no allocation per command.
/// See the module docs for the command mapping.
pub struct NgQueuePair {
    // Both are moved out exactly once, by `retire_now` (from `close` or `drop`), which sets
    // `retired`; nothing touches them after that.
    state: ManuallyDrop<QueueState>,
    ring: ManuallyDrop<PassthroughRing>,
    retired: bool,
}

impl fmt::Debug for NgQueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NgQueuePair")
            .field("nsid", &self.state.nsid)
            .field("depth", &self.state.depth)
            .field("outstanding", &self.state.outstanding)
            .finish()
    }
}

impl NgQueuePair {
    pub(super) fn new(cfg: &QueueConfig) -> io::Result<Self> {
        if cfg.depth == 0 || cfg.depth > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("depth {} (1..=32768)", cfg.depth),
            ));
        }
        // Room for a piece and a cancel per slot.
        let ring = passthrough_ring((cfg.depth * 2).next_power_of_two(), cfg.sqpoll)?;
        ring.submitter()
            .register_files(&[cfg.fd])
            .map_err(|e| super::sys::named("io_uring register_files", e))?;
        let lba_shift = cfg.geo.lba_shift();
        Ok(Self {
            state: ManuallyDrop::new(QueueState {
                geo: cfg.geo,
                nsid: cfg.nsid,
                depth: cfg.depth,
                outstanding: 0,
                slots: vec![Slot::IDLE; cfg.depth as usize],
                free: (0..cfg.depth).rev().collect(),
                rejected: VecDeque::with_capacity(cfg.depth as usize),
                ranges: vec![[0u8; DSM_RANGE_LEN]; cfg.depth as usize].into_boxed_slice(),
                max_rw_blocks: (u64::from(cfg.max_transfer) >> lba_shift).clamp(1, MAX_NLB),
                timeout_ms: cfg.timeout_ms,
            }),
            ring: ManuallyDrop::new(ring),
            retired: false,
        })
    }

    /// Sends one Flush and blocks until its CQE comes (the driver's timeout bounds the wait);
    /// returns the CQE's raw result. For the open-time probe, which wants the errno itself.
    pub(super) fn probe_flush(&mut self) -> io::Result<i32> {
        let Some(index) = self.state.free.pop() else {
            return Err(io::Error::other("probe: no free slot"));
        };
        let flush = IoCommand::new(IoOp::Flush, 0, 0, 0);
        self.state.slots[index as usize] = self.state.slot_for(&flush);
        let entry = self.state.entry(index);
        // SAFETY: a Flush points at no memory.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("probe: submission queue full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(super::sys::named("io_uring_enter", e)),
            }
            if let Some(cqe) = self.ring.completion().next() {
                self.state.slots[index as usize].busy = false;
                self.state.free.push(index);
                return Ok(cqe.result());
            }
        }
    }

    /// Takes the ring and its state out and hands them to the reaper; done once.
    fn retire_now(&mut self) -> Fence {
        if self.retired {
            return Fence::done();
        }
        self.retired = true;
        // SAFETY: `retired` was false, so neither field has been taken, and it is true now, so
        // neither is touched again (every other method runs before `close`/`drop`).
        let (mut ring, mut state) = unsafe {
            (
                ManuallyDrop::take(&mut self.ring),
                ManuallyDrop::take(&mut self.state),
            )
        };
        let in_kernel = state.slots.iter().filter(|s| s.busy).count();
        if in_kernel > 0 {
            queue_cancels(&mut ring.submission(), &mut state, |_| true);
        }
        let depth = u64::from(state.depth);
        retire_ring(ring, state, depth, in_kernel)
    }
}

/// A passthrough ring of `entries` SQEs. A kernel that cannot make one (before Linux 5.19)
/// or lacks `IORING_OP_URING_CMD` gets an error that says so.
pub(super) fn passthrough_ring(entries: u32, sqpoll: Option<u32>) -> io::Result<PassthroughRing> {
    let ring: PassthroughRing = build_ring(entries, sqpoll).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            io::Error::new(
                e.kind(),
                format!("{e} (this kernel cannot make io_uring rings with 128-byte SQEs and 32-byte CQEs: NVMe passthrough needs Linux 5.19 or later)"),
            )
        } else {
            e
        }
    })?;
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok()
        && !probe.is_supported(opcode::UringCmd80::CODE)
    {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's io_uring lacks IORING_OP_URING_CMD (NVMe passthrough needs Linux 5.19 or later)",
        ));
    }
    Ok(ring)
}

/// Queues an `ASYNC_CANCEL` for every busy slot whose tag `want` accepts and that has none
/// yet; returns how many were queued (as many as the SQ has room for).
fn queue_cancels(
    sq: &mut squeue::SubmissionQueue<'_, squeue::Entry128>,
    state: &mut QueueState,
    want: impl Fn(u64) -> bool,
) -> usize {
    let mut issued = 0;
    for (index, slot) in state.slots.iter_mut().enumerate() {
        if !slot.busy || slot.cancelled || !want(slot.tag) {
            continue;
        }
        if !push_cancel(sq, index as u64) {
            break;
        }
        slot.cancelled = true;
        issued += 1;
    }
    issued
}

/// The status of a passthrough CQE whose `res` is not 0: the NVMe status the controller
/// returned, or the kernel's errno.
pub(crate) fn status_for_result(op: IoOp, res: i32) -> Status {
    match res {
        0 => Status::SUCCESS,
        // The status field as the controller completed it (CQE DW3 bits 31:17).
        r if r > 0 => Status::from_raw(r as u16),
        // The driver's timeout (or a reset) ended the request.
        r if r == -libc::EINTR => Status::ABORTED_BY_HOST,
        r => status_for_errno(op, -r),
    }
}

impl QueueState {
    /// The slot for a command [`IoCommand::check`] accepted.
    #[inline]
    fn slot_for(&self, cmd: &IoCommand) -> Slot {
        let remaining = if cmd.op == IoOp::Flush {
            0
        } else {
            u64::from(cmd.nlb)
        };
        Slot {
            tag: cmd.tag,
            op: cmd.op,
            slba: cmd.slba,
            remaining,
            piece: 0,
            buf: if cmd.op.has_data() {
                cmd.buf.prefix((remaining << self.geo.lba_shift()) as usize)
            } else {
                IoBuf::EMPTY
            },
            fua: cmd.wants_fua(),
            busy: true,
            cancelled: false,
            retries: 0,
        }
    }

    /// The SQE for the next piece of slot `index`; records the piece's size.
    #[inline]
    fn entry(&mut self, index: u32) -> squeue::Entry128 {
        let shift = self.geo.lba_shift();
        let s = &mut self.slots[index as usize];
        let mut sqe = SubmissionQueueEntry {
            nsid: self.nsid,
            ..Default::default()
        };
        let (addr, len) = match s.op {
            IoOp::Read | IoOp::Write => {
                s.piece = s.remaining.min(self.max_rw_blocks);
                sqe.opcode = if s.op == IoOp::Read {
                    NvmOpcode::Read as u8
                } else {
                    NvmOpcode::Write as u8
                };
                sqe.set_lba_range(s.slba, s.piece as u32);
                sqe.set_fua(s.fua);
                (s.buf.as_ptr() as u64, (s.piece << shift) as u32)
            }
            IoOp::Flush => {
                sqe.opcode = NvmOpcode::Flush as u8;
                (0, 0)
            }
            IoOp::WriteZeroes => {
                s.piece = s.remaining.min(MAX_NLB);
                sqe.opcode = NvmOpcode::WriteZeroes as u8;
                sqe.set_lba_range(s.slba, s.piece as u32);
                sqe.set_fua(s.fua);
                (0, 0)
            }
            IoOp::Deallocate => {
                // One range covers every block of the command (its length is 32 bits).
                s.piece = s.remaining;
                let range = &mut self.ranges[index as usize];
                *range = dsm_range(s.slba, s.piece as u32);
                sqe.opcode = NvmOpcode::DatasetManagement as u8;
                sqe.cdw10 = 0; // Number of ranges, 0's based.
                sqe.cdw11 = DSM_ATTR_DEALLOCATE;
                (range.as_ptr() as u64, DSM_RANGE_LEN as u32)
            }
        };
        let cmd = NvmeUringCmd::from_sqe(&sqe, addr, len, self.timeout_ms);
        opcode::UringCmd80::new(FILE, NVME_URING_CMD_IO)
            .cmd(cmd.to_sqe_cmd())
            .build()
            .user_data(u64::from(index))
    }

    /// Handles the CQE of slot `index` with result `res`.
    #[inline]
    fn on_cqe(&mut self, index: u32, res: i32) -> Next {
        let shift = self.geo.lba_shift();
        let slot = &mut self.slots[index as usize];
        if res == -libc::EAGAIN && !slot.cancelled && slot.retries < MAX_RETRIES {
            // The driver could not get a request or map the buffer without blocking (the
            // passthrough path asks it not to): send the same piece again.
            slot.retries += 1;
            return Next::Resubmit(self.entry(index));
        }
        if res != 0 {
            return Next::Done(status_for_result(slot.op, res));
        }
        slot.retries = 0;
        slot.remaining -= slot.piece;
        slot.slba += slot.piece;
        if slot.op.has_data() {
            slot.buf = slot.buf.offset((slot.piece << shift) as usize);
        }
        slot.piece = 0;
        if slot.remaining == 0 {
            Next::Done(Status::SUCCESS)
        } else if slot.cancelled {
            Next::Done(Status::ABORT_REQUESTED)
        } else {
            Next::Resubmit(self.entry(index))
        }
    }
}

impl QueuePair for NgQueuePair {
    fn depth(&self) -> u32 {
        self.state.depth
    }

    fn outstanding(&self) -> u32 {
        self.state.outstanding
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        let st = &mut self.state;
        if st.outstanding >= st.depth {
            return Err(SubmitError::QueueFull);
        }
        if let Err(status) = cmd.check(&st.geo) {
            st.rejected.push_back(Completion {
                tag: cmd.tag,
                status,
            });
            st.outstanding += 1;
            return Ok(());
        }
        let Some(index) = st.free.pop() else {
            return Err(SubmitError::QueueFull);
        };
        st.slots[index as usize] = st.slot_for(&cmd);
        let entry = st.entry(index);
        // SAFETY: the SQE points at the caller's buffer (kept alive and untouched until the
        // completion is reaped, per our contract), at the slot's range buffer we own, or at
        // nothing.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen (the SQ has room for `depth` entries); refuse rather than lose it.
            st.slots[index as usize].busy = false;
            st.free.push(index);
            return Err(SubmitError::QueueFull);
        }
        st.outstanding += 1;
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let st = &mut self.state;
        let mut n = 0;
        while n < out.len() {
            let Some(cpl) = st.rejected.pop_front() else {
                break;
            };
            out[n] = cpl;
            n += 1;
        }
        let (submitter, mut sq, mut cq) = self.ring.split();
        sq.sync();
        if !sq.is_empty() || sq.taskrun() || sq.cq_overflow() {
            // EAGAIN/EBUSY/EINTR leave the SQEs in the ring for the next poll.
            let _ = submitter.submit();
            // Learn what the kernel consumed, so resubmitted pieces find the room.
            sq.sync();
        }
        cq.sync();
        while n < out.len() {
            let Some(cqe) = cq.next() else {
                break;
            };
            let Ok(index) = u32::try_from(cqe.user_data()) else {
                continue;
            };
            if index >= st.depth {
                continue;
            }
            let status = match st.on_cqe(index, cqe.result()) {
                Next::Done(status) => status,
                // SAFETY: as in `submit`: the slot's buffer is still covered by the caller's
                // promise, the range buffer is ours.
                Next::Resubmit(entry) => match unsafe { sq.push(&entry) } {
                    Ok(()) => continue,
                    // The SQ has room for a piece and a cancel per slot; unreachable, but
                    // never lose a command.
                    Err(_) => Status::INTERNAL_ERROR,
                },
            };
            let slot = &mut st.slots[index as usize];
            slot.busy = false;
            out[n] = Completion {
                tag: slot.tag,
                status,
            };
            n += 1;
            st.free.push(index);
        }
        sq.sync();
        cq.sync();
        st.outstanding -= n as u32;
        n
    }

    fn cancel(&mut self, tags: &[u64]) -> usize {
        if tags.is_empty() || self.state.outstanding == 0 {
            return 0;
        }
        let mut sq = self.ring.submission();
        queue_cancels(&mut sq, &mut self.state, |t| tags.contains(&t))
    }

    fn close(mut self: Box<Self>) -> Fence {
        self.retire_now()
    }
}

impl Drop for NgQueuePair {
    /// Never blocks: see [`close`](QueuePair::close).
    fn drop(&mut self) {
        let _ = self.retire_now();
    }
}
