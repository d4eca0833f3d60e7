//! Reports read back the way fio tools read them: the JSON's field names, percentiles of a
//! known distribution in both formats, job files with one `jobs[]` entry per section, and
//! HdrHistogram interval logs.

use std::time::Duration;

use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use nvmirror_bench::cli::Cli;
use nvmirror_bench::engine::{latency_histogram, Direction, JobStats, RunResult};
use nvmirror_bench::job::{JobSpec, RwMode};
use nvmirror_bench::report::{normal_text, write_json, write_json_runs};

fn run_cli(args: &[&str]) -> (Vec<RunResult>, String) {
    let mut argv = vec!["nvmirror-bench"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_args(argv).unwrap();
    let mut out = Vec::new();
    let runs = nvmirror_bench::run_cli(&cli, &mut out).unwrap();
    (runs, String::from_utf8(out).unwrap())
}

/// A run whose reads took exactly the given completion latencies (ns), `n` of each, and no
/// submission time (so `lat == clat`).
fn synthetic(values: &[(u64, u64)]) -> RunResult {
    let mut stats = JobStats::new().unwrap();
    let mut h = latency_histogram().unwrap();
    for &(v, n) in values {
        h.record_n(v, n).unwrap();
    }
    let read = Direction::Read.index();
    stats.io_bytes[read] = h.len() * 4096;
    stats.slat[read].record_n(0, h.len()).unwrap();
    stats.lat[read] = h.clone();
    stats.read = h;
    stats.runtime = Duration::from_secs(2);
    RunResult {
        spec: JobSpec {
            rw: RwMode::RandRead,
            ..JobSpec::default()
        },
        target: "mem://1GiB".into(),
        stats,
    }
}

#[test]
fn json_has_every_field_fio_tools_read() {
    let (runs, text) = run_cli(&[
        "--leg",
        "mem://16MiB",
        "--rw",
        "randrw",
        "--iodepth",
        "8",
        "--runtime",
        "200ms",
        "--time_based",
        "--output-format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["fio version"]
        .as_str()
        .unwrap()
        .starts_with("nvmirror-bench"));
    assert!(v["timestamp"].is_u64() && v["global options"].is_object());
    let job = &v["jobs"][0];
    assert_eq!(job["jobname"], "randrw");
    assert!(job["job options"].is_object() && job["error"] == 0);
    for dir in ["read", "write", "trim"] {
        let d = &job[dir];
        for key in [
            "io_bytes",
            "io_kbytes",
            "bw_bytes",
            "bw",
            "runtime",
            "total_ios",
            "short_ios",
            "drop_ios",
        ] {
            assert!(d[key].is_u64(), "{dir}.{key}: {}", d[key]);
        }
        assert!(d["iops"].is_f64(), "{dir}.iops");
        for lat in ["slat_ns", "clat_ns", "lat_ns"] {
            let l = &d[lat];
            for key in ["min", "max", "N"] {
                assert!(l[key].is_u64(), "{dir}.{lat}.{key}");
            }
            for key in ["mean", "stddev"] {
                assert!(l[key].is_f64(), "{dir}.{lat}.{key}");
            }
            let pct = l["percentile"].as_object().unwrap();
            assert_eq!(pct.len(), 17);
            for key in [
                "1.000000",
                "50.000000",
                "99.000000",
                "99.900000",
                "99.990000",
            ] {
                assert!(pct[key].is_u64(), "{dir}.{lat}.percentile[{key}]");
            }
        }
    }
    let st = &runs[0].stats;
    assert_eq!(job["read"]["total_ios"].as_u64(), Some(st.read.len()));
    assert_eq!(job["write"]["total_ios"].as_u64(), Some(st.write.len()));
    assert_eq!(job["write"]["clat_ns"]["N"], job["write"]["total_ios"]);
    assert_eq!(job["trim"]["total_ios"], 0);
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(st.read.len() * 4096));
}

#[test]
fn percentiles_of_a_known_distribution_in_normal_and_json_output() {
    // 1000 reads: 901 at 20 us, 90 at 200 us, 7 at 2 ms, 2 at 20 ms (no percentile falls on
    // the edge between two values).
    let run = synthetic(&[
        (20_000, 901),
        (200_000, 90),
        (2_000_000, 7),
        (20_000_000, 2),
    ]);
    let mut out = Vec::new();
    write_json(&run, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let clat = &v["jobs"][0]["read"]["clat_ns"];
    assert_eq!(clat["N"], 1000);
    assert_eq!(clat["min"], 20_000);
    let pct = |k: &str| clat["percentile"][k].as_u64().unwrap();
    // Each value is the histogram's bucket for the recorded one: within 0.1 %.
    let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
    for (key, want) in [
        ("1.000000", 20_000),
        ("50.000000", 20_000),
        ("90.000000", 20_000),
        ("95.000000", 200_000),
        ("99.000000", 200_000),
        ("99.500000", 2_000_000),
        ("99.900000", 20_000_000),
        ("99.950000", 20_000_000),
        ("99.990000", 20_000_000),
    ] {
        assert!(near(pct(key), want), "p{key}: {} want {want}", pct(key));
    }
    assert_eq!(v["jobs"][0]["read"]["total_ios"], 1000);
    assert_eq!(v["jobs"][0]["read"]["iops"], 500.0);
    assert_eq!(
        clat, &v["jobs"][0]["read"]["lat_ns"],
        "no submission time: lat == clat"
    );
    assert_eq!(v["jobs"][0]["read"]["slat_ns"]["N"], 1000);
    assert_eq!(v["jobs"][0]["read"]["slat_ns"]["max"], 0);

    let text = normal_text(&run);
    assert!(text.contains("read: IOPS=500, "), "{text}");
    // fio's three summary lines, in fio's order and layout, then clat's percentiles.
    let slat = text.find("\n    slat (nsec): min=0, max=0, avg=0.00, stdev=0.00\n");
    let clat = text.find("\n    clat (usec): min=20, max=");
    let lat = text.find("\n     lat (usec): min=20, max=");
    assert!(
        slat.is_some() && slat < clat && clat < lat,
        "{slat:?} {clat:?} {lat:?}: {text}"
    );
    assert!(text.contains("clat percentiles (usec):"), "{text}");
    assert!(text.contains(" 1.00th=[   20]"), "{text}");
    assert!(text.contains("90.00th=[   20]"), "{text}");
    assert!(text.contains("95.00th=[  200]"), "{text}");
    assert!(text.contains("99.50th=[ 2000]"), "{text}");
    // 20 ms lands in a histogram bucket 8 us wide; its top is what is reported.
    assert!(text.contains("99.90th=[20004]"), "{text}");
    assert!(text.contains("99.99th=[20004]"), "{text}");
}

#[test]
fn a_job_file_runs_its_sections_in_order_with_one_jobs_entry_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fill-and-check.fio");
    std::fs::write(
        &path,
        "\
[global]
filename=mem://8MiB
size=1MiB
verify=crc32c
iodepth=8

; stamp every block in 64 KiB writes, then check them all from a 4 KiB job
[fill]
rw=write
bs=64k

[check]
rw=randread
runtime=100ms
time_based
",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (runs, text) = run_cli(&[p, "--output-format", "json"]);
    assert_eq!(runs.len(), 2);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        (jobs[0]["jobname"].as_str(), jobs[1]["jobname"].as_str()),
        (Some("fill"), Some("check"))
    );
    assert_eq!(jobs[0]["write"]["total_ios"], 16);
    assert!(jobs[1]["read"]["total_ios"].as_u64().unwrap() > 0);
    // The check ran on the device the fill wrote (the same URI is opened once): every
    // logical block it read carried a good stamp, whatever the I/O sizes of the two jobs.
    assert_eq!(
        runs[0].stats.verify.blocks_checked, 2048,
        "the fill's read-back"
    );
    assert_eq!(runs[1].stats.verify.failures, 0);
    assert_eq!(
        runs[1].stats.verify.blocks_checked,
        runs[1].stats.read.len() * 8
    );
    assert!(!runs[1].stats.read.is_empty());

    // The command line overrides [global]: a smaller size shows in the fill's count.
    let (runs, normal) = run_cli(&[p, "--size", "512KiB"]);
    assert_eq!(runs[0].stats.write.len(), 8);
    assert!(
        normal.contains("fill: (groupid=0") && normal.contains("check: (groupid=0"),
        "{normal}"
    );
    let mut json = Vec::new();
    write_json_runs(&runs, &mut json).unwrap();
    assert!(String::from_utf8(json)
        .unwrap()
        .contains("\"jobname\": \"check\""));
}

#[test]
fn hdr_interval_logs_parse_back_and_sum_to_the_reported_ios() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let (runs, _) = run_cli(&[
        "--leg",
        "mem://16MiB",
        "--rw",
        "randrw",
        "--iodepth",
        "4",
        "--runtime",
        "450ms",
        "--time_based",
        "--ramp_time",
        "50ms",
        "--hdr-log",
        logs.to_str().unwrap(),
        "--log_interval",
        "100ms",
    ]);
    let st = &runs[0].stats;
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["randrw.read.hlog", "randrw.write.hlog"]);
    for (name, want) in [
        ("randrw.read.hlog", st.read.len()),
        ("randrw.write.hlog", st.write.len()),
    ] {
        let bytes = std::fs::read(logs.join(name)).unwrap();
        let mut deserializer = Deserializer::new();
        let mut total = 0;
        let mut intervals = 0u128;
        let mut base = false;
        for entry in IntervalLogIterator::new(&bytes) {
            match entry.unwrap() {
                LogEntry::BaseTime(_) => base = true,
                LogEntry::StartTime(_) => {}
                LogEntry::Interval(iv) => {
                    let raw = base64_decode(iv.encoded_histogram());
                    let h: hdrhistogram::Histogram<u64> =
                        deserializer.deserialize(&mut raw.as_slice()).unwrap();
                    total += h.len();
                    intervals += 1;
                    assert!(iv.duration() <= Duration::from_millis(100));
                }
            }
        }
        assert!(base, "{name}: no BaseTime");
        // One interval per started 100 ms of the measured window.
        let want_intervals = st.runtime.as_nanos().div_ceil(100_000_000);
        assert_eq!(intervals, want_intervals, "{name}: {:?} window", st.runtime);
        assert_eq!(
            total, want,
            "{name}: interval counts vs the reported I/O count"
        );
        assert!(want > 0);
    }
}

/// Standard base64 (the interval log's histogram encoding), decoded without a dependency.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut acc = 0u32;
        for (i, &d) in chunk.iter().enumerate() {
            acc |= u32::from(d) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}
