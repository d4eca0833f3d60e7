//! `nvmirror-bench`: a fio-like load generator for nvmirror devices and volumes.
//!
//! Each job thread opens its own queue pair on the target and keeps `iodepth` I/Os in flight
//! in a closed loop; completion latencies go into HDR histograms; the report is fio's normal
//! text or fio's JSON shape, so fio tooling can read it.
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
pub mod job;
pub mod plot;
pub mod report;

use std::io::Write;
use std::sync::Arc;

use nvmirror_nvme::BlockDevice;

pub use error::{Error, Result};

use cli::{Cli, OutputFormat};
use engine::RunResult;

/// Opens the legs and builds the target (see [`build_volume`]).
pub fn open_target(uris: &[String], bitmap: bool) -> Result<Target> {
    let legs = uris
        .iter()
        .map(|uri| {
            nvmirror_nvme::open_leg(uri).map_err(|source| Error::OpenLeg {
                uri: uri.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    build_volume(legs, bitmap)
}

/// What a run drives: the device, and the volume when there is one (for its statistics).
#[derive(Debug)]
pub struct Target {
    pub device: Arc<dyn BlockDevice>,
    pub volume: Option<Arc<nvmirror_mirror::Volume>>,
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
            })
        }
        (_, false) => nvmirror_mirror::Volume::new("bench", legs, cfg).map_err(flag)?,
        (_, true) => nvmirror_mirror::Volume::format("bench", legs, cfg, true).map_err(flag)?,
    };
    let volume = Arc::new(volume);
    Ok(Target {
        device: Arc::clone(&volume) as Arc<dyn BlockDevice>,
        volume: Some(volume),
    })
}

/// Runs what the command line asks for and writes the report to `out`.
pub fn run_cli(cli: &Cli, out: &mut dyn Write) -> Result<RunResult> {
    let bitmap = cli.bitmap == cli::BitmapMode::On;
    let Target {
        device: target,
        volume,
    } = open_target(&cli.legs, bitmap)?;
    let spec = cli.job_spec();
    if cli.breakdown {
        breakdown::enable(volume.as_deref(), &spec)?;
    }
    let run = engine::run(&target, &spec)?;
    let stages = volume
        .as_deref()
        .filter(|_| cli.breakdown)
        .map(breakdown::collect);
    match (cli.output_format, &stages) {
        (OutputFormat::Normal, _) => report::write_normal(&run, out)?,
        (OutputFormat::Json, None) => report::write_json(&run, out)?,
        (OutputFormat::Json, Some(st)) => breakdown::write_json(&run, st, out)?,
    }
    if let (OutputFormat::Normal, Some(st)) = (cli.output_format, &stages) {
        breakdown::write_text(st, out)?;
    }
    if let (true, Some(vol)) = (bitmap, volume) {
        let st = vol.stats();
        eprintln!(
            "bitmap: {} metadata writes, hit rate {:.4}, {} regions marked, {} predicted",
            st.metadata_writes,
            st.bitmap_hit_rate(),
            vol.marked_region_count(),
            st.predicted_regions
        );
    }
    Ok(run)
}
