//! One connection as a queue pair, driven without blocking.
//!
//! [`submit`](QueuePair::submit) checks the command (LBA range, buffer, what the export
//! allows), writes its 28-byte request header into a fixed slot and queues the slot; nothing
//! that fails the check reaches the wire. [`poll`](QueuePair::poll) sends queued requests
//! with `writev` straight from the slot headers and the callers' write buffers, then receives
//! replies: headers through a small staging buffer, read data straight into the caller's
//! buffer, across as many polls as the bytes take. Requests are pipelined; the NBD handle of
//! each is its slot index and the slot's generation, so a reply finds its command with one
//! array lookup and a stale or unknown handle is caught. No command allocates.
//!
//! A closed socket, a failed `send`/`recv`, a reply that breaks the protocol or a server
//! silent for longer than the timeout kills the connection: every outstanding command
//! completes with [`Status::HOST_PATHING_ERROR`], and so does every later one; the device
//! reports itself gone. NBD cannot abort a request; [`close`](QueuePair::close) sends
//! `NBD_CMD_DISC` and leaves the connection to a reaper thread until the server has answered
//! or closed it (`close`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod close;

use super::receive::RxState;
use super::Link;
use crate::dma::IoBuf;
use crate::queue::{Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::nbd::{
    command, command_flags, transmission_flags as tf, RequestHeader, REQUEST_LEN, REQUEST_MAGIC,
};
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// Request buffers handed to one `writev`.
const IOV_BATCH: usize = 64;
/// `writev` calls per poll at most.
const SEND_BUDGET: usize = 8;
/// Idle polls between clock reads while waiting on the server.
const CLOCK_EVERY: u32 = 64;

/// Where a slot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    /// On the wire or queued for it; `sent` and `replied` say how far.
    Active,
    /// Finished with `status`; waits in the done queue to be reaped.
    Complete,
}

/// One caller command.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub state: SlotState,
    /// Bumped at every submission: the high half of the NBD handle.
    pub gen: u32,
    pub tag: u64,
    pub op: IoOp,
    pub header: [u8; REQUEST_LEN],
    /// The caller's buffer (reads and writes).
    pub buf: IoBuf,
    /// Payload bytes: sent after the header for writes, received after the reply for reads.
    pub len: u32,
    /// The whole request is in the socket.
    pub sent: bool,
    /// The reply, and a read's data, arrived.
    pub replied: bool,
    /// A FUA write to a server without `SEND_FUA`: once the write is acknowledged, the slot
    /// sends a flush and completes when that is answered.
    pub flush_after: bool,
    pub status: Status,
}

impl Slot {
    const FREE: Self = Self {
        state: SlotState::Free,
        gen: 0,
        tag: 0,
        op: IoOp::Flush,
        header: [0; REQUEST_LEN],
        buf: IoBuf::EMPTY,
        len: 0,
        sent: false,
        replied: false,
        flush_after: false,
        status: Status::SUCCESS,
    };

    /// Bytes of this request on the wire: the header, and a write's data.
    #[inline]
    fn wire_len(&self) -> usize {
        REQUEST_LEN
            + if self.op == IoOp::Write {
                self.len as usize
            } else {
                0
            }
    }

    /// The NBD handle of the current submission.
    #[inline]
    pub fn handle(index: u32, gen: u32) -> u64 {
        (u64::from(gen) << 32) | u64::from(index)
    }
}

/// A queue pair on an [`NbdDevice`](super::NbdDevice): one connection of its own.
#[derive(Debug)]
pub struct NbdQueuePair {
    pub(super) link: Arc<Link>,
    pub(super) sock: TcpStream,
    depth: u32,
    geo: Geometry,
    flags: u16,
    max_payload: u32,
    timeout: Duration,
    outstanding: u32,
    /// Active commands whose reply header has not arrived.
    pub(super) awaiting: u32,
    pub(super) slots: Box<[Slot]>,
    free: Vec<u32>,
    /// Requests not yet fully in the socket, in submission order; `tx_off` bytes of the
    /// first are.
    txq: VecDeque<u32>,
    tx_off: usize,
    /// Complete slots, in completion order.
    done: VecDeque<u32>,
    pub(super) rx: RxState,
    /// Why the connection died; every command completes with a path error from then on.
    pub(super) dead: Option<String>,
    /// When the server was first found silent while commands waited on it.
    idle_since: Option<Instant>,
    idle_polls: u32,
    /// Closed: a reaper drives the connection until its commands are over (`close`).
    closing: bool,
    /// Bytes of the `NBD_CMD_DISC` request written (`REQUEST_LEN`: all of it).
    disc_off: usize,
    /// The server closed the connection (end of stream, not an error).
    pub(super) server_closed: bool,
}

impl NbdQueuePair {
    pub(super) fn new(link: Arc<Link>, sock: TcpStream, depth: u32) -> Result<Self> {
        let setup = |r: io::Result<()>| {
            r.map_err(|e| Error::QueuePair(format!("{}: socket setup: {e}", link.peer.label)))
        };
        setup(sock.set_read_timeout(None))?;
        setup(sock.set_write_timeout(None))?;
        setup(sock.set_nodelay(true))?;
        setup(sock.set_nonblocking(true))?;
        let d = depth as usize;
        Ok(Self {
            depth,
            geo: link.geo,
            flags: link.info.flags,
            max_payload: link.info.max_block,
            timeout: link.opts.timeout,
            link,
            sock,
            outstanding: 0,
            awaiting: 0,
            slots: vec![Slot::FREE; d].into_boxed_slice(),
            free: (0..depth).rev().collect(),
            txq: VecDeque::with_capacity(d),
            tx_off: 0,
            done: VecDeque::with_capacity(d),
            rx: RxState::new(),
            dead: None,
            idle_since: None,
            idle_polls: 0,
            closing: false,
            disc_off: 0,
            server_closed: false,
        })
    }

    /// Why the connection is dead, if it is.
    pub fn dead_reason(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    /// The NBD request for `cmd`: type, byte offset, byte length; `Ok(None)` for a flush the
    /// export does not need (it advertises no `SEND_FLUSH`: writes are stable when
    /// acknowledged). An error status completes the command without sending it.
    #[inline]
    fn request_for(&self, cmd: &IoCommand) -> std::result::Result<Option<(u16, u64, u32)>, Status> {
        cmd.check(&self.geo)?;
        let read_only = self.flags & tf::READ_ONLY != 0;
        let kind = match cmd.op {
            IoOp::Read => command::READ,
            IoOp::Flush if self.flags & tf::SEND_FLUSH == 0 => return Ok(None),
            IoOp::Flush => return Ok(Some((command::FLUSH, 0, 0))),
            _ if read_only => return Err(Status::NAMESPACE_WRITE_PROTECTED),
            IoOp::Write => command::WRITE,
            IoOp::WriteZeroes if self.flags & tf::SEND_WRITE_ZEROES != 0 => command::WRITE_ZEROES,
            IoOp::Deallocate if self.flags & tf::SEND_TRIM != 0 => command::TRIM,
            IoOp::WriteZeroes | IoOp::Deallocate => return Err(Status::INVALID_OPCODE),
        };
        let shift = self.geo.lba_shift();
        let bytes = u64::from(cmd.nlb) << shift;
        let limit = if cmd.op.has_data() {
            u64::from(self.max_payload)
        } else {
            u64::from(u32::MAX)
        };
        if bytes > limit {
            return Err(Status::INVALID_FIELD);
        }
        Ok(Some((kind, cmd.slba << shift, bytes as u32)))
    }

    /// Finishes slot `i` with `status`; it is reaped by the next `poll`.
    #[inline]
    pub(super) fn complete(&mut self, i: u32, status: Status) {
        let slot = &mut self.slots[i as usize];
        slot.state = SlotState::Complete;
        slot.status = status;
        self.done.push_back(i);
    }

    /// Slot `i`'s reply (and a read's data) is in: it completes once its request is all
    /// sent, which a server may answer early (a refused write).
    #[inline]
    pub(super) fn reply_done(&mut self, i: u32, status: Status) {
        let slot = &mut self.slots[i as usize];
        slot.status = status;
        slot.replied = true;
        if slot.sent {
            self.answered(i);
        }
    }

    /// Slot `i`'s request is sent and answered: it completes, or a FUA write the server could
    /// not be told about goes on with a flush.
    #[inline]
    fn answered(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        let status = slot.status;
        if !(slot.flush_after && status.is_success()) || self.dead.is_some() {
            self.complete(i, status);
            return;
        }
        slot.flush_after = false;
        slot.gen = slot.gen.wrapping_add(1);
        slot.op = IoOp::Flush;
        slot.buf = IoBuf::EMPTY;
        slot.len = 0;
        slot.sent = false;
        slot.replied = false;
        slot.header = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: command::FLUSH,
            handle: Slot::handle(i, slot.gen),
            offset: 0,
            len: 0,
        }
        .encode();
        self.awaiting += 1;
        self.txq.push_back(i);
    }

    /// Kills the connection: every command not yet complete fails with a path error.
    pub(super) fn die(&mut self, reason: String) {
        if self.dead.is_some() {
            return;
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        if self.closed_cleanly() {
            tracing::debug!(target = %self.link.peer.label, "closed NBD connection: the server ended it after NBD_CMD_DISC");
        } else {
            tracing::warn!(target = %self.link.peer.label, "NBD connection lost: {reason}");
            self.link.lose(reason.clone());
        }
        for i in 0..self.slots.len() {
            if self.slots[i].state == SlotState::Active {
                self.complete(i as u32, Status::HOST_PATHING_ERROR);
            }
        }
        self.txq.clear();
        self.tx_off = 0;
        self.awaiting = 0;
        self.rx.reset();
        self.dead = Some(reason);
    }

    /// Writes queued requests while the socket takes them.
    #[inline]
    fn send(&mut self) {
        for _ in 0..SEND_BUDGET {
            if self.txq.is_empty() {
                return;
            }
            let mut iov = [IoSlice::new(&[]); IOV_BATCH];
            let mut n = 0;
            let mut skip = self.tx_off;
            for &i in self.txq.iter() {
                if n + 2 > IOV_BATCH {
                    break;
                }
                let slot = &self.slots[i as usize];
                if skip < REQUEST_LEN {
                    iov[n] = IoSlice::new(&slot.header[skip..]);
                    n += 1;
                }
                if slot.op == IoOp::Write && slot.len > 0 {
                    let from = skip.saturating_sub(REQUEST_LEN);
                    // SAFETY: the write is outstanding, so the submit contract keeps its
                    // buffer valid and unmodified; `len <= buf.len()` was checked at submit
                    // and `from < len` because the slot is not fully sent.
                    let data = unsafe {
                        std::slice::from_raw_parts(
                            slot.buf.as_ptr().add(from),
                            slot.len as usize - from,
                        )
                    };
                    iov[n] = IoSlice::new(data);
                    n += 1;
                }
                skip = 0;
            }
            match self.sock.write_vectored(&iov[..n]) {
                Ok(0) => return,
                Ok(w) => self.advance_tx(w),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return
                }
                Err(e) => {
                    self.die(format!("send failed: {e}"));
                    return;
                }
            }
        }
    }

    /// `w` more bytes of the queued requests are in the socket.
    #[inline]
    fn advance_tx(&mut self, mut w: usize) {
        while w > 0 {
            let Some(&i) = self.txq.front() else {
                return;
            };
            let rest = self.slots[i as usize].wire_len() - self.tx_off;
            if w < rest {
                self.tx_off += w;
                return;
            }
            w -= rest;
            self.tx_off = 0;
            self.txq.pop_front();
            let slot = &mut self.slots[i as usize];
            slot.sent = true;
            if slot.replied && slot.state == SlotState::Active {
                self.answered(i);
            }
        }
    }

    /// Declares the connection dead when the server has been silent for the timeout while
    /// commands wait on it. Reads the clock only every few idle polls.
    #[inline]
    fn check_timeout(&mut self, received: bool) {
        if received || self.awaiting == 0 || self.timeout.is_zero() {
            self.idle_since = None;
            return;
        }
        self.idle_polls = self.idle_polls.wrapping_add(1);
        if self.idle_since.is_some() && self.idle_polls % CLOCK_EVERY != 0 {
            return;
        }
        let now = Instant::now();
        match self.idle_since {
            None => self.idle_since = Some(now),
            Some(t) if now.duration_since(t) > self.timeout => self.die(format!(
                "no reply from the server for {:?} with {} commands outstanding",
                self.timeout, self.awaiting
            )),
            Some(_) => {}
        }
    }
}

impl QueuePair for NbdQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// NBD has no abort: a request on the wire cannot be cancelled, so this issues nothing
    /// and returns 0; the commands complete with their real results (or a path error if the
    /// connection dies). [`close`](QueuePair::close) fences them with `NBD_CMD_DISC`.
    fn cancel(&mut self, tags: &[u64]) -> usize {
        let _ = tags;
        0
    }

    /// Sends `NBD_CMD_DISC` and leaves the connection to a reaper thread; the fence is done
    /// once the server answered every request or closed the connection after the DISC
    /// (`close`).
    fn close(self: Box<Self>) -> crate::Fence {
        (*self).close_fenced()
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        let Some(i) = self.free.pop() else {
            return Err(SubmitError::QueueFull);
        };
        self.outstanding += 1;
        let slot = &mut self.slots[i as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.tag = cmd.tag;
        slot.op = cmd.op;
        slot.buf = IoBuf::EMPTY;
        slot.len = 0;
        slot.sent = false;
        slot.replied = false;
        slot.flush_after = false;
        slot.status = Status::SUCCESS;
        slot.state = SlotState::Active;
        match self.request_for(&cmd) {
            Err(status) => self.complete(i, status),
            Ok(None) => self.complete(i, Status::SUCCESS),
            Ok(Some(_)) if self.dead.is_some() => self.complete(i, Status::HOST_PATHING_ERROR),
            Ok(Some((kind, offset, len))) => {
                // FUA: the server's flag when it takes one, else a flush once the write is
                // acknowledged (a server without `SEND_FLUSH` has no cache to flush).
                let fua = cmd.wants_fua() && self.flags & tf::SEND_FUA != 0;
                let flush_after = cmd.wants_fua()
                    && self.flags & tf::SEND_FUA == 0
                    && self.flags & tf::SEND_FLUSH != 0;
                let slot = &mut self.slots[i as usize];
                slot.flush_after = flush_after;
                slot.header = RequestHeader {
                    magic: REQUEST_MAGIC,
                    flags: if fua { command_flags::FUA } else { 0 },
                    kind,
                    handle: Slot::handle(i, slot.gen),
                    offset,
                    len,
                }
                .encode();
                if cmd.op.has_data() {
                    slot.buf = cmd.buf;
                    slot.len = len;
                }
                self.awaiting += 1;
                self.txq.push_back(i);
            }
        }
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.dead.is_none() {
            self.send();
            let received = self.dead.is_none() && self.receive();
            if self.dead.is_none() {
                self.check_timeout(received);
            }
        }
        let n = out.len().min(self.done.len());
        for o in &mut out[..n] {
            let i = self.done.pop_front().expect("n <= done.len()");
            let slot = &mut self.slots[i as usize];
            *o = Completion {
                tag: slot.tag,
                status: slot.status,
            };
            slot.state = SlotState::Free;
            slot.buf = IoBuf::EMPTY;
            self.free.push(i);
        }
        self.outstanding -= n as u32;
        n
    }
}

impl Drop for NbdQueuePair {
    fn drop(&mut self) {
        if self.dead.is_none() && self.txq.is_empty() && self.disc_off == 0 {
            let _ = self.sock.set_nonblocking(false);
            let _ = self
                .sock
                .set_write_timeout(Some(Duration::from_millis(100)));
            let _ = self.sock.write_all(&disc_request());
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        self.link.close_one();
    }
}

/// `NBD_CMD_DISC`: the polite end of the transmission phase.
fn disc_request() -> [u8; REQUEST_LEN] {
    RequestHeader {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind: command::DISC,
        handle: 0,
        offset: 0,
        len: 0,
    }
    .encode()
}

/// Ends a connection that never became a queue pair.
pub(super) fn disconnect(mut sock: TcpStream) {
    let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = sock.write_all(&disc_request());
    let _ = sock.shutdown(Shutdown::Both);
}
