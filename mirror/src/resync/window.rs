//! The copy window: one region of the namespace held under the overlap-guard locks that host
//! writes take, so that while a job reads and writes it no host write to it is in flight, and
//! host I/O anywhere else never waits for the job.

use crate::guard::{GranuleSpan, OverlapGuard, GUARD_ENTRIES};
use crate::volume::VolumeShared;

/// The blocks of one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegionRange {
    pub(crate) region: u64,
    /// First block.
    pub(crate) slba: u64,
    /// One past the last block (the last region may be short).
    pub(crate) end: u64,
    /// The guard entries the region covers.
    pub(crate) span: GranuleSpan,
}

impl RegionRange {
    pub(crate) fn of(vol: &VolumeShared, region: u64) -> Self {
        let slba = region << vol.region_shift;
        let end = ((region + 1) << vol.region_shift).min(vol.geo.num_blocks);
        let nlb = u32::try_from(end - slba).unwrap_or(u32::MAX);
        Self {
            region,
            slba,
            end,
            span: vol.guard.span(slba, nlb),
        }
    }

    /// Bytes in the region.
    pub(crate) fn bytes(&self, vol: &VolumeShared) -> u64 {
        (self.end - self.slba) << vol.geo.lba_shift()
    }

    /// The next command's block count from `lba`, at most `max_blocks`.
    pub(crate) fn chunk(&self, lba: u64, max_blocks: u64) -> u32 {
        (self.end - lba).min(max_blocks) as u32
    }
}

/// Number of regions of a volume.
pub(crate) fn region_count(vol: &VolumeShared) -> u64 {
    vol.geo.num_blocks.div_ceil(1 << vol.region_shift)
}

/// Waits out every modifying command that was in flight when the sweep started: each guard
/// entry is taken and released once, so a command that held one has completed on every leg by
/// the time the sweep passes it. Non-blocking: call [`step`](Self::step) until it is done.
#[derive(Debug)]
pub(crate) struct GuardSweep {
    next: usize,
}

impl GuardSweep {
    pub(crate) fn new() -> Self {
        Self { next: 0 }
    }

    /// Passes up to `budget` entries; true once every entry has been passed.
    pub(crate) fn step(&mut self, guard: &OverlapGuard, budget: usize) -> bool {
        let end = (self.next + budget).min(GUARD_ENTRIES);
        while self.next < end {
            let entry = OverlapGuard::entry(self.next);
            if !guard.try_lock(entry) {
                return false;
            }
            guard.unlock(entry);
            self.next += 1;
        }
        self.next == GUARD_ENTRIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_waits_for_a_held_entry() {
        let g = OverlapGuard::new(0);
        let held = g.span(70_000, 1);
        assert!(g.try_lock(held));
        let mut sweep = GuardSweep::new();
        assert!(!sweep.step(&g, GUARD_ENTRIES));
        assert!(sweep.next > 0 && sweep.next < GUARD_ENTRIES);
        g.unlock(held);
        assert!(sweep.step(&g, GUARD_ENTRIES));
        assert_eq!(g.held(), 0);
    }
}
