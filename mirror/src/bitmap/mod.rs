//! The persistent write-intent bitmap (ARCHITECTURE.md invariant 4): one bit per region, set
//! in memory and durably on the legs before any leg receives a write to the region, cleared
//! once the region is identical on every leg and idle. The protocol and why it is safe are in
//! `docs/bitmap.md`.
//!
//! Shared by every core of a volume, lock-free:
//!
//! - `marked`: the in-memory intent bits (`fetch_or` to set).
//! - `durable`: the bits known to be on disk on every leg that receives writes, and that no
//!   metadata write in progress will remove. A write whose regions are all marked and durable
//!   goes straight to its legs: no metadata I/O, no wait.
//! - per 4 KiB page: a writer lock (one metadata write of a page in flight at a time, so a
//!   newer snapshot can never be overtaken by an older one), `dirty_gen` (bumped after bits
//!   change) and `durable_gen` (the generation of the last snapshot written).
//! - hashed in-flight counters per region, for the Dekker-style handshake with the clearer.
//! - a last-touch epoch per region (one byte), for clearing idle regions oldest first.

mod clear;
pub mod layout;
pub(crate) mod predict;

use crate::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use layout::WORDS_PER_PAGE;
pub use layout::{MetadataLayout, BITMAP_PAGE, REGIONS_PER_PAGE};

pub(crate) use clear::ClearClock;

/// Number of hashed in-flight counters (a power of two; a few under loom, which tracks every
/// atomic).
#[cfg(not(loom))]
const INFLIGHT_SLOTS: u64 = 1 << 12;
#[cfg(loom)]
const INFLIGHT_SLOTS: u64 = 4;

/// Per-page metadata-write state.
#[derive(Debug, Default)]
pub(crate) struct PageState {
    /// Held by the one core (or the clearer) writing this page.
    writer: AtomicBool,
    /// Bumped after bits of the page change in `marked`.
    dirty_gen: AtomicU64,
    /// `dirty_gen` as read before the snapshot that is on disk now.
    durable_gen: AtomicU64,
}

/// The shared write-intent bitmap of a persistent volume.
#[derive(Debug)]
pub(crate) struct WriteIntentBitmap {
    pub(crate) layout: MetadataLayout,
    /// log2 of the logical blocks per region.
    region_shift: u32,
    marked: Box<[AtomicU64]>,
    durable: Box<[AtomicU64]>,
    pages: Box<[PageState]>,
    inflight: Box<[AtomicU32]>,
    epochs: Box<[AtomicU8]>,
    /// The epoch a write touching a region records.
    epoch: AtomicU8,
    pub(crate) clock: Mutex<ClearClock>,
}

/// The inclusive region range of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegionRange {
    pub(crate) first: u64,
    pub(crate) last: u64,
}

impl WriteIntentBitmap {
    pub(crate) fn new(layout: MetadataLayout) -> Self {
        let words = (layout.pages() as usize) * WORDS_PER_PAGE;
        let blocks_per_region = layout.region_size / u64::from(layout.lba_size);
        Self {
            layout,
            region_shift: blocks_per_region.trailing_zeros(),
            marked: (0..words).map(|_| AtomicU64::new(0)).collect(),
            durable: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages: (0..layout.pages()).map(|_| PageState::default()).collect(),
            inflight: (0..INFLIGHT_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            epochs: (0..layout.regions).map(|_| AtomicU8::new(0)).collect(),
            epoch: AtomicU8::new(0),
            clock: Mutex::new(ClearClock::default()),
        }
    }

    /// Number of regions.
    pub(crate) fn regions(&self) -> u64 {
        self.layout.regions
    }

    /// Number of bitmap pages.
    pub(crate) fn pages(&self) -> usize {
        self.pages.len()
    }

    /// The regions `[slba, slba + nlb)` covers (`nlb >= 1`, inside the namespace).
    #[inline]
    pub(crate) fn range(&self, slba: u64, nlb: u32) -> RegionRange {
        let last = (slba + u64::from(nlb.max(1)) - 1) >> self.region_shift;
        RegionRange {
            first: (slba >> self.region_shift).min(self.regions() - 1),
            last: last.min(self.regions() - 1),
        }
    }

    #[inline]
    fn counter(&self, region: u64) -> &AtomicU32 {
        &self.inflight[(region & (INFLIGHT_SLOTS - 1)) as usize]
    }

    /// A write to `r` is starting: counted before the bits are looked at (the writer's half
    /// of the handshake with [`clear`](Self::clear_idle)).
    #[inline]
    pub(crate) fn enter(&self, r: RegionRange) {
        for region in r.first..=r.last {
            self.counter(region).fetch_add(1, Ordering::SeqCst);
        }
        crate::sync::seqcst_handshake();
    }

    /// A write to `r` is done on every leg (or abandoned).
    #[inline]
    pub(crate) fn leave(&self, r: RegionRange) {
        for region in r.first..=r.last {
            self.counter(region).fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether some write to `region` (or a region sharing its counter) is in flight.
    pub(crate) fn in_flight(&self, region: u64) -> bool {
        self.counter(region).load(Ordering::SeqCst) != 0
    }

    /// Calls `f(word, mask)` for every word of the bit range `r`.
    #[inline]
    fn for_words(r: RegionRange, mut f: impl FnMut(usize, u64) -> bool) -> bool {
        let (fw, lw) = (r.first / 64, r.last / 64);
        for w in fw..=lw {
            let lo = if w == fw { r.first % 64 } else { 0 };
            let hi = if w == lw { r.last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if !f(w as usize, mask) {
                return false;
            }
        }
        true
    }

    /// Whether every region of `r` is marked and durable: the write may go to its legs now.
    #[inline]
    pub(crate) fn is_durable(&self, r: RegionRange) -> bool {
        Self::for_words(r, |w, mask| {
            self.marked[w].load(Ordering::SeqCst) & mask == mask
                && self.durable[w].load(Ordering::SeqCst) & mask == mask
        })
    }

    /// Records the current epoch as `r`'s last touch.
    #[inline]
    pub(crate) fn touch(&self, r: RegionRange) {
        let e = self.epoch.load(Ordering::Relaxed);
        for region in r.first..=r.last {
            let slot = &self.epochs[region as usize];
            if slot.load(Ordering::Relaxed) != e {
                slot.store(e, Ordering::Relaxed);
            }
        }
    }

    /// Sets the bits of `r` in memory; calls `dirty(page)` for every page whose bits changed.
    /// Returns whether any bit changed.
    pub(crate) fn mark(&self, r: RegionRange, mut dirty: impl FnMut(u32)) -> bool {
        let mut changed = false;
        Self::for_words(r, |w, mask| {
            let word = &self.marked[w];
            if word.load(Ordering::SeqCst) & mask != mask {
                let old = word.fetch_or(mask, Ordering::SeqCst);
                if old & mask != mask {
                    let page = w / WORDS_PER_PAGE;
                    // After the bits: a snapshot that reads this generation sees them.
                    self.pages[page].dirty_gen.fetch_add(1, Ordering::SeqCst);
                    dirty(page as u32);
                    changed = true;
                }
            }
            true
        });
        changed
    }

    /// The pages holding the bits of `r` (ascending, inclusive).
    pub(crate) fn page_span(&self, r: RegionRange) -> (u32, u32) {
        (
            (r.first / REGIONS_PER_PAGE) as u32,
            (r.last / REGIONS_PER_PAGE) as u32,
        )
    }

    /// Whether page `page` has bits that are not on disk yet.
    #[inline]
    pub(crate) fn needs_write(&self, page: u32) -> bool {
        let p = &self.pages[page as usize];
        p.dirty_gen.load(Ordering::SeqCst) > p.durable_gen.load(Ordering::SeqCst)
    }

    /// Takes page `page`'s writer lock.
    #[inline]
    pub(crate) fn try_lock(&self, page: u32) -> bool {
        self.pages[page as usize]
            .writer
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Releases page `page`'s writer lock.
    #[inline]
    pub(crate) fn unlock(&self, page: u32) {
        self.pages[page as usize]
            .writer
            .store(false, Ordering::Release);
    }

    /// Copies page `page` of the in-memory bits into `out` (4 KiB, on-disk byte order) and
    /// returns the generation it covers. The caller holds the page's writer lock.
    pub(crate) fn snapshot(&self, page: u32, out: &mut [u8]) -> u64 {
        let gen = self.pages[page as usize].dirty_gen.load(Ordering::SeqCst);
        let base = page as usize * WORDS_PER_PAGE;
        for (i, chunk) in out[..BITMAP_PAGE as usize].chunks_exact_mut(8).enumerate() {
            let w = self.marked[base + i].load(Ordering::SeqCst);
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        gen
    }

    /// The snapshot `bytes` of generation `gen` is on disk on every target leg. The caller
    /// holds the page's writer lock (and releases it afterwards).
    pub(crate) fn written(&self, page: u32, gen: u64, bytes: &[u8]) {
        let base = page as usize * WORDS_PER_PAGE;
        for (i, chunk) in bytes[..BITMAP_PAGE as usize].chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.durable[base + i].store(w, Ordering::SeqCst);
        }
        self.pages[page as usize]
            .durable_gen
            .fetch_max(gen, Ordering::SeqCst);
    }

    /// Loads the on-disk bitmap area (at start, before any I/O): every bit set is marked and
    /// durable. Bits past the last region are ignored.
    pub(crate) fn load(&self, area: &[u8]) {
        for (w, chunk) in area.chunks_exact(8).take(self.marked.len()).enumerate() {
            let mut v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let first = w as u64 * 64;
            if first >= self.regions() {
                v = 0;
            } else if self.regions() - first < 64 {
                v &= (1u64 << (self.regions() - first)) - 1;
            }
            self.marked[w].store(v, Ordering::SeqCst);
            self.durable[w].store(v, Ordering::SeqCst);
        }
    }

    /// Whether `region` is marked in memory.
    pub(crate) fn is_marked(&self, region: u64) -> bool {
        region < self.regions()
            && self.marked[(region / 64) as usize].load(Ordering::SeqCst) & (1 << (region % 64))
                != 0
    }

    /// The marked regions, ascending.
    pub(crate) fn marked_regions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.marked.iter().enumerate() {
            let mut bits = w.load(Ordering::SeqCst);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of marked regions.
    pub(crate) fn marked_count(&self) -> u64 {
        self.marked
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }
}

/// The bitmap steps of a volume's write gate, on the real [`WriteIntentBitmap`], for the
/// `bitmap` benchmark. Not part of the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct WriteGateBench(WriteIntentBitmap);

#[doc(hidden)]
impl WriteGateBench {
    /// A bitmap for a leg of `leg_bytes` with blocks of `lba_size` and regions of
    /// `region_size` bytes.
    pub fn new(leg_bytes: u64, lba_size: u32, region_size: u64) -> Option<Self> {
        MetadataLayout::compute(leg_bytes, lba_size, region_size)
            .map(|l| Self(WriteIntentBitmap::new(l)))
    }

    pub fn regions(&self) -> u64 {
        self.0.regions()
    }

    /// Logical blocks per region.
    pub fn blocks_per_region(&self) -> u64 {
        1 << self.0.region_shift
    }

    /// A write to `[slba, slba + nlb)` through the gate and back out, as a volume queue
    /// pair does it when the regions are marked and durable (the hit): range, enter,
    /// durable check, touch — then leave once the legs are done. Returns whether it hit.
    #[inline]
    pub fn write_hit(&self, slba: u64, nlb: u32) -> bool {
        let r = self.0.range(slba, nlb);
        self.0.enter(r);
        let hit = self.0.is_durable(r);
        if hit {
            self.0.touch(r);
        }
        self.0.leave(r);
        hit
    }

    /// A write to regions not yet marked (the first touch): range, enter, durable check,
    /// leave, mark (queueing the dirty page). Returns the dirty page, if a bit changed.
    #[inline]
    pub fn first_touch(&self, slba: u64, nlb: u32) -> Option<u32> {
        let r = self.0.range(slba, nlb);
        self.0.enter(r);
        if self.0.is_durable(r) {
            self.0.leave(r);
            return None;
        }
        self.0.leave(r);
        let mut page = None;
        self.0.mark(r, |p| page = Some(p));
        page
    }

    /// The writer's half of the clear handshake, without leaving: enter, then whether the
    /// regions are marked and durable (the write may go to its legs). For the loom model.
    pub fn enter_and_check(&self, slba: u64, nlb: u32) -> bool {
        let r = self.0.range(slba, nlb);
        self.0.enter(r);
        self.0.is_durable(r)
    }

    /// The clearer's half: clears `region` unless a write is in flight to it.
    pub fn try_clear(&self, region: u64) -> bool {
        self.0.try_clear(region, &|_| false)
    }

    pub fn is_marked(&self, region: u64) -> bool {
        self.0.is_marked(region)
    }

    /// Marks the regions of `[slba, slba + nlb)` in memory.
    pub fn mark(&self, slba: u64, nlb: u32) {
        self.0.mark(self.0.range(slba, nlb), |_| {});
    }

    /// Writes every page's marked bits as if to disk: they all become durable.
    pub fn persist_all(&self) {
        let mut buf = vec![0u8; BITMAP_PAGE as usize];
        for page in 0..self.0.pages() as u32 {
            let gen = self.0.snapshot(page, &mut buf);
            self.0.written(page, gen, &buf);
        }
    }

    /// Clears every bit, in memory and durable (a fresh bitmap, without reallocating).
    pub fn reset(&self) {
        for w in self.0.marked.iter().chain(self.0.durable.iter()) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap() -> WriteIntentBitmap {
        // 64 MiB of 512-byte blocks, 64 KiB regions: 1008 regions, one page.
        WriteIntentBitmap::new(MetadataLayout::compute(64 << 20, 512, 64 << 10).unwrap())
    }

    #[test]
    fn mark_then_write_makes_durable() {
        let b = bitmap();
        let r = b.range(128, 256); // blocks 128..384: regions 1 and 2 (128 blocks each)
        assert_eq!(r, RegionRange { first: 1, last: 2 });
        assert!(!b.is_durable(r));
        let mut pages = vec![];
        assert!(b.mark(r, |p| pages.push(p)));
        assert_eq!(pages, vec![0]);
        assert!(b.needs_write(0));
        assert!(!b.is_durable(r), "marked in memory only");
        assert!(b.try_lock(0));
        assert!(!b.try_lock(0));
        let mut buf = vec![0u8; 4096];
        let gen = b.snapshot(0, &mut buf);
        assert_eq!(buf[0], 0b110);
        b.written(0, gen, &buf);
        b.unlock(0);
        assert!(b.is_durable(r));
        assert!(!b.needs_write(0));
        // Marking again changes nothing.
        assert!(!b.mark(r, |_| panic!("no page is dirty")));
    }

    #[test]
    fn a_bit_set_after_the_snapshot_stays_not_durable() {
        let b = bitmap();
        let a = b.range(0, 1);
        let c = b.range(128 * 5, 1);
        b.mark(a, |_| {});
        let mut buf = vec![0u8; 4096];
        let gen = b.snapshot(0, &mut buf);
        b.mark(c, |_| {});
        b.written(0, gen, &buf);
        assert!(b.is_durable(a));
        assert!(!b.is_durable(c));
        assert!(b.needs_write(0));
    }

    #[test]
    fn the_bench_driver_hits_only_durable_regions() {
        let g = WriteGateBench::new(64 << 20, 512, 64 << 10).unwrap();
        assert_eq!(g.blocks_per_region(), 128);
        assert!(!g.write_hit(0, 8));
        assert_eq!(g.first_touch(0, 8), Some(0));
        assert_eq!(g.first_touch(0, 8), None, "marked already");
        assert!(!g.write_hit(0, 8), "marked but not durable");
        g.persist_all();
        assert!(g.write_hit(0, 8));
        assert!(!g.write_hit(128, 8), "another region");
        g.reset();
        assert!(!g.write_hit(0, 8));
        assert_eq!(g.first_touch(0, 8), Some(0));
    }

    #[test]
    fn load_ignores_bits_past_the_end() {
        let b = bitmap();
        let mut area = vec![0xffu8; 4096];
        area[0] = 0b1;
        b.load(&area);
        assert_eq!(b.marked_count(), b.regions() - 7);
        assert!(b.is_marked(0) && !b.is_marked(1));
        assert!(b.is_durable(b.range(0, 1)));
    }
}
