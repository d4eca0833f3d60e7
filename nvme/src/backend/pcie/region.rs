//! DMA memory: regions a controller reads and writes by bus address (IOVA), with the IOVA
//! equal to the process's virtual address (the IOMMU maps `iova = vaddr`).
//!
//! The device may write such memory at any time, so no Rust reference to it is ever formed:
//! every access goes through the volatile or raw-copy accessors of [`DmaRegion`], which check
//! their bounds. The same rule holds for the fake controller's side ([`device_read`],
//! [`device_write`]), which plays the device.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

use super::regs::PAGE_SIZE;
use crate::{Error, Result};

/// Size of a hugetlbfs page the driver maps DMA memory from.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// Where a region's memory came from, and so how it is given back.
#[derive(Debug)]
enum Backing {
    /// Page-aligned heap memory (the fake controller, and `hugepages=0`).
    Heap(Layout),
    /// An anonymous mapping of `len` bytes (2 MiB hugetlbfs pages).
    Mmap(usize),
}

/// Called when a region is dropped, before its memory is freed: removes the IOMMU mapping.
pub type Unmap = Box<dyn FnOnce(u64, usize) + Send + Sync>;

/// A page-aligned, zero-initialised region of DMA memory mapped for one device.
pub struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
    unmap: Option<Unmap>,
}

// SAFETY: the region owns its memory; it is only accessed through raw volatile/copy
// operations (never references), so moving it between threads or sharing it is sound as long
// as callers do not race on the same bytes, which the queue protocol guarantees (the driver
// writes an entry before ringing the doorbell, the device writes a CQE before the driver
// reads it).
unsafe impl Send for DmaRegion {}
// SAFETY: as for Send: no references are handed out, every access is a raw operation.
unsafe impl Sync for DmaRegion {}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion")
            .field("iova", &format_args!("{:#x}", self.iova()))
            .field("len", &self.len)
            .field("backing", &self.backing)
            .finish()
    }
}

impl DmaRegion {
    /// `len` bytes (rounded up to a page) of zeroed, page-aligned heap memory.
    pub fn heap(len: usize) -> Result<Self> {
        let len = len.max(1).next_multiple_of(PAGE_SIZE);
        let layout = Layout::from_size_align(len, PAGE_SIZE)
            .map_err(|e| Error::QueuePair(format!("DMA region of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            Error::QueuePair(format!("cannot allocate {len} bytes of DMA memory"))
        })?;
        Ok(Self {
            ptr,
            len,
            backing: Backing::Heap(layout),
            unmap: None,
        })
    }

    /// `len` bytes rounded up to whole 2 MiB hugetlbfs pages, zeroed (fresh anonymous
    /// memory), locked in memory by the kernel's hugetlb pool.
    pub fn hugepages(len: usize) -> Result<Self> {
        let len = len.max(1).next_multiple_of(HUGEPAGE_SIZE);
        // MAP_HUGE_2MB: log2(2 MiB) << MAP_HUGE_SHIFT.
        let huge_2mb = 21 << libc::MAP_HUGE_SHIFT;
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | huge_2mb,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Sys {
                op: "mmap(MAP_HUGETLB) of 2 MiB pages (reserve them: echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).expect("mmap returned a non-null mapping"),
            len,
            backing: Backing::Mmap(len),
            unmap: None,
        })
    }

    /// Sets what to call (the IOMMU unmap) before the memory is freed.
    pub fn on_drop(mut self, unmap: Unmap) -> Self {
        self.unmap = Some(unmap);
        self
    }

    /// The region's bus address: its virtual address (`iova = vaddr`).
    #[inline]
    pub fn iova(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The start of the region, for mapping it into an IOMMU.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn at(&self, off: usize, len: usize, align: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len) && off % align == 0,
            "DMA access at {off}+{len} outside a {}-byte region",
            self.len
        );
        self.ptr.as_ptr().wrapping_add(off)
    }

    /// A volatile 16-bit read (a CQE's status word: the device may be writing it).
    #[inline]
    pub fn read_u16(&self, off: usize) -> u16 {
        let p = self.at(off, 2, 2).cast::<u16>();
        // SAFETY: `at` checked bounds and alignment; the memory is live while `self` is.
        u16::from_le(unsafe { p.read_volatile() })
    }

    /// A volatile 64-bit write (a PRP list entry).
    #[inline]
    pub fn write_u64(&self, off: usize, v: u64) {
        let p = self.at(off, 8, 8).cast::<u64>();
        // SAFETY: `at` checked bounds and alignment; the memory is live while `self` is.
        unsafe { p.write_volatile(v.to_le()) }
    }

    /// Copies `src` into the region at `off` (an SQE, an Identify buffer, bounce data).
    #[inline]
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        let p = self.at(off, src.len(), 1);
        // SAFETY: bounds checked; `src` is ordinary memory that cannot overlap DMA memory
        // the driver owns.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) }
    }

    /// Copies `dst.len()` bytes at `off` out of the region.
    #[inline]
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        let p = self.at(off, dst.len(), 1);
        // SAFETY: bounds checked; the copy is a raw read, no reference to the region formed.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `len` bytes at `off` to raw memory at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes and not overlap the region.
    #[inline]
    pub unsafe fn copy_to(&self, off: usize, dst: *mut u8, len: usize) {
        let p = self.at(off, len, 1);
        // SAFETY: bounds checked here, `dst` by the caller.
        unsafe { std::ptr::copy_nonoverlapping(p, dst, len) }
    }

    /// Copies `len` bytes from raw memory at `src` into the region at `off`.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads and not overlap the region.
    #[inline]
    pub unsafe fn copy_from(&self, off: usize, src: *const u8, len: usize) {
        let p = self.at(off, len, 1);
        // SAFETY: bounds checked here, `src` by the caller.
        unsafe { std::ptr::copy_nonoverlapping(src, p, len) }
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&self, off: usize, len: usize) {
        let p = self.at(off, len, 1);
        // SAFETY: bounds checked.
        unsafe { std::ptr::write_bytes(p, 0, len) }
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        // The IOMMU mapping goes first, so the device can no longer reach the memory.
        if let Some(unmap) = self.unmap.take() {
            unmap(self.iova(), self.len);
        }
        fence(Ordering::SeqCst);
        match self.backing {
            // SAFETY: allocated in `heap` with this layout, freed only here.
            Backing::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            Backing::Mmap(len) => {
                // SAFETY: mapped in `hugepages` with this length, unmapped only here.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), len) };
            }
        }
    }
}

/// The device side of a DMA read: copies `dst.len()` bytes at bus address `iova` out of host
/// memory.
///
/// # Safety
/// `[iova, iova + dst.len())` must lie inside memory mapped for the device (a live
/// [`DmaRegion`] or a buffer the driver registered), kept alive for the duration of the call.
pub unsafe fn device_read(iova: u64, dst: &mut [u8]) {
    // SAFETY: the caller guarantees the range is live, mapped memory (iova = vaddr).
    unsafe { std::ptr::copy_nonoverlapping(iova as *const u8, dst.as_mut_ptr(), dst.len()) }
}

/// The device side of a DMA write: copies `src` to bus address `iova`.
///
/// # Safety
/// As for [`device_read`].
pub unsafe fn device_write(iova: u64, src: &[u8]) {
    // SAFETY: the caller guarantees the range is live, mapped memory (iova = vaddr).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), iova as *mut u8, src.len()) }
}
