//! A job in fio's vocabulary ([`JobSpec`]), checked against a device ([`IoLayout`]), and the
//! stream of commands it issues ([`IoPattern`]).

use std::fmt;
use std::time::Duration;

use nvmirror_nvme::{Geometry, IoOp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// fio's default `randseed`, so runs repeat unless `--seed` says otherwise.
pub const DEFAULT_SEED: u64 = 0x89;

/// Largest block size a job accepts (each job holds `iodepth` buffers of it).
pub const MAX_BS: u64 = 64 << 20;

/// Largest queue depth a job accepts.
pub const MAX_IODEPTH: u32 = 4096;

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
        }
    }

    /// Offsets are drawn at random rather than walked in order.
    pub fn is_random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }

    /// The job issues both reads and writes.
    pub fn is_mixed(self) -> bool {
        self == Self::RandRw
    }

    /// The job issues writes (their buffers carry a fill pattern).
    pub fn writes(self) -> bool {
        !matches!(self, Self::Read | Self::RandRead)
    }
}

impl fmt::Display for RwMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job, as the command line describes it. `numjobs` threads run it side by side.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub rw: RwMode,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/Os each thread keeps in flight.
    pub iodepth: u32,
    /// Measured time, after the ramp.
    pub runtime: Duration,
    /// Time run before measuring starts; its I/Os are not counted.
    pub ramp_time: Duration,
    /// Bytes of the device the offsets range over; `None` is the whole device.
    pub size: Option<u64>,
    /// Percentage of reads in mixed jobs.
    pub rwmixread: u32,
    /// Threads, each with its own queue pair and buffers.
    pub numjobs: u32,
    /// Seed of the offset and mix generators (job `i` uses `seed + i`).
    pub seed: u64,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            rw: RwMode::Read,
            bs: 4096,
            iodepth: 1,
            runtime: Duration::from_secs(10),
            ramp_time: Duration::ZERO,
            size: None,
            rwmixread: 50,
            numjobs: 1,
            seed: DEFAULT_SEED,
        }
    }
}

/// A job checked against a device: how each I/O maps onto logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoLayout {
    /// Logical blocks per I/O (`bs / lba_size`).
    pub nlb: u32,
    /// Number of `bs`-sized units the offsets range over.
    pub units: u64,
}

impl JobSpec {
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
        let lba = u64::from(geo.lba_size);
        if self.bs == 0 || self.bs > MAX_BS || self.bs % lba != 0 {
            return Err(flag(
                "--bs",
                format!(
                    "{} bytes is not a multiple of the device's {lba}-byte blocks up to {MAX_BS}",
                    self.bs
                ),
            ));
        }
        let device = geo.bytes();
        let size = match self.size {
            None => device,
            Some(s) if s > device => {
                return Err(flag(
                    "--size",
                    format!("{s} bytes exceeds the device's {device} bytes"),
                ))
            }
            Some(s) => s,
        };
        if size < self.bs {
            return Err(flag(
                "--size",
                format!("{size} bytes is smaller than one block of --bs {}", self.bs),
            ));
        }
        Ok(IoLayout {
            nlb: (self.bs / lba) as u32,
            units: size / self.bs,
        })
    }
}

/// The commands one job thread issues: direction and first LBA of each I/O, in order.
#[derive(Debug)]
pub struct IoPattern {
    rng: SmallRng,
    rw: RwMode,
    rwmixread: u32,
    units: u64,
    nlb: u64,
    /// Next unit of a sequential job.
    cursor: u64,
}

impl IoPattern {
    /// The pattern of job thread `job` of `numjobs`. Sequential threads start spread evenly
    /// over the range so they do not write the same blocks at once; each wraps at the end.
    pub fn new(spec: &JobSpec, layout: IoLayout, job: u32) -> Self {
        let cursor = layout.units / u64::from(spec.numjobs.max(1)) * u64::from(job);
        Self {
            rng: SmallRng::seed_from_u64(spec.seed.wrapping_add(u64::from(job))),
            rw: spec.rw,
            rwmixread: spec.rwmixread,
            units: layout.units,
            nlb: u64::from(layout.nlb),
            cursor: cursor % layout.units.max(1),
        }
    }

    /// The next I/O: its direction and first LBA.
    #[inline]
    pub fn next_io(&mut self) -> (IoOp, u64) {
        let op = match self.rw {
            RwMode::Read | RwMode::RandRead => IoOp::Read,
            RwMode::Write | RwMode::RandWrite => IoOp::Write,
            RwMode::RandRw => {
                if self.rng.gen_range(0..100) < self.rwmixread {
                    IoOp::Read
                } else {
                    IoOp::Write
                }
            }
        };
        let unit = if self.rw.is_random() {
            self.rng.gen_range(0..self.units)
        } else {
            let u = self.cursor;
            self.cursor += 1;
            if self.cursor == self.units {
                self.cursor = 0;
            }
            u
        };
        (op, unit * self.nlb)
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
            IoLayout { nlb: 8, units: 256 }
        );
        let err = |spec: JobSpec| spec.layout(geo(1 << 20)).unwrap_err().to_string();
        assert!(err(JobSpec {
            bs: 1000,
            ..JobSpec::default()
        })
        .starts_with("--bs:"));
        assert!(err(JobSpec {
            size: Some(2 << 20),
            ..JobSpec::default()
        })
        .starts_with("--size:"));
        assert!(err(JobSpec {
            size: Some(2048),
            ..JobSpec::default()
        })
        .starts_with("--size:"));
        assert!(err(JobSpec {
            iodepth: 0,
            ..JobSpec::default()
        })
        .starts_with("--iodepth:"));
        assert!(err(JobSpec {
            rwmixread: 101,
            ..JobSpec::default()
        })
        .starts_with("--rwmixread:"));
    }

    #[test]
    fn sequential_walks_and_wraps_random_stays_in_range() {
        let layout = IoLayout { nlb: 8, units: 4 };
        let spec = JobSpec {
            rw: RwMode::Write,
            numjobs: 2,
            ..JobSpec::default()
        };
        let mut p = IoPattern::new(&spec, layout, 1);
        let lbas: Vec<u64> = (0..5).map(|_| p.next_io().1).collect();
        assert_eq!(lbas, [16, 24, 0, 8, 16]);

        let spec = JobSpec {
            rw: RwMode::RandRw,
            rwmixread: 30,
            ..JobSpec::default()
        };
        let layout = IoLayout {
            nlb: 8,
            units: 1000,
        };
        let mut p = IoPattern::new(&spec, layout, 0);
        let mut reads = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (op, lba) = p.next_io();
            assert!(lba < 8000 && lba % 8 == 0);
            seen.insert(lba);
            reads += u32::from(op == IoOp::Read);
        }
        assert!((2700..3300).contains(&reads), "{reads} reads of 10000");
        assert!(seen.len() > 900, "only {} distinct offsets", seen.len());
    }
}
