//! `nvmirror-bench`: a fio-like load generator for nvmirror devices and volumes.
//!
//! Each job thread opens its own queue pair on the target and keeps up to `iodepth` I/Os in
//! flight, in a closed loop or on a fixed schedule (`rate_iops`); latencies go into HDR
//! histograms; `--verify crc32c` stamps and checks every block; the report is fio's normal
//! text or fio's JSON shape, so fio tooling can read it. Jobs come from the command line or
//! from a fio-style job file.
//!
//! ```
//! use std::time::Duration;
//! use nvmirror_bench::{engine, job::{JobSpec, RwMode}};
//!
//! let target = nvmirror_nvme::open_leg("mem://16MiB").unwrap();
//! let spec = JobSpec {
//!     rw: RwMode::RandWrite,
//!     iodepth: 8,
//!     runtime: Duration::from_millis(20),
//!     time_based: true,
//!     ..JobSpec::default()
//! };
//! let run = engine::run(&target, &spec).unwrap();
//! assert!(run.stats.write.len() > 0);
//! assert_eq!(run.stats.errors, 0);
//! ```

pub mod breakdown;
pub mod cli;
pub mod engine;
mod error;
pub mod histlog;
pub mod job;
mod job_thread;
pub mod jobfile;
pub mod pattern;
pub mod plot;
pub mod report;
pub mod verify;

use std::io::Write;
use std::sync::Arc;

use nvmirror_nvme::BlockDevice;

pub use error::{Error, Result};

use cli::{Cli, OutputFormat};
use engine::RunResult;
use jobfile::JobConfig;

/// Opens the legs and builds the target (see [`build_volume`]).
pub fn open_target(uris: &[String], bitmap: bool) -> Result<Target> {
    open_target_with(uris, bitmap, None)
}

/// How the last leg is mirrored asynchronously: through a journal on `journal`, with a
/// staging area `staging` when it is given: in cycles of `cycle` when that is given too, else
/// as `async-journal` that ships a backlog in batches through it.
#[derive(Clone, Copy, Debug)]
pub struct AsyncLeg<'a> {
    pub journal: &'a str,
    pub staging: Option<&'a str>,
    pub cycle: Option<std::time::Duration>,
}

/// [`open_target`], the last leg mirrored asynchronously as `async_leg` says.
pub fn open_target_with(
    uris: &[String],
    bitmap: bool,
    async_leg: Option<AsyncLeg<'_>>,
) -> Result<Target> {
    let mut legs = uris
        .iter()
        .map(|uri| {
            nvmirror_nvme::open_leg(uri).map_err(|source| Error::OpenLeg {
                uri: uri.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut journaled = None;
    if let Some(a) = async_leg {
        let flag = |reason: String| Error::Flag {
            flag: "--journal",
            reason,
        };
        if legs.len() < 2 {
            return Err(flag(
                "needs two or more --leg (the last is mirrored asynchronously)".into(),
            ));
        }
        let far = legs.pop().expect("two or more legs");
        let dev = nvmirror_nvme::open_leg(a.journal).map_err(|e| flag(e.to_string()))?;
        let leg = match a.staging {
            None => nvmirror_mirror::JournaledLeg::open(far, dev, Default::default()),
            Some(st) => {
                let stg = nvmirror_nvme::open_leg(st).map_err(|e| Error::Flag {
                    flag: "--staging",
                    reason: e.to_string(),
                })?;
                match a.cycle {
                    None => nvmirror_mirror::JournaledLeg::open_staged(
                        far,
                        dev,
                        stg,
                        false,
                        Default::default(),
                    ),
                    Some(cycle) => nvmirror_mirror::JournaledLeg::open_cycle(
                        far,
                        dev,
                        stg,
                        nvmirror_mirror::CycleConfig::every(cycle),
                        nvmirror_mirror::JournalConfig {
                            max_lag: (4 * cycle).max(std::time::Duration::from_secs(30)),
                            ..Default::default()
                        },
                    ),
                }
            }
        };
        let leg = Arc::new(leg.map_err(|e| flag(e.to_string()))?);
        legs.push(Arc::clone(&leg) as Arc<dyn BlockDevice>);
        journaled = Some(leg);
    }
    let mut target = build_volume(legs, bitmap)?;
    target.journaled = journaled;
    Ok(target)
}

/// What a run drives: the device, and the volume when there is one (for its statistics).
#[derive(Debug)]
pub struct Target {
    pub device: Arc<dyn BlockDevice>,
    pub volume: Option<Arc<nvmirror_mirror::Volume>>,
    /// The asynchronous leg (`--journal`).
    pub journaled: Option<Arc<nvmirror_mirror::JournaledLeg>>,
}

/// One leg is benchmarked as itself; several are joined into a mirrored volume.
pub fn build_target(legs: Vec<Arc<dyn BlockDevice>>) -> Result<Arc<dyn BlockDevice>> {
    Ok(build_volume(legs, false)?.device)
}

/// One leg without `bitmap` is benchmarked as itself (the single-device baseline); several
/// legs, or any number with `bitmap`, become a volume, first leg primary. With `bitmap` the
/// legs are formatted as a persistent volume (superblock and write-intent bitmap; existing
/// superblocks of a `bench` volume are overwritten, other volumes' legs are refused).
pub fn build_volume(mut legs: Vec<Arc<dyn BlockDevice>>, bitmap: bool) -> Result<Target> {
    let flag = |e: nvmirror_mirror::Error| Error::Flag {
        flag: "--leg",
        reason: e.to_string(),
    };
    let cfg = nvmirror_mirror::VolumeConfig::default();
    let volume = match (legs.len(), bitmap) {
        (0, _) => {
            return Err(Error::Flag {
                flag: "--leg",
                reason: "at least one leg is needed".into(),
            })
        }
        (1, false) => {
            return Ok(Target {
                device: legs.swap_remove(0),
                volume: None,
                journaled: None,
            })
        }
        (_, false) => nvmirror_mirror::Volume::new("bench", legs, cfg).map_err(flag)?,
        (_, true) => nvmirror_mirror::Volume::format("bench", legs, cfg, true).map_err(flag)?,
    };
    let volume = Arc::new(volume);
    Ok(Target {
        device: Arc::clone(&volume) as Arc<dyn BlockDevice>,
        volume: Some(volume),
        journaled: None,
    })
}

/// Opens what a job runs against: a running target (`--target`, one device opened with
/// `open_leg`) or in-process legs (see [`open_target`]).
pub fn open_job_target(
    target: Option<&str>,
    legs: &[String],
    bitmap: bool,
    async_leg: Option<AsyncLeg<'_>>,
) -> Result<Target> {
    match target {
        Some(_) if bitmap => Err(Error::Flag {
            flag: "--bitmap",
            reason: "formats in-process legs; it cannot be used with --target".into(),
        }),
        Some(uri) => Ok(Target {
            device: nvmirror_nvme::open_leg(uri).map_err(|source| Error::OpenTarget {
                uri: uri.to_string(),
                source,
            })?,
            volume: None,
            journaled: None,
        }),
        None => open_target_with(legs, bitmap, async_leg),
    }
}

/// The jobs the command line asks for: its own, or each section of its job file.
pub fn job_configs(cli: &Cli) -> Result<Vec<JobConfig>> {
    match &cli.jobfile {
        Some(path) => jobfile::JobFile::read(path)?.configs(cli),
        None => {
            let cfg = JobConfig {
                spec: cli.job_spec(),
                target: cli.target.clone(),
                legs: cli.legs.clone(),
            };
            cfg.check_device()?;
            Ok(vec![cfg])
        }
    }
}

/// Whether a run should make the exit status non-zero: failed I/Os or failed verification.
pub fn run_failed(run: &RunResult) -> bool {
    run.stats.errors > 0 || run.stats.verify.failures > 0
}

/// Runs what the command line asks for (job-file sections one after another, on the same
/// opened devices when they name the same ones) and writes the report to `out`.
pub fn run_cli(cli: &Cli, out: &mut dyn Write) -> Result<Vec<RunResult>> {
    let bitmap = cli.bitmap == cli::BitmapMode::On;
    let configs = job_configs(cli)?;
    // Devices opened so far, by (target, legs): later sections reuse them.
    type DeviceKey = (Option<String>, Vec<String>);
    let mut opened: Vec<(DeviceKey, Target)> = Vec::new();
    if cli.breakdown && configs.len() > 1 {
        return Err(Error::Flag {
            flag: "--breakdown",
            reason: "works with one job, not a job file of several sections".into(),
        });
    }
    let mut runs = Vec::with_capacity(configs.len());
    let mut stages = Vec::with_capacity(configs.len());
    for cfg in &configs {
        let key = (cfg.target.clone(), cfg.legs.clone());
        let at = match opened.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let target = open_job_target(
                    cfg.target.as_deref(),
                    &cfg.legs,
                    bitmap,
                    cli.journal.as_deref().map(|journal| AsyncLeg {
                        journal,
                        staging: cli.staging.as_deref(),
                        cycle: cli.cycle,
                    }),
                )?;
                opened.push((key, target));
                opened.len() - 1
            }
        };
        let volume = opened[at].1.volume.as_deref();
        if cli.breakdown {
            breakdown::enable(volume, &cfg.spec)?;
        }
        let run = engine::run(&opened[at].1.device, &cfg.spec)?;
        if let Some(dir) = &cli.hdr_log {
            histlog::write_logs(dir, &run)?;
        }
        stages.push(volume.filter(|_| cli.breakdown).map(breakdown::collect));
        runs.push(run);
    }
    match (cli.output_format, stages.as_slice()) {
        (OutputFormat::Normal, _) => {
            for (run, st) in runs.iter().zip(&stages) {
                report::write_normal(run, out)?;
                if let Some(st) = st {
                    breakdown::write_text(st, out)?;
                }
            }
        }
        (OutputFormat::Json, [Some(st)]) => breakdown::write_json(&runs[0], st, out)?,
        (OutputFormat::Json, _) => report::write_json_runs(&runs, out)?,
    }
    for leg in opened.iter().filter_map(|(_, t)| t.journaled.as_ref()) {
        if let Some(r) = leg.replication() {
            eprintln!(
                "async leg: {}, rpo {:.3} s, lag {} writes / {} bytes, journal bytes per host byte {:.3}, {} step-down(s)",
                r.state,
                r.rpo_seconds,
                r.lag_writes,
                r.lag_bytes,
                r.journal_bytes as f64 / r.host_bytes.max(1) as f64,
                r.step_downs
            );
            if let Some(c) = r.cycle {
                eprintln!(
                    "cycles: {} applied ({}), last {} bytes in {:.3} s, staged {} bytes for {} changed ({:.3} per changed byte), host bytes per changed byte {:.2}",
                    c.cycle,
                    match c.interval_ms {
                        0 => "batches of a backlog".to_string(),
                        ms => format!("every {ms} ms"),
                    },
                    c.cycle_bytes,
                    c.ship_us as f64 / 1e6,
                    c.staged_bytes,
                    c.changed_bytes,
                    c.staged_bytes as f64 / c.changed_bytes.max(1) as f64,
                    r.host_bytes as f64 / c.changed_bytes.max(1) as f64,
                );
            }
        }
    }
    if bitmap {
        for vol in opened.iter().filter_map(|(_, t)| t.volume.as_ref()) {
            let st = vol.stats();
            eprintln!(
                "bitmap: {} metadata writes, hit rate {:.4}, {} regions marked, {} predicted",
                st.metadata_writes,
                st.bitmap_hit_rate(),
                vol.marked_region_count(),
                st.predicted_regions
            );
        }
    }
    Ok(runs)
}
