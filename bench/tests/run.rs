//! Behaviour of whole runs: real jobs against `mem://` legs, failing legs, and the reports
//! they produce.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_bench::engine::{self, latency_histogram, RunResult};
use nvmirror_bench::job::{JobSpec, RwMode};
use nvmirror_bench::report::{normal_text, write_json, FioLatency, FioOutput};
use nvmirror_bench::Error;
use nvmirror_nvme::backend::{Fault, FaultyDevice, OpFilter};
use nvmirror_nvme::{open_leg, read_all, BlockDevice};

fn short(rw: RwMode) -> JobSpec {
    JobSpec {
        rw,
        iodepth: 16,
        runtime: Duration::from_millis(200),
        time_based: true,
        ..JobSpec::default()
    }
}

fn json_of(run: &RunResult) -> String {
    let mut out = Vec::new();
    write_json(run, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn a_short_write_run_reports_iops_and_no_errors_in_fio_json() {
    let target = open_leg("mem://64MiB").unwrap();
    let run = engine::run(&target, &short(RwMode::RandWrite)).unwrap();
    assert_eq!(run.stats.errors, 0);
    assert!(
        run.stats.write.len() > 100,
        "{} writes",
        run.stats.write.len()
    );
    assert_eq!(run.stats.read.len(), 0);
    assert!(run.stats.runtime >= Duration::from_millis(200));

    let text = json_of(&run);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["fio version"]
        .as_str()
        .unwrap()
        .starts_with("nvmirror-bench "));
    let job = &v["jobs"][0];
    assert_eq!(job["jobname"], "randwrite");
    assert_eq!(job["error"], 0);
    let write = &job["write"];
    assert!(write["iops"].as_f64().unwrap() > 0.0);
    assert_eq!(write["total_ios"].as_u64().unwrap(), run.stats.write.len());
    assert_eq!(
        write["io_bytes"].as_u64().unwrap(),
        run.stats.write.len() * 4096
    );
    assert_eq!(
        write["bw"].as_u64(),
        Some(write["bw_bytes"].as_u64().unwrap() / 1024)
    );
    let p99 = write["clat_ns"]["percentile"]["99.000000"]
        .as_u64()
        .unwrap();
    let p50 = write["clat_ns"]["percentile"]["50.000000"]
        .as_u64()
        .unwrap();
    assert!(p99 >= p50 && p50 > 0, "p50 {p50} p99 {p99}");
    assert!(write["clat_ns"]["max"].as_u64().unwrap() >= p99);
    assert_eq!(write["clat_ns"]["N"], write["total_ios"]);
    assert_eq!(write["slat_ns"]["N"], write["total_ios"]);
    assert_eq!(write["lat_ns"]["N"], write["total_ios"]);
    // lat = slat + clat per I/O, so the means add up (to the histograms' 0.1 % resolution).
    let mean = |k: &str| write[k]["mean"].as_f64().unwrap();
    let sum = mean("slat_ns") + mean("clat_ns");
    assert!(
        (mean("lat_ns") - sum).abs() <= sum * 0.005,
        "lat {} slat + clat {sum}",
        mean("lat_ns")
    );
    assert_eq!(job["read"]["total_ios"], 0);
    assert_eq!(job["read"]["iops"], 0.0);

    // The typed form reads back to the same report.
    let back: FioOutput = serde_json::from_str(&text).unwrap();
    assert_eq!(back, serde_json::from_value::<FioOutput>(v).unwrap());
    let pct = back.jobs[0].write.clat_ns.percentile.as_ref().unwrap();
    assert_eq!(pct.get(99.0), Some(p99));
    assert_eq!(pct.0.len(), 17);
    assert!(pct
        .0
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
}

#[test]
fn writes_carry_a_non_zero_pattern_to_the_device() {
    let target = open_leg("mem://1MiB").unwrap();
    let spec = JobSpec {
        size: Some(64 << 10),
        ..short(RwMode::Write)
    };
    let run = engine::run(&target, &spec).unwrap();
    assert!(run.stats.write.len() >= 16);
    let data = read_all(&*target).unwrap();
    let (written, rest) = data.split_at(64 << 10);
    for (i, block) in written.chunks(4096).enumerate() {
        assert!(block.iter().all(|b| *b != 0), "block {i} holds zero bytes");
    }
    assert!(rest.iter().all(|b| *b == 0), "a write landed past --size");
}

#[test]
fn mixed_jobs_split_reads_and_writes_by_rwmixread() {
    let target = open_leg("mem://64MiB").unwrap();
    let spec = JobSpec {
        rwmixread: 75,
        numjobs: 2,
        ..short(RwMode::RandRw)
    };
    let run = engine::run(&target, &spec).unwrap();
    let (r, w) = (run.stats.read.len(), run.stats.write.len());
    assert_eq!(run.stats.errors, 0);
    let share = r as f64 / (r + w) as f64;
    assert!((0.70..0.80).contains(&share), "{r} reads, {w} writes");
    let out = FioOutput::from_run(&run);
    assert_eq!(out.jobs.len(), 1, "threads are grouped into one job");
    assert_eq!(out.jobs[0].read.total_ios, r);
    assert_eq!(out.jobs[0].write.total_ios, w);
}

#[test]
fn a_gone_leg_reports_every_io_as_an_error() {
    let faulty = FaultyDevice::wrap(open_leg("mem://16MiB").unwrap());
    faulty.injector().arm(Fault::Gone);
    let target: Arc<dyn BlockDevice> = Arc::new(faulty);
    let run = engine::run(&target, &short(RwMode::RandWrite)).unwrap();
    assert!(run.stats.errors > 100, "{} errors", run.stats.errors);
    assert_eq!(
        run.stats.write.len(),
        0,
        "failed I/Os are not counted as done"
    );
    let status = run.stats.first_error.unwrap();
    assert!(!status.is_success());

    let v: serde_json::Value = serde_json::from_str(&json_of(&run)).unwrap();
    assert_eq!(v["jobs"][0]["error"].as_u64(), Some(run.stats.errors));
    assert!(v["jobs"][0]["error_status"]
        .as_str()
        .unwrap()
        .contains("host pathing error"));
    assert_eq!(v["jobs"][0]["write"]["iops"], 0.0);
    assert!(normal_text(&run).contains("I/Os failed"));
}

#[test]
fn ios_that_never_complete_are_errors_after_the_drain() {
    // Writes hang for good: the drain after the run gives up on them.
    let faulty = FaultyDevice::wrap(open_leg("mem://16MiB").unwrap());
    faulty.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let target: Arc<dyn BlockDevice> = Arc::new(faulty);
    let spec = JobSpec {
        iodepth: 4,
        runtime: Duration::from_millis(50),
        ..short(RwMode::RandWrite)
    };
    let run = engine::run(&target, &spec).unwrap();
    assert_eq!(run.stats.unfinished, 4);
    assert_eq!(run.stats.errors, 4);
    assert_eq!(run.stats.write.len(), 0);
    assert!(normal_text(&run).contains("never completed"));
}

#[test]
fn ramp_time_is_not_measured() {
    // Every I/O takes at least 1 ms, so a 100 ms window holds at most ~100 of them at depth 1;
    // counting the 100 ms ramp too would give ~200.
    let target = open_leg("mem://16MiB?latency=1ms").unwrap();
    let spec = JobSpec {
        iodepth: 1,
        ramp_time: Duration::from_millis(100),
        runtime: Duration::from_millis(100),
        ..short(RwMode::RandRead)
    };
    let run = engine::run(&target, &spec).unwrap();
    let n = run.stats.read.len();
    assert!((1..=101).contains(&n), "{n} reads counted");
    assert!(
        run.stats.read.min() >= 990_000,
        "min {}",
        run.stats.read.min()
    );
    assert!(run.stats.runtime >= Duration::from_millis(100));
    assert!(run.stats.runtime < Duration::from_millis(190));
}

#[test]
fn percentiles_of_a_known_distribution() {
    let mut h = latency_histogram().unwrap();
    h.record_n(100, 900).unwrap();
    h.record_n(10_000, 90).unwrap();
    h.record_n(1_000_000, 10).unwrap();
    let lat = FioLatency::from_histogram(&h);
    let pct = lat.percentile.as_ref().unwrap();
    let near = |v: u64, want: u64| v.abs_diff(want) * 1000 <= want;
    for (p, want) in [
        (1.0, 100),
        (50.0, 100),
        (90.0, 100),
        (95.0, 10_000),
        (99.0, 10_000),
        (99.5, 1_000_000),
        (99.99, 1_000_000),
    ] {
        let got = pct.get(p).unwrap();
        assert!(near(got, want), "p{p}: {got}, want {want}");
    }
    assert_eq!(lat.n, 1000);
    assert_eq!(lat.min, 100);
    assert!(near(lat.max, 1_000_000));
    let mean = (900.0 * 100.0 + 90.0 * 10_000.0 + 10.0 * 1e6) / 1000.0;
    assert!((lat.mean - mean).abs() / mean < 0.001, "mean {}", lat.mean);
    let var = (900.0 * (100.0 - mean) * (100.0 - mean)
        + 90.0 * (10_000.0 - mean) * (10_000.0 - mean)
        + 10.0 * (1e6 - mean) * (1e6 - mean))
        / 1000.0;
    let sd = f64::sqrt(var);
    assert!(
        (lat.stddev - sd).abs() / sd < 0.01,
        "stddev {}, want {sd}",
        lat.stddev
    );

    let empty = FioLatency::from_histogram(&latency_histogram().unwrap());
    assert_eq!((empty.n, empty.min, empty.max), (0, 0, 0));
    assert!(empty.percentile.unwrap().0.iter().all(|(_, v)| *v == 0));
}

#[test]
fn several_legs_build_a_mirrored_volume() {
    let legs = vec![
        open_leg("mem://1MiB").unwrap(),
        open_leg("mem://1MiB").unwrap(),
    ];
    let volume = nvmirror_bench::build_target(legs.clone()).unwrap();
    let run = nvmirror_bench::engine::run(&volume, &short(RwMode::RandWrite)).unwrap();
    assert_eq!(run.stats.errors, 0);
    assert!(!run.stats.write.is_empty(), "no writes completed");
    let images: Vec<Vec<u8>> = legs.iter().map(|l| read_all(&**l).unwrap()).collect();
    assert!(
        images[0] == images[1],
        "the mirror differs from the primary"
    );
    assert!(images[0].iter().any(|&b| b != 0), "nothing was written");
    let mismatched = vec![
        open_leg("mem://1MiB").unwrap(),
        open_leg("mem://1MiB?lba=4096").unwrap(),
    ];
    assert!(matches!(
        nvmirror_bench::build_target(mismatched),
        Err(Error::Flag { flag: "--leg", .. })
    ));
    let one = nvmirror_bench::build_target(vec![open_leg("null://1MiB").unwrap()]).unwrap();
    assert_eq!(one.name(), "null://1MiB");
}

#[test]
fn a_job_that_does_not_fit_the_device_is_refused_naming_the_flag() {
    let target = open_leg("mem://1MiB").unwrap();
    let spec = JobSpec {
        size: Some(2 << 20),
        ..short(RwMode::Read)
    };
    let err = engine::run(&target, &spec).unwrap_err().to_string();
    assert!(err.starts_with("--size:"), "{err}");
}
