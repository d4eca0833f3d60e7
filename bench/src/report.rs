//! Reports of a run: fio's JSON shape ([`FioOutput`], `--output-format json`), so fio tooling
//! can read it, and a human summary like fio's normal output ([`write_normal`]).
//!
//! Each job (the command line's, or each job-file section) is one entry of `jobs[]`, its
//! threads merged like fio's `group_reporting`, named after its section (or the `rw` mode).
//! The three latencies are fio's: submission latency (`slat_ns`) from the moment the I/O was
//! ready to issue (its slot freed, or due in an open loop) to the return of its submit,
//! completion latency (`clat_ns`) from there to the poll that reaped it, and total latency
//! (`lat_ns`) the two together; see [`crate::engine`] for where each stamp is taken.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::{Direction, RunResult};
use crate::{Error, Result};

/// The percentiles fio reports by default.
pub const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// fio's top-level JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FioOutput {
    #[serde(rename = "fio version")]
    pub fio_version: String,
    /// Unix time of the report, seconds.
    pub timestamp: u64,
    pub timestamp_ms: u64,
    #[serde(rename = "global options")]
    pub global_options: BTreeMap<String, String>,
    pub jobs: Vec<FioJob>,
}

/// One (grouped) job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FioJob {
    pub jobname: String,
    pub groupid: u32,
    /// Number of failed I/Os (fio puts an errno here; both are zero on success).
    pub error: u64,
    /// The first failure's NVMe status, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<String>,
    /// Blocks that failed `--verify`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verify_errors: u64,
    /// The first verify failure (`LBA n: why`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_error: Option<String>,
    /// Blocks whose verify stamp was checked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verified_blocks: u64,
    /// Measured time in milliseconds.
    pub job_runtime: u64,
    /// Measured time in seconds.
    pub elapsed: u64,
    #[serde(rename = "job options")]
    pub job_options: BTreeMap<String, String>,
    pub read: FioDirection,
    pub write: FioDirection,
    #[serde(default)]
    pub trim: FioDirection,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl FioJob {
    /// The report of one direction.
    pub fn direction(&self, dir: Direction) -> &FioDirection {
        match dir {
            Direction::Read => &self.read,
            Direction::Write => &self.write,
            Direction::Trim => &self.trim,
        }
    }
}

/// One direction (`read`, `write` or `trim`) of a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FioDirection {
    pub io_bytes: u64,
    pub io_kbytes: u64,
    pub bw_bytes: u64,
    /// KiB/s.
    pub bw: u64,
    pub iops: f64,
    /// Milliseconds.
    pub runtime: u64,
    pub total_ios: u64,
    pub short_ios: u64,
    pub drop_ios: u64,
    pub slat_ns: FioLatency,
    pub clat_ns: FioLatency,
    pub lat_ns: FioLatency,
}

/// A latency distribution in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FioLatency {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    pub stddev: f64,
    #[serde(rename = "N")]
    pub n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<Percentiles>,
}

/// Percentile → value, serialized as fio does: a map keyed `"99.900000"`, in ascending order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Percentiles(pub Vec<(f64, u64)>);

/// fio's key for a percentile (`%f`).
pub fn percentile_key(p: f64) -> String {
    format!("{p:.6}")
}

impl Percentiles {
    /// The value at percentile `p`, if reported.
    pub fn get(&self, p: f64) -> Option<u64> {
        self.0.iter().find(|(q, _)| *q == p).map(|(_, v)| *v)
    }
}

impl Serialize for Percentiles {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (p, v) in &self.0 {
            map.serialize_entry(&percentile_key(*p), v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Percentiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct PercentileMap;
        impl<'de> Visitor<'de> for PercentileMap {
            type Value = Percentiles;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from percentile strings to values")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Percentiles, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, u64>()? {
                    let p = k.parse::<f64>().map_err(|_| {
                        serde::de::Error::custom(format!("percentile key '{k}' is not a number"))
                    })?;
                    out.push((p, v));
                }
                out.sort_by(|a, b| a.0.total_cmp(&b.0));
                Ok(Percentiles(out))
            }
        }
        d.deserialize_map(PercentileMap)
    }
}

impl FioLatency {
    /// Summary of a histogram, with fio's percentiles.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                percentile: Some(Percentiles(PERCENTILES.iter().map(|p| (*p, 0)).collect())),
                ..Self::default()
            };
        }
        Self {
            min: h.min(),
            max: h.max(),
            mean: h.mean(),
            stddev: h.stdev(),
            n: h.len(),
            percentile: Some(Percentiles(
                PERCENTILES
                    .iter()
                    .map(|p| (*p, h.value_at_quantile(p / 100.0)))
                    .collect(),
            )),
        }
    }
}

impl FioDirection {
    fn new(
        slat: &Histogram<u64>,
        clat: &Histogram<u64>,
        lat: &Histogram<u64>,
        io_bytes: u64,
        runtime_ns: u128,
    ) -> Self {
        let ios = clat.len();
        let (runtime, bw_bytes, iops) = if ios == 0 || runtime_ns == 0 {
            (0, 0, 0.0)
        } else {
            let secs = runtime_ns as f64 / 1e9;
            (
                (runtime_ns / 1_000_000) as u64,
                (io_bytes as f64 / secs) as u64,
                ios as f64 / secs,
            )
        };
        Self {
            io_bytes,
            io_kbytes: io_bytes >> 10,
            bw_bytes,
            bw: bw_bytes >> 10,
            iops,
            runtime,
            total_ios: ios,
            short_ios: 0,
            drop_ios: 0,
            slat_ns: FioLatency::from_histogram(slat),
            clat_ns: FioLatency::from_histogram(clat),
            lat_ns: FioLatency::from_histogram(lat),
        }
    }
}

impl FioJob {
    /// The report entry of one run.
    pub fn from_run(run: &RunResult) -> Self {
        let spec = &run.spec;
        let st = &run.stats;
        let runtime_ns = st.runtime.as_nanos();
        let mut opts = BTreeMap::new();
        let mut opt = |k: &str, v: String| {
            opts.insert(k.to_string(), v);
        };
        opt("name", spec.job_name().to_string());
        opt("filename", run.target.clone());
        opt("rw", spec.rw.to_string());
        match spec.bsrange {
            Some(r) => opt("bsrange", r.to_string()),
            None => opt("bs", spec.bs.to_string()),
        }
        opt("iodepth", spec.iodepth.to_string());
        opt("numjobs", spec.numjobs.to_string());
        opt("runtime", format!("{}ms", spec.runtime.as_millis()));
        opt("ramp_time", format!("{}ms", spec.ramp_time.as_millis()));
        if spec.time_based {
            opt("time_based", "1".into());
        }
        if spec.offset > 0 {
            opt("offset", spec.offset.to_string());
        }
        if let Some(size) = spec.size {
            opt("size", size.to_string());
        }
        if let Some(io_size) = spec.io_size {
            opt("io_size", io_size.to_string());
        }
        if spec.rw.is_mixed() {
            opt("rwmixread", spec.rwmixread.to_string());
        }
        if spec.verify != crate::job::VerifyMode::None {
            opt("verify", spec.verify.as_str().into());
        }
        if let Some(rate) = spec.rate_iops {
            opt("rate_iops", rate.to_string());
        }
        opt("randseed", spec.seed.to_string());
        let dir = |d: Direction| {
            FioDirection::new(
                st.slat(d),
                st.clat(d),
                st.total_lat(d),
                st.io_bytes[d.index()],
                runtime_ns,
            )
        };
        FioJob {
            jobname: spec.job_name().to_string(),
            groupid: 0,
            error: st.errors,
            error_status: st.first_error.map(|s| s.to_string()),
            verify_errors: st.verify.failures,
            verify_error: st.verify.first.map(|f| f.to_string()),
            verified_blocks: st.verify.blocks_checked,
            job_runtime: (runtime_ns / 1_000_000) as u64,
            elapsed: st.runtime.as_secs(),
            job_options: opts,
            read: dir(Direction::Read),
            write: dir(Direction::Write),
            trim: dir(Direction::Trim),
        }
    }
}

impl FioOutput {
    /// The report of a run.
    pub fn from_run(run: &RunResult) -> Self {
        Self::from_runs(std::slice::from_ref(run))
    }

    /// The report of several runs (job-file sections), one `jobs[]` entry each.
    pub fn from_runs(runs: &[RunResult]) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            fio_version: format!("nvmirror-bench {}", env!("CARGO_PKG_VERSION")),
            timestamp: now.as_secs(),
            timestamp_ms: now.as_millis() as u64,
            global_options: BTreeMap::new(),
            jobs: runs.iter().map(FioJob::from_run).collect(),
        }
    }
}

/// Writes the run as fio JSON.
pub fn write_json(run: &RunResult, out: &mut dyn Write) -> Result<()> {
    write_json_runs(std::slice::from_ref(run), out)
}

/// Writes several runs as one fio JSON document.
pub fn write_json_runs(runs: &[RunResult], out: &mut dyn Write) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, &FioOutput::from_runs(runs))
        .map_err(Error::EncodeJson)?;
    writeln!(out).map_err(Error::WriteReport)
}

/// Writes the run as a human summary in fio's layout.
pub fn write_normal(run: &RunResult, out: &mut dyn Write) -> Result<()> {
    let text = normal_text(run);
    out.write_all(text.as_bytes()).map_err(Error::WriteReport)
}

/// The human summary as a string.
pub fn normal_text(run: &RunResult) -> String {
    use fmt::Write as _;
    let job = FioJob::from_run(run);
    let spec = &run.spec;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: (groupid=0, jobs={}): err={:>2}: target={} rw={} {} iodepth={}",
        job.jobname,
        spec.numjobs,
        job.error,
        run.target,
        spec.rw,
        match spec.bsrange {
            Some(r) => format!("bsrange={r}"),
            None => format!("bs={}", spec.bs),
        },
        spec.iodepth
    );
    if let Some(status) = &job.error_status {
        let _ = writeln!(
            s,
            "  errors: {} I/Os failed, first: {status}{}",
            job.error,
            if run.stats.unfinished > 0 {
                format!(" ({} never completed)", run.stats.unfinished)
            } else {
                String::new()
            }
        );
    } else if run.stats.unfinished > 0 {
        let _ = writeln!(s, "  errors: {} I/Os never completed", run.stats.unfinished);
    }
    if job.verified_blocks > 0 || job.verify_errors > 0 {
        let _ = writeln!(
            s,
            "  verify: {} blocks checked, {} failed{}",
            job.verified_blocks,
            job.verify_errors,
            job.verify_error
                .as_ref()
                .map(|f| format!(", first: {f}"))
                .unwrap_or_default()
        );
    }
    for (name, dir) in [
        ("read", &job.read),
        ("write", &job.write),
        ("trim", &job.trim),
    ] {
        if dir.total_ios == 0 {
            continue;
        }
        let _ = writeln!(
            s,
            "  {name}: IOPS={}, BW={}/s ({}/s)({}/{}msec)",
            si_count(dir.iops),
            binary_bytes(dir.bw_bytes as f64),
            decimal_bytes(dir.bw_bytes as f64),
            binary_bytes(dir.io_bytes as f64),
            dir.runtime
        );
        write_latency_line(&mut s, "slat", &dir.slat_ns);
        write_latency_line(&mut s, "clat", &dir.clat_ns);
        write_latency_line(&mut s, " lat", &dir.lat_ns);
        write_percentiles(&mut s, "clat", &dir.clat_ns);
        if run.spec.rate_iops.is_some() {
            write_percentiles(&mut s, "lat", &dir.lat_ns);
        }
    }
    let _ = writeln!(s, "\nRun status group 0 (all jobs):");
    for (name, dir) in [
        ("READ", &job.read),
        ("WRITE", &job.write),
        ("TRIM", &job.trim),
    ] {
        if dir.total_ios == 0 {
            continue;
        }
        let _ = writeln!(
            s,
            "  {name:>5}: bw={}/s ({}/s), io={} ({}), run={}-{}msec",
            binary_bytes(dir.bw_bytes as f64),
            decimal_bytes(dir.bw_bytes as f64),
            binary_bytes(dir.io_bytes as f64),
            decimal_bytes(dir.io_bytes as f64),
            dir.runtime,
            dir.runtime
        );
    }
    s
}

/// A `slat`, `clat` or ` lat` summary line, scaled to nsec, usec or msec by fio's rules
/// (`display_lat` in fio's `stat.c`).
fn write_latency_line(s: &mut String, what: &str, lat: &FioLatency) {
    use fmt::Write as _;
    let (unit, div) = if lat.min > 2_000_000 && lat.max > 99_999_999 && lat.stddev > 1e6 {
        ("msec", 1e6)
    } else if lat.min > 2_000 && lat.max > 99_999 && lat.stddev > 1e3 {
        ("usec", 1e3)
    } else {
        ("nsec", 1.0)
    };
    let _ = writeln!(
        s,
        "    {what} ({unit}): min={}, max={}, avg={:.2}, stdev={:.2}",
        (lat.min as f64 / div).round(),
        (lat.max as f64 / div).round(),
        lat.mean / div,
        lat.stddev / div
    );
}

/// A percentile table, scaled by fio's rules (`show_clat_percentiles` in fio's `stat.c`).
fn write_percentiles(s: &mut String, what: &str, lat: &FioLatency) {
    use fmt::Write as _;
    let Some(pct) = &lat.percentile else { return };
    let lo = pct.0.iter().map(|(_, v)| *v).min().unwrap_or(0);
    let hi = pct.0.iter().map(|(_, v)| *v).max().unwrap_or(0);
    let (unit, div) = if lo > 2_000_000 && hi > 99_999_999 {
        ("msec", 1_000_000)
    } else if lo > 2_000 && hi > 99_999 {
        ("usec", 1_000)
    } else {
        ("nsec", 1)
    };
    let _ = writeln!(s, "    {what} percentiles ({unit}):");
    let width = (hi / div).to_string().len();
    for row in pct.0.chunks(4) {
        let cells: Vec<String> = row
            .iter()
            .map(|(p, v)| format!("{p:>5.2}th=[{:>width$}]", v / div))
            .collect();
        let _ = writeln!(s, "     | {}", cells.join(", "));
    }
}

/// `2052k`, `1.5M`, like fio's IOPS figures.
fn si_count(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0}")
    } else if v < 10_000_000.0 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{:.1}M", v / 1e6)
    }
}

fn scaled_bytes(v: f64, base: f64, units: [&str; 5]) -> String {
    let mut v = v;
    let mut i = 0;
    while v >= 10_000.0 && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    if i == 0 || v >= 100.0 {
        format!("{v:.0}{}", units[i])
    } else {
        format!("{v:.1}{}", units[i])
    }
}

fn binary_bytes(v: f64) -> String {
    scaled_bytes(v, 1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
}

fn decimal_bytes(v: f64) -> String {
    scaled_bytes(v, 1000.0, ["B", "kB", "MB", "GB", "TB"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_keys_are_formatted_like_fio() {
        assert_eq!(percentile_key(1.0), "1.000000");
        assert_eq!(percentile_key(99.9), "99.900000");
        assert_eq!(percentile_key(99.99), "99.990000");
        let json = serde_json::to_string(&Percentiles(vec![(5.0, 7), (10.0, 9)])).unwrap();
        assert_eq!(json, r#"{"5.000000":7,"10.000000":9}"#);
    }

    fn run_with_writes(values: &[u64]) -> RunResult {
        let mut write = crate::engine::latency_histogram().unwrap();
        for v in values {
            write.record(*v).unwrap();
        }
        let mut stats = crate::engine::JobStats::new().unwrap();
        stats.io_bytes[Direction::Write.index()] = write.len() * 4096;
        stats.write = write;
        stats.runtime = std::time::Duration::from_secs(1);
        RunResult {
            spec: crate::job::JobSpec {
                rw: crate::job::RwMode::RandWrite,
                ..Default::default()
            },
            target: "mem://1GiB".into(),
            stats,
        }
    }

    #[test]
    fn normal_text_scales_latency_units_like_fio() {
        let fast = normal_text(&run_with_writes(&[300, 400, 500]));
        assert!(fast.contains("write: IOPS=3, "), "{fast}");
        assert!(
            fast.contains("clat (nsec): min=300, max=500, avg=400.00"),
            "{fast}"
        );
        assert!(fast.contains("clat percentiles (nsec):"), "{fast}");
        assert!(!fast.contains("read:"), "{fast}");

        let mut slow: Vec<u64> = (10..20).map(|i| i * 1000).collect();
        slow.push(400_000);
        let slow = normal_text(&run_with_writes(&slow));
        assert!(slow.contains("clat (usec): min=10, max=400,"), "{slow}");
        assert!(slow.contains("clat percentiles (usec):"), "{slow}");
        assert!(slow.contains("99.99th=[400]"), "{slow}");
        assert!(slow.contains(" 1.00th=[ 10]"), "{slow}");
    }

    #[test]
    fn sizes_and_counts_scale_like_fio() {
        assert_eq!(si_count(2_052_345.0), "2052k");
        assert_eq!(si_count(512.0), "512");
        assert_eq!(si_count(12_345_678.0), "12.3M");
        assert_eq!(binary_bytes(8_396_000_000.0), "8007MiB");
        assert_eq!(binary_bytes(40e9), "37.3GiB");
        assert_eq!(binary_bytes(8192.0), "8192B");
        assert_eq!(decimal_bytes(8_396_000_000.0), "8396MB");
    }
}
