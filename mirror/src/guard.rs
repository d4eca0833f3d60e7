//! The overlap guard (invariant 3): two in-flight modifying commands that overlap are never
//! applied in different orders on different legs.
//!
//! The namespace is cut into granules of `overlap_granule` bytes; granule `g` is protected by
//! lock `g mod ENTRIES` of a table shared by every core of the volume. A modifying command
//! try-locks every entry it covers in ascending order with one compare-and-swap each; if one
//! is taken it releases what it took and the command waits in its core's pending FIFO. The
//! entries are released when the command has completed (or been abandoned) on every leg.
//!
//! Caveats:
//! - Hashing is modulo the table size, so granules `ENTRIES` apart share a lock: two writes
//!   exactly a multiple of `ENTRIES × overlap_granule` bytes apart (1 GiB at the default 4 KiB
//!   granules) serialise although they do not overlap, and a resync window holds back host
//!   writes to every region aliasing it. Correctness is unaffected.
//! - Two writes in the same granule serialise even when their blocks do not overlap.
//! - There is no fairness: a waiting command retries on its core's next poll, and a stream of
//!   writes from another core can keep winning the same granule.
//! - A command covering `ENTRIES` granules or more takes the whole table.

use std::sync::atomic::{AtomicBool, Ordering};

/// Number of lock entries (a power of two).
pub const GUARD_ENTRIES: usize = 1 << 18;

/// The table entries a command covers: `[first, first + count)`, wrapping at the table end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GranuleSpan {
    first: u32,
    count: u32,
}

impl GranuleSpan {
    /// The entries in ascending order as at most two contiguous runs.
    fn runs(self) -> [(usize, usize); 2] {
        let first = self.first as usize;
        let end = first + self.count as usize;
        if end <= GUARD_ENTRIES {
            [(first, end), (0, 0)]
        } else {
            // Wrapped: the low run comes first so locks are taken in ascending order.
            [(0, end - GUARD_ENTRIES), (first, GUARD_ENTRIES)]
        }
    }
}

/// The shared lock table of one volume.
pub(crate) struct OverlapGuard {
    locks: Box<[AtomicBool]>,
    /// log2 of the logical blocks per granule.
    granule_shift: u32,
}

impl std::fmt::Debug for OverlapGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlapGuard")
            .field("entries", &self.locks.len())
            .field("granule_shift", &self.granule_shift)
            .finish()
    }
}

impl OverlapGuard {
    /// A table for granules of `1 << granule_shift` blocks.
    pub(crate) fn new(granule_shift: u32) -> Self {
        Self {
            locks: (0..GUARD_ENTRIES).map(|_| AtomicBool::new(false)).collect(),
            granule_shift,
        }
    }

    /// The entries `[slba, slba + nlb)` covers (`nlb >= 1`).
    #[inline]
    pub(crate) fn span(&self, slba: u64, nlb: u32) -> GranuleSpan {
        let g0 = slba >> self.granule_shift;
        let g1 = (slba + u64::from(nlb.max(1)) - 1) >> self.granule_shift;
        let count = g1 - g0 + 1;
        if count >= GUARD_ENTRIES as u64 {
            GranuleSpan {
                first: 0,
                count: GUARD_ENTRIES as u32,
            }
        } else {
            GranuleSpan {
                first: (g0 & (GUARD_ENTRIES as u64 - 1)) as u32,
                count: count as u32,
            }
        }
    }

    /// The single table entry `index` (a sweep that waits out every holder once takes and
    /// releases each entry in turn).
    pub(crate) fn entry(index: usize) -> GranuleSpan {
        GranuleSpan {
            first: (index % GUARD_ENTRIES) as u32,
            count: 1,
        }
    }

    /// Takes every entry of `span`, or none of them. False when one is held.
    #[inline]
    pub(crate) fn try_lock(&self, span: GranuleSpan) -> bool {
        for (run, (start, end)) in span.runs().into_iter().enumerate() {
            for i in start..end {
                if self.locks[i]
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
                {
                    // Give back what this call took: the earlier runs whole, this one up to i.
                    for (s, e) in span.runs().into_iter().take(run) {
                        self.release(s, e);
                    }
                    self.release(start, i);
                    return false;
                }
            }
        }
        true
    }

    /// Releases every entry of a span taken with [`try_lock`](Self::try_lock).
    #[inline]
    pub(crate) fn unlock(&self, span: GranuleSpan) {
        for (start, end) in span.runs() {
            self.release(start, end);
        }
    }

    fn release(&self, start: usize, end: usize) {
        for lock in &self.locks[start..end] {
            debug_assert!(lock.load(Ordering::Relaxed), "releasing a free granule");
            lock.store(false, Ordering::Release);
        }
    }

    /// Number of entries held now (for tests and diagnostics; not a consistent snapshot).
    pub(crate) fn held(&self) -> usize {
        self.locks
            .iter()
            .filter(|l| l.load(Ordering::Relaxed))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans_exclude_each_other_and_disjoint_ones_do_not() {
        // 32 blocks per granule.
        let g = OverlapGuard::new(5);
        let a = g.span(0, 40); // granules 0, 1
        assert_eq!(a, GranuleSpan { first: 0, count: 2 });
        assert!(g.try_lock(a));
        assert!(!g.try_lock(g.span(63, 1)), "granule 1 is held");
        assert_eq!(g.held(), 2, "a failed attempt gives back what it took");
        assert!(g.try_lock(g.span(64, 64)));
        g.unlock(a);
        assert!(g.try_lock(g.span(63, 1)));
        assert_eq!(g.held(), 3);
    }

    #[test]
    fn spans_wrap_at_the_table_end_and_collide_modulo_the_table() {
        let g = OverlapGuard::new(0);
        let last = GUARD_ENTRIES as u64 - 1;
        let wrap = g.span(last, 3);
        assert_eq!(
            wrap.runs(),
            [(0, 2), (GUARD_ENTRIES - 2 + 1, GUARD_ENTRIES)]
        );
        assert!(g.try_lock(wrap));
        assert_eq!(g.held(), 3);
        // Block `ENTRIES` hashes onto entry 0: the documented false sharing.
        assert!(!g.try_lock(g.span(GUARD_ENTRIES as u64 * 5, 1)));
        // A failure in the second run gives back the first run too.
        g.unlock(wrap);
        assert!(g.try_lock(g.span(last, 1)));
        assert!(!g.try_lock(wrap));
        assert_eq!(g.held(), 1);
    }

    #[test]
    fn a_huge_span_takes_the_whole_table_once() {
        let g = OverlapGuard::new(0);
        let all = g.span(7, u32::MAX);
        assert_eq!(
            all,
            GranuleSpan {
                first: 0,
                count: GUARD_ENTRIES as u32
            }
        );
        assert!(g.try_lock(all));
        assert_eq!(g.held(), GUARD_ENTRIES);
        g.unlock(all);
        assert_eq!(g.held(), 0);
    }
}
