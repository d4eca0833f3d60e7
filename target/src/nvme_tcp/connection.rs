//! One host queue: the [`Connection`] poller owns the non-blocking socket, the receive and
//! send buffers, the command slots and (for I/O queues) the back-end queue pairs.
//!
//! Per poll: one `recv` into the receive buffer, every complete PDU parsed and handled
//! (bounded by [`MAX_PDUS_PER_POLL`] and by room in the send buffer), back-end completions
//! reaped, responses encoded straight into the send buffer, one `send`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::spec::tcp::{
    self, flags, parse_pdu, DataPdu, Digests, PduError, PduLimits, PduType, Role, TERM_REQ_MAX_PLEN,
};
use nvmirror_nvme::spec::CompletionQueueEntry;
use nvmirror_nvme::{Completion, Fence, QueuePair};
use nvmirror_poller::{PollStatus, Poller, ReactorContext};

use crate::drain::Drain;

use super::admin::AdminState;
use super::request::{RequestState, SlotTable};
use super::reservation::AccessCache;
use super::subsystem::{Controller, TargetShared};
use super::{TargetConfig, ADMIN_IN_CAPSULE};

/// PDUs handled per poll before other connections get their turn.
pub(crate) const MAX_PDUS_PER_POLL: usize = 128;
/// Back-end completions reaped per queue pair per poll.
const MAX_COMPLETIONS_PER_POLL: usize = 128;
/// Send-buffer room kept free before a PDU is handled: enough for an R2T, a response
/// capsule or a termination request, whatever the PDU turns out to need.
const TX_RESERVE: usize = 256;
/// How long a closing connection may take to flush its send buffer.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// At most this long (and never past the shutdown deadline, `drain`) a closing connection
/// waits for the back end to give up its commands before it leaks their buffers.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted; the first PDU must be an ICReq.
    AwaitIcReq,
    /// ICResp sent; the first command must be a fabrics Connect.
    AwaitConnect,
    /// Connected as its controller's admin queue.
    Admin,
    /// Connected as an I/O queue.
    Io,
    /// Going away: no more input; flush what is queued, drain the back end, close.
    Closing { since: Instant },
}

/// Queue identity once connected.
#[derive(Debug)]
pub(crate) struct QueueInfo {
    pub qid: u16,
    /// Entries in the queue (SQSIZE + 1).
    pub size: u16,
    pub sq_head: u16,
    /// The host disabled SQ flow control: reads may end with a C2HData SUCCESS flag.
    pub sqflow_disabled: bool,
    pub ctrl: Option<Arc<Controller>>,
}

/// One NVMe/TCP connection (one host queue).
pub(crate) struct Connection {
    sock: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) shared: Arc<TargetShared>,
    pub(super) phase: Phase,
    pub(super) lim: PduLimits,
    pub(super) dg: Digests,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_start: usize,
    pub(super) tx_end: usize,
    /// Largest PDU the peer may send us, for receive-buffer compaction.
    max_pdu: usize,
    pub(super) slots: SlotTable,
    /// The table that replaces `slots` once the Connect response is out.
    pub(super) next_slots: Option<SlotTable>,
    /// Complete slots whose response did not fit in the send buffer yet.
    pending: VecDeque<u16>,
    /// Slots with back-end sub-commands still to submit (the queue pair was full).
    pub(super) retry: VecDeque<u16>,
    pub(super) queue: QueueInfo,
    pub(super) admin: Option<AdminState>,
    /// DH-HMAC-CHAP state where the host must authenticate this queue.
    pub(super) auth: Option<super::auth::QueueAuth>,
    pub(super) qpairs: Vec<Box<dyn QueuePair>>,
    /// Per namespace (I/O queues): the host's reservation access as last computed.
    pub(super) resv_access: Vec<AccessCache>,
    cpl: Vec<Completion>,
    /// Close after the current responses are sent (Disconnect).
    pub(super) close_after_flush: bool,
    sock_shut: bool,
    torn_down: bool,
    /// When the socket was accepted: ICReq and Connect must be done by
    /// `accepted + handshake_timeout`.
    accepted: Instant,
}

/// The back-end queue pairs are closed first, without blocking the reactor: a back end that
/// still holds commands (a hung file or block-device leg) leaves them to its reaper, and the
/// slots' buffers (lent ones included) are freed only once the close fence says no command
/// can touch them. The connection stops counting against `max_connections` here, wherever it
/// is dropped.
impl Drop for Connection {
    fn drop(&mut self) {
        let fence = Fence::all(self.qpairs.drain(..).map(QueuePair::close));
        if !fence.is_done() {
            tracing::info!(peer = %self.peer, "back end still holds commands at close; their buffers are kept until it is done");
            let slots = std::mem::replace(&mut self.slots, SlotTable::new(1, 4096));
            let next = self.next_slots.take();
            fence.then(move || drop((slots, next)));
        }
        self.shared.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("phase", &self.phase)
            .field("qid", &self.queue.qid)
            .finish()
    }
}

fn buffer_sizes(cfg: &TargetConfig) -> (usize, usize, usize) {
    let max_data = (cfg.maxh2cdata as usize)
        .max(cfg.in_capsule_data_size as usize)
        .max(ADMIN_IN_CAPSULE as usize);
    let max_pdu = max_data + 256;
    let rx = (2 * max_pdu).max(256 * 1024);
    let tx = (2 * cfg.max_transfer() as usize + 4096).max(256 * 1024);
    (max_pdu, rx, tx)
}

impl Connection {
    /// Whether the queue may carry commands other than authentication: it needs none, or
    /// its host has authenticated.
    pub(super) fn authenticated(&self) -> bool {
        self.auth.as_ref().map_or(true, |a| a.authenticated())
    }

    pub fn new(
        sock: TcpStream,
        peer: SocketAddr,
        shared: Arc<TargetShared>,
    ) -> std::io::Result<Self> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let local = sock.local_addr()?;
        let (max_pdu, rx, tx) = buffer_sizes(&shared.cfg);
        let slots = SlotTable::try_new(1, ADMIN_IN_CAPSULE).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "no memory for the Connect buffer",
            )
        })?;
        let lim = PduLimits {
            hdgst: false,
            ddgst: false,
            max_icdata: ADMIN_IN_CAPSULE.max(shared.cfg.in_capsule_data_size),
            maxh2cdata: shared.cfg.maxh2cdata,
            max_c2hdata: 0,
        };
        shared.open_connections.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            sock,
            peer,
            local,
            phase: Phase::AwaitIcReq,
            lim,
            dg: Digests::default(),
            rx: vec![0; rx],
            rx_start: 0,
            rx_end: 0,
            tx: vec![0; tx],
            tx_start: 0,
            tx_end: 0,
            max_pdu,
            slots,
            next_slots: None,
            pending: VecDeque::new(),
            retry: VecDeque::new(),
            queue: QueueInfo {
                qid: 0,
                size: 1,
                sq_head: 0,
                sqflow_disabled: false,
                ctrl: None,
            },
            admin: None,
            auth: None,
            qpairs: Vec::new(),
            resv_access: Vec::new(),
            cpl: vec![Completion::default(); MAX_COMPLETIONS_PER_POLL],
            close_after_flush: false,
            sock_shut: false,
            torn_down: false,
            accepted: Instant::now(),
            shared,
        })
    }

    /// Sizes the response and retry lists for a queue of `depth` entries, so they never
    /// grow on the I/O path.
    pub(super) fn reserve_lists(&mut self, depth: u16) {
        self.pending.reserve(usize::from(depth));
        self.retry.reserve(usize::from(depth));
    }

    /// Sets the in-capsule data limit once the queue type is known.
    pub(super) fn set_max_icdata(&mut self, n: u32) {
        self.lim.max_icdata = n;
    }

    pub(super) fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// Starts closing: no more input is read.
    pub(super) fn close(&mut self, now: Instant, why: &str) {
        if !self.is_closing() {
            tracing::debug!(peer = %self.peer, qid = self.queue.qid, "closing connection: {why}");
            self.phase = Phase::Closing { since: now };
        }
    }

    /// Sends a C2HTermReq for `e` (echoing the offending bytes) and closes.
    pub(super) fn fatal(&mut self, now: Instant, e: &PduError, offending: &[u8]) {
        tracing::warn!(peer = %self.peer, "terminating connection: {e}");
        let echo = &offending[..e.echo_len.min(offending.len())];
        if let Some(out) = self.tx_space(TERM_REQ_MAX_PLEN) {
            let n = tcp::write_term_req(out, PduType::C2HTermReq, e.fes as u16, e.fei, echo);
            self.tx_end += n;
        }
        self.close(now, "fatal transport error");
    }

    // ---- send buffer ------------------------------------------------------------------

    /// `n` bytes of room at the end of the send buffer, compacting if that makes room.
    #[inline]
    pub(super) fn tx_space(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.tx.len() - self.tx_end < n && self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
        if self.tx.len() - self.tx_end < n {
            return None;
        }
        Some(&mut self.tx[self.tx_end..])
    }

    fn tx_free(&self) -> usize {
        self.tx.len() - (self.tx_end - self.tx_start)
    }

    /// One `send` of whatever is queued. Returns whether bytes went out.
    fn send(&mut self, now: Instant) -> bool {
        if self.tx_start == self.tx_end || self.sock_shut {
            return false;
        }
        match self.sock.write(&self.tx[self.tx_start..self.tx_end]) {
            Ok(n) => {
                self.tx_start += n;
                if self.tx_start == self.tx_end {
                    self.tx_start = 0;
                    self.tx_end = 0;
                }
                n > 0
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e) => {
                self.tx_start = 0;
                self.tx_end = 0;
                self.close(now, &format!("send failed: {e}"));
                true
            }
        }
    }

    // ---- receive path -----------------------------------------------------------------

    /// One `recv` into the free tail of the receive buffer.
    fn recv(&mut self, now: Instant) -> bool {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx.len() - self.rx_end < self.max_pdu && self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.rx_end == self.rx.len() {
            return false;
        }
        match self.sock.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                self.close(now, "peer closed the connection");
                true
            }
            Ok(n) => {
                self.rx_end += n;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e) => {
                self.close(now, &format!("recv failed: {e}"));
                true
            }
        }
    }

    /// Parses and handles the complete PDUs in the receive buffer.
    fn process_rx(&mut self, now: Instant) -> bool {
        let rx = std::mem::take(&mut self.rx);
        let mut handled = 0;
        while handled < MAX_PDUS_PER_POLL && !self.is_closing() {
            if self.tx_free() < TX_RESERVE + self.pending_bytes_hint() {
                break;
            }
            let buf = &rx[self.rx_start..self.rx_end];
            let (pdu, len) = match parse_pdu(buf, Role::Controller, &self.lim) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.fatal(now, &e, buf);
                    break;
                }
            };
            // Every slot is taken and some are lent to a hung leg: the host is within its
            // queue size, so its next command waits here until a buffer is given back.
            if matches!(pdu, tcp::Pdu::CapsuleCmd { .. })
                && self.slots.lent() > 0
                && self.slots.is_exhausted()
            {
                break;
            }
            if let Err(e) = self.handle_pdu(pdu, now) {
                let hlen = usize::from(buf[2]).min(len);
                let e = PduError {
                    echo_len: hlen.min(tcp::TERM_REQ_MAX_DATA),
                    ..e
                };
                self.fatal(now, &e, buf);
                break;
            }
            self.rx_start += len;
            handled += 1;
        }
        self.rx = rx;
        handled > 0
    }

    /// Keeps room for responses already waiting, so new PDUs do not starve them.
    fn pending_bytes_hint(&self) -> usize {
        if self.pending.is_empty() {
            0
        } else {
            self.tx.len() / 2
        }
    }

    // ---- completions --------------------------------------------------------------------

    /// A command finished: queue its response.
    pub(super) fn complete(&mut self, i: u16) {
        self.slots.slots[usize::from(i)].state = RequestState::ResponsePending;
        if !self.pending.is_empty() || !self.write_response(i) {
            self.pending.push_back(i);
        }
    }

    /// Encodes the response of slot `i` (C2HData and/or response capsule) into the send
    /// buffer and frees the slot; false if it does not fit yet.
    fn write_response(&mut self, i: u16) -> bool {
        let dg = self.dg;
        let slot = &self.slots.slots[usize::from(i)];
        let cqe = CompletionQueueEntry {
            dw0: slot.dw0,
            dw1: slot.dw1,
            sq_head: self.queue.sq_head,
            sq_id: self.queue.qid,
            cid: slot.sqe.cid,
            status: slot.status.raw() << 1,
        };
        let data_len = if slot.status.is_success() {
            slot.c2h_len as usize
        } else {
            0
        };
        let success_flag = self.queue.sqflow_disabled && data_len > 0;
        let need = if data_len > 0 {
            tcp::data_pdu_len(data_len, dg)
        } else {
            0
        } + if success_flag {
            0
        } else {
            tcp::capsule_resp_len(dg)
        };
        let Some(_) = self.tx_space(need) else {
            return false;
        };
        let slot = &self.slots.slots[usize::from(i)];
        let out = &mut self.tx[self.tx_end..];
        let mut n = 0;
        if data_len > 0 {
            let d = DataPdu {
                ty: PduType::C2HData,
                flags: flags::LAST_PDU | if success_flag { flags::SUCCESS } else { 0 },
                cccid: slot.sqe.cid,
                ttag: 0,
                datao: 0,
                datal: data_len as u32,
            };
            n = tcp::write_data_pdu(out, &d, &slot.buf.as_slice()[..data_len], dg);
        }
        if !success_flag {
            n += tcp::write_capsule_resp(&mut out[n..], &cqe, dg);
        }
        self.tx_end += n;
        self.slots.release(i);
        true
    }

    fn flush_pending(&mut self) -> bool {
        let mut any = false;
        while let Some(&i) = self.pending.front() {
            if !self.write_response(i) {
                break;
            }
            self.pending.pop_front();
            any = true;
        }
        any
    }

    /// Reaps back-end completions and retries deferred submissions.
    fn reap(&mut self) -> bool {
        let mut any = false;
        for q in 0..self.qpairs.len() {
            let n = self.qpairs[q].poll(&mut self.cpl);
            for k in 0..n {
                let c = self.cpl[k];
                if !c.status.is_success() && self.qpairs[q].buffer_lent(c.tag) {
                    self.slots.lend(c.tag as u16);
                }
                if !self.is_closing() {
                    super::io::sub_complete(self, c.tag as u16, c.status);
                }
            }
            any |= n > 0;
            if self.slots.lent() > 0 {
                let mut back = [0u64; 32];
                let m = self.qpairs[q].poll_released(&mut back);
                for &t in &back[..m] {
                    self.slots.give_back(t as u16);
                }
                any |= m > 0;
            }
        }
        if !self.retry.is_empty() && !self.is_closing() {
            for _ in 0..self.retry.len() {
                let Some(i) = self.retry.pop_front() else {
                    break;
                };
                super::io::submit_more(self, i);
            }
        }
        any
    }

    fn outstanding(&self) -> u32 {
        self.qpairs.iter().map(|q| q.outstanding()).sum()
    }

    // ---- liveness -----------------------------------------------------------------------

    fn check_liveness(&mut self, now: Instant) {
        if self.is_closing() {
            return;
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            self.close(now, "target shutting down");
            return;
        }
        if matches!(self.phase, Phase::AwaitIcReq | Phase::AwaitConnect)
            && now.saturating_duration_since(self.accepted) > self.shared.cfg.handshake_timeout
        {
            self.close(
                now,
                "ICReq and Connect not done within the handshake timeout",
            );
            return;
        }
        if let Some(ctrl) = &self.queue.ctrl {
            let gone = ctrl.is_gone();
            let disabled = self.phase == Phase::Io && !ctrl.enabled.load(Ordering::Relaxed);
            if gone || disabled {
                self.close(now, "controller torn down");
                return;
            }
        }
        if let Some(deadline) = self.admin.as_ref().and_then(|a| a.keep_alive_deadline) {
            if now > deadline {
                tracing::warn!(peer = %self.peer, "keep-alive timeout expired; tearing down the controller");
                if let Some(ctrl) = &self.queue.ctrl {
                    self.shared.remove_controller(ctrl);
                }
                self.close(now, "keep-alive timeout");
            }
        }
    }

    /// Releases what this queue holds in its controller (once).
    fn tear_down(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(ctrl) = self.queue.ctrl.take() {
            if self.phase_was_admin() {
                self.shared.remove_controller(&ctrl);
            } else {
                ctrl.release_queue(self.queue.qid);
            }
        }
    }

    fn phase_was_admin(&self) -> bool {
        self.admin.is_some()
    }

    fn shut_socket(&mut self) {
        if !self.sock_shut {
            let _ = self.sock.shutdown(Shutdown::Both);
            self.sock_shut = true;
        }
    }
}

impl Connection {
    /// One poll at time `now`: what [`Poller::poll`] does, callable without a reactor.
    pub(crate) fn step(&mut self, now: Instant) -> PollStatus {
        self.check_liveness(now);
        let mut busy = false;
        if let Phase::Closing { since } = self.phase {
            busy |= self.reap();
            let flushed = self.tx_start == self.tx_end || self.sock_shut;
            if !flushed && now.duration_since(since) < CLOSE_GRACE {
                busy |= self.send(now);
            } else {
                self.tear_down();
                self.shut_socket();
            }
            if self.sock_shut && self.outstanding() == 0 {
                return PollStatus::Done;
            }
            return if busy {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            };
        }
        busy |= self.recv(now);
        busy |= self.process_rx(now);
        busy |= super::admin::deliver_async_event(self);
        busy |= self.reap();
        busy |= self.flush_pending();
        busy |= self.send(now);
        if self.close_after_flush && self.pending.is_empty() && self.tx_start == self.tx_end {
            self.close(now, "disconnected by the host");
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Closes at once and waits (bounded) for the back end: what [`Poller::stop`] does.
    pub(crate) fn finish(&mut self) {
        self.tear_down();
        self.shut_socket();
        // Buffers must outlive every command the back end still holds.
        let until = crate::drain::deadline(CLOSE_DRAIN);
        crate::drain::wait(until, || {
            if self.outstanding() == 0 {
                return Drain::Done;
            }
            let mut reaped = 0;
            for q in 0..self.qpairs.len() {
                reaped += self.qpairs[q].poll(&mut self.cpl);
            }
            if reaped > 0 {
                Drain::Progress
            } else {
                Drain::Idle
            }
        });
        if self.outstanding() > 0 {
            tracing::error!(peer = %self.peer, "back end still holds commands at close; leaking their buffers");
            std::mem::forget(std::mem::replace(&mut self.slots, SlotTable::new(1, 4096)));
        }
    }
}

impl Poller for Connection {
    fn poll(&mut self, ctx: &mut ReactorContext) -> PollStatus {
        self.step(ctx.now())
    }

    fn stop(&mut self, _ctx: &mut ReactorContext) {
        self.finish();
    }
}
