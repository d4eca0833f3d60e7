//! Per-stage latency breakdown of a volume's I/O path (off by default).
//!
//! With [`Volume::set_breakdown`](crate::Volume::set_breakdown) on, each queue pair opened
//! afterwards stamps every host command at each stage of its path (where exactly is in
//! `docs/mirror.md`, "Latency breakdown"):
//!
//! ```text
//! received ─► bitmap checked (persistent volumes, writes) ─► submitted to leg i ─►
//! leg i completed (seen by the volume's poll) ─► joined (last leg in) ─► acked (handed out)
//! ```
//!
//! and records the intervals between consecutive stages into preallocated histograms
//! ([`Breakdown`]). For mirrored writes it also records which leg completed last and by how
//! much it trailed the second-to-last one. The recording takes no lock and allocates nothing
//! per command; a queue pair hands its histograms to the volume when it is dropped (or through
//! [`VolumeQueuePair::take_breakdown`](crate::VolumeQueuePair::take_breakdown)), and
//! [`Volume::take_breakdown`](crate::Volume::take_breakdown) returns them merged.
//!
//! Off, the path pays one test of a field of the queue pair per command at receive, start,
//! send and join, and one per reaped batch and per `poll`: no clock read, no store.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::legs::MAX_LEGS;

/// Highest interval the histograms resolve (one hour); longer ones are recorded as this.
pub const BREAKDOWN_MAX_NS: u64 = 3_600_000_000_000;
/// Significant decimal digits the histograms keep (1 % resolution, ~37 KiB a histogram).
pub const BREAKDOWN_SIGFIG: u8 = 2;

/// How a queue pair records its breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakdownConfig {
    /// Commands received less than this long after the queue pair's first command are not
    /// recorded (a load generator's ramp time).
    pub warmup: Duration,
}

/// The two kinds of command path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Reads: one leg.
    Read,
    /// Write, Write Zeroes, Deallocate and Flush: fanned out to every in-sync leg.
    Write,
}

impl PathKind {
    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// One stage-to-stage interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interval {
    /// Received → bitmap checked (persistent volumes; includes waits for the overlap guard, a
    /// join slot and the bitmap page write of a first touch).
    ReceivedToBitmap,
    /// Received (or bitmap checked, when there is a bitmap) → submitted to the first leg.
    ToSubmit,
    /// Submitted to leg `i` → leg `i` completed.
    Leg(usize),
    /// Last leg completed → joined.
    LastLegToJoin,
    /// Joined → acked.
    JoinToAck,
    /// Received → acked, the whole path.
    Total,
}

impl Interval {
    /// A short label (`received→bitmap`, `submit→leg1`, …).
    pub fn label(self, bitmap: bool) -> String {
        match self {
            Self::ReceivedToBitmap => "received→bitmap".into(),
            Self::ToSubmit if bitmap => "bitmap→submit".into(),
            Self::ToSubmit => "received→submit".into(),
            Self::Leg(i) => format!("submit→leg{i}"),
            Self::LastLegToJoin => "last leg→joined".into(),
            Self::JoinToAck => "joined→acked".into(),
            Self::Total => "received→acked".into(),
        }
    }
}

/// p50/p99/p99.9/max and count of one histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalSummary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl IntervalSummary {
    /// The summary of `h` (all zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The intervals of one path kind.
#[derive(Clone, Debug)]
pub(crate) struct PathHistograms {
    pub(crate) received_to_bitmap: Histogram<u64>,
    pub(crate) to_submit: Histogram<u64>,
    pub(crate) legs: [Histogram<u64>; MAX_LEGS],
    pub(crate) last_leg_to_join: Histogram<u64>,
    pub(crate) join_to_ack: Histogram<u64>,
    pub(crate) total: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, BREAKDOWN_MAX_NS, BREAKDOWN_SIGFIG)
        .expect("constant histogram bounds are valid")
}

fn add(a: &mut Histogram<u64>, b: &Histogram<u64>) {
    // Same bounds on both sides: adding never needs to grow, so it cannot fail.
    let _ = a.add(b);
}

impl PathHistograms {
    fn new() -> Self {
        Self {
            received_to_bitmap: histogram(),
            to_submit: histogram(),
            legs: std::array::from_fn(|_| histogram()),
            last_leg_to_join: histogram(),
            join_to_ack: histogram(),
            total: histogram(),
        }
    }

    fn get(&self, i: Interval) -> Option<&Histogram<u64>> {
        Some(match i {
            Interval::ReceivedToBitmap => &self.received_to_bitmap,
            Interval::ToSubmit => &self.to_submit,
            Interval::Leg(leg) => self.legs.get(leg)?,
            Interval::LastLegToJoin => &self.last_leg_to_join,
            Interval::JoinToAck => &self.join_to_ack,
            Interval::Total => &self.total,
        })
    }

    fn merge(&mut self, o: &Self) {
        add(&mut self.received_to_bitmap, &o.received_to_bitmap);
        add(&mut self.to_submit, &o.to_submit);
        for (a, b) in self.legs.iter_mut().zip(&o.legs) {
            add(a, b);
        }
        add(&mut self.last_leg_to_join, &o.last_leg_to_join);
        add(&mut self.join_to_ack, &o.join_to_ack);
        add(&mut self.total, &o.total);
    }
}

/// Which leg a mirrored write waited for, and for how long.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastLeg {
    pub leg: usize,
    /// Mirrored writes this leg completed last.
    pub count: u64,
    /// `count` over every mirrored write recorded.
    pub share: f64,
    /// Its completion minus the second-to-last leg's, over those writes.
    pub gap: IntervalSummary,
}

/// The recorded breakdown of one or more queue pairs.
#[derive(Clone, Debug)]
pub struct Breakdown {
    pub(crate) read: PathHistograms,
    pub(crate) write: PathHistograms,
    /// Per leg: gap behind the second-to-last leg, for mirrored writes it completed last.
    pub(crate) last_gap: [Histogram<u64>; MAX_LEGS],
    /// Commands whose stamps were not in stage order (never expected; not recorded).
    pub(crate) out_of_order: u64,
    /// Commands not recorded because a leg was abandoned after the I/O timeout.
    pub(crate) abandoned: u64,
}

impl Default for Breakdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Breakdown {
    /// An empty breakdown (allocates every histogram once).
    pub fn new() -> Self {
        Self {
            read: PathHistograms::new(),
            write: PathHistograms::new(),
            last_gap: std::array::from_fn(|_| histogram()),
            out_of_order: 0,
            abandoned: 0,
        }
    }

    pub(crate) fn path_mut(&mut self, kind: PathKind) -> &mut PathHistograms {
        match kind {
            PathKind::Read => &mut self.read,
            PathKind::Write => &mut self.write,
        }
    }

    fn path(&self, kind: PathKind) -> &PathHistograms {
        match kind {
            PathKind::Read => &self.read,
            PathKind::Write => &self.write,
        }
    }

    /// Adds another breakdown's samples.
    pub fn merge(&mut self, other: &Breakdown) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        for (a, b) in self.last_gap.iter_mut().zip(&other.last_gap) {
            add(a, b);
        }
        self.out_of_order += other.out_of_order;
        self.abandoned += other.abandoned;
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.read.total.is_empty() && self.write.total.is_empty()
    }

    /// The histogram of one interval, in nanoseconds (`None` for a leg index out of range).
    pub fn histogram(&self, kind: PathKind, interval: Interval) -> Option<&Histogram<u64>> {
        self.path(kind).get(interval)
    }

    /// Summary of one interval.
    pub fn summary(&self, kind: PathKind, interval: Interval) -> IntervalSummary {
        self.histogram(kind, interval)
            .map_or_else(IntervalSummary::default, IntervalSummary::of)
    }

    /// The intervals of `kind` that have samples, in path order.
    pub fn intervals(&self, kind: PathKind) -> Vec<(Interval, IntervalSummary)> {
        let mut order = vec![Interval::ReceivedToBitmap, Interval::ToSubmit];
        order.extend((0..MAX_LEGS).map(Interval::Leg));
        order.extend([
            Interval::LastLegToJoin,
            Interval::JoinToAck,
            Interval::Total,
        ]);
        order
            .into_iter()
            .map(|i| (i, self.summary(kind, i)))
            .filter(|(_, s)| s.count > 0)
            .collect()
    }

    /// Whether writes went through a bitmap (the received→bitmap interval has samples).
    pub fn has_bitmap_stage(&self) -> bool {
        !self.write.received_to_bitmap.is_empty()
    }

    /// For mirrored writes: each leg that completed last at least once.
    pub fn last_legs(&self) -> Vec<LastLeg> {
        let total: u64 = self.last_gap.iter().map(Histogram::len).sum();
        self.last_gap
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(leg, h)| LastLeg {
                leg,
                count: h.len(),
                share: h.len() as f64 / total as f64,
                gap: IntervalSummary::of(h),
            })
            .collect()
    }

    /// Per leg: the last-minus-second-to-last gap of mirrored writes it completed last.
    pub fn last_leg_gap(&self, leg: usize) -> Option<&Histogram<u64>> {
        self.last_gap.get(leg)
    }

    /// Commands whose stage stamps were out of order (a bug if ever non-zero; such commands
    /// are not recorded).
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// Commands not recorded because a leg command was abandoned after the I/O timeout.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }
}
