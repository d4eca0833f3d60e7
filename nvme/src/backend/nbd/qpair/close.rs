//! Closing an [`NbdQueuePair`] that still has requests with the server (`docs/backends.md`,
//! "Closing a queue pair").
//!
//! NBD has no abort, but `NBD_CMD_DISC` makes the server handle every outstanding request
//! before it closes the connection. So [`close`] completes the requests that never began to
//! go out (they cannot reach the server), sends the rest and then DISC, and hands the queue
//! pair to an `nbd-reap` thread that keeps reading replies — a read's data still goes into
//! its caller's buffer — until every request is answered or the server ends the connection
//! after the DISC. Only then is the [`Fence`] done and the queue pair dropped.
//!
//! When the connection dies any other way (a reset, the server gone before the DISC was
//! out), or the server answers nothing for the I/O timeout, the server may still be working
//! on what it received and nothing on the wire says when it is done: the fence is then done
//! only after a further I/O timeout (the [`DEAD_LINK_FENCE`] when the timeout is off), with
//! a warning.
//!
//! [`close`]: crate::QueuePair::close

use std::io::{self, Write};
use std::time::{Duration, Instant};

use super::{disc_request, NbdQueuePair};
use crate::fence::{Fence, FenceSignal};
use crate::spec::nbd::REQUEST_LEN;
use crate::spec::Status;

/// How often the reaper drives a closed queue pair.
const REAP_TICK: Duration = Duration::from_millis(1);
/// The close bound, and the wait after a dead link, when the URI's I/O timeout is off.
const DEAD_LINK_FENCE: Duration = super::super::DEFAULT_TIMEOUT;

impl NbdQueuePair {
    /// See [`QueuePair::close`](crate::QueuePair::close) and the module documentation.
    #[cold]
    pub(super) fn close_fenced(mut self) -> Fence {
        self.closing = true;
        // Requests not begun on the wire never reach the server; a partly sent one must be
        // finished (the stream would break), and goes out with the rest.
        let keep = usize::from(self.tx_off > 0);
        while self.txq.len() > keep {
            let i = self.txq.pop_back().expect("len > keep");
            self.awaiting -= 1;
            self.complete(i, Status::ABORT_REQUESTED);
        }
        if self.dead.is_some() || self.all_answered() {
            return Fence::done();
        }
        let (fence, signal) = Fence::pending();
        let label = self.link.peer.label.clone();
        let requests = self.awaiting;
        let reaper = std::thread::Builder::new()
            .name("nbd-reap".into())
            .spawn(move || self.reap(signal));
        match reaper {
            Ok(_) => tracing::info!(
                target = %label, requests,
                "NBD queue pair closed with requests at the server; NBD_CMD_DISC, reaping them"
            ),
            Err(e) => tracing::error!(
                target = %label,
                "NBD queue pair closed with {requests} requests at the server and no reaper \
                 thread ({e}); the fence never ends"
            ),
        }
        fence
    }

    /// Every request is answered (and a read's data in): nothing of ours is at the server.
    fn all_answered(&self) -> bool {
        self.awaiting == 0 && self.txq.is_empty() && !self.rx.mid_data()
    }

    /// The connection ended the way a DISC ends it: the server closed it once the whole
    /// DISC request was out, having handled every request before.
    pub(super) fn closed_cleanly(&self) -> bool {
        self.closing && self.server_closed && self.disc_off == REQUEST_LEN
    }

    /// Writes what is left of the DISC request once every request is out.
    fn send_disc(&mut self) {
        if !self.txq.is_empty() || self.disc_off == REQUEST_LEN {
            return;
        }
        let disc = disc_request();
        match self.sock.write(&disc[self.disc_off..]) {
            Ok(n) => self.disc_off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => self.die(format!("sending NBD_CMD_DISC failed: {e}")),
        }
    }

    /// Reaps completions nobody will read.
    fn discard_done(&mut self) {
        while let Some(i) = self.done.pop_front() {
            let slot = &mut self.slots[i as usize];
            slot.state = super::SlotState::Free;
            slot.buf = crate::dma::IoBuf::EMPTY;
            self.free.push(i);
            self.outstanding -= 1;
        }
    }

    /// The reaper thread: drives the connection until every request is answered or the
    /// server closed it after the DISC — or, on a dead link, until the conservative wait is
    /// over — then signals the fence and drops the queue pair. Nothing touches a buffer
    /// after the signal.
    fn reap(mut self, signal: FenceSignal) {
        let bound = match self.timeout {
            t if t.is_zero() => DEAD_LINK_FENCE,
            t => t,
        };
        let started = Instant::now();
        let mut fence_at: Option<Instant> = None;
        loop {
            if self.dead.is_none() {
                self.send();
                self.send_disc();
                if self.dead.is_none() {
                    self.receive();
                }
                if self.dead.is_none() && started.elapsed() >= bound {
                    self.die(format!(
                        "closed queue pair: {} requests unanswered after {bound:?}",
                        self.awaiting
                    ));
                }
            }
            self.discard_done();
            if self.closed_cleanly() || (self.dead.is_none() && self.all_answered()) {
                tracing::debug!(target = %self.link.peer.label, "closed NBD queue pair: every request is over");
                break;
            }
            if let Some(why) = self.dead.as_deref().filter(|_| !self.closed_cleanly()) {
                let at = *fence_at.get_or_insert_with(|| {
                    tracing::warn!(
                        target = %self.link.peer.label,
                        "closed NBD queue pair lost its connection with requests at the \
                         server ({why}); fencing them for {bound:?} more"
                    );
                    Instant::now() + bound
                });
                if Instant::now() >= at {
                    break;
                }
            }
            std::thread::sleep(REAP_TICK);
        }
        signal.signal();
        drop(self);
    }
}
