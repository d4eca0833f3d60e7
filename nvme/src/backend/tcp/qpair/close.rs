//! Closing a [`TcpQueuePair`] that still has commands on the wire (`docs/backends.md`,
//! "Reconnect and fence").
//!
//! Dropping the socket does not stop what the controller already received: a write it holds
//! may still land after the caller has counted the command as over. So [`close`] sends an
//! NVMe Abort for every command the controller has, completes the ones that never left this
//! host (held for a reconnect, queued behind a full send buffer), and hands the queue pair to
//! an `nvme-tcp-reap` thread that keeps driving it — answering R2Ts, taking C2HData into the
//! callers' buffers, reaping responses — until the controller has answered every command.
//! Only then is the [`Fence`] done and the queue pair dropped.
//!
//! When the link dies first, or the controller leaves a command unanswered for longer than
//! the close bound (KATO), the commands are fenced the way a lost association is: the
//! association is marked lost (keep-alive stops, so the remote tears it down when its timer
//! runs out), and the fence is done KATO + [`FENCE_QUIESCE`] after the loss was noticed.
//!
//! [`close`]: crate::QueuePair::close

use std::time::{Duration, Instant};

use super::TcpQueuePair;
use crate::backend::tcp::reconnect::FENCE_QUIESCE;
use crate::backend::tcp::slot::SlotState;
use crate::backend::tcp::DEFAULT_KATO;
use crate::fence::{Fence, FenceSignal};
use crate::spec::Status;

/// How often the reaper drives a closed queue pair.
const REAP_TICK: Duration = Duration::from_millis(1);

impl TcpQueuePair {
    /// See [`QueuePair::close`](crate::QueuePair::close) and the module documentation.
    #[cold]
    pub(super) fn close_fenced(mut self) -> Fence {
        self.closing = true;
        while let Some(cmd) = self.held.pop_front() {
            self.complete_held(cmd.tag, Status::ABORT_REQUESTED);
        }
        while let Some(i) = self.unsent.pop_front() {
            self.complete(i, Status::ABORT_REQUESTED);
        }
        if self.dead.is_none() && self.link.health.is_lost() {
            self.lose_link();
        }
        if self.dead.is_none() {
            self.abort_in_flight();
        }
        if self.in_flight == 0 {
            // Nothing on the wire. Commands that were when the queue died before the close
            // completed with a path error then; the device's link-loss fence covers them.
            return Fence::done();
        }
        let (fence, signal) = Fence::pending();
        let commands = self.in_flight;
        let qid = self.p.qid;
        let reaper = std::thread::Builder::new()
            .name("nvme-tcp-reap".into())
            .spawn(move || self.reap(signal));
        match reaper {
            Ok(_) => {
                tracing::info!(
                    qid,
                    commands,
                    "NVMe/TCP queue pair closed with commands on the wire; reaping them"
                );
            }
            Err(e) => {
                // The queue pair went with the closure: its commands cannot be proven over,
                // so the fence (whose signal went too) stays pending for good.
                tracing::error!(
                    qid,
                    "NVMe/TCP queue pair closed with {commands} commands on the wire and no \
                     reaper thread ({e}); the fence never ends"
                );
            }
        }
        fence
    }

    /// Sends an Abort for every command the controller has that was not cancelled already;
    /// none of them sends a further piece.
    #[cold]
    fn abort_in_flight(&mut self) {
        for i in 0..self.table.slots.len() {
            let slot = &mut self.table.slots[i];
            if !matches!(slot.state, SlotState::Sent | SlotState::H2C) || slot.cancelled {
                continue;
            }
            slot.cancelled = true;
            if !self.link.admin.abort(self.p.qid, i as u16) {
                tracing::warn!(
                    qid = self.p.qid,
                    cid = i,
                    "no Abort sent for a closed queue pair's command: the admin queue is gone"
                );
            }
        }
    }

    /// The queue died (while closing) with commands on the wire and the link-loss fence has
    /// not ended.
    fn link_fence_pending(&self) -> bool {
        self.fenced_until().is_some_and(|t| Instant::now() < t)
    }

    /// When commands that were on the wire at the queue's death can no longer be executed
    /// by the remote: KATO + [`FENCE_QUIESCE`] after the death was noticed. `None` while the
    /// queue is alive or when it died with nothing on the wire.
    fn fenced_until(&self) -> Option<Instant> {
        let at = self.dead_at?;
        (self.lost_in_flight > 0).then(|| at + self.link.opts.kato + FENCE_QUIESCE)
    }

    /// How long the controller may leave a closed queue pair's commands unanswered on a
    /// healthy link before the association is given up: KATO (the default KATO when
    /// keep-alive is off).
    fn close_bound(&self) -> Duration {
        match self.link.opts.kato {
            k if k.is_zero() => DEFAULT_KATO,
            k => k,
        }
    }

    /// Reaps completions nobody will read.
    fn discard_done(&mut self) {
        while let Some(i) = self.done.pop_front() {
            self.table.release(i);
            self.outstanding -= 1;
        }
    }

    /// The reaper thread: drives the queue until every command is answered or fenced, then
    /// signals the fence and drops the queue pair. Nothing touches a buffer after the signal.
    fn reap(mut self, signal: FenceSignal) {
        let started = Instant::now();
        let bound = self.close_bound();
        loop {
            if self.dead.is_none() {
                if self.link.health.is_lost() {
                    self.lose_link();
                } else {
                    self.progress();
                }
            }
            self.discard_done();
            if self.dead.is_none() {
                if self.in_flight == 0 {
                    tracing::debug!(
                        qid = self.p.qid,
                        "closed NVMe/TCP queue pair: every command answered"
                    );
                    break;
                }
                if started.elapsed() >= bound {
                    tracing::warn!(
                        qid = self.p.qid,
                        target = %self.link.peer.label,
                        commands = self.in_flight,
                        "closed NVMe/TCP queue pair: commands unanswered after {bound:?}; \
                         giving the association up so the remote's keep-alive runs out"
                    );
                    self.die(format!(
                        "{} commands of a closed queue pair unanswered after {bound:?}",
                        self.in_flight
                    ));
                }
            } else if !self.link_fence_pending() {
                tracing::info!(
                    qid = self.p.qid,
                    commands = self.lost_in_flight,
                    "closed NVMe/TCP queue pair: link-loss fence over"
                );
                break;
            }
            std::thread::sleep(REAP_TICK);
        }
        signal.signal();
        drop(self);
    }
}
