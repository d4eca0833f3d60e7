//! Physical Region Page entries and lists (NVMe Base 2.0 §4.1.1): how a transfer of `len`
//! bytes at bus address `addr` is described to the controller.
//!
//! - PRP1 is `addr` (any dword-aligned offset in its page).
//! - If the rest fits in one page, PRP2 is that page's address.
//! - Otherwise PRP2 points at a PRP list: one page-aligned entry per further page. A list page
//!   holds 512 entries; when more pages follow than fit, its last entry points at the next
//!   list page instead (a chained list).

use super::region::DmaRegion;
use super::regs::PAGE_SIZE;

/// Entries one list page holds.
const ENTRIES: usize = PAGE_SIZE / 8;

/// Pages a transfer of `len` bytes at an address `offset` bytes into a page touches.
pub fn pages_spanned(offset: usize, len: usize) -> usize {
    (offset % PAGE_SIZE + len).div_ceil(PAGE_SIZE)
}

/// List pages needed for a transfer of `len` bytes, whatever its offset in the first page.
pub fn list_pages_for(len: usize) -> usize {
    // Worst case: the transfer starts at the end of a page.
    let entries = pages_spanned(PAGE_SIZE - 4, len).saturating_sub(1);
    if entries <= ENTRIES {
        1
    } else {
        (entries - 1).div_ceil(ENTRIES - 1)
    }
}

/// Builds PRP1/PRP2 for `len` bytes at `addr`, writing any PRP list into `list` from byte
/// `list_off` (page-aligned, with room for [`list_pages_for`]`(len)` pages).
pub fn build(addr: u64, len: usize, list: &DmaRegion, list_off: usize) -> (u64, u64) {
    debug_assert!(addr & 3 == 0 && list_off % PAGE_SIZE == 0);
    let first = len.min(PAGE_SIZE - addr as usize % PAGE_SIZE);
    let rest = len - first;
    if rest == 0 {
        return (addr, 0);
    }
    let second = addr + first as u64;
    if rest <= PAGE_SIZE {
        return (addr, second);
    }
    let n = rest.div_ceil(PAGE_SIZE);
    let mut page = list_off;
    let mut slot = 0;
    for i in 0..n {
        if slot == ENTRIES - 1 && n - i > 1 {
            let next = page + PAGE_SIZE;
            list.write_u64(page + slot * 8, list.iova() + next as u64);
            page = next;
            slot = 0;
        }
        list.write_u64(page + slot * 8, second + (i * PAGE_SIZE) as u64);
        slot += 1;
    }
    (addr, list.iova() + list_off as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_pages_cover_chained_lists() {
        assert_eq!(list_pages_for(4096), 1);
        assert_eq!(list_pages_for(128 << 10), 1);
        // 2 MiB from an unaligned start: 513 pages, 512 list entries: one page.
        assert_eq!(list_pages_for(2 << 20), 1);
        // 4 MiB from an unaligned start: 1024 list entries: 511 + 511 + 2.
        assert_eq!(list_pages_for(4 << 20), 3);
    }

    #[test]
    fn one_two_and_many_pages() {
        let list = DmaRegion::heap(3 * PAGE_SIZE).unwrap();
        assert_eq!(build(0x10_0000, 4096, &list, 0), (0x10_0000, 0));
        assert_eq!(build(0x10_0200, 4096, &list, 0), (0x10_0200, 0x10_1000));
        assert_eq!(build(0x10_0000, 8192, &list, 0), (0x10_0000, 0x10_1000));
        let (p1, p2) = build(0x10_0000, 5 * 4096, &list, PAGE_SIZE);
        assert_eq!((p1, p2), (0x10_0000, list.iova() + PAGE_SIZE as u64));
        let mut e = [0u8; 32];
        list.read_bytes(PAGE_SIZE, &mut e);
        let entry = |i: usize| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(
            (entry(0), entry(1), entry(2), entry(3)),
            (0x10_1000, 0x10_2000, 0x10_3000, 0x10_4000)
        );
    }
}
