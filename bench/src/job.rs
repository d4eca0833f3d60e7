//! A job in fio's vocabulary ([`JobSpec`]) and the same job checked against a device
//! ([`IoLayout`]). The stream of commands a job issues is in [`crate::pattern`].

use std::fmt;
use std::time::Duration;

use nvmirror_nvme::{Geometry, IoOp};

use crate::{Error, Result};

/// fio's default `randseed`, so runs repeat unless `--seed` says otherwise.
pub const DEFAULT_SEED: u64 = 0x89;

/// Largest block size a job accepts (each job holds `iodepth` buffers of it).
pub const MAX_BS: u64 = 64 << 20;

/// Largest queue depth a job accepts.
pub const MAX_IODEPTH: u32 = 4096;

/// Most verify blocks one job may track (8 bytes each: 512 MiB of ledger at most).
pub const MAX_VERIFY_BLOCKS: u64 = 1 << 26;

/// fio's `rw=`: direction and offset order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum RwMode {
    /// Sequential reads.
    #[value(name = "read")]
    Read,
    /// Sequential writes.
    #[value(name = "write")]
    Write,
    /// Random reads.
    #[value(name = "randread")]
    RandRead,
    /// Random writes.
    #[value(name = "randwrite")]
    RandWrite,
    /// Random mixed reads and writes, `rwmixread` percent reads.
    #[value(name = "randrw")]
    RandRw,
    /// Sequential trims (Dataset Management, deallocate).
    #[value(name = "trim")]
    Trim,
    /// Random trims.
    #[value(name = "randtrim")]
    RandTrim,
}

impl RwMode {
    /// fio's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::RandRw => "randrw",
            Self::Trim => "trim",
            Self::RandTrim => "randtrim",
        }
    }

    /// The mode named `s` (fio's names).
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Self::Read,
            Self::Write,
            Self::RandRead,
            Self::RandWrite,
            Self::RandRw,
            Self::Trim,
            Self::RandTrim,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }

    /// Offsets are drawn at random rather than walked in order.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Self::RandRead | Self::RandWrite | Self::RandRw | Self::RandTrim
        )
    }

    /// The job issues both reads and writes.
    pub fn is_mixed(self) -> bool {
        self == Self::RandRw
    }

    /// The job issues writes (their buffers carry a fill pattern).
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::RandWrite | Self::RandRw)
    }

    /// The job issues reads.
    pub fn reads(self) -> bool {
        matches!(self, Self::Read | Self::RandRead | Self::RandRw)
    }

    /// The job issues trims.
    pub fn trims(self) -> bool {
        matches!(self, Self::Trim | Self::RandTrim)
    }

    /// The command of a job that is not mixed.
    pub fn op(self) -> IoOp {
        match self {
            Self::Read | Self::RandRead => IoOp::Read,
            Self::Write | Self::RandWrite | Self::RandRw => IoOp::Write,
            Self::Trim | Self::RandTrim => IoOp::Deallocate,
        }
    }
}

impl fmt::Display for RwMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// fio's `verify=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum VerifyMode {
    /// No verification.
    #[default]
    #[value(name = "none")]
    None,
    /// Every written block carries a stamp with a CRC32C; reads and the read-back pass check it.
    #[value(name = "crc32c")]
    Crc32c,
}

impl VerifyMode {
    /// fio's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Crc32c => "crc32c",
        }
    }
}

/// fio's `bsrange=MIN-MAX`: I/O sizes drawn at random, multiples of `min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BsRange {
    pub min: u64,
    pub max: u64,
}

impl fmt::Display for BsRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// One job, as the command line or a job-file section describes it. `numjobs` threads run
/// it side by side.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// The job's name (a job-file section); `None` names it after `rw`.
    pub name: Option<String>,
    pub rw: RwMode,
    /// Bytes per I/O (the smallest size, and the offset alignment, with `bsrange`).
    pub bs: u64,
    /// Random I/O sizes; replaces `bs` when set.
    pub bsrange: Option<BsRange>,
    /// I/Os each thread keeps in flight.
    pub iodepth: u32,
    /// Longest measured time, after the ramp (the whole of it with `time_based`).
    pub runtime: Duration,
    /// Time run before measuring starts; its I/Os are not counted.
    pub ramp_time: Duration,
    /// Run the whole `runtime`, wrapping over the region; otherwise stop after `io_size`.
    pub time_based: bool,
    /// fio's `norandommap`: random offsets are drawn independently (repeats allowed) instead
    /// of walking a random permutation of the region.
    pub norandommap: bool,
    /// First byte of the region the offsets range over.
    pub offset: u64,
    /// Bytes of the region; `None` is the rest of the device after `offset`.
    pub size: Option<u64>,
    /// Bytes each thread transfers before it stops (without `time_based`); `None` is `size`.
    pub io_size: Option<u64>,
    /// Percentage of reads in mixed jobs.
    pub rwmixread: u32,
    /// Threads, each with its own queue pair and buffers.
    pub numjobs: u32,
    /// Seed of the offset and mix generators (job `i` uses `seed + i`).
    pub seed: u64,
    /// Data verification.
    pub verify: VerifyMode,
    /// I/Os per second each thread issues on a fixed schedule (open loop); `None` is a closed
    /// loop.
    pub rate_iops: Option<u64>,
    /// Length of one interval of the latency log; `None` keeps no log.
    pub log_interval: Option<Duration>,
    /// With `verify`: where each writing thread records every acknowledged write once the run
    /// has drained (`verify.rs`, [`BlockVerifier::write_ledger`](crate::verify::BlockVerifier::write_ledger)).
    pub verify_ledger: Option<std::path::PathBuf>,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            name: None,
            rw: RwMode::Read,
            bs: 4096,
            bsrange: None,
            iodepth: 1,
            runtime: Duration::from_secs(10),
            ramp_time: Duration::ZERO,
            time_based: false,
            norandommap: false,
            offset: 0,
            size: None,
            io_size: None,
            rwmixread: 50,
            numjobs: 1,
            seed: DEFAULT_SEED,
            verify: VerifyMode::None,
            rate_iops: None,
            log_interval: None,
            verify_ledger: None,
        }
    }
}

/// A job checked against a device: how each I/O maps onto logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoLayout {
    /// Logical blocks per unit (the smallest I/O, `bs` or the low end of `bsrange`).
    pub nlb: u32,
    /// Number of units the region holds.
    pub units: u64,
    /// Largest I/O in units (1 without `bsrange`).
    pub max_units: u32,
    /// First LBA of the region.
    pub first_lba: u64,
}

impl IoLayout {
    /// Bytes of one unit.
    pub fn unit_bytes(&self, lba_size: u32) -> u64 {
        u64::from(self.nlb) * u64::from(lba_size)
    }
}

impl JobSpec {
    /// The job's name: its section's, or the `rw` mode's.
    pub fn job_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.rw.as_str())
    }

    /// The smallest and largest I/O in bytes.
    pub fn bs_bounds(&self) -> (u64, u64) {
        self.bsrange.map_or((self.bs, self.bs), |r| (r.min, r.max))
    }

    /// Checks the job against a device; errors name the flag at fault.
    pub fn layout(&self, geo: Geometry) -> Result<IoLayout> {
        let flag = |flag, reason: String| Error::Flag { flag, reason };
        if self.iodepth == 0 || self.iodepth > MAX_IODEPTH {
            return Err(flag(
                "--iodepth",
                format!("{} is outside 1..={MAX_IODEPTH}", self.iodepth),
            ));
        }
        if self.numjobs == 0 {
            return Err(flag("--numjobs", "must be at least 1".into()));
        }
        if self.rwmixread > 100 {
            return Err(flag(
                "--rwmixread",
                format!("{} is not a percentage", self.rwmixread),
            ));
        }
        if self.runtime.is_zero() {
            return Err(flag("--runtime", "must be greater than zero".into()));
        }
        if self.rate_iops == Some(0) {
            return Err(flag("--rate_iops", "must be greater than zero".into()));
        }
        if self.io_size == Some(0) {
            return Err(flag("--io_size", "must be greater than zero".into()));
        }
        if matches!(self.log_interval, Some(d) if d < Duration::from_millis(1)) {
            return Err(flag("--log_interval", "must be at least 1ms".into()));
        }
        let lba = u64::from(geo.lba_size);
        let (min, max) = self.bs_bounds();
        let bs_flag = if self.bsrange.is_some() {
            "--bsrange"
        } else {
            "--bs"
        };
        for b in [min, max] {
            if b == 0 || b > MAX_BS || b % lba != 0 {
                return Err(flag(
                    bs_flag,
                    format!(
                        "{b} bytes is not a multiple of the device's {lba}-byte blocks up to {MAX_BS}"
                    ),
                ));
            }
        }
        if min > max {
            return Err(flag(
                "--bsrange",
                format!("the low end {min} exceeds the high end {max}"),
            ));
        }
        let device = geo.bytes();
        if self.offset % lba != 0 || self.offset >= device {
            return Err(flag(
                "--offset",
                format!(
                    "{} is not a multiple of the device's {lba}-byte blocks below its {device} bytes",
                    self.offset
                ),
            ));
        }
        let room = device - self.offset;
        let size = match self.size {
            None => room,
            Some(s) if s > room => {
                return Err(flag(
                    "--size",
                    format!(
                        "{s} bytes from --offset {} exceeds the device's {device} bytes",
                        self.offset
                    ),
                ))
            }
            Some(s) => s,
        };
        let units = size / min;
        let max_units = max / min;
        let threads = if self.verify == VerifyMode::None {
            1
        } else {
            u64::from(self.numjobs)
        };
        if units / threads < max_units {
            return Err(flag(
                "--size",
                format!(
                    "{size} bytes is smaller than {threads} I/O(s) of {max} bytes{}",
                    if threads > 1 {
                        " (verify gives each job its own share)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if self.verify != VerifyMode::None {
            if self.rw.trims() {
                return Err(flag(
                    "--verify",
                    "a trim job leaves nothing to verify".into(),
                ));
            }
            let blocks = size / lba;
            if blocks > MAX_VERIFY_BLOCKS {
                return Err(flag(
                    "--verify",
                    format!(
                        "{blocks} blocks of {lba} bytes are more than the {MAX_VERIFY_BLOCKS} a job tracks; lower --size"
                    ),
                ));
            }
        }
        Ok(IoLayout {
            nlb: (min / lba) as u32,
            units,
            max_units: max_units as u32,
            first_lba: self.offset / lba,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(bytes: u64) -> Geometry {
        Geometry::from_bytes(bytes, 512).unwrap()
    }

    #[test]
    fn layout_maps_bs_onto_blocks_and_names_bad_flags() {
        let spec = JobSpec {
            size: Some(1 << 20),
            ..JobSpec::default()
        };
        assert_eq!(
            spec.layout(geo(1 << 30)).unwrap(),
            IoLayout {
                nlb: 8,
                units: 256,
                max_units: 1,
                first_lba: 0
            }
        );
        let err = |spec: JobSpec| spec.layout(geo(1 << 20)).unwrap_err().to_string();
        for (spec, flag) in [
            (
                JobSpec {
                    bs: 1000,
                    ..JobSpec::default()
                },
                "--bs:",
            ),
            (
                JobSpec {
                    size: Some(2 << 20),
                    ..JobSpec::default()
                },
                "--size:",
            ),
            (
                JobSpec {
                    size: Some(2048),
                    ..JobSpec::default()
                },
                "--size:",
            ),
            (
                JobSpec {
                    iodepth: 0,
                    ..JobSpec::default()
                },
                "--iodepth:",
            ),
            (
                JobSpec {
                    rwmixread: 101,
                    ..JobSpec::default()
                },
                "--rwmixread:",
            ),
            (
                JobSpec {
                    offset: 1 << 20,
                    ..JobSpec::default()
                },
                "--offset:",
            ),
            (
                JobSpec {
                    offset: 100,
                    ..JobSpec::default()
                },
                "--offset:",
            ),
            (
                JobSpec {
                    offset: 512 << 10,
                    size: Some(768 << 10),
                    ..JobSpec::default()
                },
                "--size:",
            ),
            (
                JobSpec {
                    bsrange: Some(BsRange {
                        min: 8192,
                        max: 4096,
                    }),
                    ..JobSpec::default()
                },
                "--bsrange:",
            ),
            (
                JobSpec {
                    bsrange: Some(BsRange {
                        min: 4096,
                        max: 5000,
                    }),
                    ..JobSpec::default()
                },
                "--bsrange:",
            ),
            (
                JobSpec {
                    rw: RwMode::Trim,
                    verify: VerifyMode::Crc32c,
                    ..JobSpec::default()
                },
                "--verify:",
            ),
            (
                JobSpec {
                    rate_iops: Some(0),
                    ..JobSpec::default()
                },
                "--rate_iops:",
            ),
        ] {
            let e = err(spec.clone());
            assert!(e.starts_with(flag), "{spec:?}: {e}");
        }
    }

    #[test]
    fn offset_and_bsrange_shape_the_region() {
        let spec = JobSpec {
            offset: 64 << 10,
            size: Some(256 << 10),
            bsrange: Some(BsRange {
                min: 4096,
                max: 16384,
            }),
            ..JobSpec::default()
        };
        assert_eq!(
            spec.layout(geo(1 << 20)).unwrap(),
            IoLayout {
                nlb: 8,
                units: 64,
                max_units: 4,
                first_lba: 128
            }
        );
        // Without --size the region runs from the offset to the end of the device.
        let rest = JobSpec {
            offset: 512 << 10,
            ..JobSpec::default()
        };
        assert_eq!(rest.layout(geo(1 << 20)).unwrap().units, 128);
        assert_eq!(RwMode::from_name("randtrim"), Some(RwMode::RandTrim));
        assert_eq!(RwMode::from_name("trims"), None);
    }
}
