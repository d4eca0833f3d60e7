//! fio-style job files: `nvmirror-bench JOBFILE`.
//!
//! ```text
//! ; comments start with ';' or '#'
//! [global]
//! target=nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.nvmirror:vol0
//! bs=4k
//! size=64MiB
//!
//! [fill]
//! rw=write
//! verify=crc32c
//!
//! [check]
//! rw=randread
//! verify=crc32c
//! iodepth=16
//! ```
//!
//! Each section other than `[global]` is a job, named after the section; jobs run one after
//! another, each with its own report entry. Keys are the command-line flag names without the
//! dashes (`rw`, `bs`, `bsrange`, `iodepth`, `numjobs`, `size`, `offset`, `io_size`,
//! `runtime`, `ramp_time`, `time_based`, `norandommap`, `rwmixread`, `verify`, `rate_iops`, `seed`), plus
//! `leg=` (repeatable), `target=` and fio's `filename=` (a target for `nvme-tcp://` and
//! `nbd://` URIs, a leg otherwise). A setting is looked up in the job's section first, then on
//! the command line, then in `[global]`, then the defaults. Unknown keys and bad values are
//! errors naming the file, line and key.

use std::path::Path;

use crate::cli::{bsrange_arg, duration_arg, offset_arg, runtime_arg, size_arg, Cli};
use crate::job::{JobSpec, RwMode, VerifyMode, MAX_IODEPTH};
use crate::{Error, Result};

/// One `key=value` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub line: usize,
    pub key: String,
    pub value: String,
}

/// A `[name]` section and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub line: usize,
    pub settings: Vec<Setting>,
}

/// A parsed job file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFile {
    /// The file's name, for messages.
    pub path: String,
    pub global: Vec<Setting>,
    pub jobs: Vec<Section>,
}

/// What a job runs against, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    pub spec: JobSpec,
    /// A running target, or
    pub target: Option<String>,
    /// in-process legs (several: a mirrored volume).
    pub legs: Vec<String>,
}

impl JobConfig {
    /// Checks that exactly one of a target and legs is named.
    pub fn check_device(&self) -> Result<()> {
        match (&self.target, self.legs.is_empty()) {
            (Some(_), false) => Err(Error::Flag {
                flag: "--target",
                reason: "cannot be combined with --leg; name one or the other".into(),
            }),
            (None, true) => Err(Error::Flag {
                flag: "--leg",
                reason: "a --leg or a --target is needed".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl JobFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadJobFile {
            path: name.clone(),
            source,
        })?;
        Self::parse(&name, &text)
    }

    /// Parses the text of a job file and checks every setting.
    pub fn parse(path: &str, text: &str) -> Result<Self> {
        let err = |line: usize, key: &str, reason: &str| Error::JobFile {
            path: path.to_string(),
            line,
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let mut file = JobFile {
            path: path.to_string(),
            global: Vec::new(),
            jobs: Vec::new(),
        };
        // None: before any section; Some(None): [global]; Some(Some(i)): jobs[i].
        let mut current: Option<Option<usize>> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
                continue;
            }
            if let Some(rest) = l.strip_prefix('[') {
                let name = rest
                    .strip_suffix(']')
                    .ok_or_else(|| err(line, "", "a section header needs its closing ']'"))?
                    .trim();
                if name.is_empty() {
                    return Err(err(line, "", "a section needs a name"));
                }
                if name == "global" {
                    current = Some(None);
                } else {
                    file.jobs.push(Section {
                        name: name.to_string(),
                        line,
                        settings: Vec::new(),
                    });
                    current = Some(Some(file.jobs.len() - 1));
                }
                continue;
            }
            let (key, value) = match l.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (l, ""),
            };
            let key = key.replace('-', "_");
            let setting = Setting {
                line,
                key,
                value: value.to_string(),
            };
            match current {
                None => {
                    return Err(err(
                        line,
                        &setting.key,
                        "a setting before the first [section]",
                    ))
                }
                Some(None) => file.global.push(setting),
                Some(Some(j)) => file.jobs[j].settings.push(setting),
            }
        }
        if file.jobs.is_empty() {
            return Err(err(text.lines().count().max(1), "", "no job sections"));
        }
        // Check every setting of every job now, so a bad line fails before anything runs.
        for job in &file.jobs {
            let mut cfg = JobConfig {
                spec: JobSpec::default(),
                target: None,
                legs: Vec::new(),
            };
            file.apply(&mut cfg, &file.global)?;
            file.apply(&mut cfg, &job.settings)?;
        }
        Ok(file)
    }

    /// The jobs to run: each section over `[global]`, with the command line's options in
    /// between.
    pub fn configs(&self, cli: &Cli) -> Result<Vec<JobConfig>> {
        self.jobs
            .iter()
            .map(|job| {
                let mut cfg = JobConfig {
                    spec: JobSpec::default(),
                    target: None,
                    legs: Vec::new(),
                };
                self.apply(&mut cfg, &self.global)?;
                cli.override_spec(&mut cfg.spec);
                if cli.given("target") {
                    cfg.target.clone_from(&cli.target);
                    cfg.legs.clear();
                }
                if cli.given("legs") {
                    cfg.legs.clone_from(&cli.legs);
                    cfg.target = None;
                }
                self.apply(&mut cfg, &job.settings)?;
                cfg.spec.name = Some(job.name.clone());
                cfg.check_device().map_err(|e| Error::JobFile {
                    path: self.path.clone(),
                    line: job.line,
                    key: format!("[{}]", job.name),
                    reason: e.to_string(),
                })?;
                Ok(cfg)
            })
            .collect()
    }

    /// Applies one layer of settings; the first `leg=` of a layer replaces the legs (and any
    /// target) of the layers before it.
    fn apply(&self, cfg: &mut JobConfig, settings: &[Setting]) -> Result<()> {
        let mut fresh_legs = true;
        let (mut bs_line, mut bsrange_line) = (None, None);
        for s in settings {
            let err = |reason: String| Error::JobFile {
                path: self.path.clone(),
                line: s.line,
                key: s.key.clone(),
                reason,
            };
            let mut device = |cfg: &mut JobConfig, leg: bool| {
                if leg {
                    if fresh_legs {
                        cfg.legs.clear();
                        fresh_legs = false;
                    }
                    cfg.legs.push(s.value.clone());
                    cfg.target = None;
                } else {
                    cfg.target = Some(s.value.clone());
                    cfg.legs.clear();
                }
            };
            let spec = &mut cfg.spec;
            let v = s.value.as_str();
            if v.is_empty() && s.key != "time_based" && s.key != "norandommap" {
                return Err(err("needs a value (key=value)".into()));
            }
            match s.key.as_str() {
                "rw" | "readwrite" => {
                    spec.rw = RwMode::from_name(v).ok_or_else(|| {
                        err(format!(
                            "'{v}' is not one of read, write, randread, randwrite, randrw, trim, randtrim"
                        ))
                    })?;
                }
                "bs" => {
                    spec.bs = size_arg(v).map_err(err)?;
                    spec.bsrange = None;
                    bs_line = Some(s.line);
                }
                "bsrange" => {
                    spec.bsrange = Some(bsrange_arg(v).map_err(err)?);
                    bsrange_line = Some(s.line);
                }
                "iodepth" => spec.iodepth = number(v, 1, u64::from(MAX_IODEPTH)).map_err(err)?,
                "numjobs" => spec.numjobs = number(v, 1, 1024).map_err(err)?,
                "rwmixread" => spec.rwmixread = number(v, 0, 100).map_err(err)?,
                "size" => spec.size = Some(size_arg(v).map_err(err)?),
                "offset" => spec.offset = offset_arg(v).map_err(err)?,
                "io_size" => spec.io_size = Some(size_arg(v).map_err(err)?),
                "runtime" => spec.runtime = runtime_arg(v).map_err(err)?,
                "ramp_time" => spec.ramp_time = duration_arg(v).map_err(err)?,
                "time_based" => spec.time_based = boolean(v).map_err(err)?,
                "norandommap" => spec.norandommap = boolean(v).map_err(err)?,
                "verify" => {
                    spec.verify = match v {
                        "crc32c" => VerifyMode::Crc32c,
                        "none" | "0" => VerifyMode::None,
                        _ => return Err(err(format!("'{v}' is not crc32c or none"))),
                    }
                }
                "rate_iops" => spec.rate_iops = Some(number(v, 1, u64::MAX).map_err(err)?),
                "seed" | "randseed" => spec.seed = number(v, 0, u64::MAX).map_err(err)?,
                "leg" => device(cfg, true),
                "target" => device(cfg, false),
                "filename" => {
                    let network = v.starts_with("nvme-tcp://") || v.starts_with("nbd://");
                    device(cfg, !network)
                }
                _ => return Err(err("unknown key".into())),
            }
        }
        if let (Some(bs), Some(range)) = (bs_line, bsrange_line) {
            let (line, key) = if bs > range {
                (bs, "bs")
            } else {
                (range, "bsrange")
            };
            return Err(Error::JobFile {
                path: self.path.clone(),
                line,
                key: key.into(),
                reason: "bs and bsrange exclude each other in one section".into(),
            });
        }
        Ok(())
    }
}

/// A decimal number in `lo..=hi`.
fn number<T: TryFrom<u64>>(v: &str, lo: u64, hi: u64) -> std::result::Result<T, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("'{v}' is not a whole number"))?;
    if !(lo..=hi).contains(&n) {
        return Err(format!("{n} is outside {lo}..={hi}"));
    }
    T::try_from(n).map_err(|_| format!("{n} is out of range"))
}

/// fio's booleans: a bare key, `1`/`0`, `true`/`false`, `yes`/`no`.
fn boolean(v: &str) -> std::result::Result<bool, String> {
    match v {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("'{v}' is not a boolean (1 or 0)")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::BsRange;

    const GOOD: &str = "\
; a fill, then a check
# both comment styles
[global]
target=nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.nvmirror:vol0
bs=8k
size=64MiB
runtime=2
time_based

[fill]
rw=write
verify=crc32c
iodepth=16
time_based=0

[mixed]
rw=randrw
rwmixread=70
bsrange=4k-64k
offset=1MiB
io_size=8MiB
ramp_time=500ms
numjobs=2
rate_iops=1000
seed=7
filename=mem://128MiB
leg=null://128MiB
";

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["nvmirror-bench", "jobs.fio"];
        argv.extend_from_slice(args);
        Cli::try_parse_args(argv).unwrap()
    }

    #[test]
    fn a_good_file_gives_one_job_per_section() {
        let file = JobFile::parse("jobs.fio", GOOD).unwrap();
        assert_eq!(file.global.len(), 5);
        let jobs = file.configs(&cli(&[])).unwrap();
        assert_eq!(jobs.len(), 2);
        let fill = &jobs[0];
        assert_eq!(fill.spec.name.as_deref(), Some("fill"));
        assert_eq!(fill.spec.rw, RwMode::Write);
        assert_eq!((fill.spec.bs, fill.spec.size), (8192, Some(64 << 20)));
        assert_eq!(fill.spec.verify, VerifyMode::Crc32c);
        assert!(!fill.spec.time_based, "the section overrides [global]");
        assert_eq!(fill.spec.runtime, Duration::from_secs(2));
        assert_eq!(
            fill.target.as_deref(),
            Some("nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.nvmirror:vol0")
        );
        assert!(fill.legs.is_empty());

        let mixed = &jobs[1].spec;
        assert_eq!((mixed.rw, mixed.rwmixread), (RwMode::RandRw, 70));
        assert_eq!(
            mixed.bsrange,
            Some(BsRange {
                min: 4096,
                max: 65536
            })
        );
        assert_eq!((mixed.offset, mixed.io_size), (1 << 20, Some(8 << 20)));
        assert_eq!(mixed.ramp_time, Duration::from_millis(500));
        assert_eq!(
            (mixed.numjobs, mixed.rate_iops, mixed.seed),
            (2, Some(1000), 7)
        );
        assert!(mixed.time_based, "inherited from [global]");
        assert_eq!(
            jobs[1].target, None,
            "filename= with a leg URI replaces the target"
        );
        assert_eq!(jobs[1].legs, ["mem://128MiB", "null://128MiB"]);
    }

    #[test]
    fn the_command_line_overrides_global_but_not_the_sections() {
        let file = JobFile::parse("jobs.fio", GOOD).unwrap();
        let jobs = file
            .configs(&cli(&[
                "--bs",
                "16k",
                "--iodepth",
                "4",
                "--leg",
                "mem://1GiB",
            ]))
            .unwrap();
        assert_eq!(jobs[0].spec.bs, 16384);
        assert_eq!(jobs[0].spec.iodepth, 16, "[fill] sets its own iodepth");
        assert_eq!(jobs[1].spec.iodepth, 4);
        assert_eq!(jobs[0].legs, ["mem://1GiB"]);
        assert_eq!(jobs[0].target, None);
        assert_eq!(jobs[1].legs, ["mem://128MiB", "null://128MiB"]);
    }

    #[test]
    fn every_kind_of_error_names_file_line_and_key() {
        for (text, line, key) in [
            ("[job]\nrw=randwrite\nioengine=libaio\n", 3, "ioengine"),
            ("[job]\nbs=4XB\n", 2, "bs"),
            ("[job]\niodepth=0\n", 2, "iodepth"),
            ("[job]\nrw=sideways\n", 2, "rw"),
            ("[job]\nrwmixread=101\n", 2, "rwmixread"),
            ("[job]\nruntime=5 parsecs\n", 2, "runtime"),
            ("[job]\ntime_based=maybe\n", 2, "time_based"),
            ("[job]\nverify=md5\n", 2, "verify"),
            ("[job]\nrate_iops=0\n", 2, "rate_iops"),
            ("[job]\nseed=-1\n", 2, "seed"),
            ("[job]\nsize=\n", 2, "size"),
            ("[global]\nbsrange=64k-4k\n[job]\n", 2, "bsrange"),
            ("[job]\nbs=4k\nbsrange=4k-8k\n", 3, "bsrange"),
            ("rw=read\n[job]\n", 1, "rw"),
        ] {
            let e = JobFile::parse("t.fio", text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("t.fio:{line}: {key}: ")),
                "{text:?}: {e}"
            );
        }
        for (text, line, what) in [
            ("[job\nrw=read\n", 1, "closing"),
            ("[ ]\n", 1, "name"),
            ("; nothing\n[global]\nbs=4k\n", 3, "no job sections"),
        ] {
            let e = JobFile::parse("t.fio", text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("t.fio:{line}: ")), "{e}");
            assert!(e.contains(what), "{e}");
        }
        // A job without a device is refused naming its section.
        let file = JobFile::parse("t.fio", "[lonely]\nrw=read\n").unwrap();
        let e = file.configs(&cli(&[])).unwrap_err().to_string();
        assert!(e.starts_with("t.fio:1: [lonely]: --leg"), "{e}");
        let e = JobFile::read(Path::new("/nonexistent/jobs.fio"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/jobs.fio: "), "{e}");
    }
}
