//! The command line, in fio's vocabulary: `--rw`, `--bs`, `--iodepth`, `--runtime`,
//! `--ramp_time`, `--size`, `--rwmixread`, `--numjobs`, `--seed`, `--output-format`.
//!
//! Sizes take binary units (`4k`, `64KiB`, `1GiB`); durations take a unit (`500ms`, `10s`)
//! or, like fio, a bare number of seconds. Bad values are rejected naming the flag.

use std::time::Duration;

use clap::Parser;
use nvmirror_nvme::uri::{parse_duration, parse_size};

use crate::job::{JobSpec, RwMode, DEFAULT_SEED, MAX_IODEPTH};

/// How the report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A human summary like fio's.
    Normal,
    /// fio's JSON shape.
    Json,
}

/// fio-like load generator for nvmirror devices and volumes.
#[derive(Debug, Parser)]
#[command(name = "nvmirror-bench", version)]
pub struct Cli {
    /// Leg URI (mem://1GiB, null://1TiB, file:///path.img, /dev/nvme0n1); repeat to bench a
    /// mirrored volume over all of them
    #[arg(long = "leg", value_name = "URI", required = true)]
    pub legs: Vec<String>,

    /// I/O pattern
    #[arg(long, value_enum, default_value_t = RwMode::Read)]
    pub rw: RwMode,

    /// Bytes per I/O (4k, 64KiB, 1MiB)
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    pub bs: u64,

    /// I/Os each job keeps in flight
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IODEPTH)))]
    pub iodepth: u32,

    /// Measured time (10s, 500ms; a bare number is seconds)
    #[arg(long, default_value = "10s", value_parser = runtime_arg)]
    pub runtime: Duration,

    /// Time run before measuring starts
    #[arg(long = "ramp_time", visible_alias = "ramp-time", default_value = "0",
          value_parser = duration_arg)]
    pub ramp_time: Duration,

    /// Bytes of the target the offsets range over (default: all of it)
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,

    /// Percentage of reads in randrw jobs
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rwmixread: u32,

    /// Job threads, each pinned to a core with its own queue pair
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub numjobs: u32,

    /// Seed of the offset generators
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,

    /// Report format
    #[arg(long = "output-format", value_enum, default_value_t = OutputFormat::Normal)]
    pub output_format: OutputFormat,

    /// `on`: format the legs as a persistent volume (superblock and write-intent bitmap) and
    /// report the bitmap's metadata writes, hit rate and marked regions on stderr.
    #[arg(long, value_enum, default_value_t = BitmapMode::Off)]
    pub bitmap: BitmapMode,

    /// Record the volume's per-stage latency breakdown and add it to the report (see
    /// docs/bench.md; needs a volume: two or more legs, or --bitmap on)
    #[arg(long)]
    pub breakdown: bool,
}

/// `--bitmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BitmapMode {
    On,
    Off,
}

impl Cli {
    /// The job the flags describe.
    pub fn job_spec(&self) -> JobSpec {
        JobSpec {
            rw: self.rw,
            bs: self.bs,
            iodepth: self.iodepth,
            runtime: self.runtime,
            ramp_time: self.ramp_time,
            size: self.size,
            rwmixread: self.rwmixread,
            numjobs: self.numjobs,
            seed: self.seed,
        }
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| format!("'{s}' is out of range"))?;
        return Ok(Duration::from_secs(secs));
    }
    parse_duration(s)
}

fn runtime_arg(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut argv = vec!["nvmirror-bench", "--leg", "mem://1GiB"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_fio_vocabulary() {
        let cli = parse(&[
            "--rw",
            "randrw",
            "--bs",
            "64KiB",
            "--iodepth",
            "32",
            "--runtime",
            "2",
            "--ramp_time",
            "500ms",
            "--size",
            "1GiB",
            "--rwmixread",
            "70",
            "--numjobs",
            "2",
            "--seed",
            "7",
            "--output-format",
            "json",
        ])
        .unwrap();
        let spec = cli.job_spec();
        assert_eq!(spec.rw, RwMode::RandRw);
        assert_eq!(spec.bs, 64 << 10);
        assert_eq!(spec.iodepth, 32);
        assert_eq!(spec.runtime, Duration::from_secs(2));
        assert_eq!(spec.ramp_time, Duration::from_millis(500));
        assert_eq!(spec.size, Some(1 << 30));
        assert_eq!((spec.rwmixread, spec.numjobs, spec.seed), (70, 2, 7));
        assert_eq!(cli.output_format, OutputFormat::Json);
        let dashed = parse(&["--ramp-time", "1s"]).unwrap();
        assert_eq!(dashed.ramp_time, Duration::from_secs(1));
        let two =
            Cli::try_parse_from(["b", "--leg", "mem://1MiB", "--leg", "null://1MiB"]).unwrap();
        assert_eq!(two.legs, ["mem://1MiB", "null://1MiB"]);
    }

    #[test]
    fn rejects_bad_values_naming_the_flag() {
        for (args, flag) in [
            (&["--bs", "4XB"][..], "--bs"),
            (&["--size", "0"], "--size"),
            (&["--size", "lots"], "--size"),
            (&["--runtime", "0"], "--runtime"),
            (&["--runtime", "5 parsecs"], "--runtime"),
            (&["--ramp_time", "1h"], "--ramp_time"),
            (&["--iodepth", "0"], "--iodepth"),
            (&["--rwmixread", "101"], "--rwmixread"),
            (&["--rw", "trim"], "--rw"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let err = Cli::try_parse_from(["b", "--rw", "read"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--leg"), "{err}");
    }
}
