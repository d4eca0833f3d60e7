//! The metric families `/metrics` serves (`docs/operations.md`, "Metrics"): per leg and per
//! volume counters, latency histograms, states, resync and verify progress, and the reactors'
//! busy time.
//!
//! Latency histograms are built at scrape time from the per-core fixed log buckets the I/O
//! path fills (`nvmirror_mirror::stats`): the scrape sums the cores and folds the fine buckets
//! into the Prometheus buckets of [`LATENCY_BUCKETS_SECONDS`]. The I/O path takes no lock and
//! allocates nothing for it.

use std::sync::atomic::{AtomicU64, Ordering};

use nvmirror_mirror::LatencyHistogram;
use nvmirror_nvme::BlockDevice;

use crate::control::Registry;
use crate::metrics::PromWriter;

/// Upper bounds (`le`) of the latency histograms, in seconds: 10 µs to 10 s, 1-2.5-5 steps.
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The leg states `nvmirror_leg_state` has a series for.
const LEG_STATES: [&str; 5] = ["in_sync", "faulted", "resyncing", "detached", "removed"];

/// The job states `nvmirror_resync_state` and `nvmirror_verify_state` have a series for.
const JOB_STATES: [&str; 6] = [
    "starting",
    "running",
    "paused",
    "done",
    "cancelled",
    "failed",
];

/// Writes one latency histogram family sample set.
fn latency(
    w: &mut PromWriter,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    h: &LatencyHistogram,
) {
    let bounds_ns = LATENCY_BUCKETS_SECONDS.map(|s| (s * 1e9).round() as u64);
    let counts = h.cumulative(&bounds_ns);
    let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
        .iter()
        .copied()
        .zip(counts)
        .collect();
    w.histogram(
        name,
        help,
        labels,
        &buckets,
        h.sum_ns as f64 / 1e9,
        h.count(),
    );
}

/// One gauge per state in `states`, 1 for `current` and 0 for the rest.
fn state_set(
    w: &mut PromWriter,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    states: &[&str],
    current: &str,
) {
    for state in states {
        let mut l = labels.to_vec();
        l.push(("state", state));
        w.gauge(name, help, &l, f64::from(u8::from(*state == current)));
    }
}

impl Registry {
    /// Prometheus text for every volume, leg, job and reactor.
    pub fn render_metrics(&self) -> String {
        let mut w = PromWriter::new();
        for v in &self.volumes() {
            self.volume_metrics(&mut w, v);
        }
        self.reactor_metrics(&mut w);
        w.finish()
    }

    fn volume_metrics(&self, w: &mut PromWriter, v: &crate::control::VolumeEntry) {
        let name = v.volume.name();
        let stats = v.volume.stats();
        let infos = v.volume.leg_states();
        for (i, info) in infos.iter().enumerate() {
            let s = stats.legs.get(i).cloned().unwrap_or_default();
            let idx = i.to_string();
            let uri = self.leg_meta(v, i).map(|m| m.0).unwrap_or_default();
            let l = [
                ("volume", name),
                ("leg", idx.as_str()),
                ("uri", uri.as_str()),
            ];
            for (metric, help, value) in [
                (
                    "nvmirror_leg_ops_total",
                    "Commands completed by the leg.",
                    s.ops,
                ),
                (
                    "nvmirror_leg_bytes_total",
                    "Bytes moved by the leg.",
                    s.bytes,
                ),
                (
                    "nvmirror_leg_errors_total",
                    "Commands the leg failed.",
                    s.errors,
                ),
                (
                    "nvmirror_leg_timeouts_total",
                    "Commands abandoned after the I/O timeout.",
                    s.timeouts,
                ),
                (
                    "nvmirror_leg_completed_last_total",
                    "Mirrored writes for which this leg completed last (held up the ack).",
                    s.completed_last,
                ),
            ] {
                w.counter(metric, help, &l, value as f64);
            }
            latency(
                w,
                "nvmirror_leg_latency_seconds",
                "Leg command latency, from host submission to the leg's completion.",
                &l,
                &s.latency_histogram,
            );
            state_set(
                w,
                "nvmirror_leg_state",
                "1 for the leg's current state.",
                &l,
                &LEG_STATES,
                info.state.as_str(),
            );
            if let Some(r) = v.volume.leg_device(i).ok().and_then(|d| d.replication()) {
                for (metric, help, value) in [
                    (
                        "nvmirror_leg_rpo_seconds",
                        "Async leg: age of the oldest acknowledged write not yet applied on the far side.",
                        r.rpo_seconds,
                    ),
                    (
                        "nvmirror_leg_lag_bytes",
                        "Async leg: payload bytes acknowledged and not yet applied.",
                        r.lag_bytes as f64,
                    ),
                    (
                        "nvmirror_leg_lag_writes",
                        "Async leg: writes acknowledged and not yet applied.",
                        r.lag_writes as f64,
                    ),
                    (
                        "nvmirror_leg_consistent_seq",
                        "Async leg: the far side holds every write up to this journal sequence number.",
                        r.consistent_seq as f64,
                    ),
                    (
                        "nvmirror_leg_consistent",
                        "Async leg: 1 while the far image is known to be a crash-consistent point in time, 0 while a catch-up is being applied.",
                        f64::from(u8::from(r.consistent)),
                    ),
                    (
                        "nvmirror_leg_journal_used_bytes",
                        "Async leg: journal bytes written and not yet trimmed.",
                        r.journal_used as f64,
                    ),
                ] {
                    w.gauge(metric, help, &l, value);
                }
                for (metric, help, value) in [
                    (
                        "nvmirror_leg_journal_host_bytes_total",
                        "Async leg: payload bytes taken into the journal.",
                        r.host_bytes,
                    ),
                    (
                        "nvmirror_leg_journal_written_bytes_total",
                        "Async leg: bytes written to the journal device (headers and padding included).",
                        r.journal_bytes,
                    ),
                    (
                        "nvmirror_leg_step_downs_total",
                        "Async leg: times the journal hit its bound and the leg stepped down to bitmap tracking.",
                        r.step_downs,
                    ),
                ] {
                    w.counter(metric, help, &l, value as f64);
                }
                if let Some(c) = r.cycle {
                    for (metric, help, value) in [
                        (
                            "nvmirror_leg_cycle",
                            "Async-cycle leg: the last cycle the far image holds whole.",
                            c.cycle as f64,
                        ),
                        (
                            "nvmirror_leg_cycle_timestamp_seconds",
                            "Async-cycle leg: when the cut of that cycle was taken (Unix time).",
                            c.cycle_unix_ms as f64 / 1000.0,
                        ),
                        (
                            "nvmirror_leg_cycle_bytes",
                            "Async-cycle leg: distinct bytes the last cycle changed.",
                            c.cycle_bytes as f64,
                        ),
                        (
                            "nvmirror_leg_cycle_ship_seconds",
                            "Async-cycle leg: how long the last cycle took from freeze to applied.",
                            c.ship_us as f64 / 1e6,
                        ),
                    ] {
                        w.gauge(metric, help, &l, value);
                    }
                    for (metric, help, value) in [
                        (
                            "nvmirror_leg_cycle_changed_bytes_total",
                            "Async-cycle leg: distinct bytes changed, summed over cycles.",
                            c.changed_bytes,
                        ),
                        (
                            "nvmirror_leg_cycle_staged_bytes_total",
                            "Async-cycle leg: bytes sent to the staging area (data and run tables).",
                            c.staged_bytes,
                        ),
                    ] {
                        w.counter(metric, help, &l, value as f64);
                    }
                }
            }
            w.gauge(
                "nvmirror_leg_missed_regions",
                "Regions the leg missed while out of sync.",
                &l,
                v.volume.missed_region_count(i).unwrap_or(0) as f64,
            );
        }
        let lv = [("volume", name)];
        latency(
            w,
            "nvmirror_volume_latency_seconds",
            "Host-visible command latency: submission to the last leg's completion.",
            &lv,
            &stats.latency,
        );
        w.gauge(
            "nvmirror_volume_legs",
            "Leg slots of the volume (removed ones included).",
            &lv,
            infos.len() as f64,
        );
        w.gauge(
            "nvmirror_volume_legs_in_sync",
            "Legs in sync now.",
            &lv,
            infos
                .iter()
                .filter(|l| l.state.as_str() == "in_sync")
                .count() as f64,
        );
        if let Ok(r) = v.volume.resync_status() {
            let leg = r.leg.to_string();
            let lr = [("volume", name), ("leg", leg.as_str())];
            state_set(
                w,
                "nvmirror_resync_state",
                "1 for the state of the volume's latest resync.",
                &lr,
                &JOB_STATES,
                r.state.as_str(),
            );
            w.gauge(
                "nvmirror_resync_progress_ratio",
                "Progress of the volume's latest resync.",
                &lv,
                r.percent / 100.0,
            );
            w.gauge(
                "nvmirror_resync_rate_bytes_per_second",
                "Current resync copy rate.",
                &lv,
                r.rate as f64,
            );
            w.gauge(
                "nvmirror_resync_remaining_bytes",
                "Bytes the latest resync has still to copy.",
                &lv,
                r.bytes_total.saturating_sub(r.bytes_copied) as f64,
            );
            if let Some(eta) = r.eta {
                w.gauge(
                    "nvmirror_resync_eta_seconds",
                    "Estimated time to the end of the running resync.",
                    &lv,
                    eta.as_secs_f64(),
                );
            }
            w.counter(
                "nvmirror_resync_bytes_copied_total",
                "Bytes copied by the volume's latest resync.",
                &lv,
                r.bytes_copied as f64,
            );
        }
        if let Ok(s) = v.volume.verify_status() {
            state_set(
                w,
                "nvmirror_verify_state",
                "1 for the state of the volume's latest verify.",
                &lv,
                &JOB_STATES,
                s.state.as_str(),
            );
            w.gauge(
                "nvmirror_verify_progress_ratio",
                "Progress of the volume's latest verify.",
                &lv,
                s.percent / 100.0,
            );
            w.gauge(
                "nvmirror_verify_mismatched_regions",
                "Regions the latest verify found different between in-sync legs.",
                &lv,
                s.mismatched_regions.len() as f64,
            );
            w.counter(
                "nvmirror_verify_regions_repaired_total",
                "Mismatched regions the latest verify rewrote from the primary.",
                &lv,
                s.regions_repaired as f64,
            );
        }
        if v.volume.metadata_layout().is_some() {
            w.gauge(
                "nvmirror_bitmap_marked_regions",
                "Regions marked in the write-intent bitmap.",
                &lv,
                v.volume.marked_region_count() as f64,
            );
            w.counter(
                "nvmirror_bitmap_metadata_writes_total",
                "Bitmap page writes.",
                &lv,
                stats.metadata_writes as f64,
            );
            w.gauge(
                "nvmirror_bitmap_hit_rate",
                "Writes whose region was already durably marked.",
                &lv,
                stats.bitmap_hit_rate(),
            );
        }
        w.counter(
            "nvmirror_volume_overlap_waits_total",
            "Writes that waited for an overlapping write.",
            &lv,
            stats.overlap_waits as f64,
        );
        w.counter(
            "nvmirror_volume_read_retries_total",
            "Reads retried on another leg.",
            &lv,
            stats.read_retries as f64,
        );
    }

    fn reactor_metrics(&self, w: &mut PromWriter) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        for r in 0..self.reactors.count() {
            let Ok(s) = self.reactors.stats(r) else {
                continue;
            };
            let idx = r.to_string();
            let l = [("reactor", idx.as_str())];
            w.counter(
                "nvmirror_reactor_busy_seconds_total",
                "Time in loop iterations that did work.",
                &l,
                load(&s.busy_ns) / 1e9,
            );
            w.counter(
                "nvmirror_reactor_idle_seconds_total",
                "Time in loop iterations that found nothing.",
                &l,
                load(&s.idle_ns) / 1e9,
            );
            w.gauge(
                "nvmirror_reactor_busy_ratio",
                "Busy share since start.",
                &l,
                s.busy_ratio(),
            );
        }
    }
}
