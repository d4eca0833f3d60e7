//! One core's io_uring queue pair on a [`UringDevice`](super::UringDevice).
//!
//! Command → SQE: Read/Write → `READ`/`WRITE` (`READ_FIXED`/`WRITE_FIXED` inside a registered
//! [`DmaPool`]), Flush → `FSYNC` (data sync), Write Zeroes → `FALLOCATE(ZERO_RANGE)`,
//! Deallocate → `FALLOCATE(PUNCH_HOLE | KEEP_SIZE)`. Where the file system refuses that
//! `fallocate` mode the command, and every later one on this queue pair, writes zeroes from a
//! preallocated zero buffer instead, one chunk in flight per command.
//!
//! Each command holds one slot (its index is the SQE's user data) until it completes. A short
//! transfer is not an error by itself: the remainder is resubmitted from the slot at the next
//! poll. A transfer that moves nothing (the file shrank under us) completes with Data Transfer
//! Error. Commands that fail [`IoCommand::check`] never reach the kernel: they complete at the
//! next poll and count against the depth meanwhile.
//!
//! [`poll`](QueuePair::poll) makes at most one `io_uring_enter` per call: only when SQEs are
//! waiting or the kernel flags pending task work, and with SQPOLL only to wake the kernel
//! thread.
//!
//! Cancelling ([`QueuePair::cancel`]) queues an `ASYNC_CANCEL` SQE per command, sent with the
//! next poll; a command it catches completes with Command Abort Requested, and one between two
//! steps (a resumed short transfer, a fallocate's fsync) is not resubmitted. Block I/O the
//! kernel has already handed to the device usually cannot be cancelled: it completes when the
//! device answers, and is simply waited for.
//!
//! Closing ([`QueuePair::close`], or dropping) never blocks: with nothing in the kernel the
//! file is unregistered at once; otherwise every command still there is cancelled and the ring
//! goes to a reaper thread that waits for the rest, then unregisters the file (the device's
//! claim lasts until then) and signals the returned [`Fence`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::ring::{build_ring, push_cancel, retire_ring};
use crate::dma::{DmaPool, IoBuf};
use crate::fence::Fence;
use crate::queue::{Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::status::StatusCodeType;
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// How long an idle SQPOLL kernel thread spins before it sleeps.
pub(super) const SQPOLL_IDLE_MS: u32 = 1000;
/// Largest transfer Linux does in one read or write (`MAX_RW_COUNT`); longer ones are split.
const MAX_TRANSFER: u64 = 0x7fff_f000;
/// Size of the zero buffer used when `fallocate` is refused.
const ZERO_CHUNK: usize = 128 << 10;
/// The registered file's index.
const FILE: types::Fixed = types::Fixed(0);
/// io_uring's limit on registered buffers.
const MAX_REGISTERED_BUFFERS: u32 = 1 << 14;

/// PRP Offset Invalid (Base §4.2.3.1, generic 0x13): a buffer that is not aligned the way
/// the device needs, here for O_DIRECT.
pub const PRP_OFFSET_INVALID: Status = Status::new(StatusCodeType::Generic, 0x13);

/// What a queue pair is opened with.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueueConfig {
    /// The device's descriptor; registered, so the ring keeps its own reference.
    pub fd: RawFd,
    pub geo: Geometry,
    pub depth: u32,
    /// SQPOLL idle time, if a kernel thread should poll the submission queue.
    pub sqpoll: Option<u32>,
    /// Required buffer alignment (O_DIRECT); 1 for buffered files.
    pub mem_align: u32,
    /// Whether to try `fallocate` for Write Zeroes and Deallocate.
    pub fallocate: bool,
}

/// The stage a command's slot is in; decides the SQE and what its CQE means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Reading or writing the caller's buffer.
    Transfer,
    /// `fallocate` for Write Zeroes or Deallocate.
    Fallocate,
    /// Writing zeroes from the zero buffer (fallocate refused).
    ZeroFill,
    /// Flush.
    Fsync,
}

/// A command in the kernel.
#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    op: IoOp,
    stage: Stage,
    /// Next file byte offset.
    offset: u64,
    /// The rest of the caller's buffer (Transfer only).
    buf: IoBuf,
    /// Bytes still to transfer or zero.
    remaining: u64,
    /// Force Unit Access: data writes go with `RWF_DSYNC`, a fallocate is followed by an
    /// `fdatasync`.
    fua: bool,
    /// The command is in the kernel (from submit until its last CQE is handled).
    busy: bool,
    /// A cancel was issued for it: it ends at its next CQE, whatever that says.
    cancelled: bool,
}

impl Slot {
    const IDLE: Self = Self {
        tag: 0,
        op: IoOp::Flush,
        stage: Stage::Fsync,
        offset: 0,
        buf: IoBuf::EMPTY,
        remaining: 0,
        fua: false,
        busy: false,
        cancelled: false,
    };
}

/// What a CQE leads to.
enum Next {
    Done(Status),
    Resubmit(squeue::Entry),
}

/// A [`DmaPool`] registered with the ring: buffer `i` covers
/// `base + i * buf_size .. base + (i + 1) * buf_size`.
#[derive(Clone, Copy, Debug)]
struct RegisteredPool {
    base: usize,
    buf_size: usize,
    count: u32,
}

impl RegisteredPool {
    /// The registered buffer that holds `buf` entirely, if any.
    #[inline]
    fn index_of(&self, buf: IoBuf) -> Option<u16> {
        let addr = (buf.as_ptr() as usize).checked_sub(self.base)?;
        let index = addr / self.buf_size;
        let end = addr.checked_add(buf.len())?;
        (index < self.count as usize && end <= (index + 1) * self.buf_size)
            .then(|| u16::try_from(index).ok())?
    }
}

/// Everything but the ring, so completions can be handled while the ring's queues are borrowed.
struct QueueState {
    geo: Geometry,
    depth: u32,
    /// Commands accepted and not yet returned by `poll`: slots in use plus `rejected`.
    outstanding: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Completions of commands that failed validation, returned by the next poll.
    rejected: VecDeque<Completion>,
    /// `addr % mem_align != 0` buffers are refused (O_DIRECT would fail with EINVAL).
    mem_align_mask: usize,
    zero_range: bool,
    punch_hole: bool,
    /// Owns the zero buffer.
    _zero_pool: DmaPool,
    zero: IoBuf,
    registered: Option<RegisteredPool>,
    /// `io_uring_enter` calls made by `poll`.
    enters: u64,
}

/// One core's queue pair on a file or block device: one ring, no locks.
///
/// Reads and writes become `READ`/`WRITE` SQEs (`READ_FIXED`/`WRITE_FIXED` for buffers in a
/// pool registered with [`register_pool`](Self::register_pool)), Flush an `FSYNC`, Write
/// Zeroes and Deallocate an `FALLOCATE` (zero range, punch hole) or, where the file system
/// refuses it, writes of zeroes. Short transfers are resumed; a transfer that moves nothing
/// completes with Data Transfer Error. [`poll`](QueuePair::poll) enters the kernel at most once.
pub struct UringQueuePair {
    // Both are moved out exactly once, by `retire` (from `close` or `drop`), which sets
    // `retired`; nothing touches them after that.
    state: ManuallyDrop<QueueState>,
    ring: ManuallyDrop<IoUring>,
    retired: bool,
}

impl fmt::Debug for UringQueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringQueuePair")
            .field("depth", &self.state.depth)
            .field("outstanding", &self.state.outstanding)
            .field("sqpoll", &self.ring.params().is_setup_sqpoll())
            .field("registered", &self.state.registered)
            .finish()
    }
}

impl UringQueuePair {
    pub(super) fn new(cfg: &QueueConfig) -> io::Result<Self> {
        if cfg.depth == 0 || cfg.depth > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("depth {} (1..=32768)", cfg.depth),
            ));
        }
        let entries = cfg.depth.next_power_of_two();
        let ring: IoUring = build_ring(entries, cfg.sqpoll)?;
        ring.submitter()
            .register_files(&[cfg.fd])
            .map_err(|e| super::sys::named("io_uring register_files", e))?;
        let mut zero_pool = DmaPool::new(1, ZERO_CHUNK);
        let zero = zero_pool.get().map(|b| b.io_buf()).unwrap_or(IoBuf::EMPTY);
        Ok(Self {
            state: ManuallyDrop::new(QueueState {
                geo: cfg.geo,
                depth: cfg.depth,
                outstanding: 0,
                slots: vec![Slot::IDLE; cfg.depth as usize],
                free: (0..cfg.depth).rev().collect(),
                rejected: VecDeque::with_capacity(cfg.depth as usize),
                mem_align_mask: cfg.mem_align.max(1) as usize - 1,
                zero_range: cfg.fallocate,
                punch_hole: cfg.fallocate,
                _zero_pool: zero_pool,
                zero,
                registered: None,
                enters: 0,
            }),
            ring: ManuallyDrop::new(ring),
            retired: false,
        })
    }

    /// Registers `pool`'s buffers with the ring, so reads and writes that lie inside one of
    /// them use `READ_FIXED`/`WRITE_FIXED` and skip pinning pages per command. Replaces an
    /// earlier registration; fails while commands are outstanding.
    ///
    /// # Safety
    /// `pool` must stay alive until this queue pair is dropped or registers another pool: the
    /// kernel keeps its pages pinned, and commands are matched to it by address.
    pub unsafe fn register_pool(&mut self, pool: &DmaPool) -> Result<()> {
        let err = |what: String| Error::QueuePair(format!("register buffers: {what}"));
        if self.state.outstanding > 0 {
            return Err(err("commands are outstanding".into()));
        }
        if pool.count() > MAX_REGISTERED_BUFFERS {
            return Err(err(format!(
                "{} buffers, at most {MAX_REGISTERED_BUFFERS}",
                pool.count()
            )));
        }
        let submitter = self.ring.submitter();
        if self.state.registered.take().is_some() {
            submitter
                .unregister_buffers()
                .map_err(|e| err(e.to_string()))?;
        }
        let iovecs: Vec<libc::iovec> = (0..pool.count() as usize)
            .map(|i| libc::iovec {
                iov_base: pool.base().wrapping_add(i * pool.buf_size()).cast(),
                iov_len: pool.buf_size(),
            })
            .collect();
        // SAFETY: the iovecs cover the pool's live region; our caller keeps it alive while it
        // is registered.
        unsafe { submitter.register_buffers(&iovecs) }.map_err(|e| err(e.to_string()))?;
        self.state.registered = Some(RegisteredPool {
            base: pool.base() as usize,
            buf_size: pool.buf_size(),
            count: pool.count(),
        });
        Ok(())
    }

    /// The registered buffer `buf` lies in, if any.
    #[cfg(test)]
    pub(super) fn registered_index(&self, buf: IoBuf) -> Option<u16> {
        self.state.registered.and_then(|r| r.index_of(buf))
    }

    /// Whether Write Zeroes and Deallocate still try `fallocate`.
    #[cfg(test)]
    pub(super) fn fallocate_modes(&self) -> (bool, bool) {
        (self.state.zero_range, self.state.punch_hole)
    }

    /// `io_uring_enter` calls made by [`poll`](QueuePair::poll) so far.
    pub fn enter_calls(&self) -> u64 {
        self.state.enters
    }

    /// Takes the ring and its state out and hands them to [`retire`]; done once.
    fn retire_now(&mut self) -> Fence {
        if self.retired {
            return Fence::done();
        }
        self.retired = true;
        // SAFETY: `retired` was false, so neither field has been taken, and it is true now, so
        // neither is touched again (every other method runs before `close`/`drop`).
        let (ring, state) = unsafe {
            (
                ManuallyDrop::take(&mut self.ring),
                ManuallyDrop::take(&mut self.state),
            )
        };
        retire(ring, state)
    }
}

/// Queues an `ASYNC_CANCEL` for every busy slot of `state` whose tag `want` accepts and that
/// has none yet; returns how many were queued (as many as the SQ has room for).
fn queue_cancels(
    sq: &mut squeue::SubmissionQueue<'_>,
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

/// Ends a queue pair without blocking the caller: cancels what is in the kernel and leaves
/// the rest to a reaper thread (see the module docs). `state` goes with the ring: it owns the
/// zero buffer the commands may still use.
fn retire(mut ring: IoUring, mut state: QueueState) -> Fence {
    let in_kernel = state.slots.iter().filter(|s| s.busy).count();
    if in_kernel > 0 {
        let mut sq = ring.submission();
        queue_cancels(&mut sq, &mut state, |_| true);
    }
    let depth = u64::from(state.depth);
    retire_ring(ring, state, depth, in_kernel)
}

/// The NVMe status for a failed CQE (`errno` positive). All statuses are context-free: no DNR,
/// no More.
pub(crate) fn status_for_errno(op: IoOp, errno: i32) -> Status {
    match errno {
        libc::EIO if op == IoOp::Read => Status::UNRECOVERED_READ_ERROR,
        libc::EIO => Status::WRITE_FAULT,
        libc::ENOSPC | libc::EDQUOT => Status::CAPACITY_EXCEEDED,
        libc::ECANCELED => Status::ABORT_REQUESTED,
        _ => Status::INTERNAL_ERROR,
    }
}

impl QueueState {
    /// Rejects what the kernel must not see: bad ranges and short buffers ([`IoCommand::check`]),
    /// and buffers O_DIRECT cannot use.
    #[inline]
    fn validate(&self, cmd: &IoCommand) -> std::result::Result<(), Status> {
        cmd.check(&self.geo)?;
        if cmd.op.has_data() && cmd.buf.as_ptr() as usize & self.mem_align_mask != 0 {
            return Err(PRP_OFFSET_INVALID);
        }
        Ok(())
    }

    /// The slot for a validated command.
    #[inline]
    fn slot_for(&self, cmd: &IoCommand) -> Slot {
        let shift = self.geo.lba_shift();
        let len = u64::from(cmd.nlb) << shift;
        let stage = match cmd.op {
            IoOp::Read | IoOp::Write => Stage::Transfer,
            IoOp::Flush => Stage::Fsync,
            IoOp::WriteZeroes if self.zero_range => Stage::Fallocate,
            IoOp::Deallocate if self.punch_hole => Stage::Fallocate,
            IoOp::WriteZeroes | IoOp::Deallocate => Stage::ZeroFill,
        };
        Slot {
            tag: cmd.tag,
            op: cmd.op,
            stage,
            offset: cmd.slba << shift,
            buf: if stage == Stage::Transfer {
                cmd.buf.prefix(len as usize)
            } else {
                IoBuf::EMPTY
            },
            remaining: if cmd.op == IoOp::Flush { 0 } else { len },
            fua: cmd.wants_fua(),
            busy: true,
            cancelled: false,
        }
    }

    /// The SQE for the next step of slot `index`.
    #[inline]
    fn entry(&self, index: u32) -> squeue::Entry {
        let s = &self.slots[index as usize];
        // FUA: the write returns once its data (and the metadata to find it) is stable.
        let rw_flags = if s.fua { libc::RWF_DSYNC } else { 0 };
        let entry = match s.stage {
            Stage::Transfer => {
                let len = s.remaining.min(MAX_TRANSFER) as u32;
                let buf = s.buf.prefix(len as usize);
                let fixed = self.registered.and_then(|r| r.index_of(buf));
                match (s.op, fixed) {
                    (IoOp::Read, Some(i)) => opcode::ReadFixed::new(FILE, buf.as_ptr(), len, i)
                        .offset(s.offset)
                        .build(),
                    (IoOp::Read, None) => opcode::Read::new(FILE, buf.as_ptr(), len)
                        .offset(s.offset)
                        .build(),
                    (_, Some(i)) => opcode::WriteFixed::new(FILE, buf.as_ptr(), len, i)
                        .offset(s.offset)
                        .rw_flags(rw_flags)
                        .build(),
                    (_, None) => opcode::Write::new(FILE, buf.as_ptr(), len)
                        .offset(s.offset)
                        .rw_flags(rw_flags)
                        .build(),
                }
            }
            Stage::ZeroFill => {
                let len = s.remaining.min(self.zero.len() as u64) as u32;
                opcode::Write::new(FILE, self.zero.as_ptr(), len)
                    .offset(s.offset)
                    .rw_flags(rw_flags)
                    .build()
            }
            Stage::Fallocate => {
                let mode = if s.op == IoOp::WriteZeroes {
                    libc::FALLOC_FL_ZERO_RANGE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(FILE, s.remaining)
                    .offset(s.offset)
                    .mode(mode)
                    .build()
            }
            Stage::Fsync => opcode::Fsync::new(FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(u64::from(index))
    }

    /// Handles the CQE of slot `index` with result `res`.
    #[inline]
    fn on_cqe(&mut self, index: u32, res: i32) -> Next {
        let slot = &mut self.slots[index as usize];
        if slot.cancelled && (res < 0 || !matches!(slot.stage, Stage::Fsync)) {
            // Cancelled: it ends here (a step that did complete is not followed by the next).
            let done = res >= 0
                && match slot.stage {
                    Stage::Transfer | Stage::ZeroFill => res as u64 >= slot.remaining,
                    Stage::Fallocate => !slot.fua,
                    Stage::Fsync => true,
                };
            return Next::Done(if done {
                Status::SUCCESS
            } else {
                Status::ABORT_REQUESTED
            });
        }
        if res < 0 {
            let errno = -res;
            let refused = matches!(errno, libc::EOPNOTSUPP | libc::EINVAL);
            if slot.stage == Stage::Fallocate && refused {
                // This file system cannot do it: write zeroes now and from now on.
                match slot.op {
                    IoOp::WriteZeroes => self.zero_range = false,
                    _ => self.punch_hole = false,
                }
                slot.stage = Stage::ZeroFill;
                return Next::Resubmit(self.entry(index));
            }
            return Next::Done(status_for_errno(slot.op, errno));
        }
        match slot.stage {
            Stage::Fallocate if slot.fua => {
                // FUA on a fallocated range: make the new extent state durable too.
                slot.stage = Stage::Fsync;
                slot.fua = false;
                Next::Resubmit(self.entry(index))
            }
            Stage::Fsync | Stage::Fallocate => Next::Done(Status::SUCCESS),
            Stage::Transfer | Stage::ZeroFill => {
                let done = res as u64;
                if done == 0 {
                    // Nothing moved: past the end of a file that shrank, or a device that
                    // stopped accepting data. Retrying would spin.
                    return Next::Done(Status::DATA_TRANSFER_ERROR);
                }
                slot.remaining = slot.remaining.saturating_sub(done);
                slot.offset += done;
                if slot.stage == Stage::Transfer {
                    slot.buf = slot.buf.offset(done as usize);
                }
                if slot.remaining == 0 {
                    Next::Done(Status::SUCCESS)
                } else {
                    Next::Resubmit(self.entry(index))
                }
            }
        }
    }
}

impl QueuePair for UringQueuePair {
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
        if let Err(status) = st.validate(&cmd) {
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
        // completion is reaped, per our contract), at the zero buffer we own, or at nothing.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen (the SQ has room for `depth` entries); refuse rather than lose it.
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
            st.enters += 1;
            // EAGAIN/EBUSY/EINTR leave the SQEs in the ring for the next poll; nothing else
            // can fail on a ring set up like ours.
            let _ = submitter.submit();
            // Learn what the kernel consumed, so resubmitted steps find the room.
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
                // promise, the zero buffer is ours.
                Next::Resubmit(entry) => match unsafe { sq.push(&entry) } {
                    Ok(()) => continue,
                    // The SQ holds at most one entry per slot; unreachable, but never lose a
                    // command.
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

    unsafe fn register_buffers(&mut self, pool: &DmaPool) -> Result<()> {
        // SAFETY: forwarded from our caller's promise.
        unsafe { self.register_pool(pool) }
    }

    fn cancel(&mut self, tags: &[u64]) -> usize {
        if tags.is_empty() || self.state.outstanding == 0 {
            return 0;
        }
        let (_, mut sq, _) = self.ring.split();
        let issued = queue_cancels(&mut sq, &mut self.state, |t| tags.contains(&t));
        sq.sync();
        issued
    }

    fn close(mut self: Box<Self>) -> Fence {
        self.retire_now()
    }
}

impl Drop for UringQueuePair {
    /// Never blocks: see [`close`](QueuePair::close). A queue pair dropped rather than closed
    /// has no one to tell when its commands are over, so a caller whose commands may still be
    /// in the kernel closes it and keeps their buffers until the fence is done.
    fn drop(&mut self) {
        let _ = self.retire_now();
    }
}
