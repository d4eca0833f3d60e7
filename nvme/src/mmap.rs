//! Anonymous memory mappings for RAM that should sit on transparent hugepages: the `mem://`
//! store's flat region and [`DmaPool`](crate::dma::DmaPool) regions.
//!
//! A mapping asked for hugepages starts on a 2 MiB boundary and is advised with
//! `madvise(MADV_HUGEPAGE)`, so each 2 MiB of it is one page-table entry and one fault instead of
//! 512 (Linux's transparent hugepages, `/sys/kernel/mm/transparent_hugepage/enabled`; with
//! `[madvise]` only advised memory gets them, with `[always]` all of it, with `[never]` none).
//! The advice is a hint: where the kernel has no THP, or it is set to `never`, the mapping keeps
//! 4 KiB pages and says so ([`Hugepages::Unavailable`]); the caller logs it.
//! [`populate`](AnonMapping::populate) faults the whole mapping in up front, so a run never pays
//! a first-touch fault.
//!
//! This is the only place that calls `mmap`, `madvise` and `munmap` for such memory.

use std::io;
use std::ptr::NonNull;

use crate::{Error, Result};

/// Size of a transparent hugepage on x86-64 and AArch64 with 4 KiB base pages.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// Base page size the mappings are rounded to.
const PAGE_SIZE: usize = 4096;

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The kernel's transparent hugepage setting, the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/enabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThpMode {
    /// Every anonymous mapping may get hugepages.
    Always,
    /// Only mappings advised with `MADV_HUGEPAGE`.
    Madvise,
    /// None.
    Never,
    /// The file is missing or unreadable: a kernel without transparent hugepages.
    Unsupported,
}

impl ThpMode {
    /// The current setting.
    pub fn current() -> Self {
        match std::fs::read_to_string(THP_ENABLED) {
            Ok(s) => Self::parse(&s),
            Err(_) => Self::Unsupported,
        }
    }

    /// Parses the file's contents (`always [madvise] never`).
    fn parse(s: &str) -> Self {
        let chosen = s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')));
        match chosen {
            Some("always") => Self::Always,
            Some("madvise") => Self::Madvise,
            Some("never") => Self::Never,
            _ => Self::Unsupported,
        }
    }

    /// Whether advised memory can get hugepages.
    pub fn allows_advised(self) -> bool {
        matches!(self, Self::Always | Self::Madvise)
    }
}

/// What became of a mapping's hugepage request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hugepages {
    /// Not asked for: ordinary 4 KiB pages (unless THP is `always`).
    Off,
    /// Aligned to 2 MiB and advised with `MADV_HUGEPAGE`; the kernel gives hugepages where it
    /// can find contiguous memory.
    Advised,
    /// Asked for, but the kernel cannot give them (THP `never` or not built in): 4 KiB pages.
    Unavailable(ThpMode),
}

/// A private anonymous mapping, zero-filled, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
    hugepages: Hugepages,
}

// SAFETY: the mapping is plain memory owned by this value; which part of it a thread may touch
// is decided by its owner (the mem store, a DMA pool), not by the mapping.
unsafe impl Send for AnonMapping {}
// SAFETY: as above: the mapping itself is never read or written through `&AnonMapping`.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to whole 4 KiB pages) of zeroed memory, charged against
    /// the kernel's overcommit limit up front like a heap allocation. With `hugepages` the
    /// mapping starts on a 2 MiB boundary and is advised for transparent hugepages (see
    /// [`hugepages`](Self::hugepages) for what came of it).
    pub fn new(len: usize, hugepages: bool) -> Result<Self> {
        Self::map(len, hugepages, 0)
    }

    /// Like [`new`](Self::new), but `MAP_NORESERVE`: nothing is charged up front, so a mapping
    /// may be far larger than memory (a sparse namespace) and takes memory only as it is
    /// touched.
    pub fn sparse(len: usize, hugepages: bool) -> Result<Self> {
        Self::map(len, hugepages, libc::MAP_NORESERVE)
    }

    fn map(len: usize, hugepages: bool, extra_flags: libc::c_int) -> Result<Self> {
        let len = len
            .max(1)
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or_else(|| sys("mmap: length overflows", libc::EINVAL))?;
        let thp = if hugepages {
            ThpMode::current()
        } else {
            ThpMode::Never
        };
        let align = hugepages && thp.allows_advised() && len >= HUGEPAGE_SIZE;
        let mapped = if align {
            len.checked_add(HUGEPAGE_SIZE)
                .ok_or_else(|| sys("mmap: length overflows", libc::EINVAL))?
        } else {
            len
        };
        // SAFETY: a new private anonymous mapping at an address the kernel picks; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Sys {
                op: "mmap of anonymous memory",
                source: io::Error::last_os_error(),
            });
        }
        let mut base = p.cast::<u8>();
        if align {
            // Trim the mapping to `len` bytes from the first 2 MiB boundary in it.
            let head = base.align_offset(HUGEPAGE_SIZE);
            let tail = HUGEPAGE_SIZE - head;
            // SAFETY: both ranges lie inside the mapping just made and are page-aligned
            // (`head` and `len` are multiples of 4 KiB); nothing refers to them.
            unsafe {
                if head > 0 {
                    libc::munmap(p, head);
                }
                base = base.add(head);
                if tail > 0 {
                    libc::munmap(base.add(len).cast(), tail);
                }
            }
        }
        let mut mapping = Self {
            ptr: NonNull::new(base).expect("mmap returned a non-null mapping"),
            len,
            hugepages: Hugepages::Off,
        };
        if hugepages {
            mapping.hugepages = if !thp.allows_advised() {
                Hugepages::Unavailable(thp)
            } else if mapping.advise(libc::MADV_HUGEPAGE).is_err() {
                // EINVAL: a kernel built without transparent hugepages.
                Hugepages::Unavailable(ThpMode::Unsupported)
            } else {
                Hugepages::Advised
            };
        }
        Ok(mapping)
    }

    /// Faults every page in now (writing, so each gets its own zeroed page, a hugepage where
    /// advised), so that later accesses take no first-touch fault. Call it before the memory is
    /// shared.
    pub fn populate(&mut self) -> Result<()> {
        match self.advise(libc::MADV_POPULATE_WRITE) {
            Ok(()) => Ok(()),
            // Before Linux 5.14: touch a byte of every page instead.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                for off in (0..self.len).step_by(PAGE_SIZE) {
                    // SAFETY: `off < len`, inside the mapping, which `&mut self` owns alone;
                    // the byte is zero (fresh memory) and stays zero.
                    unsafe { self.ptr.as_ptr().add(off).write_volatile(0) };
                }
                Ok(())
            }
            Err(source) => Err(Error::Sys {
                op: "madvise(MADV_POPULATE_WRITE): faulting the memory in",
                source,
            }),
        }
    }

    /// Gives the whole pages inside `[off, off + len)` back to the kernel; they read as zeroes
    /// and are faulted in again on the next touch. Returns the sub-range it dropped (empty when
    /// the range holds no whole page); the caller zeroes the rest.
    pub fn discard(&self, off: usize, len: usize) -> std::ops::Range<usize> {
        let end = (off + len).min(self.len);
        let start = off.next_multiple_of(PAGE_SIZE);
        let stop = end - end % PAGE_SIZE;
        if start >= stop {
            return off..off;
        }
        // SAFETY: `[start, stop)` is page-aligned and inside the mapping. MADV_DONTNEED on a
        // private anonymous mapping only replaces those pages with zero pages; the caller owns
        // the bytes of the range (no other command may be using them).
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                stop - start,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return off..off;
        }
        start..stop
    }

    fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping; the advice values used here change how
        // the kernel backs it, never its contents.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What came of the hugepage request.
    pub fn hugepages(&self) -> Hugepages {
        self.hugepages
    }

    /// Bytes of this mapping the kernel currently backs with transparent hugepages
    /// (`AnonHugePages` of its entry in `/proc/self/smaps`).
    pub fn huge_bytes(&self) -> io::Result<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let (lo, hi) = (self.as_ptr() as usize, self.as_ptr() as usize + self.len);
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    // A mapping line: the kernel may have split or merged ours.
                    inside = a < hi && b > lo;
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    let kb = kb.trim().trim_end_matches("kB").trim();
                    total += kb.parse::<u64>().unwrap_or(0) << 10;
                }
            }
        }
        Ok(total)
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this start and length and is unmapped
        // only here; its owner guarantees nothing uses it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn sys(op: &'static str, errno: i32) -> Error {
    Error::Sys {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thp_setting_is_the_bracketed_word() {
        assert_eq!(ThpMode::parse("always [madvise] never\n"), ThpMode::Madvise);
        assert_eq!(ThpMode::parse("[always] madvise never"), ThpMode::Always);
        assert_eq!(ThpMode::parse("always madvise [never]"), ThpMode::Never);
        assert_eq!(ThpMode::parse(""), ThpMode::Unsupported);
    }

    #[test]
    fn a_mapping_is_zeroed_and_aligned_for_hugepages() {
        let mut m = AnonMapping::new(3 * HUGEPAGE_SIZE + 100, true).unwrap();
        assert_eq!(m.len(), 3 * HUGEPAGE_SIZE + PAGE_SIZE);
        if m.hugepages() == Hugepages::Advised {
            assert_eq!(m.as_ptr() as usize % HUGEPAGE_SIZE, 0);
        }
        m.populate().unwrap();
        // SAFETY: the mapping is `len` bytes, owned by `m` and not shared.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[PAGE_SIZE + 7] = 9;
        bytes[m.len() - 1] = 9;
        // The page holding byte 4103 goes back to zero; the edges of the range stay.
        let dropped = m.discard(100, 3 * PAGE_SIZE);
        assert_eq!(dropped, PAGE_SIZE..3 * PAGE_SIZE);
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert_eq!(bytes[PAGE_SIZE + 7], 0);
        assert_eq!(bytes[m.len() - 1], 9);
        assert_eq!(m.discard(100, 200), 100..100, "no whole page inside");
    }

    #[test]
    fn a_mapping_without_hugepages_says_off() {
        let m = AnonMapping::new(PAGE_SIZE, false).unwrap();
        assert_eq!(m.hugepages(), Hugepages::Off);
        assert_eq!(m.len(), PAGE_SIZE);
    }

    #[test]
    fn populated_hugepage_memory_shows_in_smaps() {
        let thp = ThpMode::current();
        if !thp.allows_advised() {
            eprintln!("transparent hugepages are {thp:?} here: nothing to check");
            return;
        }
        let mut m = AnonMapping::new(8 * HUGEPAGE_SIZE, true).unwrap();
        assert_eq!(m.hugepages(), Hugepages::Advised);
        m.populate().unwrap();
        let huge = m.huge_bytes().unwrap();
        // The kernel may fail to find contiguous memory for some; all of it failing would
        // mean the advice did not reach the mapping.
        assert!(huge >= HUGEPAGE_SIZE as u64, "AnonHugePages {huge} bytes");
    }
}
