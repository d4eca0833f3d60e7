//! The admin queue after bring-up: a small thread owns its socket, sends Keep Alive every
//! KATO/2 (Base §3.9 "Keep Alive") and, when the controller is dropped, the shutdown
//! notification. The admin path is not the hot path; I/O queues only read [`Health`]. The
//! first Keep Alive goes out at once, so the round trip is known from the start; an
//! association lost elsewhere stops its keep-alive within 50 ms.

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

/// The thread that owns the admin connection. Dropping this stops it (after the shutdown
/// notification) and joins it.
#[derive(Debug)]
pub(super) struct AdminQueue {
    stop: Option<mpsc::Sender<()>>,
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
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for AdminQueue {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the thread looks whether the association was lost elsewhere (an I/O queue
/// died): it then stops sending Keep Alive and closes the admin connection at once, so the
/// remote's keep-alive timer runs out and the fence (`reconnect`) holds.
const LOST_CHECK: Duration = Duration::from_millis(50);

fn run(mut conn: ControlConn, kato: Duration, cc: u32, stop: &mpsc::Receiver<()>, health: &Health) {
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
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => {
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
