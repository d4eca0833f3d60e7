//! The latency clocks cover every I/O's whole cycle: in a closed loop each slot is always either
//! waiting to be submitted (`slat`) or in flight (`clat`), so by Little's law
//! IOPS × mean(`lat`) is the queue depth. A clock that left out part of the cycle (a freed slot
//! waiting while the rest of its poll batch is submitted) would read low here.
//!
//! The ratio compares two figures of one run against each other, so it holds on a loaded
//! machine too: what load changes is both the IOPS and the latency, not their product.

mod common;

use std::sync::Arc;
use std::time::Duration;

use nvmirror_bench::engine::{self, RunResult};
use nvmirror_bench::job::{JobSpec, RwMode};
use nvmirror_bench::report::FioJob;
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::BlockDevice;

fn closed_loop(rw: RwMode, iodepth: u32, runtime_ms: u64) -> JobSpec {
    JobSpec {
        rw,
        iodepth,
        runtime: Duration::from_millis(runtime_ms),
        time_based: true,
        ..JobSpec::default()
    }
}

/// IOPS × mean total latency / queue depth, over every direction the run issued.
fn littles_ratio(run: &RunResult) -> (f64, String) {
    let job = FioJob::from_run(run);
    let (mut in_flight, mut ios) = (0.0, 0);
    let mut detail = String::new();
    for d in [&job.read, &job.write, &job.trim] {
        in_flight += d.iops * d.lat_ns.mean / 1e9;
        ios += d.total_ios;
        if d.total_ios > 0 {
            detail += &format!(
                "{:.0} IOPS, slat {:.0} ns, clat {:.0} ns, lat {:.0} ns; ",
                d.iops, d.slat_ns.mean, d.clat_ns.mean, d.lat_ns.mean
            );
        }
    }
    assert!(ios > 100, "too few I/Os to judge: {detail}");
    (in_flight / f64::from(run.spec.iodepth), detail)
}

fn assert_littles_law(target: &Arc<dyn BlockDevice>, spec: &JobSpec, tolerance: f64, what: &str) {
    let run = engine::run(target, spec).unwrap();
    assert_eq!(run.stats.errors, 0, "{what}");
    let (ratio, detail) = littles_ratio(&run);
    assert!(
        (ratio - 1.0).abs() <= tolerance,
        "{what} at QD{}: IOPS × mean(lat) = {:.2}, not the queue depth ({detail})",
        spec.iodepth,
        ratio * f64::from(spec.iodepth)
    );
}

fn legs(uris: &[&str]) -> Arc<dyn BlockDevice> {
    let uris: Vec<String> = uris.iter().map(|u| u.to_string()).collect();
    nvmirror_bench::open_target(&uris, false).unwrap().device
}

#[test]
fn in_process_legs_keep_littles_law() {
    let targets = [
        ("null leg", legs(&["null://1TiB"])),
        ("mem leg", legs(&["mem://64MiB"])),
        (
            "two mirrored mem legs",
            legs(&["mem://64MiB", "mem://64MiB"]),
        ),
    ];
    for (what, target) in &targets {
        for qd in [8, 32] {
            for rw in [RwMode::RandWrite, RwMode::RandRead] {
                let what = format!("{what} {rw}");
                assert_littles_law(target, &closed_loop(rw, qd, 200), 0.05, &what);
            }
        }
    }
}

#[test]
fn nvme_tcp_keeps_littles_law() {
    let ns: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap());
    let t = common::start(ns);
    let target = nvmirror_nvme::open_leg(&t.uri).unwrap();
    for qd in [8, 32] {
        // Over a socket, on a machine that may be busy, the I/Os in flight at the window's end
        // weigh more: a little more room, and a longer window.
        assert_littles_law(
            &target,
            &closed_loop(RwMode::RandWrite, qd, 500),
            0.10,
            "nvme-tcp mem namespace randwrite",
        );
    }
}
