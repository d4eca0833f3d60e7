//! The queue-pair abstraction every back end implements.
//!
//! A [`BlockDevice`] is shared by all cores; each core opens its own [`QueuePair`] on it (SPDK's
//! "io_channel") and uses it without locks. Submission is batch-shaped: [`QueuePair::submit`]
//! only queues, [`QueuePair::poll`] rings the doorbell once for everything queued since the last
//! call and reaps completions.
//!
//! Commands a caller gave up on (a mirror leg's I/O timeout) are fenced without blocking:
//! [`QueuePair::cancel`] asks the back end to stop them, and each one is over once `poll` has
//! returned its completion (Command Abort Requested when the cancel took, the real result when
//! the device finished first). [`QueuePair::close`] hands whatever is still in flight to the
//! back end's reaper and returns a [`Fence`] that says when the last of it is over.

use std::fmt::Debug;

use crate::dma::{DmaPool, IoBuf};
use crate::fence::Fence;
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// What a command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    WriteZeroes,
    /// Dataset Management with the deallocate attribute over one range.
    Deallocate,
}

impl IoOp {
    /// Ops that carry a data buffer.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }

    /// Ops that change the medium (everything but reads and flushes).
    pub fn modifies(self) -> bool {
        matches!(self, Self::Write | Self::WriteZeroes | Self::Deallocate)
    }
}

/// One command handed to a queue pair.
#[derive(Clone, Copy, Debug)]
pub struct IoCommand {
    pub op: IoOp,
    /// First logical block (ignored for `Flush`).
    pub slba: u64,
    /// Number of logical blocks, 1-based (ignored for `Flush`).
    pub nlb: u32,
    /// Data buffer for reads and writes, at least `nlb * lba_size` bytes.
    pub buf: IoBuf,
    /// The caller's tag, returned unchanged in the completion.
    pub tag: u64,
    /// Force Unit Access (NVMe Write CDW12 bit 30): the command completes only once its data
    /// is on stable storage, not just in a volatile write cache. Meaningful for `Write` and
    /// `WriteZeroes`; ignored otherwise.
    pub fua: bool,
}

impl IoCommand {
    /// A command without data.
    pub fn new(op: IoOp, slba: u64, nlb: u32, tag: u64) -> Self {
        Self {
            op,
            slba,
            nlb,
            buf: IoBuf::EMPTY,
            tag,
            fua: false,
        }
    }

    /// A read or write over `buf`.
    pub fn with_buf(op: IoOp, slba: u64, nlb: u32, buf: IoBuf, tag: u64) -> Self {
        Self {
            op,
            slba,
            nlb,
            buf,
            tag,
            fua: false,
        }
    }

    /// The same command with Force Unit Access set.
    #[must_use]
    pub fn with_fua(self) -> Self {
        Self { fua: true, ..self }
    }

    /// Whether the command must be durable when it completes: a write or write-zeroes with
    /// FUA set.
    #[inline]
    pub fn wants_fua(&self) -> bool {
        self.fua && matches!(self.op, IoOp::Write | IoOp::WriteZeroes)
    }

    /// Validates the command against a namespace: LBA range, and a buffer large enough for
    /// the transfer. Every back end calls this before touching data.
    #[inline]
    pub fn check(&self, geo: &Geometry) -> std::result::Result<(), Status> {
        if self.op == IoOp::Flush {
            return Ok(());
        }
        geo.check_range(self.slba, self.nlb)?;
        if self.op.has_data() && (self.buf.len() as u64) < (u64::from(self.nlb) << geo.lba_shift())
        {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        Ok(())
    }
}

/// A completed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Completion {
    pub tag: u64,
    pub status: Status,
}

/// Why a submission was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `depth` commands are already outstanding; poll and try again.
    QueueFull,
}

/// A per-core queue pair on a [`BlockDevice`]. Not shared between threads.
pub trait QueuePair: Send + Debug {
    /// Maximum number of commands outstanding at once.
    fn depth(&self) -> u32;

    /// Commands submitted and not yet reaped.
    fn outstanding(&self) -> u32;

    /// Queues one command; never blocks. The command is handed to the device at the next
    /// [`poll`](Self::poll) at the latest. Invalid commands (range, buffer size) are accepted
    /// and complete with the matching NVMe status.
    ///
    /// # Safety
    /// For reads and writes, the memory behind `cmd.buf` must stay allocated until the
    /// command's completion has been reaped by `poll`. Until then the caller must not touch a
    /// read's buffer at all and must not modify a write's buffer (other readers are fine, so
    /// one buffer may be written to several devices at once).
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError>;

    /// Submits everything queued and reaps up to `out.len()` completions into `out`.
    /// Returns how many were written.
    fn poll(&mut self, out: &mut [Completion]) -> usize;

    /// Buffer lending. A queue pair that completes a command before every command it issued
    /// below on the same buffer has been reaped (a mirror volume after a leg's I/O timeout)
    /// keeps the buffer *lent*: its memory may still be read or filled by a back end, so the
    /// caller must not reuse or free it until [`poll_released`](Self::poll_released) hands
    /// the tag back. Only a completion with an error status can lend its buffer, so a caller
    /// asks only on errors; queue pairs that never lend answer `false`.
    fn buffer_lent(&self, tag: u64) -> bool {
        let _ = tag;
        false
    }

    /// Tags of lent buffers that are free again (their last command below was reaped or
    /// fenced), up to `out.len()`; returns how many were written.
    fn poll_released(&mut self, out: &mut [u64]) -> usize {
        let _ = out;
        0
    }

    /// Asks the back end to cancel the outstanding commands tagged `tags` (commands the caller
    /// has abandoned); never blocks. Each such command still completes through a later
    /// [`poll`](Self::poll): with [`Status::ABORT_REQUESTED`] when the cancel took, with its real
    /// result when the device finished it first or cannot stop it (block I/O already under
    /// way, a remote that has it). Its completion is the fence either way: once `poll` has
    /// returned it, nothing touches its buffer or the medium for it any more. Tags that are
    /// not outstanding are ignored. Returns how many cancels were issued.
    ///
    /// The default cannot cancel anything and returns 0: the commands are simply waited for.
    fn cancel(&mut self, tags: &[u64]) -> usize {
        let _ = tags;
        0
    }

    /// Closes the queue pair without blocking. Commands still outstanding are cancelled where
    /// the back end can, and the rest are left to a reaper; the returned [`Fence`] is done once
    /// every one of them is over. Until then their buffers must stay allocated (and a leg they
    /// write treated as busy); completions are not reported.
    ///
    /// The default drops the queue pair and returns a fence that is done: for back ends whose
    /// drop ends every command itself (memory, null) or that have no better answer yet.
    fn close(self: Box<Self>) -> Fence {
        drop(self);
        Fence::done()
    }

    /// Registers a per-core [`DmaPool`] with the device so commands on its buffers are
    /// cheaper (io_uring fixed buffers). Buffers outside the pool keep working. Back ends
    /// without such a feature do nothing.
    ///
    /// # Safety
    /// `pool` must stay alive until this queue pair is dropped or registers another pool.
    unsafe fn register_buffers(&mut self, pool: &DmaPool) -> Result<()> {
        let _ = pool;
        Ok(())
    }
}

/// A namespace that per-core queue pairs can be opened on. Shared between cores.
pub trait BlockDevice: Send + Sync + Debug {
    /// Size and block size.
    fn geometry(&self) -> Geometry;

    /// Opens a queue pair for the calling core with room for `depth` outstanding commands.
    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>>;

    /// A short human name (the URI it was opened from).
    fn name(&self) -> &str;

    /// A 16-byte identity of the data this device holds, kept across restarts and distinct for
    /// a re-created device (a mirror volume's UUID). Front ends derive the namespace's NGUID and
    /// UUID from it, so hosts never take a blank device for the disk they knew. `None` where the
    /// device has no such identity.
    fn identity(&self) -> Option<[u8; 16]> {
        None
    }

    /// The state of the network link to a remote device; `None` for local devices.
    fn link(&self) -> Option<crate::LinkStatus> {
        None
    }

    /// [`LinkStatus::generation`](crate::LinkStatus) alone (one more at each reconnect),
    /// cheaply: the journal threads read it once a segment.
    fn link_generation(&self) -> Option<u64> {
        self.link().map(|l| l.generation)
    }

    /// The reservation commands of this namespace, where the back end can send them (a
    /// volume fences such a leg, `docs/promotion.md`); `None` for devices without them.
    fn reservations(&self) -> Option<&dyn crate::Reservations> {
        None
    }

    /// The reservation commands of a second namespace this leg writes, where it has one (an
    /// asynchronous leg's staging area at the far site): a volume fences it with the leg.
    fn staging_reservations(&self) -> Option<&dyn crate::Reservations> {
        None
    }

    /// Where an asynchronously mirrored leg stands (`async-journal`); `None` for devices
    /// written synchronously.
    fn replication(&self) -> Option<crate::ReplicationStatus> {
        None
    }

    /// Switches an asynchronously mirrorable leg between `"sync"` (writes go straight to the
    /// device) and `"async-journal"` (through its journal). Switching to `sync` drains the
    /// journal first, waiting up to `limit`. `None` for devices that have no journal.
    fn set_replication_mode(
        &self,
        mode: &str,
        limit: std::time::Duration,
    ) -> Option<std::result::Result<(), String>> {
        let _ = (mode, limit);
        None
    }

    /// Ends the open cycle of an `async-cycle` leg now and waits (up to `limit`) until the
    /// far image holds every write acknowledged before the call; the cycle it is in. `None`
    /// for devices that do not ship in cycles.
    fn cycle_now(&self, limit: std::time::Duration) -> Option<std::result::Result<u64, String>> {
        let _ = limit;
        None
    }

    /// Whether completed writes may sit in a volatile write cache until a Flush (Identify
    /// Controller VWC). `true` unless the back end knows better: a Flush is then needed to
    /// make them durable. Memory and null devices have no cache apart from their medium.
    fn volatile_write_cache(&self) -> bool {
        true
    }

    /// A resync of this leg starts (`true`), or one has made the leg whole (`false`; a
    /// resync that stops short never says so). An `async-cycle` leg takes no cut in between,
    /// so its far image stays at the last cycle until a copy is whole (`docs/cycles.md`);
    /// other devices ignore it.
    fn catch_up(&self, on: bool) {
        let _ = on;
    }
}

/// Reads the whole namespace of `dev` into a vector, through a fresh queue pair. For tests and
/// tools that compare legs; blocks (spins) until done.
pub fn read_all(dev: &dyn BlockDevice) -> Result<Vec<u8>> {
    let geo = dev.geometry();
    let mut data = vec![0u8; geo.bytes() as usize];
    let mut qp = dev.open_qpair(1)?;
    let chunk_blocks = ((1u64 << 20) >> geo.lba_shift()).min(65536);
    let mut lba = 0;
    while lba < geo.num_blocks {
        let nlb = chunk_blocks.min(geo.num_blocks - lba) as u32;
        let off = (lba << geo.lba_shift()) as usize;
        let len = (nlb as usize) << geo.lba_shift();
        let buf = IoBuf::from_slice(&mut data[off..off + len]);
        // SAFETY: `data` outlives the command, which is reaped below before it is touched.
        unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, lba, nlb, buf, 0)) }
            .map_err(|e| Error::QueuePair(format!("{e:?}")))?;
        let mut cpl = [Completion::default()];
        while qp.poll(&mut cpl) == 0 {
            std::hint::spin_loop();
        }
        if !cpl[0].status.is_success() {
            return Err(Error::QueuePair(format!(
                "read at LBA {lba} failed: {}",
                cpl[0].status
            )));
        }
        lba += u64::from(nlb);
    }
    Ok(data)
}
