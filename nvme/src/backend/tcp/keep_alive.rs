//! The admin queue after bring-up: a small thread owns its socket, sends Keep Alive every
//! KATO/2 (Base §3.9 "Keep Alive"), the Abort commands I/O queues ask for (Base §5.1 "Abort
//! command") and, when the controller is dropped, the shutdown notification. The admin path
//! is not the hot path; I/O queues only read [`Health`] and, to cancel a command, post a
//! request. The first Keep Alive goes out at once, so the round trip is known from the
//! start; an association lost elsewhere stops its keep-alive within 50 ms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::control::ControlConn;
use crate::spec::admin::AdminOpcode;
use crate::spec::SubmissionQueueEntry;
use crate::{Error, Result};

/// Whether the controller is still there, as far as the admin queue knows.
#[derive(Debug, Default)]
pub(super) struct Health {
    lost: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Round trip of the last Keep Alive in nanoseconds (0: none answered yet).
    rtt_ns: AtomicU64,
}

impl Health {
    /// Marks the controller lost; the first reason is kept.
    pub fn lose(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.lost.store(true, Ordering::Release);
    }

    /// One relaxed load: cheap enough for every poll.
    #[inline]
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Round trip of the last Keep Alive.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What an I/O queue asks of the admin queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    /// Abort command `cid` of submission queue `sqid`.
    Abort { sqid: u16, cid: u16 },
}

/// The thread that owns the admin connection. Dropping this stops it (after the shutdown
/// notification) and joins it.
#[derive(Debug)]
pub(super) struct AdminQueue {
    /// Requests to the thread; dropping it stops the thread.
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminQueue {
    /// Starts the thread; `kato` zero means no keep-alive is sent. `cc` is the value that
    /// enabled the controller.
    pub fn start(conn: ControlConn, kato: Duration, cc: u32, health: Arc<Health>) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let label = conn.peer.label.clone();
        let thread = std::thread::Builder::new()
            .name("nvme-tcp-admin".into())
            .spawn(move || run(conn, kato, cc, &rx, &health))
            .map_err(|e| Error::NvmeTcp {
                target: label,
                step: "start the keep-alive thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks the controller to abort command `cid` of I/O queue `sqid`, without waiting: the
    /// command still completes on its queue (aborted, or with its own result when it was
    /// past stopping). False when the admin queue is gone.
    pub fn abort(&self, sqid: u16, cid: u16) -> bool {
        self.requests
            .as_ref()
            .is_some_and(|tx| tx.send(Request::Abort { sqid, cid }).is_ok())
    }
}

impl Drop for AdminQueue {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the thread looks whether the association was lost elsewhere (an I/O queue
/// died): it then stops sending Keep Alive and closes the admin connection at once, so the
/// remote's keep-alive timer runs out and the fence (`reconnect`) holds.
const LOST_CHECK: Duration = Duration::from_millis(50);

fn run(
    mut conn: ControlConn,
    kato: Duration,
    cc: u32,
    requests: &mpsc::Receiver<Request>,
    health: &Health,
) {
    let interval = kato / 2;
    // The first Keep Alive goes out at once (it measures the round trip).
    let mut next = std::time::Instant::now();
    loop {
        let wait = if kato.is_zero() {
            LOST_CHECK
        } else {
            next.saturating_duration_since(std::time::Instant::now())
                .min(LOST_CHECK)
        };
        match requests.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Request::Abort { sqid, cid }) => {
                if !health.is_lost() && !abort(&mut conn, sqid, cid, health) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                if !health.is_lost() {
                    super::controller::shutdown(&mut conn, cc);
                }
                return;
            }
        }
        if health.is_lost() {
            return;
        }
        if kato.is_zero() || std::time::Instant::now() < next {
            continue;
        }
        next = std::time::Instant::now() + interval;
        let sqe = SubmissionQueueEntry {
            opcode: AdminOpcode::KeepAlive as u8,
            ..Default::default()
        };
        let timeout = kato.max(Duration::from_secs(1));
        let sent = std::time::Instant::now();
        match conn.command("Keep Alive", sqe, &[], 0, timeout) {
            Ok((c, _)) if c.status().is_success() => {
                let ns = sent.elapsed().as_nanos().clamp(1, u128::from(u64::MAX)) as u64;
                health.rtt_ns.store(ns, Ordering::Relaxed);
            }
            Ok((c, _)) => {
                let why = format!("Keep Alive failed: NVMe status {}", c.status());
                tracing::warn!(target = %conn.peer.label, "{why}");
                health.lose(why);
                return;
            }
            Err(e) => {
                tracing::warn!("{e}");
                health.lose(e.to_string());
                return;
            }
        }
    }
}

/// How long an Abort may take before the association is given up (the controller must answer
/// admin commands promptly; one that does not is as good as lost).
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one Abort (CDW10: SQID in bits 15:0, CID in bits 31:16). Completion DW0 bit 0 is 0
/// when the command was aborted, 1 when it was not (it completes with its own result). False
/// when the admin connection failed and the controller is marked lost.
fn abort(conn: &mut ControlConn, sqid: u16, cid: u16, health: &Health) -> bool {
    let sqe = SubmissionQueueEntry {
        opcode: AdminOpcode::Abort as u8,
        cdw10: u32::from(sqid) | (u32::from(cid) << 16),
        ..Default::default()
    };
    match conn.command("Abort", sqe, &[], 0, ABORT_TIMEOUT) {
        Ok((c, _)) => {
            tracing::debug!(
                target = %conn.peer.label, sqid, cid, status = %c.status(),
                aborted = c.status().is_success() && c.dw0 & 1 == 0,
                "Abort of an abandoned command"
            );
            true
        }
        Err(e) => {
            tracing::warn!("{e}");
            health.lose(e.to_string());
            false
        }
    }
}
