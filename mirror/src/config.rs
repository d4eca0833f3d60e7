//! Volume configuration.

use std::time::Duration;

use crate::{Error, Result};

/// Which in-sync leg serves a read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Always the primary (the default: the most predictable).
    #[default]
    Primary,
    /// Each core cycles through the in-sync legs.
    RoundRobin,
    /// The leg with the lowest `EWMA completion latency × (1 + outstanding commands)`, as seen
    /// by the submitting core.
    LeastLatency,
}

/// How a [`Volume`](crate::Volume) behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeConfig {
    /// A leg command older than this is abandoned and its leg faulted (invariant 7).
    pub io_timeout: Duration,
    /// Which leg serves reads.
    pub read_policy: ReadPolicy,
    /// Bytes covered by one bit of a leg's missed-region set (a power of two, at least one
    /// logical block).
    pub region_size: u64,
    /// Bytes covered by one overlap-guard lock (a power of two, at least one logical block).
    pub overlap_granule: u64,
    /// The write-intent bitmap of a persistent volume ([`Volume::format`](crate::Volume::format),
    /// [`Volume::open_persistent`](crate::Volume::open_persistent)); ignored by
    /// [`Volume::new`](crate::Volume::new), whose legs carry no metadata.
    pub bitmap: BitmapConfig,
}

/// Tuning of a persistent volume's write-intent bitmap (`docs/bitmap.md`). Its region size is
/// [`VolumeConfig::region_size`] (64 KiB to 64 MiB for a persistent volume).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapConfig {
    /// A marked region is cleared once nothing has written it for this long.
    pub idle_delay: Duration,
    /// When more regions than this are marked, idle regions are cleared oldest first even
    /// before `idle_delay` (`None`: no bound).
    pub max_marked_regions: Option<u64>,
    /// Most regions a sequential stream pre-marks at a first touch (0: no prediction). The
    /// default, 256, keeps a 128 KiB sequential stream under one page write per 1000 writes
    /// at 1 MiB regions; after a crash, at most this many regions per stream were marked
    /// without being written (and are copied for nothing).
    pub predict_max: u32,
}

impl Default for BitmapConfig {
    fn default() -> Self {
        Self {
            idle_delay: Duration::from_secs(5),
            max_marked_regions: None,
            predict_max: 256,
        }
    }
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(5),
            read_policy: ReadPolicy::Primary,
            region_size: 1 << 20,
            overlap_granule: 4 << 10,
            bitmap: BitmapConfig::default(),
        }
    }
}

impl VolumeConfig {
    /// Checks the configuration against the legs' block size.
    pub(crate) fn validate(&self, volume: &str, lba_size: u32) -> Result<()> {
        let err = |reason: String| Error::Config {
            volume: volume.to_string(),
            reason,
        };
        if self.io_timeout.is_zero() {
            return Err(err("io_timeout must be greater than zero".into()));
        }
        for (what, value) in [
            ("region_size", self.region_size),
            ("overlap_granule", self.overlap_granule),
        ] {
            if !value.is_power_of_two() || value < u64::from(lba_size) {
                return Err(err(format!(
                    "{what} = {value} must be a power of two of at least one {lba_size}-byte block"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_validates_and_bad_sizes_are_refused() {
        let cfg = VolumeConfig::default();
        assert!(cfg.validate("v", 4096).is_ok());
        let odd = VolumeConfig {
            region_size: 3 << 20,
            ..VolumeConfig::default()
        };
        assert!(odd.validate("v", 512).is_err());
        let tiny = VolumeConfig {
            overlap_granule: 512,
            ..VolumeConfig::default()
        };
        assert!(tiny.validate("v", 512).is_ok());
        assert!(tiny.validate("v", 4096).is_err());
        let zero = VolumeConfig {
            io_timeout: Duration::ZERO,
            ..VolumeConfig::default()
        };
        assert!(zero.validate("v", 512).is_err());
    }
}
