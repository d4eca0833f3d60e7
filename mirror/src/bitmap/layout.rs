//! Where the metadata lives on a leg (ARCHITECTURE.md §4): the superblock in the first 4 KiB,
//! the write-intent bitmap right after it (one bit per region, whole 4 KiB pages), and the
//! exported namespace from `data_offset` on (rounded up to 1 MiB).
//!
//! Bit `r` of the bitmap (region `r`) is bit `r % 8` of byte `r / 8` of the area, which is also
//! bit `r % 64` of little-endian word `r / 64`: the in-memory words are written out as they are.

/// Bytes of one bitmap page, the unit of every metadata write.
pub const BITMAP_PAGE: u64 = 4096;
/// Regions covered by one bitmap page.
pub const REGIONS_PER_PAGE: u64 = BITMAP_PAGE * 8;
/// 64-bit words in one bitmap page.
pub(crate) const WORDS_PER_PAGE: usize = (BITMAP_PAGE / 8) as usize;
/// Bytes reserved for the superblock.
pub const SUPERBLOCK_AREA: u64 = 4096;
/// The exported namespace starts on a multiple of this.
pub const DATA_ALIGN: u64 = 1 << 20;

/// The metadata layout of a volume's legs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataLayout {
    pub lba_size: u32,
    pub region_size: u64,
    /// Regions tracked (bits in use).
    pub regions: u64,
    pub bitmap_offset: u64,
    /// Bytes of the bitmap area (whole pages).
    pub bitmap_len: u64,
    /// First byte of the exported namespace on every leg.
    pub data_offset: u64,
    /// Exported logical blocks.
    pub data_blocks: u64,
}

impl MetadataLayout {
    /// The layout for legs whose smallest holds `leg_bytes` bytes, or `None` when the
    /// metadata would leave no room for data.
    pub fn compute(leg_bytes: u64, lba_size: u32, region_size: u64) -> Option<Self> {
        // Size the bitmap for the whole leg: a few bits too many, never too few.
        let regions = leg_bytes.div_ceil(region_size).max(1);
        let bitmap_len = regions.div_ceil(8).div_ceil(BITMAP_PAGE) * BITMAP_PAGE;
        let data_offset = (SUPERBLOCK_AREA + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        let data_bytes = leg_bytes.checked_sub(data_offset)?;
        let data_blocks = data_bytes / u64::from(lba_size);
        if data_blocks == 0 {
            return None;
        }
        Some(Self {
            lba_size,
            region_size,
            regions: (data_blocks * u64::from(lba_size)).div_ceil(region_size),
            bitmap_offset: SUPERBLOCK_AREA,
            bitmap_len,
            data_offset,
            data_blocks,
        })
    }

    /// Number of bitmap pages.
    pub fn pages(&self) -> u64 {
        self.regions.div_ceil(REGIONS_PER_PAGE)
    }

    /// First logical block of the exported namespace on a leg.
    pub fn data_lba(&self) -> u64 {
        self.data_offset / u64::from(self.lba_size)
    }

    /// First logical block of bitmap page `page` on a leg.
    pub fn page_lba(&self, page: u64) -> u64 {
        (self.bitmap_offset + page * BITMAP_PAGE) / u64::from(self.lba_size)
    }

    /// Logical blocks per bitmap page.
    pub fn page_blocks(&self) -> u32 {
        (BITMAP_PAGE / u64::from(self.lba_size)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_leg_layout() {
        // 64 MiB, 1 MiB regions: 64 bits fit one page; data at 1 MiB.
        let l = MetadataLayout::compute(64 << 20, 4096, 1 << 20).unwrap();
        assert_eq!(l.bitmap_offset, 4096);
        assert_eq!(l.bitmap_len, 4096);
        assert_eq!(l.data_offset, 1 << 20);
        assert_eq!(l.data_blocks, (63 << 20) / 4096);
        assert_eq!(l.regions, 63);
        assert_eq!(l.pages(), 1);
        assert_eq!(l.page_lba(0), 1);
        assert_eq!(l.data_lba(), 256);
    }

    #[test]
    fn large_leg_with_small_regions_needs_several_pages() {
        // 16 GiB at 64 KiB regions: 262 144 bits = 8 pages = 32 KiB of bitmap.
        let l = MetadataLayout::compute(16 << 30, 512, 64 << 10).unwrap();
        assert_eq!(l.bitmap_len, 32 << 10);
        assert_eq!(l.data_offset, 1 << 20);
        assert!(l.pages() <= 8 && l.regions * (64 << 10) >= l.data_blocks * 512);
        assert_eq!(l.page_lba(1), (4096 + 4096) / 512);
        assert_eq!(l.page_blocks(), 8);
    }

    #[test]
    fn a_leg_smaller_than_the_metadata_has_no_layout() {
        assert_eq!(MetadataLayout::compute(1 << 20, 4096, 1 << 20), None);
        assert_eq!(MetadataLayout::compute(4096, 512, 64 << 10), None);
    }
}
