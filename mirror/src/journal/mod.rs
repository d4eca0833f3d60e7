//! Asynchronous mirroring by ordered journal shipping (`async-journal`, `docs/journal.md`).
//!
//! A [`JournaledLeg`] wraps the far leg's device. The volume sees an ordinary leg: a write
//! sent to it completes once it is durable in a local *journal* (group-committed: one device
//! write holds every record that arrived while the previous one was being written), so the
//! host is acknowledged at local speed. A shipper thread reads the journal back segment by
//! segment and applies each one to the far device, in sequence order; the next segment goes
//! out only once the previous one is applied and its commit position is durable, so the far
//! device always holds a prefix of the acknowledged writes (a crash-consistent image).
//!
//! Records of one segment are all in flight at once at the host (each was submitted and none
//! acknowledged when the segment was written) and never overlap (an overlapping record starts
//! the next segment), so they are applied in parallel. Reads wait until every write
//! completed before them is applied. When the journal would exceed its bound (bytes or
//! `max_lag`), writes fail instead of blocking: the volume faults the leg and tracks what it
//! misses in its write-intent bitmap, as for any failed leg.

mod cycle;
mod dev_io;
mod format;
mod qpair;
mod recover;
mod roll;
mod shipper;
mod staging;
mod writer;

pub use cycle::{recover_cycle, CycleRecovery, FarApplier};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nvmirror_nvme::{
    BlockDevice, Completion, CycleStatus, FenceSignal, Geometry, IoCommand, QueuePair,
    ReplicationStatus, Uuid,
};
use nvmirror_poller::Ring;

use crate::{Error, Result};

/// How a journal is sized and bounded.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Most records in one segment.
    pub max_records: usize,
    /// Most payload bytes in one segment; a larger write is split across segments.
    pub max_segment_bytes: usize,
    /// Journal bytes in use (written, not yet applied) beyond which writes are refused and
    /// the leg steps down to bitmap tracking; `None`: the whole ring.
    pub max_bytes: Option<u64>,
    /// Age of the oldest unapplied write beyond which the leg steps down.
    pub max_lag: Duration,
    /// Start in `sync` mode (writes straight to the far device, the journal idle until
    /// [`JournaledLeg::set_mode`] makes the leg asynchronous).
    pub start_sync: bool,
    /// The time one command of the journal threads may take (the volume's I/O timeout, as a
    /// rule). A journal write given up fails the writes it held, as a failed one does; a far
    /// command given up is sent again on a new queue pair, as a refused one is.
    pub io_timeout: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            max_records: 256,
            max_segment_bytes: 1 << 20,
            max_bytes: None,
            max_lag: Duration::from_secs(30),
            start_sync: false,
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// Modes of a journaled leg: writes through the journal, straight to the far device, or
/// held while the journal drains on the way from the first to the second.
pub(crate) const MODE_ASYNC: u8 = 0;
pub(crate) const MODE_SYNC: u8 = 1;
pub(crate) const MODE_DRAINING: u8 = 2;

/// Replication states (`ReplicationStatus::state`).
pub(crate) const REPLICATING: u8 = 0;
pub(crate) const STEPPED_DOWN: u8 = 2;

/// What the volume last told an `async-cycle` leg through `catch_up`.
pub(crate) const TOLD_NOTHING: u8 = 0;
pub(crate) const TOLD_HELD: u8 = 1;
pub(crate) const TOLD_WHOLE: u8 = 2;
pub(crate) const FAILED: u8 = 3;

fn state_name(s: u8) -> &'static str {
    match s {
        REPLICATING => "replicating",
        STEPPED_DOWN => "stepped-down",
        _ => "failed",
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One write (or flush, write zeroes, deallocate) on its way into the journal.
#[derive(Debug)]
pub(crate) struct Req {
    pub cmd: IoCommand,
    pub chan: Arc<Channel>,
}

/// A queue pair's link to the writer: its completions, and the fence of its close.
#[derive(Debug)]
pub(crate) struct Channel {
    /// Completions of journaled commands (capacity = the queue pair's depth, so a push
    /// never fails).
    pub cpl: Ring<Completion>,
    /// Requests handed to the writer and not yet completed.
    pub inflight: AtomicU32,
    pub closed: AtomicBool,
    /// Signalled by whoever sees the channel closed with nothing in flight.
    pub signal: Mutex<Option<FenceSignal>>,
}

impl Channel {
    /// The writer's side: `cpl` is the completion of one request.
    pub(crate) fn complete(&self, cpl: Completion) {
        let mut c = cpl;
        while let Err(back) = self.cpl.push(c) {
            // Cannot happen (capacity = depth); never drop a completion.
            c = back;
            std::hint::spin_loop();
        }
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            self.end_fence();
        }
    }

    pub(crate) fn end_fence(&self) {
        let signal = self
            .signal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(s) = signal {
            s.signal();
        }
    }
}

/// How an `async-cycle` leg ships (`docs/cycles.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CycleConfig {
    /// The cycle period.
    pub interval: Duration,
    /// Leave the apply to a [`FarApplier`](cycle::FarApplier) at the far site: this side
    /// stages each cycle and waits for the far side to mark it applied, so the link carries
    /// each changed block once instead of twice.
    pub far_apply: bool,
}

impl CycleConfig {
    /// Cycles of `interval`, applied from this side.
    pub fn every(interval: Duration) -> Self {
        Self {
            interval,
            far_apply: false,
        }
    }
}

/// The cycles of an `async-cycle` leg, as its shipper publishes them.
#[derive(Debug, Default)]
pub(crate) struct CycleShared {
    /// The cycle period; `None`: the leg ships segment by segment (`async-journal`).
    pub interval: Option<Duration>,
    /// The leg has a staging area: `async-cycle`, or `async-journal` that ships a backlog in
    /// batches and stages a catch-up (`docs/journal.md`, "With a staging area").
    pub staged: bool,
    /// A cycle is wanted now (`cycle_now`, or a read waiting for the far image).
    pub asked: AtomicBool,
    /// What the volume last said (`catch_up`): `TOLD_NOTHING`, `TOLD_HELD` (a resync of the
    /// leg started and has not made it whole yet) or `TOLD_WHOLE`.
    pub told: AtomicU8,
    /// The leg opened in the middle of a catch-up (a record journaled during one lies past
    /// the commit, or the staging area holds pieces of one): held until the volume tells.
    pub restored: AtomicBool,
    pub cycle: AtomicU64,
    pub cut_unix_ms: AtomicU64,
    pub cycle_bytes: AtomicU64,
    pub changed_bytes: AtomicU64,
    pub staged_bytes: AtomicU64,
    /// Bytes this side wrote to the image (0 with `far_apply`).
    pub image_bytes: AtomicU64,
    pub far_apply: bool,
    pub ship_us: AtomicU64,
}

/// What the writer, the shipper and the queue pairs share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub name: String,
    pub uuid: Uuid,
    pub cfg: JournalConfig,
    /// The far device's geometry (the leg's).
    pub geo: Geometry,
    /// The journal device's block size and its ring's end (block index).
    pub lba_size: u32,
    pub ring_end: u64,
    /// Journaled commands on their way to the writer, from every queue pair.
    pub sub: Ring<Req>,
    /// Last record durable in the journal, its payload bytes so far, and the block after its
    /// segment (the writer's; published before the records' completions).
    pub written_seq: AtomicU64,
    pub written_bytes: AtomicU64,
    pub written_unix_ms: AtomicU64,
    /// Last record applied on the far device, durable in a commit block (the shipper's).
    pub applied_seq: AtomicU64,
    pub applied_bytes: AtomicU64,
    pub applied_unix_ms: AtomicU64,
    /// When the first unapplied segment was written (Unix ms; the shipper's).
    pub next_unix_ms: AtomicU64,
    /// The block where the oldest segment still needed starts: the ring is free from the
    /// writer's tail up to here.
    pub commit_offset: AtomicU64,
    pub tail_offset: AtomicU64,
    pub host_bytes: AtomicU64,
    pub journal_bytes: AtomicU64,
    pub step_downs: AtomicU64,
    pub state: AtomicU8,
    /// `MODE_*`.
    pub mode: AtomicU8,
    /// Commands handed to the writer and not completed yet, over every queue pair.
    pub journaled_inflight: AtomicU64,
    /// The far side refuses (or does not answer) a segment; the shipper sends it again.
    pub retrying: AtomicBool,
    /// The far image or the staging area answered Reservation Conflict: another host (the
    /// far site, promoted) holds its reservation. Nothing is shipped again, and every write
    /// to the leg fails with Reservation Conflict, which fences the volume (`fencing.rs`).
    pub fenced: Arc<AtomicBool>,
    pub stop: AtomicBool,
    pub cycle: CycleShared,
    /// An `async-journal` leg's far image is a consistent point once `applied_seq` reaches
    /// this: `u64::MAX` while a resync copies to the leg (the copy goes in region order), then
    /// the last record journaled when the copy was whole.
    pub consistent_from: AtomicU64,
    /// Why the shipper last failed or had to retry; cleared once a step works again (status
    /// only, never the data path).
    pub error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// Whether the far site was taken over ([`Shared::fenced`]).
    #[inline]
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// A shipper's end once the far site was taken over (`failed`: the step that met the
    /// conflict): says so once, then waits for the stop; false, as a stopped step returns.
    pub(crate) fn park_fenced(&self, failed: &str) -> bool {
        let why = format!(
            "the far site answered Reservation Conflict ({failed}): another host holds its reservation (a promotion there); nothing more is shipped, and writes to the leg fail with Reservation Conflict, which fences the volume"
        );
        tracing::error!(leg = %self.name, "{why}");
        self.report(Some(why));
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Records why the shipper is stuck (`None`: it is not) for the status page.
    pub(crate) fn report(&self, why: Option<String>) {
        *self.error_slot() = why;
    }

    /// Why shipping is stuck, as last reported.
    fn error(&self) -> Option<String> {
        self.error_slot().clone()
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Journal blocks in use between the commit position and the writer's tail.
    pub(crate) fn used_blocks(&self) -> u64 {
        let tail = self.tail_offset.load(Ordering::Acquire);
        let commit = self.commit_offset.load(Ordering::Acquire);
        let ring = self.ring_end - format::RING_START;
        if tail >= commit {
            tail - commit
        } else {
            ring - (commit - tail)
        }
    }

    /// Age of the oldest acknowledged write not yet applied, in seconds.
    pub(crate) fn rpo_seconds(&self) -> f64 {
        let applied = self.applied_seq.load(Ordering::Acquire);
        let written = self.written_seq.load(Ordering::Acquire);
        if applied >= written {
            return 0.0;
        }
        let mut since = self.next_unix_ms.load(Ordering::Acquire);
        if since == 0 {
            since = self.written_unix_ms.load(Ordering::Acquire);
        }
        unix_ms().saturating_sub(since) as f64 / 1000.0
    }

    fn status(&self) -> ReplicationStatus {
        let written = self.written_seq.load(Ordering::Acquire);
        let applied = self.applied_seq.load(Ordering::Acquire);
        let consistent = applied >= self.consistent_from.load(Ordering::Acquire);
        ReplicationStatus {
            mode: match self.mode.load(Ordering::Acquire) {
                MODE_ASYNC if self.cycle.interval.is_some() => "async-cycle",
                MODE_ASYNC => "async-journal",
                MODE_SYNC => "sync",
                _ => "draining",
            },
            state: match self.state.load(Ordering::Relaxed) {
                _ if self.is_fenced() => "fenced",
                REPLICATING if self.retrying.load(Ordering::Relaxed) => "retrying",
                REPLICATING if self.catching_up() || !consistent => "catching-up",
                s => state_name(s),
            },
            rpo_seconds: self.rpo_seconds(),
            lag_bytes: self
                .written_bytes
                .load(Ordering::Acquire)
                .saturating_sub(self.applied_bytes.load(Ordering::Acquire)),
            lag_writes: written.saturating_sub(applied),
            consistent,
            consistent_seq: applied,
            consistent_unix_ms: self.applied_unix_ms.load(Ordering::Acquire),
            host_bytes: self.host_bytes.load(Ordering::Relaxed),
            journal_bytes: self.journal_bytes.load(Ordering::Relaxed),
            journal_used: self.used_blocks() * u64::from(self.lba_size),
            journal_capacity: (self.ring_end - format::RING_START) * u64::from(self.lba_size),
            step_downs: self.step_downs.load(Ordering::Relaxed),
            cycle: self.cycle.staged.then(|| {
                let c = &self.cycle;
                CycleStatus {
                    cycle: c.cycle.load(Ordering::Acquire),
                    cycle_unix_ms: c.cut_unix_ms.load(Ordering::Acquire),
                    interval_ms: c.interval.map_or(0, |i| i.as_millis() as u64),
                    cycle_bytes: c.cycle_bytes.load(Ordering::Relaxed),
                    changed_bytes: c.changed_bytes.load(Ordering::Relaxed),
                    staged_bytes: c.staged_bytes.load(Ordering::Relaxed),
                    image_bytes: c.image_bytes.load(Ordering::Relaxed),
                    far_apply: c.far_apply,
                    ship_us: c.ship_us.load(Ordering::Relaxed),
                }
            }),
            error: self.error(),
        }
    }

    /// Whether this staged leg's cuts are held: a resync of it runs, or it opened in the
    /// middle of a catch-up and its volume has not said yet that it is whole.
    pub(crate) fn catching_up(&self) -> bool {
        if !self.cycle.staged {
            return false;
        }
        match self.cycle.told.load(Ordering::Acquire) {
            TOLD_HELD => true,
            TOLD_WHOLE => false,
            _ => self.cycle.restored.load(Ordering::Acquire),
        }
    }

    /// The name of the asynchronous mode this leg runs in.
    fn async_mode(&self) -> &'static str {
        if self.cycle.interval.is_some() {
            "async-cycle"
        } else {
            "async-journal"
        }
    }
}

/// The far leg of an `async-journal` mirror: see the module documentation.
pub struct JournaledLeg {
    inner: Arc<dyn BlockDevice>,
    /// The staging area at the far site, if the leg has one: fenced with the image.
    staging: Option<Arc<dyn BlockDevice>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for JournaledLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournaledLeg")
            .field("name", &self.shared.name)
            .finish()
    }
}

impl JournaledLeg {
    /// Opens the journal on `journal` (formatting it when blank), finds how far the far side
    /// `inner` has applied it, and starts the writer and the shipper. A journal of another
    /// block size or device size, or a damaged header, is refused.
    pub fn open(
        inner: Arc<dyn BlockDevice>,
        journal: Arc<dyn BlockDevice>,
        cfg: JournalConfig,
    ) -> Result<Self> {
        Self::open_with(inner, journal, None, cfg)
    }

    /// Opens an `async-cycle` leg (`docs/cycles.md`): as [`open`](Self::open), but the
    /// journal is shipped in cycles of `interval` through the far site's `staging` area
    /// (same block size as `inner`), so the far image moves from one cut to the next
    /// atomically. A cycle a crash left committed is rolled forward when the shipper starts.
    /// `cfg.max_lag` should be at least two periods: a write waits up to a whole period and
    /// its shipping before it is applied (`nvmirror serve` refuses less).
    ///
    /// A leg opened in the middle of a catch-up (a crash cut one short) takes no cut until
    /// it is told whether the leg is whole (`catch_up`): a [`Volume`](crate::Volume) tells
    /// each leg when it is built, and a resync when it ends. Meanwhile, reads see the far
    /// image as it is (the last cycle).
    pub fn open_cycle(
        inner: Arc<dyn BlockDevice>,
        journal: Arc<dyn BlockDevice>,
        staging: Arc<dyn BlockDevice>,
        cycle: CycleConfig,
        cfg: JournalConfig,
    ) -> Result<Self> {
        Self::open_with(
            inner,
            journal,
            Some((staging, Some(cycle.interval), cycle.far_apply)),
            cfg,
        )
    }

    /// Opens an `async-journal` leg with a staging area at the far site
    /// (`docs/journal.md`, "With a staging area"): as [`open`](Self::open) while the shipper
    /// keeps up (segment by segment), but a backlog of more than one segment ships as one
    /// batch through the staging area (each changed block once, the image moved from one
    /// segment boundary to a later one atomically), and a resync's catch-up is staged whole
    /// before it is applied, so the far image stays a consistent prefix through it. With
    /// `far_apply` a [`FarApplier`](cycle::FarApplier) at the far site applies the batches
    /// (the link carries their blocks once); segments still go straight to the image.
    pub fn open_staged(
        inner: Arc<dyn BlockDevice>,
        journal: Arc<dyn BlockDevice>,
        staging: Arc<dyn BlockDevice>,
        far_apply: bool,
        cfg: JournalConfig,
    ) -> Result<Self> {
        Self::open_with(inner, journal, Some((staging, None, far_apply)), cfg)
    }

    fn open_with(
        inner: Arc<dyn BlockDevice>,
        journal: Arc<dyn BlockDevice>,
        staging: Option<(Arc<dyn BlockDevice>, Option<Duration>, bool)>,
        cfg: JournalConfig,
    ) -> Result<Self> {
        let name = inner.name().to_string();
        let err = |reason: String| Error::Journal {
            leg: name.clone(),
            journal: journal.name().to_string(),
            reason,
        };
        if cfg.max_records == 0 || cfg.max_segment_bytes < inner.geometry().lba_size as usize {
            return Err(err(format!(
                "max_records {} and max_segment_bytes {} must hold at least one block",
                cfg.max_records, cfg.max_segment_bytes
            )));
        }
        if let Some((stg, interval, _)) = &staging {
            if stg.geometry().lba_size != inner.geometry().lba_size {
                return Err(err(format!(
                    "the staging area {} has {}-byte blocks; the leg has {}-byte ones",
                    stg.name(),
                    stg.geometry().lba_size,
                    inner.geometry().lba_size
                )));
            }
            if interval.is_some_and(|i| i.is_zero()) {
                return Err(err("the cycle period must be more than 0".into()));
            }
        }
        let found = recover::recover(&journal, &cfg).map_err(err)?;
        let geo = inner.geometry();
        let shared = Arc::new(Shared {
            name: name.clone(),
            uuid: found.uuid,
            geo,
            lba_size: found.lba_size,
            ring_end: found.ring_end,
            sub: Ring::new(4096),
            written_seq: AtomicU64::new(found.next_seq - 1),
            written_bytes: AtomicU64::new(found.bytes),
            written_unix_ms: AtomicU64::new(found.last_unix_ms),
            applied_seq: AtomicU64::new(found.commit.seq),
            applied_bytes: AtomicU64::new(found.commit.bytes),
            applied_unix_ms: AtomicU64::new(found.commit.unix_ms),
            next_unix_ms: AtomicU64::new(0),
            commit_offset: AtomicU64::new(found.commit.offset),
            tail_offset: AtomicU64::new(found.tail),
            host_bytes: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            step_downs: AtomicU64::new(0),
            state: AtomicU8::new(REPLICATING),
            mode: AtomicU8::new(if cfg.start_sync {
                MODE_SYNC
            } else {
                MODE_ASYNC
            }),
            journaled_inflight: AtomicU64::new(0),
            retrying: AtomicBool::new(false),
            fenced: Arc::new(AtomicBool::new(false)),
            stop: AtomicBool::new(false),
            cycle: CycleShared {
                interval: staging.as_ref().and_then(|s| s.1),
                staged: staging.is_some(),
                told: AtomicU8::new(TOLD_NOTHING),
                restored: AtomicBool::new(found.catch_up),
                far_apply: staging.as_ref().is_some_and(|s| s.2),
                ..CycleShared::default()
            },
            error: std::sync::Mutex::new(None),
            consistent_from: AtomicU64::new(0),
            cfg,
        });
        if found.next_seq - 1 > found.commit.seq {
            tracing::info!(leg = %name, records = found.next_seq - 1 - found.commit.seq, "journal holds writes the far side does not have yet; shipping resumes");
        }
        let w = writer::Writer::new(
            Arc::clone(&shared),
            Arc::clone(&journal),
            found.next_seq,
            found.tail,
        )
        .map_err(|e| err(e.to_string()))?;
        let staging_dev = staging.as_ref().map(|s| Arc::clone(&s.0));
        let ship: Box<dyn FnOnce() + Send> = match staging {
            None => {
                let s = shipper::Shipper::new(
                    Arc::clone(&shared),
                    Arc::clone(&journal),
                    Arc::clone(&inner),
                    found.commit,
                )
                .map_err(err)?;
                Box::new(move || s.run())
            }
            Some((stg, interval, far_apply)) => {
                let s = cycle::CycleShipper::new(
                    Arc::clone(&shared),
                    (interval, far_apply),
                    Arc::clone(&journal),
                    Arc::clone(&inner),
                    stg,
                    found.commit,
                )
                .map_err(err)?;
                Box::new(move || s.run())
            }
        };
        let spawn = |what: &str| std::thread::Builder::new().name(format!("nvm-{what}"));
        let threads = vec![
            spawn("journal")
                .spawn(move || w.run())
                .map_err(|e| err(e.to_string()))?,
            spawn("shipper")
                .spawn(ship)
                .map_err(|e| err(e.to_string()))?,
        ];
        Ok(Self {
            inner,
            staging: staging_dev,
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// The far device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// Waits until the far side holds every write journaled so far, up to `limit`; whether
    /// it does.
    pub fn wait_applied(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let target = self.shared.written_seq.load(Ordering::Acquire);
        while self.shared.applied_seq.load(Ordering::Acquire) < target {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Switches the leg between `sync` and `async-journal`. To `sync`: new writes are held
    /// while the journal drains (up to `limit`; past it the leg stays asynchronous and the
    /// error says how far behind it is), then go straight to the far device.
    pub fn set_mode(&self, mode: &str, limit: Duration) -> std::result::Result<(), String> {
        let sh = &self.shared;
        match mode {
            "async-journal" | "async-cycle" if mode == sh.async_mode() => {
                sh.mode.store(MODE_ASYNC, Ordering::Release);
                tracing::info!(leg = %sh.name, mode, "leg mirrored asynchronously");
                Ok(())
            }
            "sync" => {
                if sh.mode.load(Ordering::Acquire) == MODE_SYNC {
                    return Ok(());
                }
                if sh.is_fenced() {
                    return Err("the far site is reserved by another host (a promotion there): the leg ships no more".into());
                }
                if sh.state.load(Ordering::Relaxed) != REPLICATING {
                    return Err(format!(
                        "the journal is {}: it cannot drain",
                        state_name(sh.state.load(Ordering::Relaxed))
                    ));
                }
                sh.mode.store(MODE_DRAINING, Ordering::SeqCst);
                let deadline = std::time::Instant::now() + limit;
                loop {
                    let drained = sh.journaled_inflight.load(Ordering::SeqCst) == 0
                        && sh.applied_seq.load(Ordering::Acquire)
                            >= sh.written_seq.load(Ordering::Acquire);
                    if drained {
                        sh.mode.store(MODE_SYNC, Ordering::Release);
                        tracing::info!(leg = %sh.name, "leg mirrored synchronously (the journal drained)");
                        return Ok(());
                    }
                    if std::time::Instant::now() >= deadline {
                        sh.mode.store(MODE_ASYNC, Ordering::Release);
                        let st = sh.status();
                        return Err(format!(
                            "the journal did not drain within {limit:?} ({} writes, {} bytes behind); the leg stays asynchronous",
                            st.lag_writes, st.lag_bytes
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            other => Err(format!("mode '{other}': sync or {}", sh.async_mode())),
        }
    }

    /// Ends the open cycle now and waits (up to `limit`) until the far image holds every
    /// write journaled before the call; the cycle that holds them. Refused on a leg that does
    /// not ship in cycles.
    pub fn cycle_now(&self, limit: Duration) -> std::result::Result<u64, String> {
        let sh = &self.shared;
        if sh.cycle.interval.is_none() {
            return Err("the leg is not async-cycle".into());
        }
        if sh.catching_up() {
            return Err(format!(
                "a resync of the leg is running: its far image stays at cycle {} until the copy is whole",
                sh.cycle.cycle.load(Ordering::Acquire)
            ));
        }
        sh.cycle.asked.store(true, Ordering::Release);
        if !self.wait_applied(limit) {
            let st = sh.status();
            return Err(format!(
                "the cycle did not reach the far image within {limit:?} (state {}, {} writes behind)",
                st.state, st.lag_writes
            ));
        }
        Ok(sh.cycle.cycle.load(Ordering::Acquire))
    }

    /// Stops the writer and the shipper (what is journaled stays in the journal and ships at
    /// the next open). Commands not yet journaled fail.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for JournaledLeg {
    fn drop(&mut self) {
        self.stop();
    }
}

impl BlockDevice for JournaledLeg {
    fn geometry(&self) -> Geometry {
        self.shared.geo
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(qpair::JournalQueuePair::new(
            Arc::clone(&self.shared),
            self.inner.open_qpair(depth)?,
            depth,
        )))
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    fn link(&self) -> Option<nvmirror_nvme::LinkStatus> {
        self.inner.link()
    }

    fn link_generation(&self) -> Option<u64> {
        self.inner.link_generation()
    }

    fn volatile_write_cache(&self) -> bool {
        self.inner.volatile_write_cache()
    }

    fn reservations(&self) -> Option<&dyn nvmirror_nvme::Reservations> {
        self.inner.reservations()
    }

    fn staging_reservations(&self) -> Option<&dyn nvmirror_nvme::Reservations> {
        self.staging.as_ref()?.reservations()
    }

    fn replication(&self) -> Option<ReplicationStatus> {
        Some(self.shared.status())
    }

    fn set_replication_mode(
        &self,
        mode: &str,
        limit: Duration,
    ) -> Option<std::result::Result<(), String>> {
        Some(self.set_mode(mode, limit))
    }

    fn cycle_now(&self, limit: Duration) -> Option<std::result::Result<u64, String>> {
        // An async-journal leg does not ship in cycles: no answer, as for any device.
        self.shared
            .cycle
            .interval
            .is_some()
            .then(|| Self::cycle_now(self, limit))
    }

    fn catch_up(&self, on: bool) {
        let sh = &self.shared;
        let told = if on { TOLD_HELD } else { TOLD_WHOLE };
        sh.cycle.told.store(told, Ordering::Release);
        if !sh.cycle.staged {
            // async-journal ships the copy as it comes: the far image is no consistent point
            // until every record of the copy is applied.
            if on {
                sh.consistent_from.store(u64::MAX, Ordering::Release);
            } else {
                let end = sh.written_seq.load(Ordering::Acquire);
                let _ = sh.consistent_from.compare_exchange(
                    u64::MAX,
                    end,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
    }
}
