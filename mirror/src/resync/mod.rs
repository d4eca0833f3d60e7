//! Resync and verify (ARCHITECTURE.md invariant 5): rebuild a leg online, and scrub the
//! in-sync legs against each other.
//!
//! A leg being rebuilt is in state Resyncing: it receives every host write from the moment it
//! enters that state, and a [`ResyncJob`] copies the regions it missed from an in-sync leg, one
//! region per *window*, each window under the same overlap-guard locks host writes take. A host
//! write to a region therefore either completes before the copy of that region reads it, or
//! waits for the copy and then reaches the rebuilt leg itself. When every region is copied the
//! leg flips to InSync with one CAS on the state word.
//!
//! A [`VerifyJob`] compares the in-sync legs region by region (CRC32C), under the same window
//! locks, and can repair a mismatch from the primary.
//!
//! Both jobs are non-blocking state machines: [`ResyncJob::poll`] does a bounded amount of work.
//! They implement [`nvmirror_poller::Poller`] for a reactor, and [`ResyncJob::run`] drives one on
//! its own thread. The design and its guarantees are in `docs/resync.md`.

mod channels;
mod control;
mod driver;
mod job;
mod progress;
mod rate;
mod source;
mod verify;
mod window;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use job::ResyncJob;
pub(crate) use progress::JobShared;
pub use source::{MissedRegionSource, RegionSource};
pub use verify::VerifyJob;

/// How a resync or verify job runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ResyncConfig {
    /// Regions copied at once (each holds its region's window lock while it is in flight).
    pub windows: u32,
    /// Most bytes per I/O command; a larger region is copied in several commands under one
    /// window lock.
    pub max_io_bytes: u32,
    /// Bandwidth cap in bytes per second (token bucket); 0 means no cap.
    pub max_rate: u64,
    /// Adapt the pace to host write latency (see [`latency_factor`](Self::latency_factor)).
    pub adaptive: bool,
    /// Back off while the host's p99 latency is above this multiple of its p99 before the
    /// resync started.
    pub latency_factor: f64,
    /// How often the adaptive controller looks at host latency.
    pub sample_interval: Duration,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            windows: 4,
            max_io_bytes: 1 << 20,
            max_rate: 0,
            adaptive: true,
            latency_factor: 2.0,
            sample_interval: Duration::from_millis(20),
        }
    }
}

impl ResyncConfig {
    pub(crate) fn validate(&self, volume: &str) -> crate::Result<()> {
        let err = |reason: &str| crate::Error::Config {
            volume: volume.to_string(),
            reason: reason.to_string(),
        };
        if !(1..=64).contains(&self.windows) {
            return Err(err("resync windows must be 1 to 64"));
        }
        if self.max_io_bytes < 4096 || !self.max_io_bytes.is_power_of_two() {
            return Err(err(
                "resync max_io_bytes must be a power of two of at least 4096",
            ));
        }
        if self.latency_factor.is_nan() || self.latency_factor < 1.0 {
            return Err(err("resync latency_factor must be at least 1.0"));
        }
        if self.sample_interval.is_zero() {
            return Err(err("resync sample_interval must be greater than zero"));
        }
        Ok(())
    }
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting out host writes that started before the leg entered Resyncing.
    Starting,
    Running,
    Paused,
    /// Finished: for a resync, the leg is in sync.
    Done,
    /// Cancelled by request: the leg is Faulted with what is left still marked.
    Cancelled,
    /// Stopped by an I/O error or a leg leaving its state; see the status's `error`.
    Failed,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Done | Self::Cancelled | Self::Failed)
    }
}

/// Progress of a resync, from [`Volume::resync_status`](crate::Volume::resync_status).
#[derive(Clone, Debug, PartialEq)]
pub struct ResyncStatus {
    /// The leg being rebuilt.
    pub leg: usize,
    pub state: JobState,
    /// Walks over the region set (a later pass copies regions marked during an earlier one).
    pub passes: u32,
    pub regions_copied: u64,
    pub bytes_copied: u64,
    /// Bytes to copy: what was marked at the start plus what later passes found.
    pub bytes_total: u64,
    /// `bytes_copied / bytes_total`, 0 to 100.
    pub percent: f64,
    /// Copy rate over the last second or so, bytes per second.
    pub rate: u64,
    /// Time left at the current rate (`None` while unknown).
    pub eta: Option<Duration>,
    /// Windows the rate controller lets run at once now.
    pub window_limit: u32,
    /// Bandwidth cap in bytes per second (0: none) and whether the pace adapts to host latency.
    pub max_rate: u64,
    pub adaptive: bool,
    /// Host p99 latency before the resync started (the adaptive baseline), when known.
    pub baseline_p99: Option<Duration>,
    pub elapsed: Duration,
    /// Why the job failed.
    pub error: Option<String>,
}

/// Result of a scrub, from [`Volume::verify_status`](crate::Volume::verify_status).
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyStatus {
    pub state: JobState,
    /// Whether mismatches are repaired from the primary.
    pub repair: bool,
    pub regions_checked: u64,
    pub regions_total: u64,
    pub bytes_checked: u64,
    pub percent: f64,
    /// Regions whose CRC32C differed between in-sync legs, ascending.
    pub mismatched_regions: Vec<u64>,
    /// Mismatched regions rewritten from the primary.
    pub regions_repaired: u64,
    pub elapsed: Duration,
    pub error: Option<String>,
}

/// The jobs started on a volume (one resync and one verify at a time).
#[derive(Debug, Default)]
pub(crate) struct JobRegistry {
    resync: Mutex<Option<Arc<JobShared>>>,
    verify: Mutex<Option<Arc<JobShared>>>,
}
