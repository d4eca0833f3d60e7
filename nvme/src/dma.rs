//! DMA-able I/O buffers: one contiguous, page-aligned region per core, carved into
//! fixed-size buffers, so the I/O path never allocates.
//!
//! A region of 2 MiB or more is an anonymous mapping advised for transparent hugepages
//! ([`crate::mmap`]), so a large pool costs a TLB entry per 2 MiB instead of per 4 KiB; where
//! the kernel has none it is ordinary pages, which work the same. Smaller regions come from
//! the heap.
//!
//! Soundness. A [`DmaBuf`] keeps its pool's region alive (the region is reference-counted:
//! one count per buffer taken, bumped in [`DmaPool::get`] and dropped with the buffer), so a
//! buffer outliving its pool still points at live memory. Its safe accessors
//! ([`DmaBuf::as_slice`], [`DmaBuf::as_mut_slice`]) borrow the buffer, and the only way to let
//! a device touch the memory behind them is the `unsafe` [`QueuePair::submit`], whose caller
//! promises not to touch the buffer until the command is reaped (or, for a buffer a mirror
//! volume lends past the host completion, until it is released). Safe code alone therefore
//! never forms a reference to memory a device may be writing.
//!
//! [`QueuePair::submit`]: crate::QueuePair::submit

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::mmap::{AnonMapping, Hugepages, HUGEPAGE_SIZE};

/// Alignment of every pool: a page, which satisfies O_DIRECT and NVMe PRP rules.
pub const DMA_ALIGN: usize = 4096;

/// A raw view of I/O memory handed to a queue pair: pointer and length, no ownership.
/// Who may touch the memory while a command is outstanding is the contract of
/// [`QueuePair::submit`](crate::QueuePair::submit).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IoBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoBuf is an address and a length, like a DMA address handed to a device; the
// submit contract, not the type, decides who may touch the memory.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// No buffer (commands without data).
    pub const EMPTY: Self = Self {
        ptr: std::ptr::null_mut(),
        len: 0,
    };

    /// A view of `len` bytes at `ptr`. Creating one is safe; using it is governed by `submit`.
    pub fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Self { ptr, len }
    }

    /// A view of a mutable slice.
    pub fn from_slice(s: &mut [u8]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` bytes of this view (`len` clamped to the view's length).
    pub fn prefix(&self, len: usize) -> Self {
        Self {
            ptr: self.ptr,
            len: len.min(self.len),
        }
    }

    /// The view starting `off` bytes in (`off` clamped to the view's length).
    pub fn offset(&self, off: usize) -> Self {
        let off = off.min(self.len);
        Self {
            ptr: self.ptr.wrapping_add(off),
            len: self.len - off,
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({:p}, {})", self.ptr, self.len)
    }
}

/// A buffer taken from a [`DmaPool`]; give it back with [`DmaPool::put`]. It keeps the
/// pool's memory alive, so it may outlive the pool (its memory is freed with the last buffer).
#[derive(Debug)]
pub struct DmaBuf {
    index: u32,
    buf: IoBuf,
    region: Arc<Region>,
}

impl DmaBuf {
    /// Index of this buffer in its pool (the registered-buffer index for io_uring).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The raw view to hand to a queue pair.
    pub fn io_buf(&self) -> IoBuf {
        self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    /// The buffer's bytes. While a command using the buffer is outstanding, the
    /// [`QueuePair::submit`](crate::QueuePair::submit) contract its submitter accepted forbids
    /// calling this (see the module docs).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is alive while `self.region` is; the buffer's bytes lie inside it
        // and belong to this DmaBuf alone (each index is handed out once until `put`). No
        // device writes them now: lending them to one takes an `unsafe` submit whose contract
        // rules out this borrow until the command is reaped.
        unsafe { std::slice::from_raw_parts(self.buf.ptr, self.buf.len) }
    }

    /// The buffer's bytes, mutably. As for [`as_slice`](Self::as_slice).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr, self.buf.len) }
    }
}

/// A pool's memory: freed when the pool and every buffer taken from it are gone.
#[derive(Debug)]
struct Region {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    /// From the global allocator with this layout.
    Heap(Layout),
    /// A mapping advised for hugepages, unmapped with it.
    Mapped(AnonMapping),
}

// SAFETY: the region is plain memory owned by this value; which buffer of it a thread may touch
// is decided by the pool (one owner per buffer), not by the region.
unsafe impl Send for Region {}
// SAFETY: as above: the region itself is never read or written through `&Region`.
unsafe impl Sync for Region {}

impl Region {
    /// `len` zeroed bytes, page-aligned; `None` where the memory cannot be had.
    fn new(len: usize) -> Option<Self> {
        if len >= HUGEPAGE_SIZE {
            if let Ok(m) = AnonMapping::new(len, true) {
                return Some(Self {
                    base: NonNull::new(m.as_ptr())?,
                    len,
                    backing: Backing::Mapped(m),
                });
            }
        }
        let layout = Layout::from_size_align(len, DMA_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size (the caller's count and size are > 0).
        let base = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(Self {
            base,
            len,
            backing: Backing::Heap(layout),
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Backing::Heap(layout) = self.backing {
            // SAFETY: allocated in `Region::new` with this layout and freed only here.
            unsafe { alloc::dealloc(self.base.as_ptr(), layout) }
        }
        // A mapping unmaps itself.
    }
}

/// A per-core pool of `count` page-aligned buffers of `buf_size` bytes in one region.
pub struct DmaPool {
    region: Arc<Region>,
    buf_size: usize,
    count: u32,
    free: Vec<u32>,
}

impl fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaPool")
            .field("buf_size", &self.buf_size)
            .field("count", &self.count)
            .field("free", &self.free.len())
            .finish()
    }
}

impl DmaPool {
    /// Allocates the region, zeroed. `buf_size` is rounded up to [`DMA_ALIGN`].
    pub fn new(count: u32, buf_size: usize) -> Self {
        assert!(count > 0 && buf_size > 0, "empty DMA pool");
        let buf_size = buf_size.next_multiple_of(DMA_ALIGN);
        let layout = Layout::from_size_align(buf_size * count as usize, DMA_ALIGN)
            .expect("DMA pool size overflows");
        Self::try_new(count, buf_size).unwrap_or_else(|| alloc::handle_alloc_error(layout))
    }

    /// Like [`new`](Self::new), but `None` where the memory cannot be had (or the sizes are
    /// zero or overflow), for pools sized by a peer, which can simply be refused.
    pub fn try_new(count: u32, buf_size: usize) -> Option<Self> {
        if count == 0 || buf_size == 0 {
            return None;
        }
        let buf_size = buf_size.checked_next_multiple_of(DMA_ALIGN)?;
        let total = buf_size.checked_mul(count as usize)?;
        // Refuse what no layout can describe, as the heap would.
        Layout::from_size_align(total, DMA_ALIGN).ok()?;
        let region = Arc::new(Region::new(total)?);
        let mut free = Vec::new();
        // On failure `region` frees the memory.
        free.try_reserve_exact(count as usize).ok()?;
        free.extend((0..count).rev());
        Some(Self {
            region,
            buf_size,
            count,
            free,
        })
    }

    /// Takes a free buffer; `None` when all are in use.
    #[inline]
    pub fn get(&mut self) -> Option<DmaBuf> {
        let index = self.free.pop()?;
        let ptr = self.base().wrapping_add(index as usize * self.buf_size);
        Some(DmaBuf {
            index,
            buf: IoBuf {
                ptr,
                len: self.buf_size,
            },
            region: Arc::clone(&self.region),
        })
    }

    /// Returns a buffer taken from this pool.
    #[inline]
    pub fn put(&mut self, buf: DmaBuf) {
        // A buffer of another pool would index outside this one's region later on.
        assert!(
            Arc::ptr_eq(&buf.region, &self.region) && buf.index < self.count,
            "DmaPool::put: the buffer is not from this pool"
        );
        self.free.push(buf.index);
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Start of the region (for registering it with a device).
    pub fn base(&self) -> *mut u8 {
        self.region.base.as_ptr()
    }

    /// Whether `ptr` points into this pool's region.
    pub fn contains(&self, ptr: *const u8) -> bool {
        let base = self.base() as usize;
        (base..base + self.region.len).contains(&(ptr as usize))
    }

    /// Whether the region was advised for hugepages and what came of it: `Off` for a region
    /// under 2 MiB (from the heap).
    pub fn hugepages(&self) -> Hugepages {
        match &self.region.backing {
            Backing::Heap(_) => Hugepages::Off,
            Backing::Mapped(m) => m.hugepages(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_new_refuses_what_cannot_be_allocated() {
        assert!(DmaPool::try_new(0, 4096).is_none());
        assert!(DmaPool::try_new(4, 0).is_none());
        assert!(
            DmaPool::try_new(u32::MAX, usize::MAX / 2).is_none(),
            "overflow"
        );
        // 2^62 bytes: more than any address space.
        assert!(DmaPool::try_new(1 << 20, 1 << 42).is_none());
        let mut pool = DmaPool::try_new(2, 100).unwrap();
        assert_eq!(pool.buf_size(), 4096);
        assert!(pool.get().is_some() && pool.get().is_some() && pool.get().is_none());
    }

    #[test]
    fn buffers_are_aligned_distinct_and_recycled() {
        let mut pool = DmaPool::new(4, 1000);
        assert_eq!(pool.buf_size(), 4096);
        let mut bufs: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
        assert!(pool.get().is_none());
        for b in &bufs {
            assert_eq!(b.io_buf().as_ptr() as usize % DMA_ALIGN, 0);
            assert!(pool.contains(b.io_buf().as_ptr()));
        }
        bufs[0].as_mut_slice()[0] = 7;
        assert_eq!(bufs[1].as_slice()[0], 0);
        let b = bufs.pop().unwrap();
        let idx = b.index();
        pool.put(b);
        assert_eq!(pool.get().unwrap().index(), idx);
    }

    #[test]
    fn a_buffer_keeps_its_memory_after_the_pool_is_gone() {
        let mut pool = DmaPool::new(2, 4096);
        let mut b = pool.get().unwrap();
        b.as_mut_slice().fill(0xa5);
        drop(pool);
        // The region is freed with the last buffer, not with the pool.
        assert!(b.as_slice().iter().all(|&x| x == 0xa5));
        b.as_mut_slice()[4095] = 1;
        assert_eq!(b.as_slice()[4095], 1);
    }

    #[test]
    fn a_large_pool_is_advised_for_hugepages_and_a_small_one_is_not() {
        let small = DmaPool::new(32, 4096);
        assert_eq!(small.hugepages(), Hugepages::Off);
        let mut large = DmaPool::new(32, 128 << 10);
        let thp = crate::mmap::ThpMode::current();
        if thp.allows_advised() {
            assert_eq!(large.hugepages(), Hugepages::Advised);
            assert_eq!(large.base() as usize % HUGEPAGE_SIZE, 0);
        } else {
            assert_eq!(large.hugepages(), Hugepages::Unavailable(thp));
        }
        // Zeroed and usable like any pool.
        let mut bufs: Vec<_> = std::iter::from_fn(|| large.get()).collect();
        assert_eq!(bufs.len(), 32);
        assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 0)));
        bufs[31].as_mut_slice().fill(0x5a);
        assert!(large.contains(bufs[31].io_buf().as_ptr()));
        let last = bufs.pop().unwrap();
        drop(large);
        assert!(last.as_slice().iter().all(|&x| x == 0x5a));
    }

    #[test]
    #[should_panic(expected = "not from this pool")]
    fn a_buffer_of_another_pool_is_refused() {
        let mut a = DmaPool::new(1, 4096);
        let mut b = DmaPool::new(1, 4096);
        let buf = a.get().unwrap();
        let _ = b.get().unwrap();
        b.put(buf);
    }
}
