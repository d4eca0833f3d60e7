//! The per-queue-pair stage recorder behind [`crate::breakdown`].
//!
//! A queue pair with the breakdown on holds a [`StageRecorder`]: per join slot the stamps of
//! the command in it, a FIFO of arrival stamps parallel to the `Waiting::New` entries of the
//! pending FIFO, and a FIFO of join stamps parallel to the host completion queue. Everything
//! is sized to the queue depth when the recorder is made; stamps are nanoseconds since the
//! recorder's epoch, plus one, so that 0 means "not stamped".
//!
//! Every hook in the queue pair is `if let Some(r) = self.stages.as_deref_mut()` (the leg
//! loops test it once and run a stamping or a plain variant): with the breakdown off, that
//! test of the queue pair's own field is all the path pays. The hooks are cold and never
//! inlined, so the off path also keeps its code size and layout.

use std::collections::VecDeque;
use std::time::Instant;

use nvmirror_nvme::Completion;

use super::VolumeQueuePair;
use crate::breakdown::{Breakdown, BreakdownConfig, PathKind};
use crate::join::JoinResult;
use crate::legs::MAX_LEGS;

/// The stamps of the command in one join slot.
#[derive(Clone, Copy, Debug, Default)]
struct SlotStamps {
    received: u64,
    /// 0 when the command passed no bitmap gate.
    bitmap: u64,
    submitted: [u64; MAX_LEGS],
    /// 0 until the leg's completion for the current send is reaped.
    completed: [u64; MAX_LEGS],
}

/// A host completion on its way out: what the ack stamp is measured against.
#[derive(Clone, Copy, Debug)]
struct Outgoing {
    /// 0: not recorded (an immediate error, a warm-up command, an abandoned leg).
    received: u64,
    joined: u64,
    kind: PathKind,
}

impl Outgoing {
    const NONE: Self = Self {
        received: 0,
        joined: 0,
        kind: PathKind::Read,
    };
}

/// One queue pair's stage stamps and histograms.
#[derive(Debug)]
pub(crate) struct StageRecorder {
    epoch: Instant,
    warmup_ns: u64,
    /// Commands received before this stamp are not recorded (set at the first command).
    record_from: Option<u64>,
    /// Arrival stamp of the command `start` is working on.
    arrival: u64,
    /// Bitmap stamp of the command `start` is working on (0: none).
    bitmap_at: u64,
    /// Stamp of the leg completions being reaped.
    reaped_at: u64,
    /// Arrival stamps of the `Waiting::New` entries of the pending FIFO, in the same order.
    waiting: VecDeque<u64>,
    slots: Box<[SlotStamps]>,
    /// One entry per host completion in the queue pair's completion queue, same order.
    outgoing: VecDeque<Outgoing>,
    data: Box<Breakdown>,
}

impl StageRecorder {
    pub(crate) fn new(cfg: BreakdownConfig, depth: u32) -> Self {
        let depth = depth as usize;
        Self {
            epoch: Instant::now(),
            warmup_ns: cfg.warmup.as_nanos().min(u128::from(u64::MAX / 2)) as u64,
            record_from: None,
            arrival: 0,
            bitmap_at: 0,
            reaped_at: 0,
            waiting: VecDeque::with_capacity(depth),
            slots: vec![SlotStamps::default(); depth].into_boxed_slice(),
            outgoing: VecDeque::with_capacity(depth),
            data: Box::new(Breakdown::new()),
        }
    }

    /// Now, in nanoseconds since the epoch, plus one (never 0).
    #[inline]
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// A host command was accepted by `submit`.
    #[cold]
    #[inline(never)]
    pub(super) fn receive(&mut self) {
        let now = self.now();
        self.record_from.get_or_insert(now + self.warmup_ns);
        self.arrival = now;
        self.bitmap_at = 0;
    }

    /// The command being started waits in the pending FIFO.
    #[cold]
    #[inline(never)]
    pub(super) fn wait(&mut self) {
        self.waiting.push_back(self.arrival);
    }

    /// The oldest waiting command is retried.
    #[cold]
    #[inline(never)]
    pub(super) fn retry(&mut self) {
        self.arrival = self.waiting.pop_front().unwrap_or(0);
        self.bitmap_at = 0;
    }

    /// The command being started passed the bitmap gate.
    #[cold]
    #[inline(never)]
    pub(super) fn bitmap_passed(&mut self) {
        self.bitmap_at = self.now();
    }

    /// The command being started took join slot `slot`.
    #[cold]
    #[inline(never)]
    pub(super) fn start(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.received = self.arrival;
            s.bitmap = self.bitmap_at;
            s.submitted = [0; MAX_LEGS];
            s.completed = [0; MAX_LEGS];
        }
    }

    /// Slot `slot`'s command is about to be handed to `leg`.
    #[cold]
    #[inline(never)]
    pub(super) fn submit(&mut self, slot: u32, leg: usize) {
        let now = self.now();
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.submitted[leg] = now;
            s.completed[leg] = 0;
        }
    }

    /// Leg completions were reaped: stamps them.
    #[cold]
    #[inline(never)]
    pub(super) fn reap(&mut self) {
        self.reaped_at = self.now();
    }

    /// `leg`'s completion for slot `slot` was reaped (at `reaped_at`).
    #[cold]
    #[inline(never)]
    pub(super) fn complete(&mut self, slot: u32, leg: usize) {
        let at = self.reaped_at;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.completed[leg] = at;
        }
    }

    /// A host completion that carries no stamps entered the completion queue.
    #[cold]
    #[inline(never)]
    pub(super) fn pass(&mut self) {
        self.outgoing.push_back(Outgoing::NONE);
    }

    /// Slot `slot`'s command is joined (every leg in `result.legs` is in; `last` closed it,
    /// `None` for a timeout) and its host completion entered the completion queue. Records
    /// every interval up to the join.
    #[cold]
    #[inline(never)]
    pub(super) fn join(
        &mut self,
        slot: u32,
        kind: PathKind,
        result: &JoinResult,
        last: Option<usize>,
    ) {
        let joined = self.now();
        let Some(s) = self.slots.get(slot as usize).copied() else {
            self.pass();
            return;
        };
        let recording = self.record_from.is_some_and(|from| s.received >= from);
        let Some(last) = last.filter(|_| recording && s.received != 0) else {
            if recording {
                self.data.abandoned += 1;
            }
            self.pass();
            return;
        };
        let legs = || (0..MAX_LEGS).filter(|l| result.legs & (1 << l) != 0);
        if legs().any(|l| s.completed[l] == 0 || s.submitted[l] == 0) {
            // A leg's completion never came in (abandoned): its stage has no end.
            self.data.abandoned += 1;
            self.pass();
            return;
        }
        let first_submit = legs().map(|l| s.submitted[l]).min().unwrap_or(0);
        let before_submit = if s.bitmap != 0 { s.bitmap } else { s.received };
        let ordered = s.received <= before_submit
            && before_submit <= first_submit
            && legs().all(|l| s.submitted[l] <= s.completed[l] && s.completed[l] <= joined)
            && s.completed[last] <= joined;
        if !ordered {
            self.data.out_of_order += 1;
            self.pass();
            return;
        }
        let p = self.data.path_mut(kind);
        if s.bitmap != 0 {
            p.received_to_bitmap
                .saturating_record(s.bitmap - s.received);
        }
        p.to_submit.saturating_record(first_submit - before_submit);
        for l in legs() {
            p.legs[l].saturating_record(s.completed[l] - s.submitted[l]);
        }
        p.last_leg_to_join
            .saturating_record(joined - s.completed[last]);
        if kind == PathKind::Write && result.legs.count_ones() >= 2 {
            let second = legs()
                .filter(|&l| l != last)
                .map(|l| s.completed[l])
                .max()
                .unwrap_or(s.completed[last]);
            self.data.last_gap[last].saturating_record(s.completed[last].saturating_sub(second));
        }
        self.outgoing.push_back(Outgoing {
            received: s.received,
            joined,
            kind,
        });
    }

    /// `n` host completions are handed out now.
    #[cold]
    #[inline(never)]
    pub(super) fn ack(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let acked = self.now();
        let n = n.min(self.outgoing.len());
        for o in self.outgoing.drain(..n) {
            if o.received == 0 {
                continue;
            }
            let p = self.data.path_mut(o.kind);
            p.join_to_ack
                .saturating_record(acked.saturating_sub(o.joined));
            p.total.saturating_record(acked.saturating_sub(o.received));
        }
    }

    /// What was recorded.
    pub(crate) fn into_breakdown(self) -> Breakdown {
        *self.data
    }

    /// Takes what was recorded so far, leaving empty histograms.
    pub(crate) fn take(&mut self) -> Breakdown {
        std::mem::take(&mut *self.data)
    }
}

impl VolumeQueuePair {
    /// Turns the latency breakdown on (or off, with `None`) for this queue pair from now on;
    /// what it recorded so far goes to the volume ([`Volume::take_breakdown`](crate::Volume::take_breakdown)).
    pub fn set_breakdown(&mut self, cfg: Option<BreakdownConfig>) {
        self.publish_breakdown();
        self.stages = cfg.map(|cfg| Box::new(StageRecorder::new(cfg, self.depth)));
    }

    /// What this queue pair's breakdown recorded so far (its histograms start over); `None`
    /// when the breakdown is off.
    pub fn take_breakdown(&mut self) -> Option<Breakdown> {
        self.stages.as_deref_mut().map(StageRecorder::take)
    }

    /// Hands what the breakdown recorded to the volume, and turns it off.
    pub(super) fn publish_breakdown(&mut self) {
        if let Some(r) = self.stages.take() {
            self.vol.add_breakdown(r.into_breakdown());
        }
    }

    /// Queues a host completion that was not joined (an immediate error).
    #[inline]
    pub(super) fn push_ready(&mut self, cpl: Completion) {
        self.ready.push_back(cpl);
        if let Some(r) = self.stages.as_deref_mut() {
            r.pass();
        }
    }

    /// A host command on a fenced volume: Reservation Conflict, nothing sent to a leg.
    #[cold]
    pub(super) fn refuse_fenced(
        &mut self,
        cmd: nvmirror_nvme::IoCommand,
    ) -> std::result::Result<(), nvmirror_nvme::SubmitError> {
        self.push_ready(Completion {
            tag: cmd.tag,
            status: crate::fencing::FENCED_STATUS,
        });
        Ok(())
    }
}
