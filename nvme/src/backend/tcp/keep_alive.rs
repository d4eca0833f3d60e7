//! The admin queue after bring-up: a small thread owns its socket, sends Keep Alive every
//! KATO/2 (Base §3.9 "Keep Alive") and, when the controller is dropped, the shutdown
//! notification. The admin path is not the hot path; I/O queues only read [`Health`].

use std::sync::atomic::{AtomicBool, Ordering};
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

fn run(mut conn: ControlConn, kato: Duration, cc: u32, stop: &mpsc::Receiver<()>, health: &Health) {
    let interval = kato / 2;
    loop {
        let woke = if kato.is_zero() {
            stop.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            stop.recv_timeout(interval)
        };
        if woke != Err(RecvTimeoutError::Timeout) {
            if !health.is_lost() {
                super::controller::shutdown(&mut conn, cc);
            }
            return;
        }
        let sqe = SubmissionQueueEntry {
            opcode: AdminOpcode::KeepAlive as u8,
            ..Default::default()
        };
        let timeout = kato.max(Duration::from_secs(1));
        match conn.command("Keep Alive", sqe, &[], 0, timeout) {
            Ok((c, _)) if c.status().is_success() => {}
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
