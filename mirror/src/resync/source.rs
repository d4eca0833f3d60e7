//! Where a resync learns which regions to copy.
//!
//! The job asks for the next region at or after its cursor, and reports each region it has
//! made identical on the target. Today the set is the leg's in-memory missed-region set; the
//! persistent write-intent bitmap implements the same trait.

use std::fmt;
use std::sync::Arc;

use crate::volume::LegShared;

/// The set of regions a leg needs copied. The job calls it from one thread.
pub trait RegionSource: Send + fmt::Debug {
    /// The first region at or after `from` that still needs copying.
    fn next_region(&mut self, from: u64) -> Option<u64>;

    /// `region` is now identical on the target (called under the region's window lock).
    fn region_copied(&mut self, region: u64);

    /// `region` needs copying again (a copy that was cleared and then found its leg no
    /// longer resyncing).
    fn region_dirty(&mut self, region: u64);

    /// Regions still to copy.
    fn remaining(&self) -> u64;
}

/// The missed-region set of a leg, read and cleared in place: a cancelled job leaves the
/// regions it did not copy marked, so the next resync of the leg continues from there.
pub struct MissedRegionSource {
    leg: Arc<LegShared>,
}

impl MissedRegionSource {
    pub(crate) fn new(leg: Arc<LegShared>) -> Self {
        Self { leg }
    }
}

impl fmt::Debug for MissedRegionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MissedRegionSource")
            .field("leg", &self.leg.dev.name())
            .field("remaining", &self.leg.missed.count())
            .finish()
    }
}

impl RegionSource for MissedRegionSource {
    fn next_region(&mut self, from: u64) -> Option<u64> {
        self.leg.missed.next_from(from)
    }

    fn region_copied(&mut self, region: u64) {
        self.leg.missed.clear(region);
    }

    fn region_dirty(&mut self, region: u64) {
        self.leg.missed.mark_region(region);
    }

    fn remaining(&self) -> u64 {
        self.leg.missed.count()
    }
}
