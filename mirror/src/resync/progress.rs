//! What a running job shares with the control plane: requests in (pause, cancel, rate) and
//! progress out. The job polls the requests with relaxed loads and publishes progress under a
//! mutex once per finished region, so neither side waits on the other for long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{JobState, ResyncStatus, VerifyStatus};

/// Progress of one job, as last published.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) state: JobState,
    pub(crate) passes: u32,
    pub(crate) regions_done: u64,
    pub(crate) bytes_done: u64,
    pub(crate) bytes_total: u64,
    /// Verify: regions in the namespace.
    pub(crate) regions_total: u64,
    /// Bytes per second over the last rate interval.
    pub(crate) rate: u64,
    pub(crate) window_limit: u32,
    pub(crate) baseline_p99: Option<Duration>,
    pub(crate) started: Instant,
    pub(crate) finished: Option<Instant>,
    pub(crate) error: Option<String>,
    /// Verify: regions that differed, ascending.
    pub(crate) mismatched: Vec<u64>,
    pub(crate) repaired: u64,
}

/// The control block of one job, shared by the job and the volume's control methods.
#[derive(Debug)]
pub(crate) struct JobShared {
    /// The leg a resync rebuilds (unused by verify).
    pub(crate) leg: usize,
    /// Verify: repair mismatches from the primary.
    pub(crate) repair: bool,
    paused: AtomicBool,
    cancel: AtomicBool,
    max_rate: AtomicU64,
    adaptive: AtomicBool,
    progress: Mutex<Progress>,
}

impl JobShared {
    pub(crate) fn new(leg: usize, repair: bool, max_rate: u64, adaptive: bool) -> Self {
        Self {
            leg,
            repair,
            paused: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            max_rate: AtomicU64::new(max_rate),
            adaptive: AtomicBool::new(adaptive),
            progress: Mutex::new(Progress {
                state: JobState::Starting,
                passes: 0,
                regions_done: 0,
                bytes_done: 0,
                bytes_total: 0,
                regions_total: 0,
                rate: 0,
                window_limit: 0,
                baseline_p99: None,
                started: Instant::now(),
                finished: None,
                error: None,
                mismatched: Vec::new(),
                repaired: 0,
            }),
        }
    }

    pub(crate) fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub(crate) fn request_cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub(crate) fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub(crate) fn set_rate(&self, max_rate: u64, adaptive: bool) {
        self.max_rate.store(max_rate, Ordering::Relaxed);
        self.adaptive.store(adaptive, Ordering::Relaxed);
    }

    pub(crate) fn max_rate(&self) -> u64 {
        self.max_rate.load(Ordering::Relaxed)
    }

    pub(crate) fn adaptive(&self) -> bool {
        self.adaptive.load(Ordering::Relaxed)
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.progress().state.is_finished()
    }

    /// Records the end of the job (once).
    pub(crate) fn finish(&self, state: JobState, error: Option<String>) {
        let mut p = self.progress();
        if p.state.is_finished() {
            return;
        }
        p.state = state;
        p.error = error;
        p.finished = Some(Instant::now());
    }

    fn elapsed(p: &Progress) -> Duration {
        p.finished
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(p.started)
    }

    fn percent(done: u64, total: u64) -> f64 {
        if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        }
    }

    pub(crate) fn resync_status(&self) -> ResyncStatus {
        let p = self.progress().clone();
        let left = p.bytes_total.saturating_sub(p.bytes_done);
        let eta = match (p.state, p.rate) {
            (s, _) if s.is_finished() => Some(Duration::ZERO),
            (_, 0) => None,
            (_, rate) => Some(Duration::from_secs_f64(left as f64 / rate as f64)),
        };
        let state = match p.state {
            JobState::Running if self.paused() => JobState::Paused,
            s => s,
        };
        let elapsed = Self::elapsed(&p);
        ResyncStatus {
            leg: self.leg,
            state,
            passes: p.passes,
            regions_copied: p.regions_done,
            bytes_copied: p.bytes_done,
            bytes_total: p.bytes_total,
            percent: Self::percent(p.bytes_done, p.bytes_total),
            rate: p.rate,
            eta,
            window_limit: p.window_limit,
            max_rate: self.max_rate(),
            adaptive: self.adaptive(),
            baseline_p99: p.baseline_p99,
            elapsed,
            error: p.error,
        }
    }

    pub(crate) fn verify_status(&self) -> VerifyStatus {
        let p = self.progress().clone();
        let state = match p.state {
            JobState::Running if self.paused() => JobState::Paused,
            s => s,
        };
        let elapsed = Self::elapsed(&p);
        VerifyStatus {
            state,
            repair: self.repair,
            regions_checked: p.regions_done,
            regions_total: p.regions_total,
            bytes_checked: p.bytes_done,
            percent: Self::percent(p.regions_done, p.regions_total),
            mismatched_regions: p.mismatched,
            regions_repaired: p.repaired,
            elapsed,
            error: p.error,
        }
    }
}
