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
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(5),
            read_policy: ReadPolicy::Primary,
            region_size: 1 << 20,
            overlap_granule: 16 << 10,
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
