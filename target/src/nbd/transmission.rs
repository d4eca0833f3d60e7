//! The transmission phase of one connection: requests parsed from received bytes become
//! device commands on the connection's own queue pair, with data in buffers from the
//! connection's own DMA pool; completions become simple replies, sent in completion order.
//!
//! Everything is sized when the phase starts (request slots, buffer chunks, completion
//! array, the free list and the reply queue), so serving a request allocates nothing.
//!
//! Requests must be aligned to the device's logical block size (advertised as the minimum
//! block size); others get `EINVAL`, except trims, which are hints and shrink to the aligned
//! blocks they cover.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::dma::{DmaBuf, DmaPool, IoBuf};
use nvmirror_nvme::{BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, Status};

use super::buffer::ByteQueue;
use super::proto::{
    command, command_flags, errno, simple_reply, RequestHeader, MAX_PAYLOAD, REPLY_LEN,
    REQUEST_LEN, REQUEST_MAGIC,
};
use super::{Error, Result};
use crate::drain::Drain;

/// Bytes per buffer chunk, and per device command of a read or write.
pub(crate) const CHUNK: usize = 128 << 10;
/// Chunks per connection at most: enough for one request of the protocol's maximum payload.
const CHUNKS: u32 = MAX_PAYLOAD / CHUNK as u32;
/// Requests in flight per connection.
pub(crate) const SLOTS: usize = 256;
/// Completions reaped per queue-pair poll.
const COMPLETION_BATCH: usize = 64;
/// How long tearing down waits for commands still on the device.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// A write's payload is still arriving.
    Receiving,
    /// Commands are on the device.
    InFlight,
    /// In the reply queue.
    Ready,
    /// Answered, but a back end still uses its chunks (`QueuePair::buffer_lent`): they go
    /// back to the pool when it gives them back.
    Lent,
}

/// One request in flight.
#[derive(Debug)]
struct Slot {
    state: SlotState,
    handle: u64,
    kind: u16,
    /// First byte on the device.
    offset: u64,
    /// Bytes of data (reads and writes).
    len: u32,
    /// Buffers holding the data, `CHUNK` bytes each but the last; capacity for the largest
    /// request is reserved up front.
    chunks: Vec<DmaBuf>,
    /// Commands submitted and not yet completed.
    pending: u32,
    /// Chunks of a write handed to the device so far.
    submitted: u32,
    /// NBD error to report; 0 for success.
    error: u32,
    /// `NBD_CMD_FLAG_FUA`: every command of the write goes with Force Unit Access.
    fua: bool,
    /// Completed commands whose chunk a back end still uses.
    lent: u32,
}

impl Slot {
    fn new(chunks: u32) -> Self {
        Self {
            state: SlotState::Free,
            handle: 0,
            kind: 0,
            offset: 0,
            len: 0,
            chunks: Vec::with_capacity(chunks as usize),
            pending: 0,
            submitted: 0,
            error: 0,
            fua: false,
            lent: 0,
        }
    }

    /// Bytes of reply payload (a successful read's data).
    fn reply_data_len(&self) -> usize {
        if self.kind == command::READ && self.error == 0 {
            self.len as usize
        } else {
            0
        }
    }
}

/// What to do with a request header.
enum Admission {
    /// Not enough slots or buffers: leave it in the receive buffer for later.
    Stall,
    /// Taken; its header (and nothing else) was consumed.
    Taken,
}

/// Transmission state of one connection.
#[derive(Debug)]
pub(crate) struct Transmission {
    qpair: Box<dyn QueuePair>,
    pool: DmaPool,
    /// The largest read or write accepted (the pool's size).
    max_payload: u32,
    geo: Geometry,
    size: u64,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    ready: VecDeque<u16>,
    completions: Box<[Completion]>,
    /// The write whose payload is arriving, and how many bytes have arrived.
    receiving: Option<(u16, u32)>,
    /// Payload bytes of a refused write still to skip.
    discard: u64,
    /// Data bytes of the head of `ready` already copied to the send queue; `None` while its
    /// header has not been queued.
    sending: Option<usize>,
    /// `NBD_CMD_DISC` was received: nothing after it is parsed.
    disconnected: bool,
    /// Sum of the slots' `lent`.
    lent: u32,
}

impl Transmission {
    /// Opens a queue pair and a buffer pool on `device` for this connection (on the
    /// calling reactor): room for one request of `max_payload` bytes (whole chunks).
    pub(crate) fn new(device: &Arc<dyn BlockDevice>, max_payload: u32) -> Result<Self> {
        let chunks = (max_payload / CHUNK as u32).clamp(1, CHUNKS);
        let depth = chunks + SLOTS as u32;
        let pool = payload_pool(chunks, CHUNK)?;
        let qpair = device.open_qpair(depth).map_err(|source| Error::Device {
            device: device.name().to_string(),
            source,
        })?;
        let geo = device.geometry();
        Ok(Self {
            qpair,
            pool,
            max_payload: chunks * CHUNK as u32,
            geo,
            size: geo.bytes(),
            slots: (0..SLOTS).map(|_| Slot::new(chunks)).collect(),
            free: (0..SLOTS as u16).rev().collect(),
            ready: VecDeque::with_capacity(SLOTS),
            completions: vec![Completion::default(); COMPLETION_BATCH].into_boxed_slice(),
            receiving: None,
            discard: 0,
            sending: None,
            disconnected: false,
            lent: 0,
        })
    }

    /// Requests taken and not yet fully copied to the send queue.
    pub(crate) fn in_flight(&self) -> usize {
        SLOTS - self.free.len()
    }

    /// Whether `NBD_CMD_DISC` was received.
    pub(crate) fn disconnected(&self) -> bool {
        self.disconnected
    }

    /// Parses requests (and write payloads) from `input`, submitting their commands.
    /// Returns the bytes consumed; stops early when slots or buffers run out. A request
    /// header with a bad magic is an error: the stream cannot be resynchronised.
    pub(crate) fn consume(&mut self, input: &[u8]) -> std::result::Result<usize, &'static str> {
        let mut pos = 0;
        while !self.disconnected {
            if self.discard > 0 {
                let n = self.discard.min((input.len() - pos) as u64);
                pos += n as usize;
                self.discard -= n;
                if self.discard > 0 {
                    break;
                }
                continue;
            }
            if let Some((ix, got)) = self.receiving {
                pos += self.receive_payload(ix, got, &input[pos..]);
                if self.receiving.is_some() {
                    break;
                }
                continue;
            }
            let Some(bytes) = input.get(pos..pos + REQUEST_LEN) else {
                break;
            };
            let h = RequestHeader::parse(bytes.try_into().expect("REQUEST_LEN bytes"));
            if h.magic != REQUEST_MAGIC {
                return Err("bad request magic");
            }
            if h.kind == command::DISC {
                self.disconnected = true;
                pos += REQUEST_LEN;
                break;
            }
            match self.admit(&h) {
                Admission::Stall => break,
                Admission::Taken => pos += REQUEST_LEN,
            }
        }
        Ok(pos)
    }

    /// Validates a request and takes a slot for it.
    fn admit(&mut self, h: &RequestHeader) -> Admission {
        let Some(&ix) = self.free.last() else {
            return Admission::Stall;
        };
        let lba_mask = u64::from(self.geo.lba_size) - 1;
        let aligned = (h.offset | u64::from(h.len)) & lba_mask == 0;
        let end = h.offset.checked_add(u64::from(h.len));
        let in_range = end.is_some_and(|e| e <= self.size);
        let allowed_flags = match h.kind {
            command::WRITE_ZEROES => command_flags::NO_HOLE | command_flags::FUA,
            command::WRITE => command_flags::FUA,
            _ => 0,
        };
        let refusal = if h.flags & !allowed_flags != 0 {
            Some(errno::EINVAL)
        } else {
            match h.kind {
                command::READ | command::WRITE if h.len > self.max_payload => {
                    Some(errno::EOVERFLOW)
                }
                command::READ | command::WRITE | command::WRITE_ZEROES | command::TRIM
                    if h.len == 0 =>
                {
                    Some(errno::EINVAL)
                }
                command::READ if !in_range => Some(errno::EINVAL),
                command::WRITE | command::WRITE_ZEROES | command::TRIM if !in_range => {
                    Some(errno::ENOSPC)
                }
                command::READ | command::WRITE | command::WRITE_ZEROES if !aligned => {
                    Some(errno::EINVAL)
                }
                command::READ | command::WRITE | command::WRITE_ZEROES | command::TRIM => None,
                command::FLUSH => None,
                _ => Some(errno::EINVAL),
            }
        };
        let chunks = if refusal.is_none() && matches!(h.kind, command::READ | command::WRITE) {
            (h.len as usize).div_ceil(CHUNK)
        } else {
            0
        };
        if self.pool.available() < chunks {
            return Admission::Stall;
        }
        self.free.pop();
        let slot = &mut self.slots[ix as usize];
        slot.handle = h.handle;
        slot.kind = h.kind;
        slot.offset = h.offset;
        slot.len = h.len;
        slot.pending = 0;
        slot.submitted = 0;
        slot.error = 0;
        slot.fua = h.flags & command_flags::FUA != 0;
        for _ in 0..chunks {
            slot.chunks
                .push(self.pool.get().expect("availability checked"));
        }
        if let Some(error) = refusal {
            slot.error = error;
            if h.kind == command::WRITE {
                self.discard = u64::from(h.len);
            }
            self.make_ready(ix);
            return Admission::Taken;
        }
        let shift = self.geo.lba_shift();
        match h.kind {
            command::READ => {
                for c in 0..chunks {
                    let (slba, nlb, buf) = self.chunk_command(ix, c);
                    self.submit(ix, IoCommand::with_buf(IoOp::Read, slba, nlb, buf, 0));
                }
                self.finish_submission(ix);
            }
            command::WRITE => {
                self.slots[ix as usize].state = SlotState::Receiving;
                self.receiving = Some((ix, 0));
            }
            command::FLUSH => {
                self.submit(ix, IoCommand::new(IoOp::Flush, 0, 0, 0));
                self.finish_submission(ix);
            }
            command::WRITE_ZEROES => {
                let nlb = h.len >> shift;
                let cmd = IoCommand::new(IoOp::WriteZeroes, h.offset >> shift, nlb, 0);
                self.submit(ix, cmd);
                self.finish_submission(ix);
            }
            _ => {
                // Trim: the whole blocks inside the range; nothing to do if there are none.
                let first = (h.offset + lba_mask) >> shift;
                let last = (h.offset + u64::from(h.len)) >> shift;
                if last > first {
                    let nlb = (last - first) as u32;
                    self.submit(ix, IoCommand::new(IoOp::Deallocate, first, nlb, 0));
                }
                self.finish_submission(ix);
            }
        }
        Admission::Taken
    }

    /// LBA range and buffer of chunk `c` of slot `ix`.
    fn chunk_command(&self, ix: u16, c: usize) -> (u64, u32, IoBuf) {
        let slot = &self.slots[ix as usize];
        let start = c * CHUNK;
        let len = (slot.len as usize - start).min(CHUNK);
        let shift = self.geo.lba_shift();
        let slba = (slot.offset + start as u64) >> shift;
        (
            slba,
            (len >> shift) as u32,
            slot.chunks[c].io_buf().prefix(len),
        )
    }

    /// Copies write payload from `input` into the chunks of slot `ix`, submitting each chunk
    /// once full. Returns the bytes taken.
    fn receive_payload(&mut self, ix: u16, mut got: u32, input: &[u8]) -> usize {
        let len = self.slots[ix as usize].len as usize;
        let mut taken = 0;
        while (got as usize) < len && taken < input.len() {
            let at = got as usize;
            let (c, off) = (at / CHUNK, at % CHUNK);
            let chunk_end = ((c + 1) * CHUNK).min(len);
            let n = (chunk_end - at).min(input.len() - taken);
            let dst = &mut self.slots[ix as usize].chunks[c].as_mut_slice()[off..off + n];
            dst.copy_from_slice(&input[taken..taken + n]);
            taken += n;
            got += n as u32;
            if got as usize == chunk_end {
                let (slba, nlb, buf) = self.chunk_command(ix, c);
                self.submit(ix, IoCommand::with_buf(IoOp::Write, slba, nlb, buf, 0));
                self.slots[ix as usize].submitted += 1;
            }
        }
        if got as usize == len {
            self.receiving = None;
            self.finish_submission(ix);
        } else {
            self.receiving = Some((ix, got));
        }
        taken
    }

    /// Hands one command of slot `ix` to the queue pair.
    fn submit(&mut self, ix: u16, mut cmd: IoCommand) {
        cmd.tag = u64::from(ix);
        // A FUA write or write-zeroes is durable on every leg when it is acknowledged.
        cmd.fua = self.slots[ix as usize].fua && cmd.op.modifies();
        // SAFETY: data buffers are chunks owned by slot `ix`; they go back to the pool only
        // in `release`, after every completion of the slot has been reaped (`pending == 0`),
        // and nothing writes them while the slot is in flight. Teardown waits for the queue
        // pair to drain or leaks the pool (`Drop`).
        match unsafe { self.qpair.submit(cmd) } {
            Ok(()) => self.slots[ix as usize].pending += 1,
            // The depth covers every chunk and slot, so this means a back-end fault.
            Err(_) => {
                let slot = &mut self.slots[ix as usize];
                if slot.error == 0 {
                    slot.error = errno::EIO;
                }
            }
        }
    }

    /// Marks slot `ix` in flight, or ready if nothing is outstanding.
    fn finish_submission(&mut self, ix: u16) {
        if self.slots[ix as usize].pending == 0 {
            self.make_ready(ix);
        } else {
            self.slots[ix as usize].state = SlotState::InFlight;
        }
    }

    fn make_ready(&mut self, ix: u16) {
        self.slots[ix as usize].state = SlotState::Ready;
        self.ready.push_back(ix);
    }

    /// Rings the queue pair's doorbell and reaps completions; returns how many.
    pub(crate) fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            let n = self.qpair.poll(&mut self.completions);
            for i in 0..n {
                let cpl = self.completions[i];
                let ix = cpl.tag as u16;
                let Some(slot) = self.slots.get_mut(ix as usize) else {
                    continue;
                };
                if slot.pending == 0 {
                    continue;
                }
                slot.pending -= 1;
                if !cpl.status.is_success() {
                    if slot.error == 0 {
                        slot.error = errno_for(cpl.status);
                    }
                    if self.qpair.buffer_lent(cpl.tag) {
                        slot.lent += 1;
                        self.lent += 1;
                    }
                }
                if slot.pending == 0 && slot.state == SlotState::InFlight {
                    self.make_ready(ix);
                }
            }
            total += n;
            if self.lent > 0 {
                total += self.take_back();
            }
            if n < self.completions.len() {
                return total;
            }
        }
    }

    /// Copies finished replies into `tx` while it has room. Returns whether any bytes were
    /// queued.
    pub(crate) fn gather_replies(&mut self, tx: &mut ByteQueue) -> bool {
        let mut queued = false;
        while let Some(&ix) = self.ready.front() {
            let slot = &self.slots[ix as usize];
            let mut copied = match self.sending {
                Some(c) => c,
                None => {
                    if tx.room() < REPLY_LEN {
                        break;
                    }
                    tx.put(&simple_reply(slot.error, slot.handle));
                    queued = true;
                    0
                }
            };
            let data_len = slot.reply_data_len();
            while copied < data_len && tx.room() > 0 {
                let (c, off) = (copied / CHUNK, copied % CHUNK);
                let n = (CHUNK - off).min(data_len - copied).min(tx.room());
                tx.put(&slot.chunks[c].as_slice()[off..off + n]);
                copied += n;
                queued = true;
            }
            if copied < data_len {
                self.sending = Some(copied);
                break;
            }
            self.sending = None;
            self.ready.pop_front();
            self.release(ix);
        }
        queued
    }

    /// Drops finished replies (the peer is gone).
    pub(crate) fn drop_replies(&mut self) {
        self.sending = None;
        while let Some(ix) = self.ready.pop_front() {
            self.release(ix);
        }
    }

    /// Stops taking payload for a write cut off by the peer: its unsent chunks are dropped,
    /// the slot finishes once the submitted ones complete.
    pub(crate) fn abandon_payload(&mut self) {
        self.discard = 0;
        if let Some((ix, _)) = self.receiving.take() {
            let slot = &mut self.slots[ix as usize];
            slot.error = errno::EIO;
            self.finish_submission(ix);
        }
    }

    /// Slots whose lent chunks the queue pair gives back; returns how many came back.
    #[cold]
    fn take_back(&mut self) -> usize {
        let mut back = [0u64; 32];
        let n = self.qpair.poll_released(&mut back);
        for &tag in &back[..n] {
            let ix = tag as u16;
            let Some(slot) = self.slots.get_mut(ix as usize) else {
                continue;
            };
            if slot.lent == 0 {
                continue;
            }
            slot.lent -= 1;
            self.lent -= 1;
            if slot.lent == 0 && slot.state == SlotState::Lent {
                self.release(ix);
            }
        }
        n
    }

    fn release(&mut self, ix: u16) {
        let slot = &mut self.slots[ix as usize];
        if slot.lent > 0 {
            // A back end may still fill or read these chunks: not reused until given back.
            slot.state = SlotState::Lent;
            return;
        }
        for buf in slot.chunks.drain(..) {
            self.pool.put(buf);
        }
        slot.state = SlotState::Free;
        self.free.push(ix);
    }

    /// Spins until the queue pair has nothing outstanding or `timeout` passes.
    fn quiesce(&mut self, timeout: Duration) -> bool {
        crate::drain::wait(crate::drain::deadline(timeout), || {
            if self.qpair.outstanding() == 0 {
                Drain::Done
            } else if self.reap() > 0 {
                Drain::Progress
            } else {
                Drain::Idle
            }
        })
    }
}

/// A connection's payload buffers: `count` of `size` bytes, or an error (never an abort)
/// when they cannot be allocated.
fn payload_pool(count: u32, size: usize) -> Result<DmaPool> {
    DmaPool::try_new(count, size).ok_or(Error::BufferAlloc {
        bytes: u64::from(count).saturating_mul(size as u64),
        count,
        size,
    })
}

impl Drop for Transmission {
    fn drop(&mut self) {
        let quiet = self.quiesce(QUIESCE_TIMEOUT);
        // Closing never blocks: a back end that still holds commands leaves them to its
        // reaper, and the pool (whose memory its buffers keep alive) goes once none of them can
        // touch it any more.
        let qpair = std::mem::replace(&mut self.qpair, Box::new(Detached));
        let fence = qpair.close();
        if !quiet || !fence.is_done() {
            tracing::warn!(
                "NBD connection torn down with commands still on the device; its buffers are kept until they are over"
            );
            let pool = std::mem::replace(&mut self.pool, DmaPool::new(1, 1));
            let slots = std::mem::take(&mut self.slots);
            fence.then(move || drop((pool, slots)));
        }
    }
}

/// Stand-in for a queue pair leaked at teardown.
#[derive(Debug)]
struct Detached;

impl QueuePair for Detached {
    fn depth(&self) -> u32 {
        0
    }
    fn outstanding(&self) -> u32 {
        0
    }
    unsafe fn submit(
        &mut self,
        _cmd: IoCommand,
    ) -> std::result::Result<(), nvmirror_nvme::SubmitError> {
        Err(nvmirror_nvme::SubmitError::QueueFull)
    }
    fn poll(&mut self, _out: &mut [Completion]) -> usize {
        0
    }
}

/// The NBD error for a failed NVMe command.
fn errno_for(status: Status) -> u32 {
    // Compare type and code only, without the DNR/More flags.
    let code = Status::from_raw(status.raw() & 0x7ff);
    if code == Status::LBA_OUT_OF_RANGE || code == Status::CAPACITY_EXCEEDED {
        errno::ENOSPC
    } else if code == Status::INVALID_FIELD || code == Status::INVALID_OPCODE {
        errno::EINVAL
    } else {
        errno::EIO
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_buffers_that_cannot_be_allocated_are_an_error_not_an_abort() {
        let err = super::payload_pool(u32::MAX, usize::MAX / 2).unwrap_err();
        assert!(
            matches!(
                err,
                super::Error::BufferAlloc {
                    count: u32::MAX,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("payload buffers"), "{err}");
        assert!(super::payload_pool(2, super::CHUNK).is_ok());
    }

    use super::*;

    #[test]
    fn device_errors_map_to_nbd_errors() {
        assert_eq!(
            errno_for(Status::LBA_OUT_OF_RANGE.with_dnr()),
            errno::ENOSPC
        );
        assert_eq!(errno_for(Status::INVALID_FIELD), errno::EINVAL);
        assert_eq!(errno_for(Status::WRITE_FAULT), errno::EIO);
        assert_eq!(errno_for(Status::HOST_PATHING_ERROR.with_dnr()), errno::EIO);
    }
}
