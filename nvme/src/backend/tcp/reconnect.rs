//! The controller's life cycle on the host side, after Linux's nvme-tcp host: one
//! association (admin queue + I/O queues, a [`Link`]) at a time; when it is lost the
//! device reconnects in the background, every `reconnect_delay` (doubling after failures,
//! up to 8×) until `ctrl_loss_tmo` has passed, and the queue pairs opened on the old
//! association get new I/O queues on the new one without their owner doing anything.
//!
//! Threads: one `nvme-tcp-ctrl` thread per device runs [`Supervisor::tick`]: it notices a
//! lost association (keep-alive failure, or any I/O queue dying, which marks the whole
//! association lost), reconnects, and connects replacement I/O queues for the queue pairs
//! that asked for one ([`Revival`]). Queue pairs never block: a dead one looks at its
//! revival's `ready` flag (one atomic load, only while dead) and takes the new connection.
//!
//! **Fence.** Commands that were on the wire when a connection died may still be executed by
//! the remote: nvmet, SPDK and nvmirror finish what they received. Until the remote has
//! given up on the old association — its keep-alive timer (our KATO) expires, then its
//! in-flight commands drain — a write of ours could still land. The device therefore
//! reports a fence of KATO + [`FENCE_QUIESCE`] from the moment the loss was noticed, with the
//! count of commands that were on the wire; the volume does not resync the leg before the
//! fence ends (`docs/backends.md`, "Reconnect and fence").

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::control::ControlConn;
use super::{ControllerInfo, Link, NvmeTcpOptions};
use crate::link::LinkStatus;
use crate::spec::Geometry;
use crate::{Error, Result};

/// What the remote may take, after its keep-alive timer fired, to finish the commands it had
/// already received (added to KATO for the fence).
pub const FENCE_QUIESCE: Duration = Duration::from_secs(1);
/// How often the supervisor looks at the association.
const TICK: Duration = Duration::from_millis(20);
/// Reconnect backoff: `reconnect_delay` × 2^failures, at most this factor.
const MAX_BACKOFF: u32 = 8;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A queue pair's claim on a replacement I/O queue. Shared by the queue pair and the
/// supervisor; the queue pair sets `wanted` when its connection dies, the supervisor connects
/// a new I/O queue on the live association, parks it in `conn` and sets `ready`.
#[derive(Debug)]
pub(super) struct Revival {
    /// Wire queue entries the queue pair was opened with.
    pub size: u32,
    pub wanted: AtomicBool,
    pub ready: AtomicBool,
    /// Commands that were on the wire when this queue pair's connection died (cleared when
    /// the fence ends).
    pub fenced: AtomicU32,
    pub conn: Mutex<Option<(Arc<Link>, ControlConn, u16)>>,
}

impl Revival {
    pub fn new(size: u32) -> Self {
        Self {
            size,
            wanted: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            fenced: AtomicU32::new(0),
            conn: Mutex::new(None),
        }
    }

    /// The replacement connection, if the supervisor has one ready.
    pub fn take(&self) -> Option<(Arc<Link>, ControlConn, u16)> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        let got = lock(&self.conn).take();
        self.ready.store(false, Ordering::Release);
        got
    }
}

/// A replacement connection nobody took gives its queue ID back.
impl Drop for Revival {
    fn drop(&mut self) {
        if let Some((link, _conn, qid)) = lock(&self.conn).take() {
            link.release_qid(qid);
        }
    }
}

/// The association's history, changed by the supervisor thread only (and read by status).
#[derive(Debug)]
struct Life {
    link: Option<Arc<Link>>,
    generation: u64,
    last_error: Option<String>,
    attempts: u64,
    lost_at: Option<Instant>,
    fence_until: Option<Instant>,
    failures: u32,
    next_attempt: Instant,
    given_up: bool,
    /// Round trip of the last association's keep-alive, kept while disconnected.
    rtt: Option<Duration>,
    /// What the controller reported at the last bring-up.
    info: ControllerInfo,
}

/// What the device, its queue pairs and the supervisor thread share.
#[derive(Debug)]
pub(super) struct Supervisor {
    host_port: String,
    opts: NvmeTcpOptions,
    hostnqn: String,
    geo: Geometry,
    life: Mutex<Life>,
    revivals: Mutex<Vec<Weak<Revival>>>,
}

impl Supervisor {
    pub fn new(host_port: &str, opts: &NvmeTcpOptions, link: Arc<Link>) -> Self {
        Self {
            host_port: host_port.to_string(),
            opts: opts.clone(),
            hostnqn: link.hostnqn.clone(),
            geo: link.geo,
            life: Mutex::new(Life {
                info: link.info.clone(),
                link: Some(link),
                generation: 1,
                last_error: None,
                attempts: 0,
                lost_at: None,
                fence_until: None,
                failures: 0,
                next_attempt: Instant::now(),
                given_up: false,
                rtt: None,
            }),
            revivals: Mutex::new(Vec::new()),
        }
    }

    /// A supervisor for a controller that could not be reached: no association yet, the
    /// namespace expected to have geometry `geo`; reconnecting starts at once.
    pub fn offline(host_port: &str, opts: &NvmeTcpOptions, geo: Geometry, reason: String) -> Self {
        let now = Instant::now();
        Self {
            host_port: host_port.to_string(),
            opts: opts.clone(),
            hostnqn: opts
                .hostnqn
                .clone()
                .unwrap_or_else(|| super::host_identity().0.clone()),
            geo,
            life: Mutex::new(Life {
                link: None,
                generation: 0,
                last_error: Some(reason),
                attempts: 0,
                lost_at: Some(now),
                fence_until: None,
                failures: 0,
                next_attempt: now + opts.reconnect_delay,
                given_up: false,
                rtt: None,
                info: ControllerInfo {
                    cntlid: 0,
                    version: 0,
                    max_queue_entries: 0,
                    maxcmd: 0,
                    in_capsule: 0,
                    max_transfer: 0,
                    io_queues: 0,
                    model: String::new(),
                    serial: String::new(),
                    volatile_cache: true,
                    cc: 0,
                },
            }),
            revivals: Mutex::new(Vec::new()),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The namespace the device was opened for.
    pub fn nsid(&self) -> u32 {
        self.opts.nsid
    }

    pub fn hostnqn(&self) -> String {
        self.hostnqn.clone()
    }

    pub fn last_info(&self) -> ControllerInfo {
        lock(&self.life).info.clone()
    }

    /// The live association, if there is one.
    pub fn link(&self) -> Option<Arc<Link>> {
        lock(&self.life)
            .link
            .as_ref()
            .filter(|l| !l.health.is_lost())
            .cloned()
    }

    /// The live association, or the error saying why there is none.
    pub fn live(&self, step: &str) -> Result<Arc<Link>> {
        let life = lock(&self.life);
        match life.link.as_ref() {
            Some(l) if !l.health.is_lost() => Ok(Arc::clone(l)),
            Some(l) => Err(l.peer.err(
                step,
                format!(
                    "the controller is lost ({}); reconnecting",
                    l.health.reason().unwrap_or_default()
                ),
            )),
            None => Err(Error::NvmeTcp {
                target: self.host_port.clone(),
                step: step.into(),
                reason: format!(
                    "the controller is not connected{} ({})",
                    if life.given_up {
                        "; reconnecting gave up after ctrl_loss_tmo"
                    } else {
                        "; reconnecting"
                    },
                    life.last_error.as_deref().unwrap_or("no reason recorded")
                ),
            }),
        }
    }

    /// Registers a queue pair's revival.
    pub fn register(&self, r: &Arc<Revival>) {
        let mut list = lock(&self.revivals);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(r));
    }

    fn revivals(&self) -> Vec<Arc<Revival>> {
        let mut list = lock(&self.revivals);
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }

    /// The association's generation (one more at each reconnect), as `status` gives it.
    pub fn generation(&self) -> u64 {
        lock(&self.life).generation
    }

    /// The status the control plane shows.
    pub fn status(&self) -> LinkStatus {
        let revivals = self.revivals();
        let life = lock(&self.life);
        let now = Instant::now();
        let live = life.link.as_ref().filter(|l| !l.health.is_lost());
        let last_error = match (live, life.link.as_ref()) {
            (None, Some(l)) => l.health.reason().or_else(|| life.last_error.clone()),
            _ => life.last_error.clone(),
        };
        let fence_remaining = life
            .fence_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        LinkStatus {
            connected: live.is_some(),
            generation: life.generation,
            last_error,
            reconnect_attempts: life.attempts,
            rtt: live.and_then(|l| l.health.rtt()).or(life.rtt),
            fenced_commands: revivals
                .iter()
                .map(|r| r.fenced.load(Ordering::Relaxed))
                .sum(),
            fence_remaining,
            given_up: life.given_up,
        }
    }

    /// Why the controller is considered lost, if it is.
    pub fn lost_reason(&self) -> Option<String> {
        let life = lock(&self.life);
        match life.link.as_ref() {
            Some(l) if !l.health.is_lost() => None,
            Some(l) => l.health.reason(),
            None => life.last_error.clone(),
        }
    }

    /// One round of the supervisor: notice a loss, end a fence, reconnect when it is time,
    /// and give queue pairs that asked for one a new I/O queue.
    fn tick(&self) {
        let now = Instant::now();
        let mut life = lock(&self.life);
        if life.fence_until.is_some_and(|t| now >= t) {
            life.fence_until = None;
            for r in self.revivals() {
                r.fenced.store(0, Ordering::Relaxed);
            }
        }
        match life.link.clone() {
            Some(link) if !link.health.is_lost() => {
                drop(life);
                self.revive_queues(&link);
            }
            Some(link) => {
                let why = link.health.reason().unwrap_or_default();
                tracing::warn!(target = %link.peer.label, "NVMe/TCP controller lost: {why}; reconnecting every {:?}", self.opts.reconnect_delay);
                let fence = now + link.opts.kato + FENCE_QUIESCE;
                life.fence_until = Some(life.fence_until.map_or(fence, |t| t.max(fence)));
                life.rtt = link.health.rtt().or(life.rtt);
                life.last_error = Some(why);
                life.lost_at = Some(now);
                life.failures = 0;
                life.next_attempt = now + self.opts.reconnect_delay;
                let old = life.link.take();
                // The old association (its admin thread joined) goes outside the lock.
                drop(life);
                drop(old);
                drop(link);
            }
            None if life.given_up => {}
            None => {
                let lost_at = *life.lost_at.get_or_insert(now);
                if self
                    .opts
                    .ctrl_loss_tmo
                    .is_some_and(|tmo| now.duration_since(lost_at) >= tmo)
                {
                    tracing::error!(target = %self.host_port, "NVMe/TCP controller unreachable for longer than ctrl_loss_tmo; no more reconnects");
                    life.given_up = true;
                    return;
                }
                if now < life.next_attempt {
                    return;
                }
                life.attempts += 1;
                drop(life);
                let got = super::connect_link(&self.host_port, &self.opts).and_then(|link| {
                    if link.geo == self.geo {
                        Ok(link)
                    } else {
                        Err(link.peer.err(
                            "reconnect",
                            format!(
                                "the namespace changed: {} blocks of {} B, was {} of {} B",
                                link.geo.num_blocks,
                                link.geo.lba_size,
                                self.geo.num_blocks,
                                self.geo.lba_size
                            ),
                        ))
                    }
                });
                let mut life = lock(&self.life);
                match got {
                    Ok(link) => {
                        tracing::info!(target = %link.peer.label, attempts = life.attempts, "NVMe/TCP controller reconnected");
                        life.info = link.info.clone();
                        life.link = Some(Arc::new(link));
                        // Every queue pair is on an old association now: each gets a
                        // replacement ready before its owner next uses it.
                        for r in self.revivals() {
                            if !r.ready.load(Ordering::Acquire) {
                                r.wanted.store(true, Ordering::Release);
                            }
                        }
                        life.generation += 1;
                        life.failures = 0;
                        life.lost_at = None;
                    }
                    Err(e) => {
                        tracing::debug!("reconnect failed: {e}");
                        life.last_error = Some(e.to_string());
                        let factor = 1u32 << life.failures.min(3);
                        life.failures = life.failures.saturating_add(1);
                        life.next_attempt =
                            Instant::now() + self.opts.reconnect_delay * factor.min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// Connects a replacement I/O queue for every queue pair whose connection died.
    fn revive_queues(&self, link: &Arc<Link>) {
        for r in self.revivals() {
            if !r.wanted.load(Ordering::Acquire) || r.ready.load(Ordering::Acquire) {
                continue;
            }
            match super::connect_io_queue(link, r.size) {
                Ok((conn, qid)) => {
                    *lock(&r.conn) = Some((Arc::clone(link), conn, qid));
                    r.wanted.store(false, Ordering::Release);
                    r.ready.store(true, Ordering::Release);
                }
                Err(e) => {
                    // An association that cannot open an I/O queue is no good: start over.
                    link.health.lose(format!("reconnecting an I/O queue: {e}"));
                    return;
                }
            }
        }
    }
}

/// The `nvme-tcp-ctrl` thread; dropping this stops and joins it.
#[derive(Debug)]
pub(super) struct SupervisorThread {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SupervisorThread {
    pub fn start(sup: Arc<Supervisor>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        let label = sup.host_port.clone();
        let thread = std::thread::Builder::new()
            .name("nvme-tcp-ctrl".into())
            .spawn(move || {
                while rx.recv_timeout(TICK) == Err(mpsc::RecvTimeoutError::Timeout) {
                    sup.tick();
                }
            })
            .map_err(|e| Error::NvmeTcp {
                target: label,
                step: "start the reconnect thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for SupervisorThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
