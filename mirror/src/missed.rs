//! A leg's missed-region set: one bit per region of `region_size` bytes, set when a write to
//! the region did not reach the leg.
//!
//! A lock-free bitmap (`Vec<AtomicU64>`, bits set with `fetch_or`), the same shape as
//! rust-vmm's `AtomicBitmap`. A write to a region already marked costs one load. The
//! persistent write-intent bitmap replaces this in-memory set later; the marking points stay.

use std::sync::atomic::{AtomicU64, Ordering};

/// The missed-region set of one leg.
#[derive(Debug)]
pub(crate) struct MissedRegions {
    words: Box<[AtomicU64]>,
    /// Number of regions (bits in use).
    regions: u64,
    /// log2 of the logical blocks per region.
    region_shift: u32,
}

impl MissedRegions {
    /// A clean set over `num_blocks` blocks, `1 << region_shift` blocks per region.
    pub(crate) fn new(num_blocks: u64, region_shift: u32) -> Self {
        let regions = num_blocks.div_ceil(1 << region_shift).max(1);
        let words = (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            words,
            regions,
            region_shift,
        }
    }

    /// Records that `[slba, slba + nlb)` missed this leg (`nlb >= 1`, range inside the
    /// namespace).
    #[inline]
    pub(crate) fn mark(&self, slba: u64, nlb: u32) {
        let first = slba >> self.region_shift;
        let last = ((slba + u64::from(nlb.max(1)) - 1) >> self.region_shift).min(self.regions - 1);
        self.set_bits(first, last);
    }

    /// Marks one region.
    pub(crate) fn mark_region(&self, region: u64) {
        if region < self.regions {
            self.set_bits(region, region);
        }
    }

    /// Records that every region missed this leg (a failed flush: nothing since the last
    /// flush can be trusted).
    pub(crate) fn mark_all(&self) {
        self.set_bits(0, self.regions - 1);
    }

    fn set_bits(&self, first: u64, last: u64) {
        if first > last {
            return;
        }
        for w in first / 64..=last / 64 {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let word = &self.words[w as usize];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Release);
            }
        }
    }

    /// Whether `region` is marked.
    pub(crate) fn contains(&self, region: u64) -> bool {
        region < self.regions
            && self.words[(region / 64) as usize].load(Ordering::Acquire) & (1 << (region % 64))
                != 0
    }

    /// Forgets `region` (it was copied to the leg). Only the resync job calls this, under the
    /// region's overlap-guard window.
    pub(crate) fn clear(&self, region: u64) {
        if region < self.regions {
            self.words[(region / 64) as usize].fetch_and(!(1 << (region % 64)), Ordering::AcqRel);
        }
    }

    /// The first marked region at or after `from`.
    pub(crate) fn next_from(&self, from: u64) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = self.words[w].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = self.words[w].load(Ordering::Acquire);
        }
    }

    /// Number of marked regions.
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The marked regions, ascending.
    pub(crate) fn regions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.load(Ordering::Acquire);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_exactly_the_covered_regions() {
        // 8-block regions over 1000 blocks: 125 regions, two words.
        let m = MissedRegions::new(1000, 3);
        m.mark(0, 1);
        m.mark(15, 2); // regions 1 and 2
        m.mark(8 * 63, 9); // straddles the word boundary: 63, 64
        m.mark(999, 1); // the last region
        assert_eq!(m.regions(), vec![0, 1, 2, 63, 64, 124]);
        assert_eq!(m.count(), 6);
        assert!(m.contains(64));
        assert!(!m.contains(3));
        assert!(!m.contains(125));
    }

    #[test]
    fn next_from_walks_marked_regions_and_clear_forgets_them() {
        let m = MissedRegions::new(200 * 8, 3);
        for r in [3, 63, 64, 150, 199] {
            m.mark(r * 8, 1);
        }
        assert_eq!(m.next_from(0), Some(3));
        assert_eq!(m.next_from(4), Some(63));
        assert_eq!(m.next_from(64), Some(64));
        assert_eq!(m.next_from(65), Some(150));
        assert_eq!(m.next_from(200), None);
        m.clear(150);
        m.clear(500); // out of range: ignored
        assert_eq!(m.next_from(65), Some(199));
        m.clear(199);
        assert_eq!(m.next_from(65), None);
        assert_eq!(m.count(), 3);
    }

    #[test]
    fn mark_all_covers_a_partial_last_region() {
        let m = MissedRegions::new(130 * 8 + 1, 3);
        m.mark_all();
        assert_eq!(m.count(), 131);
        assert_eq!(m.regions().last(), Some(&130));
    }

    #[test]
    fn single_regions_and_clear() {
        let m = MissedRegions::new(100 * 8, 3);
        m.mark_region(5);
        m.mark_region(99);
        m.mark_region(100); // past the end: ignored
        assert_eq!(m.regions(), vec![5, 99]);
        m.clear(5);
        m.clear(99);
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn wide_marks_span_many_words() {
        let m = MissedRegions::new(64 * 300, 0);
        m.mark(10, 64 * 200);
        assert_eq!(m.count(), 64 * 200);
        assert_eq!(m.regions()[0], 10);
        assert_eq!(*m.regions().last().unwrap(), 10 + 64 * 200 - 1);
    }
}
