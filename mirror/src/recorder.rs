//! The metadata thread of a persistent volume (`docs/bitmap.md`, "Superblock protocol").
//!
//! A leg that is taken out changes what the superblocks must say, and a host write that the
//! leg missed may be acknowledged only once the superblocks naming it stale are on stable
//! storage on the in-sync legs. Those writes are synchronous control-plane I/O that can wait
//! up to the I/O timeout per leg, so they never run on a data-path reactor:
//!
//! - A reactor that takes a leg out only changes the state word and wakes this thread. A host
//!   write (or flush) that completes while the state word's event count is ahead of what the
//!   superblocks record is held on its core — not blocked — until this thread reports the
//!   state durable ([`StateRecorder::ack_status`]); the core keeps serving everything else.
//! - This thread writes the current states to every in-sync leg's superblock (FUA), bumping
//!   the event counter in every round, attempt or not. An in-sync leg whose superblock write
//!   fails is faulted too and the round is repeated, so every leg left in sync holds the
//!   states. When the failing leg is the last in sync, the states are *unbacked*: held
//!   writes fail, and so does every write after them, until a retry gets the superblock out.
//! - It also writes the whole bitmap to a leg at the end of its resync
//!   ([`StateRecorder::request_whole_bitmap`]), which the resync job polls for.
//!
//! The thread has queue pairs of its own (`PersistentMeta::sb_io`): it never waits behind the
//! clearer or a recovery copy, and no reactor ever takes a lock it holds.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::legs::{LegState, Refusal, MAX_LEGS};
use crate::metadata::ControlIo;
use crate::volume::VolumeShared;

/// How long the thread sleeps with nothing asked of it (it looks at the state word then, in
/// case a change came without a wake-up).
const IDLE: Duration = Duration::from_millis(100);

/// How often unbacked states are tried again.
const RETRY: Duration = Duration::from_millis(50);

/// The longest a clean shutdown waits for the thread to pause.
const PAUSE_LIMIT: Duration = Duration::from_secs(120);

/// What a held acknowledgement may become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AckStatus {
    /// The superblocks on the in-sync legs record the states the write completed under.
    Backed,
    /// No in-sync leg could record them: the write must not be acknowledged as a success.
    Unbacked,
    /// Not recorded yet: hold the acknowledgement.
    Pending,
}

/// The handshake between the reactors (and the control plane) and the metadata thread.
#[derive(Debug, Default)]
pub(crate) struct StateRecorder {
    /// `(events << 1) | unbacked` of the last round: `events` is the state word's event count
    /// that round wrote; `unbacked` that no in-sync leg took it.
    recorded: AtomicU64,
    /// The in-sync legs whose superblock write failed in the last round (for errors).
    last_failed: AtomicU8,
    /// Per leg: number of the last whole-bitmap write asked for.
    bitmap_asked: [AtomicU64; MAX_LEGS],
    /// Per leg: `(number << 1) | failed` of the last whole-bitmap write done.
    bitmap_done: [AtomicU64; MAX_LEGS],
    /// Set by a wake-up not yet seen by the thread (saves repeated unparks).
    woken: AtomicBool,
    /// Asked to pause (a clean shutdown writes the superblocks itself).
    pause: AtomicBool,
    /// The thread is paused and holds no reference to the volume.
    paused: AtomicBool,
    waker: OnceLock<Thread>,
}

impl StateRecorder {
    /// Notes that the superblocks record event count `events` (written synchronously at
    /// start-up or shutdown).
    pub(crate) fn mark_recorded(&self, events: u32) {
        self.recorded
            .store(u64::from(events) << 1, Ordering::Release);
    }

    fn store_round(&self, events: u32, unbacked: bool, failed: u8) {
        self.last_failed.store(failed, Ordering::Relaxed);
        self.recorded.store(
            (u64::from(events) << 1) | u64::from(unbacked),
            Ordering::Release,
        );
    }

    /// Whether a write that completed when the state word's event count was `events` may be
    /// acknowledged. Two atomic loads; no lock.
    #[inline]
    pub(crate) fn ack_status(&self, events: u32) -> AckStatus {
        let word = self.recorded.load(Ordering::Acquire);
        let recorded = (word >> 1) as u32;
        if (recorded.wrapping_sub(events) as i32) < 0 {
            AckStatus::Pending
        } else if word & 1 != 0 {
            AckStatus::Unbacked
        } else {
            AckStatus::Backed
        }
    }

    /// Whether the last round left the states unbacked.
    pub(crate) fn unbacked(&self) -> bool {
        self.recorded.load(Ordering::Acquire) & 1 != 0
    }

    /// The legs whose superblock write failed last.
    pub(crate) fn last_failed(&self) -> u8 {
        self.last_failed.load(Ordering::Relaxed)
    }

    /// Asks the thread for a round. Cheap when one is asked for already; never blocks.
    #[inline]
    pub(crate) fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.waker.get() {
                t.unpark();
            }
        }
    }

    /// Asks for the whole bitmap to be written to leg `leg`; returns the ticket for
    /// [`whole_bitmap_done`](Self::whole_bitmap_done).
    pub(crate) fn request_whole_bitmap(&self, leg: usize) -> u64 {
        let ticket = self.bitmap_asked[leg].fetch_add(1, Ordering::AcqRel) + 1;
        self.wake();
        ticket
    }

    /// `Some(true)` once the whole-bitmap write `ticket` is durable on leg `leg`,
    /// `Some(false)` when it failed, `None` while it runs.
    pub(crate) fn whole_bitmap_done(&self, leg: usize, ticket: u64) -> Option<bool> {
        let done = self.bitmap_done[leg].load(Ordering::Acquire);
        (done >> 1 >= ticket).then_some(done & 1 == 0)
    }

    /// Blocks the calling (control-plane) thread until the superblocks record event count
    /// `events`, or `limit` passes. Returns what a write would get.
    pub(crate) fn wait(&self, events: u32, limit: Duration) -> AckStatus {
        let start = Instant::now();
        loop {
            self.wake();
            match self.ack_status(events) {
                AckStatus::Pending if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                s => return s,
            }
        }
    }

    /// Pauses the thread and waits until it holds no reference to the volume and writes
    /// nothing (a clean shutdown, which then writes the superblocks itself).
    pub(crate) fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let Some(t) = self.waker.get() else {
            return;
        };
        // A round in progress ends within a few I/O timeouts; a thread that died never
        // answers, and then there is nothing to wait for.
        let start = Instant::now();
        while !self.paused.load(Ordering::SeqCst) && start.elapsed() < PAUSE_LIMIT {
            t.unpark();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a paused thread go on.
    pub(crate) fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.pause.store(false, Ordering::SeqCst);
        if let Some(t) = self.waker.get() {
            t.unpark();
        }
    }
}

/// Starts the metadata thread of a persistent volume. It ends by itself once the volume is
/// gone.
pub(crate) fn spawn(vol: &Arc<VolumeShared>) -> std::io::Result<()> {
    let Some(meta) = vol.meta.as_ref() else {
        return Ok(());
    };
    let weak = Arc::downgrade(vol);
    let rec = Arc::clone(&meta.recorder);
    let handle = std::thread::Builder::new()
        .name(format!("nvmirror-meta-{}", vol.name))
        .spawn(move || run(&weak, &rec))?;
    let _ = meta.recorder.waker.set(handle.thread().clone());
    Ok(())
}

fn run(vol: &Weak<VolumeShared>, rec: &StateRecorder) {
    loop {
        if rec.pause.load(Ordering::SeqCst) {
            rec.paused.store(true, Ordering::SeqCst);
            std::thread::park_timeout(IDLE);
            if vol.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(v) = vol.upgrade() else {
            return;
        };
        let Some(meta) = v.meta.as_ref() else {
            return;
        };
        rec.woken.store(false, Ordering::Release);
        let worked = {
            let mut io = meta.lock_sb_io();
            let bitmaps = v.write_asked_bitmaps(&mut io);
            v.record_round(&mut io) || bitmaps
        };
        let pause = if rec.unbacked() { RETRY } else { IDLE };
        drop(v);
        if !worked {
            std::thread::park_timeout(pause);
        }
    }
}

impl VolumeShared {
    /// One round: when the state word is ahead of the superblocks (or they are unbacked),
    /// writes the states to every in-sync leg, faulting each leg whose superblock write fails
    /// and writing again without it. Returns whether it wrote anything.
    fn record_round(&self, io: &mut ControlIo) -> bool {
        let meta = self.meta.as_ref().expect("persistent");
        let rec = &meta.recorder;
        let snap = self.states.snapshot();
        if rec.ack_status(snap.events()) == AckStatus::Backed {
            return false;
        }
        // Each pass faults at least one leg or sees the state word move; a leg count's worth
        // bounds it.
        for _ in 0..=2 * MAX_LEGS {
            let snap = self.states.snapshot();
            let failed = meta.write_superblocks(io, self, snap, false, true);
            if failed == 0 {
                rec.store_round(snap.events(), false, 0);
                return true;
            }
            let mut stuck = false;
            for leg in (0..MAX_LEGS).filter(|&i| failed & (1 << i) != 0) {
                match self.states.take_out(leg, LegState::Faulted, None) {
                    Ok(Some(t)) => {
                        tracing::error!(
                            volume = %self.name, leg, name = self.leg_name(leg),
                            "leg faulted: its superblock cannot be written"
                        );
                        if let Some(p) = t.promoted {
                            tracing::warn!(volume = %self.name, old = leg, new = p, "primary promoted");
                        }
                    }
                    Ok(None) | Err(Refusal::AlreadyDetached | Refusal::WrongState(_)) => {}
                    Err(Refusal::LastInSync | Refusal::NoFreeSlot | Refusal::Primary) => {
                        stuck = true;
                    }
                }
            }
            if stuck {
                let now = self.states.snapshot();
                tracing::error!(
                    volume = %self.name, legs = format_args!("{failed:#06b}"),
                    "leg states cannot be recorded on the last in-sync leg; writes fail until they are"
                );
                rec.store_round(now.events(), true, failed);
                return true;
            }
        }
        let now = self.states.snapshot();
        rec.store_round(now.events(), true, rec.last_failed());
        true
    }

    /// Writes the whole bitmap to every leg that asked for it since the last time.
    fn write_asked_bitmaps(&self, io: &mut ControlIo) -> bool {
        let meta = self.meta.as_ref().expect("persistent");
        let rec = &meta.recorder;
        let mut worked = false;
        for leg in 0..MAX_LEGS {
            let asked = rec.bitmap_asked[leg].load(Ordering::Acquire);
            if rec.bitmap_done[leg].load(Ordering::Acquire) >> 1 >= asked {
                continue;
            }
            worked = true;
            let failed = match self.write_whole_bitmap_with(io, leg) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(volume = %self.name, leg, error = %e, "whole bitmap not written");
                    1
                }
            };
            rec.bitmap_done[leg].store((asked << 1) | failed, Ordering::Release);
        }
        worked
    }

    /// The recorder of a persistent volume.
    pub(crate) fn recorder(&self) -> Option<&StateRecorder> {
        self.meta.as_ref().map(|m| &*m.recorder)
    }
}
