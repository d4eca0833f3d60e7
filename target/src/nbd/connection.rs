//! One client connection: a poller that owns the non-blocking socket and runs the
//! handshake, then the transmission phase, on the reactor it was handed to.
//!
//! Each poll: one `recv` into the receive queue, parse what is there, reap completions,
//! gather replies into the send queue, one `send`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use nvmirror_poller::{PollStatus, Poller, ReactorContext};

use super::buffer::ByteQueue;
use super::export::ExportTable;
use super::negotiation::{Negotiation, Step};
use super::proto::greeting;
use super::server::{LiveConnection, ServerState};
use super::transmission::{Transmission, CHUNK};

/// Receive queue size: several maximum-size requests' headers and payload chunks per recv.
const RX_CAPACITY: usize = 2 * CHUNK;
/// Send queue size.
const TX_CAPACITY: usize = 2 * CHUNK;

#[derive(Debug)]
enum Phase {
    Negotiating(Negotiation),
    Transmitting(Box<Transmission>),
    /// Send what is queued, then close (after `NBD_OPT_ABORT`).
    Closing,
}

/// A client connection, registered as a poller on one reactor.
#[derive(Debug)]
pub(crate) struct Connection {
    sock: TcpStream,
    peer: SocketAddr,
    exports: ExportTable,
    server: Arc<ServerState>,
    rx: ByteQueue,
    tx: ByteQueue,
    /// Handshake replies before they enter `tx`.
    scratch: Vec<u8>,
    phase: Phase,
    /// No more bytes are read: the peer closed, sent `NBD_CMD_DISC`, broke the protocol, or
    /// the server is shutting down.
    read_closed: bool,
    /// Requests already received are no longer parsed.
    parse_closed: bool,
    /// The socket cannot be written: replies are dropped.
    write_failed: bool,
    /// When the socket was accepted: negotiation must end by `accepted + handshake_timeout`.
    accepted: Instant,
    /// Dropped last, after the transmission has waited for its commands.
    _live: LiveConnection,
}

impl Connection {
    pub(crate) fn new(
        sock: TcpStream,
        peer: SocketAddr,
        exports: ExportTable,
        server: Arc<ServerState>,
        live: LiveConnection,
    ) -> Self {
        let mut tx = ByteQueue::new(TX_CAPACITY);
        tx.put(&greeting());
        Self {
            sock,
            peer,
            exports: exports.clone(),
            server,
            rx: ByteQueue::new(RX_CAPACITY),
            tx,
            scratch: Vec::new(),
            phase: Phase::Negotiating(Negotiation::new(exports)),
            read_closed: false,
            parse_closed: false,
            write_failed: false,
            accepted: Instant::now(),
            _live: live,
        }
    }

    /// One `recv`. Returns whether bytes arrived.
    fn receive(&mut self) -> bool {
        if self.read_closed {
            return false;
        }
        let spare = self.rx.spare();
        if spare.is_empty() {
            return false;
        }
        match self.sock.read(spare) {
            Ok(0) => {
                tracing::debug!(peer = %self.peer, "NBD client closed its side");
                self.read_closed = true;
                true
            }
            Ok(n) => {
                self.rx.commit(n);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => false,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "NBD recv failed");
                self.read_closed = true;
                self.write_failed = true;
                true
            }
        }
    }

    /// One `send` of whatever is queued. Returns whether bytes left.
    fn send(&mut self) -> bool {
        if self.tx.is_empty() || self.write_failed {
            return false;
        }
        match self.sock.write(self.tx.data()) {
            Ok(n) => {
                self.tx.consume(n);
                n > 0
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => false,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "NBD send failed");
                self.write_failed = true;
                self.read_closed = true;
                true
            }
        }
    }

    /// Runs the handshake over the received bytes. Returns `false` if the connection must
    /// close at once.
    fn negotiate(&mut self) -> bool {
        let Phase::Negotiating(neg) = &mut self.phase else {
            return true;
        };
        let mut next = None;
        loop {
            // A peer that sends options without reading the replies is not read further
            // until it does: the replies queued stay below half the send buffer (plus one
            // option's worth), whatever it sends.
            if self.tx.len() > TX_CAPACITY / 2 {
                break;
            }
            self.scratch.clear();
            let step = neg.advance(self.rx.data(), &mut self.scratch);
            self.tx.put_growing(&self.scratch);
            match step {
                Step::NeedMore => break,
                Step::Consumed(n) => self.rx.consume(n),
                Step::Abort { consumed } => {
                    self.rx.consume(consumed);
                    self.read_closed = true;
                    next = Some(Phase::Closing);
                    break;
                }
                Step::Reject(reason) => {
                    tracing::debug!(peer = %self.peer, reason, "NBD handshake refused");
                    return false;
                }
                Step::Transmission { consumed, export } => {
                    self.rx.consume(consumed);
                    let Some(export) = self.exports.get(export) else {
                        return false;
                    };
                    match Transmission::new(&export.device, export.max_payload) {
                        Ok(t) => {
                            tracing::debug!(peer = %self.peer, export = %export.name, "NBD transmission starts");
                            next = Some(Phase::Transmitting(Box::new(t)));
                        }
                        Err(e) => {
                            tracing::warn!(peer = %self.peer, export = %export.name, error = %e, "NBD connection refused: export unavailable");
                            return false;
                        }
                    }
                    break;
                }
            }
        }
        if let Some(p) = next {
            self.phase = p;
        }
        true
    }

    /// Closes the socket both ways (the peer sees the connection end at once).
    fn hard_close(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.read_closed = true;
        self.parse_closed = true;
        self.write_failed = true;
    }
}

impl Connection {
    /// One poll: what [`Poller::poll`] does, callable without a reactor.
    pub(crate) fn step(&mut self) -> PollStatus {
        let mut busy = false;
        if self.server.stopping() && !self.parse_closed {
            // Stop taking requests; finish those in flight.
            self.read_closed = true;
            self.parse_closed = true;
            if !matches!(self.phase, Phase::Transmitting(_)) {
                self.hard_close();
            }
        }
        if matches!(self.phase, Phase::Negotiating(_))
            && self.accepted.elapsed() > self.server.handshake_timeout
        {
            tracing::debug!(peer = %self.peer, "NBD handshake not done within the handshake timeout; closing");
            self.hard_close();
            return PollStatus::Done;
        }
        busy |= self.receive();
        if matches!(self.phase, Phase::Negotiating(_)) && !self.parse_closed && !self.negotiate() {
            self.hard_close();
            return PollStatus::Done;
        }
        let mut malformed = false;
        // Whether the received bytes can still produce a request.
        let mut input_done = true;
        if let Phase::Transmitting(t) = &mut self.phase {
            let in_flight_before = t.in_flight();
            let mut parsed = 0;
            if !self.parse_closed && !self.rx.is_empty() {
                match t.consume(self.rx.data()) {
                    Ok(n) => {
                        parsed = n;
                        self.rx.consume(n);
                    }
                    Err(reason) => {
                        tracing::debug!(peer = %self.peer, reason, "NBD request malformed; closing");
                        malformed = true;
                    }
                }
                if t.disconnected() {
                    self.read_closed = true;
                    self.parse_closed = true;
                }
            }
            busy |= parsed > 0;
            // A request stalled for lack of slots may still go once slots free up.
            input_done =
                self.parse_closed || self.rx.is_empty() || (parsed == 0 && in_flight_before == 0);
            if self.read_closed && input_done {
                // No more payload can come for a write still being received.
                t.abandon_payload();
            }
            busy |= t.reap() > 0;
            if malformed || self.write_failed {
                t.drop_replies();
            } else {
                busy |= t.gather_replies(&mut self.tx);
            }
        }
        if malformed {
            self.hard_close();
            if let Phase::Transmitting(t) = &mut self.phase {
                t.abandon_payload();
            }
        }
        busy |= self.send();
        let in_flight = match &self.phase {
            Phase::Transmitting(t) => t.in_flight(),
            _ => 0,
        };
        if self.read_closed
            && (input_done || malformed)
            && in_flight == 0
            && (self.tx.is_empty() || self.write_failed)
        {
            let _ = self.sock.shutdown(Shutdown::Both);
            tracing::debug!(peer = %self.peer, "NBD connection closed");
            return PollStatus::Done;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Sends what the socket takes at once and closes: what [`Poller::stop`] does.
    pub(crate) fn finish(&mut self) {
        // The reactor is going away: send what is queued if the socket takes it at once;
        // dropping the transmission waits for commands still on the device.
        let _ = self.send();
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Poller for Connection {
    fn poll(&mut self, _ctx: &mut ReactorContext) -> PollStatus {
        self.step()
    }

    fn stop(&mut self, _ctx: &mut ReactorContext) {
        self.finish();
    }
}
