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

pub mod cli;
pub mod engine;
mod error;
pub mod job;
pub mod report;

use std::io::Write;
use std::sync::Arc;

use nvmirror_nvme::BlockDevice;

pub use error::{Error, Result};

use cli::{Cli, OutputFormat};
use engine::RunResult;

/// Opens every `--leg` URI, then joins them into the device the jobs run against.
pub fn open_target(uris: &[String]) -> Result<Arc<dyn BlockDevice>> {
    let legs = uris
        .iter()
        .map(|uri| {
            nvmirror_nvme::open_leg(uri).map_err(|source| Error::OpenLeg {
                uri: uri.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    build_target(legs)
}

/// One leg is benchmarked as itself; several are joined into a mirrored volume.
pub fn build_target(mut legs: Vec<Arc<dyn BlockDevice>>) -> Result<Arc<dyn BlockDevice>> {
    match legs.len() {
        0 => Err(Error::Flag {
            flag: "--leg",
            reason: "at least one leg is needed".into(),
        }),
        // One leg: the device itself, the honest single-device baseline.
        1 => Ok(legs.swap_remove(0)),
        // Several legs: a mirrored volume, first leg primary.
        _ => {
            let volume = nvmirror_mirror::Volume::new(
                "bench",
                legs,
                nvmirror_mirror::VolumeConfig::default(),
            )
            .map_err(|e| Error::Flag {
                flag: "--leg",
                reason: e.to_string(),
            })?;
            Ok(Arc::new(volume))
        }
    }
}

/// Runs what the command line asks for and writes the report to `out`.
pub fn run_cli(cli: &Cli, out: &mut dyn Write) -> Result<RunResult> {
    let target = open_target(&cli.legs)?;
    let run = engine::run(&target, &cli.job_spec())?;
    match cli.output_format {
        OutputFormat::Normal => report::write_normal(&run, out)?,
        OutputFormat::Json => report::write_json(&run, out)?,
    }
    Ok(run)
}
