//! Per-leg statistics without locks.
//!
//! Every volume queue pair (one per core) owns a [`CoreStats`] block of relaxed atomics that
//! only it writes — with a plain load and store, no locked instruction — and registers it with
//! the volume; [`Volume::stats`](crate::Volume::stats) sums the blocks. A closed queue pair's
//! block is folded into the volume's first block (the retired counters) and dropped, so hosts
//! that connect and disconnect all day do not grow the list. Latencies go into a
//! fixed log-bucketed histogram (8 buckets per power of two, so a reported quantile is within
//! 12.5 % of the true value); nothing on the I/O path allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::legs::MAX_LEGS;

/// Sub-buckets per power of two (log2).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Latencies are clamped below 2^40 ns (18 minutes).
const MAX_EXP: u32 = 40;
/// Number of histogram buckets.
pub(crate) const BUCKETS: usize = (MAX_EXP - SUB_BITS + 1) as usize * SUB as usize;

/// The histogram bucket of a latency in nanoseconds.
#[inline]
pub(crate) fn bucket_of(ns: u64) -> usize {
    let ns = ns.min((1 << MAX_EXP) - 1);
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// `[low, high]` nanoseconds of a bucket.
pub(crate) fn bucket_bounds(bucket: usize) -> (u64, u64) {
    let b = bucket as u64;
    if b < SUB {
        return (b, b);
    }
    let exp = (b / SUB) as u32 + SUB_BITS - 1;
    let sub = b % SUB;
    let low = (SUB + sub) << (exp - SUB_BITS);
    (low, low + (1 << (exp - SUB_BITS)) - 1)
}

/// Adds `n` to a counter that only the calling core writes.
#[inline]
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// One leg's counters on one core.
#[derive(Debug)]
pub(crate) struct LegCounters {
    pub(crate) ops: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) late_completions: AtomicU64,
    pub(crate) completed_last: AtomicU64,
    latency: LatencyCounters,
}

/// A latency histogram one core writes: fixed log buckets and the exact sum, so a scrape can
/// report Prometheus `_bucket`, `_sum` and `_count` without the I/O path doing more than two
/// plain stores.
#[derive(Debug)]
pub(crate) struct LatencyCounters {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyCounters {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one sample; only the owning core calls this.
    #[inline]
    pub(crate) fn record(&self, ns: u64) {
        bump(&self.buckets[bucket_of(ns)], 1);
        bump(&self.sum_ns, ns);
    }

    /// Adds `other` to this block (the caller is this block's only writer).
    fn absorb(&self, other: &LatencyCounters) {
        for (t, f) in self.buckets.iter().zip(other.buckets.iter()) {
            bump(t, f.load(Ordering::Relaxed));
        }
        bump(&self.sum_ns, other.sum_ns.load(Ordering::Relaxed));
    }

    /// Adds this block to a scrape-time total.
    fn add_to(&self, out: &mut LatencyHistogram) {
        if out.buckets.len() != BUCKETS {
            out.buckets = vec![0; BUCKETS];
        }
        for (sum, b) in out.buckets.iter_mut().zip(self.buckets.iter()) {
            *sum += b.load(Ordering::Relaxed);
        }
        out.sum_ns = out.sum_ns.wrapping_add(self.sum_ns.load(Ordering::Relaxed));
    }
}

/// A latency histogram summed over every core at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Samples per fixed log bucket (empty with no cores).
    buckets: Vec<u64>,
    /// Exact sum of every sample, in nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Samples certainly no longer than `ns`: those whose bucket lies wholly at or below it.
    /// A bucket is at most 1/8 as wide as its lower bound, so a sample is placed at most
    /// 12.5 % above its true latency, never below.
    pub fn at_most(&self, ns: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|(b, _)| bucket_bounds(*b).1 <= ns)
            .map(|(_, n)| n)
            .sum()
    }

    /// Cumulative counts at each upper bound in `bounds_ns` (ascending): Prometheus buckets.
    pub fn cumulative(&self, bounds_ns: &[u64]) -> Vec<u64> {
        bounds_ns.iter().map(|&le| self.at_most(le)).collect()
    }

    /// p50, p99 and max.
    pub fn summary(&self) -> LatencySummary {
        summarize(&self.buckets)
    }
}

impl LegCounters {
    fn new() -> Self {
        Self {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            late_completions: AtomicU64::new(0),
            completed_last: AtomicU64::new(0),
            latency: LatencyCounters::new(),
        }
    }

    /// Records one completed leg command.
    #[inline]
    pub(crate) fn record(&self, bytes: u64, latency_ns: u64, failed: bool) {
        bump(&self.ops, 1);
        bump(&self.bytes, bytes);
        if failed {
            bump(&self.errors, 1);
        }
        self.latency.record(latency_ns);
    }
}

/// The counters one core keeps for a volume.
#[derive(Debug)]
pub(crate) struct CoreStats {
    pub(crate) legs: [LegCounters; MAX_LEGS],
    /// Host-visible latency: submission to the join (the last leg in) of each command.
    pub(crate) host_latency: LatencyCounters,
    /// Start attempts that found the overlap guard held.
    pub(crate) overlap_waits: AtomicU64,
    /// Start attempts that found no free join slot or a full leg queue.
    pub(crate) resource_waits: AtomicU64,
    /// Reads retried on another leg.
    pub(crate) read_retries: AtomicU64,
    /// Writes started through the bitmap gate.
    pub(crate) bitmap_writes: AtomicU64,
    /// Writes that marked a region not marked before (a first touch).
    pub(crate) bitmap_first_touches: AtomicU64,
    /// Start attempts that waited for a bitmap page to be written.
    pub(crate) bitmap_waits: AtomicU64,
    /// Bitmap pages written (one per page write, whatever the number of legs).
    pub(crate) metadata_writes: AtomicU64,
    /// Regions marked ahead of a sequential stream.
    pub(crate) predicted_regions: AtomicU64,
}

impl CoreStats {
    pub(crate) fn new() -> Self {
        Self {
            legs: std::array::from_fn(|_| LegCounters::new()),
            host_latency: LatencyCounters::new(),
            overlap_waits: AtomicU64::new(0),
            resource_waits: AtomicU64::new(0),
            read_retries: AtomicU64::new(0),
            bitmap_writes: AtomicU64::new(0),
            bitmap_first_touches: AtomicU64::new(0),
            bitmap_waits: AtomicU64::new(0),
            metadata_writes: AtomicU64::new(0),
            predicted_regions: AtomicU64::new(0),
        }
    }
}

impl CoreStats {
    /// Adds every counter of `other` to this block. The caller is this block's only writer
    /// (the volume's retired-counters block, written under the volume's core list lock).
    pub(crate) fn absorb(&self, other: &CoreStats) {
        let add = |to: &AtomicU64, from: &AtomicU64| bump(to, from.load(Ordering::Relaxed));
        for (to, from) in self.legs.iter().zip(other.legs.iter()) {
            add(&to.ops, &from.ops);
            add(&to.bytes, &from.bytes);
            add(&to.errors, &from.errors);
            add(&to.timeouts, &from.timeouts);
            add(&to.late_completions, &from.late_completions);
            add(&to.completed_last, &from.completed_last);
            to.latency.absorb(&from.latency);
        }
        self.host_latency.absorb(&other.host_latency);
        add(&self.overlap_waits, &other.overlap_waits);
        add(&self.resource_waits, &other.resource_waits);
        add(&self.read_retries, &other.read_retries);
        add(&self.bitmap_writes, &other.bitmap_writes);
        add(&self.bitmap_first_touches, &other.bitmap_first_touches);
        add(&self.bitmap_waits, &other.bitmap_waits);
        add(&self.metadata_writes, &other.metadata_writes);
        add(&self.predicted_regions, &other.predicted_regions);
    }

    /// Adds this core's latency histogram of the legs in `mask` to `out` (`BUCKETS` long).
    pub(crate) fn add_latency(&self, mask: u8, out: &mut [u64]) {
        for (leg, c) in self.legs.iter().enumerate() {
            if mask & (1 << leg) == 0 {
                continue;
            }
            for (sum, b) in out.iter_mut().zip(c.latency.buckets.iter()) {
                *sum += b.load(Ordering::Relaxed);
            }
        }
    }
}

/// A latency distribution summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// One leg's statistics, summed over every core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegStats {
    pub name: String,
    /// Commands completed by the leg (late completions excluded).
    pub ops: u64,
    pub bytes: u64,
    /// Commands the leg completed with an error status.
    pub errors: u64,
    /// Commands abandoned after the I/O timeout.
    pub timeouts: u64,
    /// Completions that arrived after their command was abandoned, and were ignored.
    pub late_completions: u64,
    /// Mirrored writes for which this leg was the last to complete.
    pub completed_last: u64,
    /// Completion latency of the leg's commands, from host submission.
    pub latency: LatencySummary,
    /// The same latencies as a histogram (for Prometheus).
    pub latency_histogram: LatencyHistogram,
}

/// A volume's statistics, summed over every core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub legs: Vec<LegStats>,
    /// Host-visible latency of the volume's commands: submission to the last leg's
    /// completion (commands closed by a timeout are not counted).
    pub latency: LatencyHistogram,
    /// Start attempts that found the overlap guard held (a waiting command counts once per
    /// retry).
    pub overlap_waits: u64,
    /// Start attempts that found no free join slot or a full leg queue.
    pub resource_waits: u64,
    /// Reads retried on another leg after a failure or timeout.
    pub read_retries: u64,
    /// Persistent volumes: modifying commands started (each once, however often it waited).
    pub bitmap_writes: u64,
    /// Persistent volumes: writes whose regions were all marked already (`bitmap_writes`
    /// less `bitmap_first_touches`): they cost no metadata I/O of their own.
    pub bitmap_hits: u64,
    /// Persistent volumes: writes that marked a region not marked before.
    pub bitmap_first_touches: u64,
    /// Persistent volumes: start attempts that waited for a bitmap page write (a waiting
    /// command counts once per retry).
    pub bitmap_waits: u64,
    /// Persistent volumes: bitmap pages written by the write path (one per page, whatever
    /// the number of legs).
    pub metadata_writes: u64,
    /// Persistent volumes: regions marked ahead of sequential streams.
    pub predicted_regions: u64,
    /// Volume queue pairs open now (one per connected host queue and core).
    pub queue_pairs: usize,
}

impl VolumeStats {
    /// Fraction of writes that did not mark a new region (1.0 with no writes).
    pub fn bitmap_hit_rate(&self) -> f64 {
        if self.bitmap_writes == 0 {
            return 1.0;
        }
        self.bitmap_hits as f64 / self.bitmap_writes as f64
    }
}

impl VolumeStats {
    /// Sums the per-core blocks for legs named `names`.
    pub(crate) fn collect(names: &[&str], cores: &[std::sync::Arc<CoreStats>]) -> Self {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut stats = Self::default();
        for (leg, name) in names.iter().enumerate() {
            let mut hist = LatencyHistogram::default();
            let mut s = LegStats {
                name: (*name).to_string(),
                ..LegStats::default()
            };
            for core in cores {
                let c = &core.legs[leg];
                s.ops += load(&c.ops);
                s.bytes += load(&c.bytes);
                s.errors += load(&c.errors);
                s.timeouts += load(&c.timeouts);
                s.late_completions += load(&c.late_completions);
                s.completed_last += load(&c.completed_last);
                c.latency.add_to(&mut hist);
            }
            s.latency = hist.summary();
            s.latency_histogram = hist;
            stats.legs.push(s);
        }
        for core in cores {
            core.host_latency.add_to(&mut stats.latency);
            stats.overlap_waits += load(&core.overlap_waits);
            stats.resource_waits += load(&core.resource_waits);
            stats.read_retries += load(&core.read_retries);
            stats.bitmap_writes += load(&core.bitmap_writes);
            stats.bitmap_first_touches += load(&core.bitmap_first_touches);
            stats.bitmap_waits += load(&core.bitmap_waits);
            stats.metadata_writes += load(&core.metadata_writes);
            stats.predicted_regions += load(&core.predicted_regions);
        }
        stats.queue_pairs = cores.len().saturating_sub(1);
        stats.bitmap_hits = stats
            .bitmap_writes
            .saturating_sub(stats.bitmap_first_touches);
        stats
    }
}

/// p50, p99 and max of a bucket histogram (each the midpoint of its bucket).
pub(crate) fn summarize(hist: &[u64]) -> LatencySummary {
    let count: u64 = hist.iter().sum();
    if count == 0 {
        return LatencySummary::default();
    }
    let mid = |b: usize| {
        let (lo, hi) = bucket_bounds(b);
        Duration::from_nanos(lo + (hi - lo) / 2)
    };
    let quantile = |q: f64| {
        let rank = ((count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return mid(b);
            }
        }
        Duration::ZERO
    };
    let max = hist
        .iter()
        .rposition(|&n| n > 0)
        .map_or(Duration::ZERO, mid);
    LatencySummary {
        count,
        p50: quantile(0.50),
        p99: quantile(0.99),
        max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_within_an_eighth() {
        let mut prev_high = None;
        for b in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(b);
            assert!(lo <= hi);
            if let Some(p) = prev_high {
                assert_eq!(lo, p + 1, "bucket {b} starts where {} ended", b - 1);
            }
            prev_high = Some(hi);
            assert_eq!(bucket_of(lo), b);
            assert_eq!(bucket_of(hi), b);
            assert!((hi - lo) * 8 <= lo.max(1), "bucket {b} is at most 1/8 wide");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_come_from_the_right_buckets() {
        let c = LegCounters::new();
        for _ in 0..98 {
            c.record(4096, 10_000, false);
        }
        c.record(4096, 1_000_000, true);
        c.record(4096, 5_000_000, false);
        let hist: Vec<u64> = c
            .latency
            .buckets
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let s = summarize(&hist);
        assert_eq!(s.count, 100);
        let near = |d: Duration, ns: u64| (d.as_nanos() as f64 / ns as f64 - 1.0).abs() < 0.07;
        assert!(near(s.p50, 10_000), "{:?}", s.p50);
        assert!(near(s.p99, 1_000_000), "{:?}", s.p99);
        assert!(near(s.max, 5_000_000), "{:?}", s.max);
        assert_eq!(c.errors.load(Ordering::Relaxed), 1);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 409_600);
    }

    #[test]
    fn histogram_buckets_are_cumulative_sum_exact_and_never_undercount() {
        let core = CoreStats::new();
        let lat = [3_000u64, 40_000, 90_000, 2_000_000];
        for ns in lat {
            core.legs[1].record(512, ns, false);
        }
        let retired = CoreStats::new();
        retired.absorb(&core);
        let stats = VolumeStats::collect(&["a", "b"], &[std::sync::Arc::new(retired)]);
        let h = &stats.legs[1].latency_histogram;
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_ns, lat.iter().sum::<u64>());
        let bounds = [1_000, 50_000, 100_000, 1_000_000, 10_000_000];
        let cum = h.cumulative(&bounds);
        assert_eq!(cum, vec![0, 2, 3, 3, 4]);
        // A bound inside a bucket counts that bucket's samples above it (conservative).
        assert_eq!(h.at_most(40_000), 1);
        assert_eq!(h.at_most(u64::MAX), 4);
        assert_eq!(stats.legs[0].latency_histogram.count(), 0);
        assert_eq!(stats.latency.count(), 0, "no joins were recorded");
    }
}
