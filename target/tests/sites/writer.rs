//! The verifying host writer of the site drills and what it reports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ChildGuard, Site, Sites, HOST_ADDR};
use crate::serve_rig::NVMIRROR;

/// A project binary next to `nvmirror` (`nvmirror-bench`, `nvmirror-netdelay`): built by
/// `cargo test --workspace`, or by `cargo build --release -p nvmirror-bench`.
pub fn sibling_binary(name: &str) -> String {
    let p = Path::new(NVMIRROR).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p nvmirror-bench --bins`",
        p.display()
    );
    p.display().to_string()
}

/// The verifying host writer: `nvmirror-bench --verify crc32c` in the host namespace against
/// site A. Every block it writes is stamped with its LBA, a generation and a CRC; every
/// acknowledged write is recorded in its ledger, and its read-back pass at the end checks that
/// each block holds exactly the last acknowledged generation. Per-interval latency
/// histograms (`--hdr-log`) give the latency during a fault window.
#[derive(Debug)]
pub struct HostWriter {
    child: ChildGuard,
    /// When the process was started.
    pub started: Instant,
    log_dir: PathBuf,
    /// Length of one `--hdr-log` interval.
    pub interval: Duration,
}

/// What the writer reported.
#[derive(Debug)]
pub struct WriterReport {
    /// fio's JSON job object.
    pub job: Value,
    /// Exit status 0: every I/O succeeded and every block verified.
    pub success: bool,
    /// Per-interval write latency histograms, in order.
    pub intervals: Vec<(Duration, hdrhistogram::Histogram<u64>)>,
    /// Length of one interval.
    pub interval: Duration,
    pub stderr: String,
}

impl HostWriter {
    /// 4 KiB random writes at `iodepth` over the first `size` bytes for `runtime`, verified.
    pub fn start(sites: &Sites, name: &str, size: &str, iodepth: u32, runtime: Duration) -> Self {
        Self::start_to(sites, name, &sites.a_uri(), size, iodepth, runtime, &[])
    }

    /// [`start`](Self::start) against `target`, with `extra` arguments (`--offset`,
    /// `--verify-ledger`).
    pub fn start_to(
        sites: &Sites,
        name: &str,
        target: &str,
        size: &str,
        iodepth: u32,
        runtime: Duration,
        extra: &[String],
    ) -> Self {
        let log_dir = sites.path(name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let interval = Duration::from_millis(250);
        let mut args: Vec<String> = [
            "--target",
            target,
            "--rw",
            "randwrite",
            "--bs",
            "4k",
            "--iodepth",
            &iodepth.to_string(),
            "--size",
            size,
            "--runtime",
            &format!("{}ms", runtime.as_millis()),
            "--time_based",
            "--verify",
            "crc32c",
            "--hdr-log",
            log_dir.to_str().unwrap(),
            "--log_interval",
            &format!("{}ms", interval.as_millis()),
            "--output-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        let started = Instant::now();
        let child = sites.spawn_in(Site::Host, &sibling_binary("nvmirror-bench"), &args);
        Self {
            child,
            started,
            log_dir,
            interval,
        }
    }

    /// Waits until the writer has connected to site A (its log says so; connecting can take
    /// seconds on a loaded machine) and restarts [`started`](Self::started) there: the
    /// writer's measured window, and so its interval log, starts a few milliseconds later.
    /// (Polling `volume_status` instead would both lag, its counters being published in
    /// batches, and load a small machine.)
    pub fn wait_connected(&mut self, sites: &Sites) {
        self.wait_connected_at(sites, Site::A, HOST_ADDR);
    }

    /// [`wait_connected`](Self::wait_connected) to `site`, which sees the host as `peer`.
    pub fn wait_connected_at(&mut self, sites: &Sites, site: Site, peer: &str) {
        let log = sites.log(site);
        let line = format!("admin queue connected peer={peer}:");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&line)
        {
            assert!(
                Instant::now() < deadline,
                "the writer did not connect to site {site:?} in 60 s ({})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.started = Instant::now();
    }

    /// Waits for the writer (its run plus the read-back pass) and reads its report.
    pub fn finish(self, within: Duration) -> WriterReport {
        let (status, out, stderr) = self.child.finish(within);
        let json: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("writer output is not JSON ({e}): {out}\n{stderr}"));
        let job = json["jobs"][0].clone();
        let hlog = std::fs::read_dir(&self.log_dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".write.hlog"))
            .expect("the writer wrote a write latency log");
        WriterReport {
            job,
            success: status.success(),
            intervals: read_interval_log(&hlog),
            interval: self.interval,
            stderr,
        }
    }
}

/// The intervals of an HdrHistogram interval log: (start from the log's start, histogram).
fn read_interval_log(path: &Path) -> Vec<(Duration, hdrhistogram::Histogram<u64>)> {
    use base64::Engine as _;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(&bytes) {
        if let LogEntry::Interval(h) = entry.expect("a well-formed interval log") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(h.encoded_histogram())
                .unwrap();
            let hist: hdrhistogram::Histogram<u64> =
                de.deserialize(&mut std::io::Cursor::new(raw)).unwrap();
            out.push((h.start_timestamp(), hist));
        }
    }
    out
}

impl WriterReport {
    /// Write latency over the intervals that overlap `[from, to)` (measured from the writer's
    /// start; an interval that only touches the window counts): (p99, max, count),
    /// nanoseconds.
    pub fn window(&self, from: Duration, to: Duration) -> (u64, u64, u64) {
        let interval = self.interval;
        let mut merged = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        merged.auto(true);
        for (start, h) in &self.intervals {
            if *start + interval > from && *start < to {
                merged.add(h).unwrap();
            }
        }
        (merged.value_at_quantile(0.99), merged.max(), merged.len())
    }

    /// Blocks the read-back pass checked and the failures it found.
    pub fn verified(&self) -> (u64, u64) {
        (
            self.job["verified_blocks"].as_u64().unwrap_or(0),
            self.job["verify_errors"].as_u64().unwrap_or(0),
        )
    }

    /// Acknowledged writes and failed I/Os.
    pub fn writes(&self) -> (u64, u64) {
        (
            self.job["write"]["total_ios"].as_u64().unwrap_or(0),
            self.job["error"].as_u64().unwrap_or(0),
        )
    }
}
