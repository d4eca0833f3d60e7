//! The command line, in fio's vocabulary: `--rw`, `--bs`, `--bsrange`, `--iodepth`,
//! `--runtime`, `--ramp_time`, `--time_based`, `--offset`, `--size`, `--io_size`,
//! `--rwmixread`, `--numjobs`, `--seed`, `--verify`, `--rate_iops`, `--output-format`, and a
//! fio-style job file as the positional argument (see [`crate::jobfile`]).
//!
//! Sizes take binary units (`4k`, `64KiB`, `1GiB`); durations take a unit (`500ms`, `10s`)
//! or, like fio, a bare number of seconds. Bad values are rejected naming the flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use nvmirror_nvme::uri::{parse_duration, parse_size};

use crate::job::{BsRange, JobSpec, RwMode, VerifyMode, DEFAULT_SEED, MAX_IODEPTH};

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
    /// fio-style job file: a global section and job sections of key=value lines; the jobs run
    /// one after another
    #[arg(value_name = "JOBFILE")]
    pub jobfile: Option<PathBuf>,

    /// Leg URI (mem://1GiB, null://1TiB, file:///path.img, /dev/nvme0n1); repeat to bench a
    /// mirrored volume over all of them
    #[arg(long = "leg", value_name = "URI",
          required_unless_present_any = ["target", "jobfile"], conflicts_with = "target")]
    pub legs: Vec<String>,

    /// Mirror the last --leg asynchronously through a journal on this device
    /// (`async-journal`, docs/journal.md); the run's end prints the leg's replication state
    #[arg(long, value_name = "URI", conflicts_with = "target")]
    pub journal: Option<String>,

    /// A staging area at the far site for the --journal leg: with --cycle the leg ships in
    /// cycles (`async-cycle`, docs/cycles.md), else it stays `async-journal` and ships a
    /// backlog in batches through it (docs/journal.md); the run's end prints the cycles
    #[arg(long, value_name = "URI", requires = "journal")]
    pub staging: Option<String>,

    /// Ship the --staging leg in cycles of this period (`async-cycle`)
    #[arg(long, value_parser = duration_arg, requires = "staging")]
    pub cycle: Option<Duration>,

    /// A running target to drive instead of in-process legs
    /// (nvme-tcp://HOST:PORT/NQN, nbd://HOST:PORT/EXPORT); each job thread opens its own queue
    #[arg(long, value_name = "URI")]
    pub target: Option<String>,

    /// I/O pattern
    #[arg(long, value_enum, default_value_t = RwMode::Read)]
    pub rw: RwMode,

    /// Bytes per I/O (4k, 64KiB, 1MiB)
    #[arg(long, default_value = "4k", value_parser = size_arg, conflicts_with = "bsrange")]
    pub bs: u64,

    /// Random I/O sizes MIN-MAX (4k-64k), multiples of MIN; offsets are aligned to MIN
    #[arg(long, value_name = "MIN-MAX", value_parser = bsrange_arg)]
    pub bsrange: Option<BsRange>,

    /// I/Os each job keeps in flight
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IODEPTH)))]
    pub iodepth: u32,

    /// Longest measured time (10s, 500ms; a bare number is seconds); all of it with
    /// --time_based
    #[arg(long, default_value = "10s", value_parser = runtime_arg)]
    pub runtime: Duration,

    /// Run for the whole --runtime, wrapping over the region, instead of stopping after
    /// --io_size (default --size) bytes
    #[arg(long = "time_based", visible_alias = "time-based")]
    pub time_based: bool,

    /// Draw random offsets independently, repeats allowed (fio's norandommap); by default a
    /// random job visits every block once per pass over the region, in random order
    #[arg(long = "norandommap")]
    pub norandommap: bool,

    /// Time run before measuring starts
    #[arg(long = "ramp_time", visible_alias = "ramp-time", default_value = "0",
          value_parser = duration_arg)]
    pub ramp_time: Duration,

    /// Bytes of the target the offsets range over (default: all of it after --offset)
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,

    /// First byte of the region the offsets range over
    #[arg(long, default_value = "0", value_parser = offset_arg)]
    pub offset: u64,

    /// Bytes each job thread transfers before it stops without --time_based (default: --size)
    #[arg(long = "io_size", visible_alias = "io-size", value_parser = size_arg)]
    pub io_size: Option<u64>,

    /// Percentage of reads in randrw jobs
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rwmixread: u32,

    /// Job threads, each pinned to a core with its own queue pair
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub numjobs: u32,

    /// Seed of the offset generators
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,

    /// Stamp every written block and check every block read: crc32c or none
    #[arg(long, value_enum, default_value_t = VerifyMode::None)]
    pub verify: VerifyMode,

    /// I/Os per second per job thread, on a fixed schedule (open loop: latency counts from
    /// the time each I/O was due)
    #[arg(long = "rate_iops", visible_alias = "rate-iops",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rate_iops: Option<u64>,

    /// With --verify: write every acknowledged write (LBA, generation, seed) to FILE once the
    /// run has drained, before the read-back pass (`.N` appended for job thread N > 0)
    #[arg(long = "verify-ledger", value_name = "FILE")]
    pub verify_ledger: Option<PathBuf>,

    /// Write HdrHistogram interval logs, one per job and direction, into DIR
    #[arg(long = "hdr-log", value_name = "DIR")]
    pub hdr_log: Option<PathBuf>,

    /// Length of one interval of --hdr-log
    #[arg(long = "log_interval", visible_alias = "log-interval", default_value = "1s",
          value_parser = runtime_arg)]
    pub log_interval: Duration,

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

    /// The options given on the command line (clap ids), which override a job file's
    /// `[global]` section.
    #[arg(skip)]
    pub explicit: Vec<String>,
}

/// `--bitmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BitmapMode {
    On,
    Off,
}

impl Cli {
    /// Parses `args` (the program name first) and records which options were given.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        cli.explicit = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().to_string())
            .collect();
        Ok(cli)
    }

    /// Parses the process's arguments, exiting with clap's message on errors.
    pub fn parse_args() -> Self {
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// The job the flags describe.
    pub fn job_spec(&self) -> JobSpec {
        let mut spec = JobSpec::default();
        self.apply_to(&mut spec, |_| true);
        spec
    }

    /// Whether option `id` (a clap id: `rw`, `legs`, `time_based`, …) was given on the
    /// command line, as recorded by [`Cli::try_parse_args`].
    pub fn given(&self, id: &str) -> bool {
        self.explicit.iter().any(|e| e == id)
    }

    /// Sets the job options given on the command line over `spec` (a job file's settings).
    pub fn override_spec(&self, spec: &mut JobSpec) {
        self.apply_to(spec, |id| self.given(id));
    }

    fn apply_to(&self, spec: &mut JobSpec, given: impl Fn(&str) -> bool) {
        if given("rw") {
            spec.rw = self.rw;
        }
        if given("bs") {
            spec.bs = self.bs;
            if !self.explicit.is_empty() {
                spec.bsrange = None;
            }
        }
        if given("bsrange") {
            spec.bsrange = self.bsrange;
        }
        if given("iodepth") {
            spec.iodepth = self.iodepth;
        }
        if given("runtime") {
            spec.runtime = self.runtime;
        }
        if given("time_based") {
            spec.time_based = self.time_based;
        }
        if given("norandommap") {
            spec.norandommap = self.norandommap;
        }
        if given("ramp_time") {
            spec.ramp_time = self.ramp_time;
        }
        if given("size") {
            spec.size = self.size;
        }
        if given("offset") {
            spec.offset = self.offset;
        }
        if given("io_size") {
            spec.io_size = self.io_size;
        }
        if given("rwmixread") {
            spec.rwmixread = self.rwmixread;
        }
        if given("numjobs") {
            spec.numjobs = self.numjobs;
        }
        if given("seed") {
            spec.seed = self.seed;
        }
        if given("verify") {
            spec.verify = self.verify;
        }
        if given("rate_iops") {
            spec.rate_iops = self.rate_iops;
        }
        spec.log_interval = self.hdr_log.as_ref().map(|_| self.log_interval);
        if self.verify_ledger.is_some() {
            spec.verify_ledger = self.verify_ledger.clone();
        }
    }
}

pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

pub(crate) fn offset_arg(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s)
}

pub(crate) fn bsrange_arg(s: &str) -> Result<BsRange, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not MIN-MAX (4k-64k)"))?;
    let (min, max) = (parse_size(lo)?, parse_size(hi)?);
    if min > max {
        return Err(format!("the low end {min} exceeds the high end {max}"));
    }
    Ok(BsRange { min, max })
}

pub(crate) fn duration_arg(s: &str) -> Result<Duration, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| format!("'{s}' is out of range"))?;
        return Ok(Duration::from_secs(secs));
    }
    parse_duration(s)
}

pub(crate) fn runtime_arg(s: &str) -> Result<Duration, String> {
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
            (&["--rw", "trims"], "--rw"),
            (&["--bsrange", "4k"], "--bsrange"),
            (&["--bsrange", "64k-4k"], "--bsrange"),
            (&["--bs", "8k", "--bsrange", "4k-64k"], "--bs"),
            (&["--target", "nvme-tcp://h/nqn.x"], "--target"),
            (&["--rate_iops", "0"], "--rate_iops"),
            (&["--verify", "md5"], "--verify"),
            (&["--offset", "x"], "--offset"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let err = Cli::try_parse_from(["b", "--rw", "read"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--leg"), "{err}");
    }

    #[test]
    fn parses_the_new_fio_options_and_remembers_what_was_given() {
        let cli = Cli::try_parse_args([
            "b",
            "--target",
            "nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.nvmirror:vol0",
            "--rw",
            "trim",
            "--bsrange",
            "4k-64k",
            "--offset",
            "1MiB",
            "--io_size",
            "8MiB",
            "--time_based",
            "--rate_iops",
            "5000",
            "--hdr-log",
            "/tmp/x",
            "--log_interval",
            "250ms",
        ])
        .unwrap();
        assert!(cli.legs.is_empty());
        let spec = cli.job_spec();
        assert_eq!(spec.rw, RwMode::Trim);
        assert_eq!(
            spec.bsrange,
            Some(BsRange {
                min: 4096,
                max: 65536
            })
        );
        assert_eq!((spec.offset, spec.io_size), (1 << 20, Some(8 << 20)));
        assert!(spec.time_based);
        assert_eq!(spec.rate_iops, Some(5000));
        assert_eq!(spec.log_interval, Some(Duration::from_millis(250)));
        for id in ["target", "rw", "bsrange", "time_based", "rate_iops"] {
            assert!(
                cli.explicit.iter().any(|e| e == id),
                "{id}: {:?}",
                cli.explicit
            );
        }
        assert!(!cli.explicit.iter().any(|e| e == "iodepth"));
        let plain = parse(&["--verify", "crc32c"]).unwrap();
        assert_eq!(plain.job_spec().verify, VerifyMode::Crc32c);
        assert!(!plain.job_spec().time_based);
        assert_eq!(plain.job_spec().log_interval, None);
        let file = Cli::try_parse_args(["b", "jobs.fio"]).unwrap();
        assert_eq!(file.jobfile, Some(PathBuf::from("jobs.fio")));
    }
}
