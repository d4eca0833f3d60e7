//! fio's job options against `mem://` legs: time_based, size and io_size, offset, bsrange,
//! trim, and the open loop of rate_iops.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_bench::engine::{self, Direction};
use nvmirror_bench::job::{BsRange, JobSpec, RwMode};
use nvmirror_bench::report::normal_text;
use nvmirror_nvme::{open_leg, read_all, BlockDevice};

#[test]
fn without_time_based_a_job_stops_after_size_bytes_and_with_it_runs_the_whole_runtime() {
    let target = open_leg("mem://16MiB").unwrap();
    let spec = JobSpec {
        rw: RwMode::RandWrite,
        iodepth: 8,
        size: Some(1 << 20),
        runtime: Duration::from_secs(20),
        ..JobSpec::default()
    };
    let run = engine::run(&target, &spec).unwrap();
    assert_eq!(run.stats.write.len(), 256, "size / bs I/Os");
    assert!(
        run.stats.runtime < Duration::from_secs(10),
        "it did not wait out the runtime"
    );
    let with_io_size = engine::run(
        &target,
        &JobSpec {
            io_size: Some(3 << 20),
            numjobs: 2,
            ..spec.clone()
        },
    )
    .unwrap();
    assert_eq!(
        with_io_size.stats.write.len(),
        2 * 768,
        "io_size per thread"
    );

    let timed = engine::run(
        &target,
        &JobSpec {
            time_based: true,
            runtime: Duration::from_millis(300),
            ..spec
        },
    )
    .unwrap();
    assert!(timed.stats.runtime >= Duration::from_millis(300));
    assert!(
        timed.stats.write.len() > 256,
        "time_based wraps over the region"
    );
}

#[test]
fn the_runtime_ends_a_job_that_has_not_done_its_size() {
    // 1 ms per I/O at depth 1: 1 MiB would take a quarter of a second more than the runtime.
    let target = open_leg("mem://16MiB?latency=1ms").unwrap();
    let spec = JobSpec {
        rw: RwMode::Read,
        size: Some(1 << 20),
        runtime: Duration::from_millis(50),
        ..JobSpec::default()
    };
    let run = engine::run(&target, &spec).unwrap();
    assert!(run.stats.read.len() < 100, "{} reads", run.stats.read.len());
    assert!(run.stats.runtime >= Duration::from_millis(50));
}

#[test]
fn offset_and_size_confine_writes_to_the_region() {
    let target = open_leg("mem://4MiB").unwrap();
    let spec = JobSpec {
        rw: RwMode::Write,
        offset: 1 << 20,
        size: Some(512 << 10),
        iodepth: 4,
        ..JobSpec::default()
    };
    let run = engine::run(&target, &spec).unwrap();
    assert_eq!(run.stats.write.len(), 128);
    let image = read_all(&*target).unwrap();
    let (before, rest) = image.split_at(1 << 20);
    let (region, after) = rest.split_at(512 << 10);
    assert!(before.iter().all(|&b| b == 0), "wrote below --offset");
    assert!(
        after.iter().all(|&b| b == 0),
        "wrote past --offset + --size"
    );
    assert!(
        region.chunks(4096).all(|c| c.iter().any(|&b| b != 0)),
        "a sequential pass writes every block of the region"
    );
}

#[test]
fn bsrange_mixes_sizes_and_counts_bytes_by_size() {
    let target = open_leg("mem://16MiB").unwrap();
    let spec = JobSpec {
        rw: RwMode::RandWrite,
        bsrange: Some(BsRange {
            min: 4096,
            max: 65536,
        }),
        iodepth: 8,
        runtime: Duration::from_millis(200),
        time_based: true,
        ..JobSpec::default()
    };
    let run = engine::run(&target, &spec).unwrap();
    let ios = run.stats.write.len();
    let bytes = run.stats.io_bytes[Direction::Write.index()];
    assert!(ios > 100);
    assert_eq!(bytes % 4096, 0);
    // Sizes 4..64 KiB uniform in 4 KiB steps: a mean of 34 KiB.
    let mean = bytes as f64 / ios as f64;
    assert!(
        (28_000.0..42_000.0).contains(&mean),
        "mean I/O {mean} bytes"
    );
    let json = nvmirror_bench::report::FioOutput::from_run(&run);
    assert_eq!(json.jobs[0].write.io_bytes, bytes);
    assert_eq!(json.jobs[0].job_options["bsrange"], "4096-65536");
}

#[test]
fn trim_deallocates_and_is_reported_as_its_own_direction() {
    let target = open_leg("mem://4MiB").unwrap();
    let fill = JobSpec {
        rw: RwMode::Write,
        iodepth: 4,
        ..JobSpec::default()
    };
    engine::run(&target, &fill).unwrap();
    let trim = JobSpec {
        rw: RwMode::Trim,
        bs: 64 << 10,
        size: Some(1 << 20),
        ..fill
    };
    let run = engine::run(&target, &trim).unwrap();
    assert_eq!(run.stats.errors, 0);
    assert_eq!(run.stats.trim.len(), 16);
    assert_eq!(run.stats.write.len() + run.stats.read.len(), 0);
    let image = read_all(&*target).unwrap();
    assert!(
        image[..1 << 20].iter().all(|&b| b == 0),
        "trimmed blocks read zero"
    );
    assert!(
        image[1 << 20..].iter().any(|&b| b != 0),
        "the rest is untouched"
    );
    let text = normal_text(&run);
    assert!(text.contains("  trim: IOPS="), "{text}");
    assert!(text.contains("   TRIM: bw="), "{text}");
}

#[test]
fn open_loop_latency_counts_the_queueing_a_closed_loop_hides() {
    // 1 ms per I/O at depth 4: the leg completes at most 4000 IOPS. The open loop asks for
    // 8000: I/Os queue up behind the full queue, and their latency counts from when they were
    // due, so it grows through the run (to about half the runtime at the median), while the
    // closed loop only ever sees the 1 ms service time.
    let target = open_leg("mem://16MiB?latency=1ms").unwrap();
    let closed = JobSpec {
        rw: RwMode::RandRead,
        iodepth: 4,
        runtime: Duration::from_millis(400),
        time_based: true,
        ..JobSpec::default()
    };
    let open = JobSpec {
        rate_iops: Some(8000),
        ..closed.clone()
    };
    let c = engine::run(&target, &closed).unwrap();
    let o = engine::run(&target, &open).unwrap();
    let p50 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.5);
    let closed_p50 = p50(c.stats.total_lat(Direction::Read));
    let open_p50 = p50(o.stats.total_lat(Direction::Read));
    assert!(
        open_p50 >= 2 * closed_p50,
        "open-loop p50 {open_p50} ns vs closed-loop p50 {closed_p50} ns"
    );
    // Completion latency alone (from the actual send) hides the queueing.
    let open_clat_p50 = p50(&o.stats.read);
    assert!(
        open_clat_p50 < open_p50 / 2,
        "clat {open_clat_p50} lat {open_p50}"
    );
    let text = normal_text(&o);
    assert!(
        text.contains("    lat (") && text.contains("    clat ("),
        "{text}"
    );
}

#[test]
fn open_loop_below_capacity_issues_the_asked_rate() {
    let target: Arc<dyn BlockDevice> = open_leg("mem://16MiB").unwrap();
    let spec = JobSpec {
        rw: RwMode::RandWrite,
        iodepth: 4,
        runtime: Duration::from_millis(500),
        time_based: true,
        rate_iops: Some(2000),
        ..JobSpec::default()
    };
    let run = engine::run(&target, &spec).unwrap();
    let iops = run.stats.write.len() as f64 / run.stats.runtime.as_secs_f64();
    assert!(
        (1600.0..2400.0).contains(&iops),
        "{iops} IOPS for 2000 asked"
    );
}
