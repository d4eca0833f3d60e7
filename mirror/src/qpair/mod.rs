//! The per-core volume queue pair: fan-out on submit, join on poll.
//!
//! `submit` range-checks the command, takes the overlap guard for modifying commands, takes a
//! join slot and hands the command to every in-sync leg's queue pair in the same call
//! (invariant 2). `poll` first retries commands that had to wait, then reaps every leg's queue
//! pair, merges each leg result into its join slot and, when the last leg of a command is in,
//! applies the ack rule ([`ack`]); every few polls it looks for leg commands older than the
//! I/O timeout ([`timeout`]). Host completions are queued and handed out at the end of `poll`.
//!
//! Nothing on this path locks, allocates or makes a system call of its own: the join table,
//! the pending FIFO and the completion queue are sized to the queue depth when the queue pair
//! is opened.

mod ack;
mod intent;
mod lending;
mod stages;
mod timeout;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nvmirror_nvme::{Completion, Fence, Geometry, IoCommand, IoOp, QueuePair, Status, SubmitError};

use crate::join::leg_tag;
use crate::legs::{LegSnapshot, LegState, MAX_LEGS};
use crate::read_policy::ReadSelector;
use crate::stats::{bump, CoreStats};
use crate::table::JoinTable;
use crate::volume::VolumeShared;
use crate::{Error, Result};
use intent::{release_intent, IntentWriter};
use stages::StageRecorder;
use timeout::TimeoutClock;

/// Largest queue depth a volume queue pair accepts.
pub const MAX_QUEUE_DEPTH: u32 = 1 << 16;

/// Waiting commands scanned for overlap before a new write may go ahead of them; with more
/// waiting, new writes queue behind all of them.
const WAIT_SCAN_MAX: usize = 16;

/// A command's blocks, `[slba, slba + nlb)`.
#[inline]
fn blocks(c: &IoCommand) -> (u64, u64) {
    (c.slba, c.slba + u64::from(c.nlb))
}

/// Whether two block ranges overlap.
#[inline]
fn overlaps((a0, a1): (u64, u64), (b0, b1): (u64, u64)) -> bool {
    a0 < b1 && b0 < a1
}

/// Bit `i` set for every leg among the first `legs` mirrored asynchronously.
fn async_mask(vol: &VolumeShared, legs: usize) -> u8 {
    let mut mask = 0;
    for i in 0..legs {
        if vol.leg(i).is_some_and(|l| l.dev.replication().is_some()) {
            mask |= 1 << i;
        }
    }
    mask
}

/// A finished write whose command was abandoned on a leg that is still in sync: it holds
/// its overlap-guard entries (and its bitmap in-flight count) until every such leg command is
/// reaped, or fenced by closing the queue pair.
#[derive(Clone, Copy, Debug)]
struct Parked {
    slot: u32,
    generation: u32,
    /// Legs whose abandoned command is not reaped yet.
    legs: u8,
    span: crate::guard::GranuleSpan,
    cmd: IoCommand,
}

/// A command that could not start yet.
#[derive(Clone, Copy, Debug)]
enum Waiting {
    /// A host command waiting for a join slot, leg queue room or the overlap guard.
    New(IoCommand),
    /// A started command (slot, generation) with legs whose queue pair refused it.
    Resend(u32, u32),
}

/// One core's queue pair on a [`Volume`](crate::Volume).
#[derive(Debug)]
pub struct VolumeQueuePair {
    vol: Arc<VolumeShared>,
    geo: Geometry,
    depth: u32,
    /// Host commands accepted and not yet handed back by `poll`.
    accepted: u32,
    /// Leg queue pairs; `None` for a leg this core has not opened one on (detached when this
    /// queue pair was opened, or added since). Opened lazily when the leg starts to receive
    /// writes ([`refresh_legs`](Self::refresh_legs)).
    legs: [Option<Box<dyn QueuePair>>; MAX_LEGS],
    /// Persistent volumes: the bitmap page writer (declared after `legs`, so its buffers
    /// outlive the leg queue pairs).
    intent: Option<IntentWriter>,
    /// First block of the exported namespace on every leg (0 without metadata).
    data_lba: u64,
    leg_count: usize,
    /// Event count of the state word when the leg queue pairs were last brought up to date.
    seen_events: u32,
    /// Each leg queue pair's depth.
    leg_depth: [u32; MAX_LEGS],
    /// Commands this core has handed to each leg and not yet reaped (abandoned ones included).
    inflight: [u32; MAX_LEGS],
    /// Of those, the ones abandoned after the I/O timeout (also counted in the leg's shared
    /// `abandoned`, which holds back its resync).
    abandoned: [u32; MAX_LEGS],
    table: JoinTable,
    /// Finished writes still holding the guard for an abandoned leg command (capacity =
    /// depth).
    parked: Vec<Parked>,
    /// Host buffers a completed command still lends to abandoned leg commands, and those
    /// given back since the last `poll_released` (both capacity = depth; `lending`).
    lent: Vec<lending::Lent>,
    released: VecDeque<u64>,
    /// Commands waiting to start, oldest first (capacity = depth).
    pending: VecDeque<Waiting>,
    /// Host completions not yet handed out (capacity = depth).
    ready: VecDeque<Completion>,
    /// Persistent volumes: successful write and flush completions waiting until the
    /// superblocks record the leg states (the state word's event count) they completed
    /// under (capacity = depth; `ack`).
    held: VecDeque<ack::Held>,
    /// Scratch for reaping a leg queue pair.
    reaped: Box<[Completion]>,
    reads: ReadSelector,
    /// Legs mirrored asynchronously (`async-journal`): they serve reads only when no other
    /// in-sync leg can (theirs wait for the journal to drain).
    async_legs: u8,
    clock: TimeoutClock,
    stats: Arc<CoreStats>,
    /// The latency breakdown's stamps and histograms, when it is on (`crate::breakdown`).
    stages: Option<Box<StageRecorder>>,
    /// Set by [`teardown`](Self::teardown), which runs once (from `close` or `drop`).
    torn_down: bool,
}

impl VolumeQueuePair {
    pub(crate) fn open(vol: Arc<VolumeShared>, depth: u32) -> Result<Self> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(Error::Config {
                volume: vol.name.clone(),
                reason: format!("queue depth {depth} is not in 1..={MAX_QUEUE_DEPTH}"),
            });
        }
        let snap = vol.states.snapshot();
        let mut legs: [Option<Box<dyn QueuePair>>; MAX_LEGS] = Default::default();
        let mut leg_depth = [0; MAX_LEGS];
        for i in 0..snap.leg_count() {
            let Some(leg) = vol.leg(i) else {
                continue;
            };
            if matches!(snap.state(i), LegState::Detached | LegState::Removed) {
                continue;
            }
            match leg.dev.open_qpair(depth) {
                Ok(qp) => {
                    leg_depth[i] = qp.depth();
                    legs[i] = Some(qp);
                }
                // A leg that receives no writes is left without a queue pair on this core (one
                // is opened when it starts to receive them again).
                Err(e) if !matches!(snap.state(i), LegState::InSync | LegState::Resyncing) => {
                    tracing::warn!(volume = %vol.name, leg = i, error = %e, "no queue pair on an out-of-sync leg");
                }
                // A leg that receives writes and cannot open one is faulted (it would miss this
                // core's writes), unless it is the last in-sync leg.
                Err(e)
                    if vol.fault_on_io(
                        i,
                        None,
                        Status::HOST_PATHING_ERROR,
                        "opening a queue pair",
                    ) =>
                {
                    tracing::warn!(volume = %vol.name, leg = i, error = %e, "cannot open a queue pair");
                }
                Err(source) => {
                    return Err(Error::OpenLegQueuePair {
                        volume: vol.name.clone(),
                        leg: i,
                        name: leg.dev.name().to_string(),
                        source: Box::new(source),
                    })
                }
            }
        }
        let stats = Arc::new(CoreStats::new());
        vol.register_core(Arc::clone(&stats));
        let now = Instant::now();
        let stages = vol
            .breakdown_config()
            .map(|cfg| Box::new(StageRecorder::new(cfg, depth)));
        Ok(Self {
            geo: vol.geo,
            depth,
            accepted: 0,
            leg_count: snap.leg_count(),
            seen_events: snap.events(),
            legs,
            intent: vol
                .bitmap
                .as_ref()
                .map(|b| IntentWriter::new(vol.cfg.bitmap.predict_max, b.pages())),
            data_lba: vol.data_lba,
            leg_depth,
            inflight: [0; MAX_LEGS],
            abandoned: [0; MAX_LEGS],
            table: JoinTable::new(depth, now),
            parked: Vec::with_capacity(depth as usize),
            lent: Vec::with_capacity(depth as usize),
            released: VecDeque::with_capacity(depth as usize),
            pending: VecDeque::with_capacity(depth as usize),
            ready: VecDeque::with_capacity(depth as usize),
            held: VecDeque::with_capacity(depth as usize),
            reaped: vec![Completion::default(); depth.min(256) as usize].into_boxed_slice(),
            reads: ReadSelector::new(vol.cfg.read_policy),
            async_legs: async_mask(&vol, snap.leg_count()),
            clock: TimeoutClock::new(vol.cfg.io_timeout, now),
            stats,
            stages,
            torn_down: false,
            vol,
        })
    }

    /// Tries to start a host command; false when it has to wait.
    #[inline]
    fn start(&mut self, cmd: IoCommand) -> bool {
        if cmd.op == IoOp::Read {
            self.start_read(cmd)
        } else {
            self.start_fanout(cmd)
        }
    }

    /// Whether every leg in `mask` has room for one more command from this core.
    #[inline]
    fn legs_have_room(&self, mask: u8) -> bool {
        (0..self.leg_count)
            .all(|leg| mask & (1 << leg) == 0 || self.inflight[leg] < self.leg_depth[leg])
    }

    /// Write, Write Zeroes, Deallocate and Flush: every in-sync leg and every leg being
    /// resynchronised, joined.
    #[inline]
    fn start_fanout(&mut self, cmd: IoCommand) -> bool {
        let mut snap = self.vol.states.snapshot();
        if snap.events() != self.seen_events {
            snap = self.refresh_legs();
        }
        let mut mask = snap.write_mask(self.leg_count) & self.open_legs();
        if snap.in_sync_mask(self.leg_count) & mask == 0 {
            self.push_ready(Completion {
                tag: cmd.tag,
                status: Status::NAMESPACE_NOT_READY,
            });
            return true;
        }
        if self.table.is_full() || !self.legs_have_room(mask) {
            bump(&self.stats.resource_waits, 1);
            return false;
        }
        let modifies = cmd.op.modifies();
        let span = if modifies {
            let span = self.vol.guard.span(cmd.slba, cmd.nlb);
            if !self.vol.guard.try_lock(span) {
                bump(&self.stats.overlap_waits, 1);
                return false;
            }
            // The leg states that count are the ones read under the guard: a resync copies a
            // region under the same locks, so this write either completes before the copy
            // reads its region or sees the leg being rebuilt (docs/resync.md).
            let now = self.vol.states.snapshot();
            if now != snap {
                snap = self.refresh_legs();
                mask = snap.write_mask(self.leg_count) & self.open_legs();
                let in_sync = snap.in_sync_mask(self.leg_count) & mask;
                if in_sync == 0 || !self.legs_have_room(mask) {
                    self.vol.guard.unlock(span);
                    if in_sync == 0 {
                        self.push_ready(Completion {
                            tag: cmd.tag,
                            status: Status::NAMESPACE_NOT_READY,
                        });
                        return true;
                    }
                    bump(&self.stats.resource_waits, 1);
                    return false;
                }
            }
            // Bitmap gate: the regions are durably marked before any leg has the write.
            if !self.intent_gate(&cmd) {
                self.vol.guard.unlock(span);
                return false;
            }
            if let Some(r) = self.stages.as_deref_mut() {
                if self.vol.bitmap.is_some() {
                    r.bitmap_passed();
                }
            }
            Some(span)
        } else {
            None
        };
        if modifies {
            // Legs out of sync miss this write: record it before any leg has it.
            let out = ((1u8 << self.leg_count) - 1) & !mask;
            for leg in 0..self.leg_count {
                if out & (1 << leg) != 0 {
                    self.vol.mark_missed(leg, &cmd);
                }
            }
        }
        let resyncing = mask & snap.resyncing_mask(self.leg_count);
        let slot = self
            .table
            .alloc(cmd, mask, snap.primary(), span, Instant::now());
        self.table.meta_mut(slot).resyncing = resyncing;
        if let Some(r) = self.stages.as_deref_mut() {
            r.start(slot);
        }
        self.send(slot, mask);
        true
    }

    /// Brings the leg queue pairs up to date with the state word: notes legs added since, and
    /// opens a queue pair on every leg that receives writes and has none on this core. A leg
    /// being resynchronised that cannot get one is faulted (it would miss this core's writes),
    /// as is an in-sync leg unless it is the last. Returns the snapshot it matched.
    #[cold]
    #[inline(never)]
    fn refresh_legs(&mut self) -> LegSnapshot {
        let mut snap = self.vol.states.snapshot();
        for _ in 0..=MAX_LEGS {
            self.leg_count = snap.leg_count();
            let mut faulted = false;
            for leg in 0..self.leg_count {
                let state = snap.state(leg);
                if self.legs[leg].is_some()
                    || !matches!(state, LegState::InSync | LegState::Resyncing)
                {
                    continue;
                }
                let Some(shared) = self.vol.leg(leg) else {
                    continue;
                };
                match shared.dev.open_qpair(self.depth) {
                    Ok(qp) => {
                        tracing::debug!(volume = %self.vol.name, leg, %state, "queue pair opened on a leg");
                        self.leg_depth[leg] = qp.depth();
                        self.legs[leg] = Some(qp);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.vol.name, leg, error = %e, "cannot open a queue pair");
                        faulted |= self.vol.fault_on_io(
                            leg,
                            None,
                            Status::HOST_PATHING_ERROR,
                            "opening a queue pair",
                        );
                    }
                }
            }
            self.seen_events = snap.events();
            self.async_legs = async_mask(&self.vol, self.leg_count);
            if !faulted {
                break;
            }
            snap = self.vol.states.snapshot();
        }
        snap
    }

    /// Read: one in-sync leg chosen by the read policy.
    #[inline]
    fn start_read(&mut self, cmd: IoCommand) -> bool {
        let snap = self.vol.states.snapshot();
        let mut candidates = snap.in_sync_mask(self.leg_count) & self.open_legs();
        if candidates & !self.async_legs != 0 {
            candidates &= !self.async_legs;
        }
        if candidates == 0 {
            self.push_ready(Completion {
                tag: cmd.tag,
                status: Status::NAMESPACE_NOT_READY,
            });
            return true;
        }
        if self.table.is_full() {
            bump(&self.stats.resource_waits, 1);
            return false;
        }
        let leg = self
            .reads
            .choose(candidates, snap.primary(), &self.inflight);
        if self.inflight[leg] >= self.leg_depth[leg] {
            bump(&self.stats.resource_waits, 1);
            return false;
        }
        let slot = self
            .table
            .alloc(cmd, 1 << leg, snap.primary(), None, Instant::now());
        if let Some(r) = self.stages.as_deref_mut() {
            r.start(slot);
        }
        self.send(slot, 1 << leg);
        true
    }

    /// Legs this queue pair has a queue pair on.
    #[inline]
    fn open_legs(&self) -> u8 {
        let mut mask = 0;
        for leg in 0..self.leg_count {
            if self.legs[leg].is_some() {
                mask |= 1 << leg;
            }
        }
        mask
    }

    /// Hands slot `slot`'s command to the legs in `mask`; legs that refuse are retried from
    /// the pending FIFO.
    #[inline]
    fn send(&mut self, slot: u32, mask: u8) {
        // One test per command picks the leg loop with or without the breakdown's stamps.
        if self.stages.is_some() {
            self.send_legs::<true>(slot, mask);
        } else {
            self.send_legs::<false>(slot, mask);
        }
    }

    /// [`send`](Self::send); `STAMP`: stamp each leg's submission for the breakdown.
    #[inline]
    fn send_legs<const STAMP: bool>(&mut self, slot: u32, mask: u8) {
        let meta = self.table.meta(slot);
        let generation = meta.generation;
        let mut cmd = IoCommand {
            tag: leg_tag(slot, generation),
            ..meta.cmd
        };
        if cmd.op != IoOp::Flush {
            cmd.slba += self.data_lba;
        }
        let mut refused = 0;
        for leg in 0..self.leg_count {
            if mask & (1 << leg) == 0 {
                continue;
            }
            let Some(qp) = self.legs[leg].as_mut() else {
                refused |= 1 << leg;
                continue;
            };
            if STAMP {
                if let Some(r) = self.stages.as_deref_mut() {
                    r.submit(slot, leg);
                }
            }
            // SAFETY: the host's promise for `cmd.buf` (our own `submit` contract) covers
            // the leg command: the host command completes only after every leg command has
            // completed or been abandoned, and an abandoned one keeps the buffer lent until it
            // is reaped or fenced (`timeout`, `lending`). One write buffer read by several legs
            // at once is allowed by the contract.
            match unsafe { qp.submit(cmd) } {
                Ok(()) => self.inflight[leg] += 1,
                Err(SubmitError::QueueFull) => refused |= 1 << leg,
            }
        }
        if refused != 0 {
            self.table.meta_mut(slot).unsent = refused;
            bump(&self.stats.resource_waits, 1);
            self.pending.push_back(Waiting::Resend(slot, generation));
        }
    }

    /// Whether `cmd`, a modifying command, must queue behind a waiting one: it overlaps a
    /// waiting modifying command (overlapping writes start in submission order, so a stream
    /// of new writes cannot starve a waiting one), or more commands wait than are worth
    /// scanning. Writes to other blocks go ahead of a waiting one: NVMe orders nothing
    /// between commands in flight, and one write held up by the overlap guard or the bitmap
    /// must not stall the rest of the queue.
    #[inline]
    fn behind_waiting(&self, cmd: &IoCommand) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        if self.pending.len() > WAIT_SCAN_MAX {
            return true;
        }
        self.pending.iter().any(|w| match w {
            Waiting::New(o) => o.op.modifies() && overlaps(blocks(o), blocks(cmd)),
            Waiting::Resend(..) => false,
        })
    }

    /// Retries every waiting command once, in order; those that still cannot go stay, in
    /// order. A modifying command that overlaps one still waiting ahead of it is not tried.
    fn retry_pending(&mut self) {
        let mut held = [(0u64, 0u64); WAIT_SCAN_MAX];
        let mut nheld = 0;
        for _ in 0..self.pending.len() {
            let Some(w) = self.pending.pop_front() else {
                break;
            };
            match w {
                Waiting::New(cmd) => {
                    let modifies = cmd.op.modifies();
                    let range = blocks(&cmd);
                    let blocked = modifies
                        && (nheld == held.len()
                            || held[..nheld].iter().any(|&h| overlaps(h, range)));
                    if let Some(r) = self.stages.as_deref_mut() {
                        r.retry();
                    }
                    if blocked || !self.start(cmd) {
                        if let Some(r) = self.stages.as_deref_mut() {
                            r.wait();
                        }
                        self.pending.push_back(w);
                        if modifies && nheld < held.len() {
                            held[nheld] = range;
                            nheld += 1;
                        }
                    }
                }
                Waiting::Resend(slot, generation) => {
                    let meta = self.table.meta(slot);
                    if meta.in_use && meta.generation == generation && meta.unsent != 0 {
                        let unsent = meta.unsent;
                        self.table.meta_mut(slot).unsent = 0;
                        self.send(slot, unsent);
                    }
                }
            }
        }
    }

    /// Reaps leg `leg`'s queue pair. `now` is read from the clock at the first completion of
    /// this poll and shared by the rest.
    #[inline]
    fn reap_leg(&mut self, leg: usize, now: &mut Option<Instant>) {
        loop {
            let Some(qp) = self.legs[leg].as_mut() else {
                return;
            };
            let n = qp.poll(&mut self.reaped);
            if n == 0 {
                return;
            }
            let at = *now.get_or_insert_with(Instant::now);
            // One test per batch picks the completion path with or without the breakdown.
            if let Some(r) = self.stages.as_deref_mut() {
                r.reap();
                for i in 0..n {
                    let cpl = self.reaped[i];
                    self.on_leg_completion::<true>(leg, cpl, at);
                }
            } else {
                for i in 0..n {
                    let cpl = self.reaped[i];
                    self.on_leg_completion::<false>(leg, cpl, at);
                }
            }
            if n < self.reaped.len() {
                return;
            }
        }
    }
}

impl QueuePair for VolumeQueuePair {
    fn buffer_lent(&self, tag: u64) -> bool {
        self.is_lent(tag)
    }

    fn poll_released(&mut self, out: &mut [u64]) -> usize {
        self.take_released(out)
    }

    /// Closes the leg queue pairs without blocking; see [`teardown`](Self::teardown).
    fn close(mut self: Box<Self>) -> Fence {
        self.teardown()
    }

    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.accepted
    }

    /// Range-checks `cmd` and starts it (or queues it to start at a later `poll`).
    ///
    /// # Safety
    /// As [`QueuePair::submit`]; the buffer goes to every leg the command is sent to.
    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        if self.accepted >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.accepted += 1;
        if self.vol.fence.is_fenced() {
            return self.refuse_fenced(cmd);
        }
        if let Err(status) = cmd.check(&self.geo) {
            self.push_ready(Completion {
                tag: cmd.tag,
                status,
            });
            return Ok(());
        }
        if let Some(r) = self.stages.as_deref_mut() {
            r.receive();
        }
        // A modifying command overlapping a waiting one queues behind it.
        let behind = cmd.op.modifies() && self.behind_waiting(&cmd);
        if behind || !self.start(cmd) {
            if behind {
                // Its regions join this poll's bitmap page writes now, not after the wait.
                self.intent_note(&cmd);
            }
            if let Some(r) = self.stages.as_deref_mut() {
                r.wait();
            }
            self.pending.push_back(Waiting::New(cmd));
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.intent.as_ref().is_some_and(IntentWriter::has_requests) {
            self.write_intent_pages();
        }
        if !self.pending.is_empty() {
            self.retry_pending();
        }
        let mut now = None;
        for leg in 0..self.leg_count {
            if self.inflight[leg] != 0 {
                self.reap_leg(leg, &mut now);
            }
        }
        self.check_timeouts(now);
        if self.intent.as_ref().is_some_and(IntentWriter::busy) {
            self.expire_meta_writes();
        }
        if !self.held.is_empty() {
            self.release_held();
        }
        let n = out.len().min(self.ready.len());
        for (slot, cpl) in out.iter_mut().zip(self.ready.drain(..n)) {
            *slot = cpl;
        }
        self.accepted -= n as u32;
        if let Some(r) = self.stages.as_deref_mut() {
            r.ack(n);
        }
        n
    }
}

impl Drop for VolumeQueuePair {
    /// As [`close`](QueuePair::close), for a caller that does not need the fence: one whose
    /// buffers outlive every back end's reaper (or that has no commands in flight).
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

impl VolumeQueuePair {
    /// Closes every leg queue pair without blocking and gives up this core's share of the
    /// ordering state. Returns a fence that is done once no leg command of this queue pair
    /// can touch a buffer or a leg any more; the host's buffers must stay allocated until then.
    ///
    /// A leg queue pair whose close fence is not done yet (commands left to a reaper) keeps
    /// its leg busy — every command still in it counts in the leg's `abandoned` — and keeps
    /// the overlap-guard entries and bitmap in-flight counts of the writes this core had in
    /// flight, until the fence is done: no command of this core can land behind a write the
    /// guard lets through, and the leg's resync waits for the reaper.
    fn teardown(&mut self) -> Fence {
        if self.torn_down {
            return Fence::done();
        }
        self.torn_down = true;
        let mut pending = Vec::new();
        for leg in 0..MAX_LEGS {
            let fence = self.legs[leg]
                .take()
                .map_or_else(Fence::done, |qp| qp.close());
            let abandoned = std::mem::take(&mut self.abandoned[leg]);
            let Some(l) = self.vol.leg(leg) else {
                continue;
            };
            if fence.is_done() {
                if abandoned > 0 {
                    l.abandoned.fetch_sub(abandoned, Ordering::Release);
                }
                continue;
            }
            // Every command still in that back end is abandoned now.
            let extra = self.inflight[leg].saturating_sub(abandoned);
            l.abandoned.fetch_add(extra, Ordering::Relaxed);
            let held = abandoned + extra;
            tracing::info!(volume = %self.vol.name, leg, commands = held, "leg queue pair closed with commands in its back end; the leg stays busy until they are reaped");
            let vol = Arc::clone(&self.vol);
            fence.then(move || {
                if let Some(l) = vol.leg(leg) {
                    l.abandoned.fetch_sub(held, Ordering::Release);
                }
            });
            pending.push(fence);
        }
        let mut ordering = Vec::new();
        for slot in 0..self.table.capacity() as u32 {
            let meta = *self.table.meta(slot);
            if meta.in_use {
                if let Some(span) = meta.span {
                    // A write cut off in flight may have reached some legs only: its regions
                    // stay marked until they are reconciled (a clean shutdown does it, or the
                    // next start).
                    if meta.cmd.op.modifies() {
                        self.vol.diverged.mark(meta.cmd.slba, meta.cmd.nlb);
                    }
                    ordering.push((span, meta.cmd));
                }
                self.table.release(slot);
            }
        }
        // Parked writes: their abandoned leg commands are fenced with the legs above.
        ordering.extend(
            std::mem::take(&mut self.parked)
                .into_iter()
                .map(|p| (p.span, p.cmd)),
        );
        self.drop_intent();
        self.publish_breakdown();
        self.vol.retire_core(&self.stats);
        let fence = Fence::all(pending);
        let vol = Arc::clone(&self.vol);
        // Bitmap page writes may be among the commands left in flight: their buffers go with
        // the fence.
        let pages = self.intent.take();
        fence.then(move || {
            drop(pages);
            for (span, cmd) in ordering {
                vol.guard.unlock(span);
                release_intent(&vol, &cmd);
            }
        });
        fence
    }

    /// Asks `leg`'s back end to cancel an abandoned command (tag `tag`).
    #[cold]
    pub(super) fn cancel_leg_command(&mut self, leg: usize, tag: u64) {
        if let Some(qp) = self.legs[leg].as_mut() {
            let issued = qp.cancel(&[tag]);
            tracing::debug!(volume = %self.vol.name, leg, issued, "cancel of an abandoned leg command");
        }
    }
}

impl VolumeQueuePair {
    /// A command sent to `leg` was abandoned (timed out): until it is reaped, the leg's resync
    /// waits.
    #[cold]
    pub(super) fn note_abandoned(&mut self, leg: usize) {
        self.abandoned[leg] += 1;
        if let Some(l) = self.vol.leg(leg) {
            l.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A late completion from `leg`: an abandoned command is reaped at last.
    #[cold]
    pub(super) fn note_late(&mut self, leg: usize) {
        if self.abandoned[leg] > 0 {
            self.abandoned[leg] -= 1;
            if let Some(l) = self.vol.leg(leg) {
                l.abandoned.fetch_sub(1, Ordering::Release);
            }
        }
    }
}
