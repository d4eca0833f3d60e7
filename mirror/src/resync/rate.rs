//! Pacing a job: a bandwidth cap (token bucket) and an adaptive controller that watches host
//! latency.
//!
//! The adaptive controller reads the volume's per-core latency histograms (every leg command a
//! host queue pair completed) every `sample_interval` and takes the p99 of that interval.
//! Before the job starts, the p99 of everything recorded so far is the baseline; on a volume
//! with no history the first busy interval is (measured with a single window in flight). While
//! the interval p99 is above `latency_factor × baseline` the job backs off — half as many
//! windows, then a growing pause between windows — and while it is below 80 % of that, or the
//! host is idle, it speeds up again: shorter pauses, then one more window at a time.

use std::time::{Duration, Instant};

use crate::stats::{summarize, BUCKETS};
use crate::volume::VolumeShared;

/// Fewer leg completions than this in an interval means the host is idle.
const IDLE_SAMPLES: u64 = 16;
/// Pause between windows when one window is still too much.
const MIN_GAP: Duration = Duration::from_micros(200);
const MAX_GAP: Duration = Duration::from_millis(50);

/// Admits a window when enough bytes have accrued at the capped rate.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            tokens: 0.0,
            last: now,
        }
    }

    /// Whether `bytes` may go now at `rate` bytes per second (0: no cap). The bucket holds
    /// 50 ms of rate or one window, whichever is more.
    pub(crate) fn admit(&mut self, now: Instant, rate: u64, bytes: u64) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if rate == 0 {
            self.tokens = 0.0;
            return true;
        }
        let burst = (rate as f64 / 20.0).max(bytes as f64);
        self.tokens = (self.tokens + dt * rate as f64).min(burst);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// The adaptive pace: how many windows may be in flight and how long to wait between them.
#[derive(Debug)]
pub(crate) struct Pace {
    max_windows: u32,
    limit: u32,
    gap: Duration,
    next_start: Instant,
    factor: f64,
    interval: Duration,
    next_sample: Instant,
    baseline_ns: Option<u64>,
    last_hist: Vec<u64>,
}

impl Pace {
    /// A pace for up to `max_windows` windows; the baseline is the p99 recorded so far.
    pub(crate) fn new(
        vol: &VolumeShared,
        max_windows: u32,
        factor: f64,
        interval: Duration,
        now: Instant,
    ) -> Self {
        let last_hist = host_histogram(vol);
        let baseline_ns = (last_hist.iter().sum::<u64>() >= 64)
            .then(|| summarize(&last_hist).p99.as_nanos() as u64)
            .filter(|&ns| ns > 0);
        Self {
            max_windows,
            limit: max_windows,
            gap: Duration::ZERO,
            next_start: now,
            factor,
            interval,
            next_sample: now + interval,
            baseline_ns,
            last_hist,
        }
    }

    /// Windows allowed in flight now.
    pub(crate) fn limit(&self, adaptive: bool) -> u32 {
        if adaptive {
            self.limit
        } else {
            self.max_windows
        }
    }

    pub(crate) fn baseline(&self) -> Option<Duration> {
        self.baseline_ns.map(Duration::from_nanos)
    }

    /// Whether a window may start now (the pause since the last one is over).
    pub(crate) fn may_start(&self, now: Instant, adaptive: bool) -> bool {
        !adaptive || now >= self.next_start
    }

    /// Whether another window may open now, with `active` windows in flight: below the
    /// limit, and the pause since the last one is over.
    pub(crate) fn may_open(&self, now: Instant, adaptive: bool, active: usize) -> bool {
        active < self.limit(adaptive) as usize && self.may_start(now, adaptive)
    }

    /// A window started at `now`.
    pub(crate) fn started(&mut self, now: Instant) {
        self.next_start = now + self.gap;
    }

    /// Looks at host latency when an interval has passed.
    pub(crate) fn sample(&mut self, vol: &VolumeShared, now: Instant, adaptive: bool) {
        if now < self.next_sample {
            return;
        }
        self.next_sample = now + self.interval;
        let hist = host_histogram(vol);
        let delta: Vec<u64> = hist
            .iter()
            .zip(&self.last_hist)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        self.last_hist = hist;
        if adaptive {
            self.adjust(&delta);
        }
    }

    /// Adapts the pace to one interval's latency histogram.
    fn adjust(&mut self, delta: &[u64]) {
        let samples: u64 = delta.iter().sum();
        if samples < IDLE_SAMPLES {
            // An idle host: go at full speed.
            self.limit = self.max_windows;
            self.gap = Duration::ZERO;
            return;
        }
        let p99 = summarize(delta).p99.as_nanos() as u64;
        let Some(baseline) = self.baseline_ns else {
            // No history before the job: this interval (host now busy) is the baseline,
            // and the job restarts from one window.
            self.baseline_ns = Some(p99.max(1));
            self.limit = 1;
            return;
        };
        let high = baseline as f64 * self.factor;
        if p99 as f64 > high {
            if self.limit > 1 {
                self.limit /= 2;
            } else {
                self.gap = (self.gap * 2).clamp(MIN_GAP, MAX_GAP);
            }
        } else if (p99 as f64) < high * 0.8 {
            if self.gap > Duration::ZERO {
                self.gap /= 2;
                if self.gap < MIN_GAP {
                    self.gap = Duration::ZERO;
                }
            } else {
                self.limit = (self.limit + 1).min(self.max_windows);
            }
        }
    }
}

/// Latency histogram of every leg command completed by the host queue pairs so far.
fn host_histogram(vol: &VolumeShared) -> Vec<u64> {
    let mut hist = vec![0u64; BUCKETS];
    let cores = vol.cores.lock().unwrap_or_else(|e| e.into_inner());
    for core in cores.iter() {
        core.add_latency(0xff, &mut hist);
    }
    hist
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::bucket_of;

    /// An interval of `n` completions at `us` microseconds each.
    fn interval(n: u64, us: u64) -> Vec<u64> {
        let mut h = vec![0; BUCKETS];
        h[bucket_of(us * 1000)] = n;
        h
    }

    fn pace(baseline_us: Option<u64>) -> Pace {
        let now = Instant::now();
        Pace {
            max_windows: 8,
            limit: 8,
            gap: Duration::ZERO,
            next_start: now,
            factor: 2.0,
            interval: Duration::from_millis(20),
            next_sample: now,
            baseline_ns: baseline_us.map(|us| us * 1000),
            last_hist: vec![0; BUCKETS],
        }
    }

    #[test]
    fn slow_host_io_backs_off_and_fast_or_idle_host_io_speeds_up() {
        let mut p = pace(Some(100));
        p.adjust(&interval(1000, 150)); // within 2x: no change
        assert_eq!((p.limit(true), p.gap), (8, Duration::ZERO));
        for want in [4, 2, 1] {
            p.adjust(&interval(1000, 500));
            assert_eq!(p.limit(true), want);
        }
        assert_eq!(
            p.limit(false),
            8,
            "without adaptation the limit is the maximum"
        );
        p.adjust(&interval(1000, 500));
        assert_eq!(
            p.gap, MIN_GAP,
            "one window is still too much: pause between windows"
        );
        p.adjust(&interval(1000, 500));
        assert_eq!(p.gap, MIN_GAP * 2);
        let now = Instant::now();
        p.started(now);
        assert!(!p.may_start(now, true) && p.may_start(now, false));
        // Latency back under the threshold: shorter pauses first, then more windows.
        p.adjust(&interval(1000, 100));
        assert_eq!(p.gap, MIN_GAP);
        p.adjust(&interval(1000, 100));
        assert_eq!((p.limit(true), p.gap), (1, Duration::ZERO));
        p.adjust(&interval(1000, 100));
        assert_eq!(p.limit(true), 2);
        // An idle host: full speed at once.
        p.adjust(&interval(3, 900));
        assert_eq!(p.limit(true), 8);
    }

    #[test]
    fn without_history_the_first_busy_interval_is_the_baseline() {
        let mut p = pace(None);
        p.adjust(&interval(5, 100));
        assert_eq!(p.baseline(), None, "idle: nothing to learn");
        p.adjust(&interval(500, 100));
        assert!(p.baseline().is_some());
        assert_eq!(p.limit(true), 1);
        p.adjust(&interval(500, 1000));
        assert_eq!(p.gap, MIN_GAP);
    }

    #[test]
    fn the_bucket_admits_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0);
        assert!(b.admit(t0, 0, 1 << 30), "no cap admits anything");
        let rate = 10 << 20; // 10 MiB/s, 1 MiB windows
        let mut admitted = 0u64;
        for ms in 0..=1000 {
            while b.admit(t0 + Duration::from_millis(ms), rate, 1 << 20) {
                admitted += 1 << 20;
            }
        }
        assert!(
            (9 << 20..=11 << 20).contains(&admitted),
            "{admitted} bytes in one second"
        );
    }
}
