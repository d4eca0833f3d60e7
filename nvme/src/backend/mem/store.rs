//! Backing store: a two-level table of 64 KiB chunks.
//!
//! Level 1 has one entry per GiB, level 2 one per chunk. In the default, sparse store both are
//! allocated lazily and installed with a compare-and-swap on first write, so cores share the
//! store without locks. Untouched chunks read as zeroes and cost nothing, so a 1 TiB namespace
//! is fine.
//!
//! A mapped store ([`SparseStore::mapped`], `mem://…?hugepages=1` or `prealloc=1`) is one
//! anonymous mapping of the whole namespace ([`AnonMapping`]), advised for transparent
//! hugepages and optionally faulted in at open; every chunk entry is installed up front and
//! points into it, so the access paths below are the same for both. Its memory is taken as it
//! is touched (all of it at open with prealloc), in 2 MiB pages where the kernel gives them.
//!
//! Concurrent overlapping commands have the NVMe semantics: the result is one of the writers'
//! data per block, in no defined order; the mirror engine never issues such commands. Cores
//! may still touch the same chunk at once (other blocks of it, or a test that overlaps on
//! purpose), so chunk memory is only ever accessed as relaxed atomics (`shared_copy.rs`): no data
//! race by the language's rules, at the speed of a plain copy.

use std::alloc::{self, Layout};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use super::shared_copy::{copy_in, copy_out, fill_zero};
use crate::mmap::{AnonMapping, Hugepages};
use crate::Result;

const CHUNK_SHIFT: u32 = 16;
const CHUNK: usize = 1 << CHUNK_SHIFT;
const L2_SHIFT: u32 = 14;
const L2_ENTRIES: usize = 1 << L2_SHIFT;
const CHUNK_LAYOUT: Layout = match Layout::from_size_align(CHUNK, 4096) {
    Ok(l) => l,
    Err(_) => panic!("chunk layout"),
};

type L2Table = [AtomicPtr<u8>];

#[derive(Debug)]
pub(super) struct SparseStore {
    bytes: u64,
    l1: Box<[AtomicPtr<AtomicPtr<u8>>]>,
    /// Bytes of chunks allocated (sparse), or the mapping's length (mapped).
    resident: AtomicU64,
    /// The mapped store's memory, which every chunk entry points into; `None` for a sparse
    /// store, whose chunks are separate allocations.
    mapping: Option<Mapped>,
}

#[derive(Debug)]
struct Mapped {
    region: AnonMapping,
    /// Faulted in at open: zeroing writes zeroes instead of handing pages back, so the memory
    /// stays resident.
    prealloc: bool,
}

impl SparseStore {
    pub(super) fn new(bytes: u64) -> Self {
        let l1_entries = (bytes >> (CHUNK_SHIFT + L2_SHIFT)) as usize + 1;
        let l1 = (0..l1_entries)
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect();
        Self {
            bytes,
            l1,
            resident: AtomicU64::new(0),
            mapping: None,
        }
    }

    /// A store of `bytes` in one anonymous mapping, advised for transparent hugepages if
    /// `hugepages` and faulted in now if `prealloc`.
    pub(super) fn mapped(bytes: u64, hugepages: bool, prealloc: bool) -> Result<Self> {
        let chunks = bytes.div_ceil(CHUNK as u64);
        let len = usize::try_from(chunks << CHUNK_SHIFT).map_err(|_| crate::Error::Sys {
            op: "mmap of the mem store: larger than the address space",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        let mut region = AnonMapping::sparse(len, hugepages)?;
        if prealloc {
            region.populate()?;
        }
        let mut store = Self::new(bytes);
        let base = region.as_ptr();
        for ci in 0..chunks as usize {
            let l1 = &store.l1[ci >> L2_SHIFT];
            if l1.load(Ordering::Relaxed).is_null() {
                l1.store(new_l2_table(), Ordering::Relaxed);
            }
            let table = l1.load(Ordering::Relaxed);
            // SAFETY: the table has L2_ENTRIES entries; the chunk lies inside the mapping
            // (`ci < chunks`, and the mapping holds `chunks` whole chunks).
            unsafe {
                (*table.add(ci & (L2_ENTRIES - 1)))
                    .store(base.add(ci << CHUNK_SHIFT), Ordering::Relaxed);
            }
        }
        store.resident = AtomicU64::new(len as u64);
        store.mapping = Some(Mapped { region, prealloc });
        Ok(store)
    }

    pub(super) fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// What came of a mapped store's hugepage request; `None` for a sparse store.
    pub(super) fn hugepages(&self) -> Option<Hugepages> {
        self.mapping.as_ref().map(|m| m.region.hugepages())
    }

    /// Bytes of a mapped store the kernel backs with transparent hugepages now.
    pub(super) fn huge_bytes(&self) -> Option<u64> {
        self.mapping
            .as_ref()
            .and_then(|m| m.region.huge_bytes().ok())
    }

    /// The chunk holding byte `off`, or null if never written and `create` is false.
    #[inline]
    fn chunk(&self, off: u64, create: bool) -> *mut u8 {
        let ci = (off >> CHUNK_SHIFT) as usize;
        let l1 = &self.l1[ci >> L2_SHIFT];
        let mut table = l1.load(Ordering::Acquire);
        if table.is_null() {
            if !create {
                return ptr::null_mut();
            }
            table = install(l1, new_l2_table(), free_l2_table);
        }
        // SAFETY: installed tables have L2_ENTRIES entries and live as long as the store.
        let slot = unsafe { &*table.add(ci & (L2_ENTRIES - 1)) };
        let mut chunk = slot.load(Ordering::Acquire);
        if chunk.is_null() && create {
            // SAFETY: CHUNK_LAYOUT has a non-zero size.
            let fresh = unsafe { alloc::alloc_zeroed(CHUNK_LAYOUT) };
            if fresh.is_null() {
                alloc::handle_alloc_error(CHUNK_LAYOUT);
            }
            chunk = install(slot, fresh, free_chunk);
            if chunk == fresh {
                self.resident.fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
        }
        chunk
    }

    /// Walks `[off, off + len)` chunk by chunk: `f(chunk_or_null, offset_in_chunk, done, n)`.
    #[inline]
    fn for_each_span(
        &self,
        off: u64,
        len: usize,
        create: bool,
        mut f: impl FnMut(*mut u8, usize, usize, usize),
    ) {
        debug_assert!(off + len as u64 <= self.bytes);
        let mut done = 0;
        while done < len {
            let pos = off + done as u64;
            let in_chunk = (pos as usize) & (CHUNK - 1);
            let n = (CHUNK - in_chunk).min(len - done);
            f(self.chunk(pos, create), in_chunk, done, n);
            done += n;
        }
    }

    /// Copies `len` bytes at `off` into `dst`.
    ///
    /// # Safety
    /// `dst` is valid for `len` bytes of writes; `off + len` is within the store.
    pub(super) unsafe fn read(&self, off: u64, dst: *mut u8, len: usize) {
        self.for_each_span(off, len, false, |chunk, at, done, n| {
            // SAFETY: `dst` holds `len` bytes (caller); a chunk holds CHUNK bytes and
            // `at + n <= CHUNK`.
            unsafe {
                if chunk.is_null() {
                    ptr::write_bytes(dst.add(done), 0, n);
                } else {
                    copy_out(chunk.add(at), dst.add(done), n);
                }
            }
        });
    }

    /// Copies `len` bytes from `src` to `off`.
    ///
    /// # Safety
    /// `src` is valid for `len` bytes of reads; `off + len` is within the store.
    pub(super) unsafe fn write(&self, off: u64, src: *const u8, len: usize) {
        self.for_each_span(off, len, true, |chunk, at, done, n| {
            // SAFETY: `src` holds `len` bytes (caller); the chunk exists (`create`) and holds
            // CHUNK bytes with `at + n <= CHUNK`.
            unsafe { copy_in(src.add(done), chunk.add(at), n) }
        });
    }

    /// Zeroes `[off, off + len)`; chunks never written stay unallocated, and a mapped store
    /// without prealloc hands the whole pages of the range back to the kernel.
    pub(super) fn zero(&self, off: u64, len: u64) {
        if let Some(m) = self.mapping.as_ref().filter(|m| !m.prealloc) {
            // Offsets fit: the mapping holds the whole store in the address space.
            let dropped = m.region.discard(off as usize, len as usize);
            if !dropped.is_empty() {
                self.zero_words(off, dropped.start as u64 - off);
                self.zero_words(dropped.end as u64, off + len - dropped.end as u64);
                return;
            }
        }
        self.zero_words(off, len);
    }

    fn zero_words(&self, off: u64, len: u64) {
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let in_chunk = (pos as usize) & (CHUNK - 1);
            let n = ((CHUNK - in_chunk) as u64).min(len - done) as usize;
            let chunk = self.chunk(pos, false);
            if !chunk.is_null() {
                // SAFETY: the chunk holds CHUNK bytes and `in_chunk + n <= CHUNK`.
                unsafe { fill_zero(chunk.add(in_chunk), n) };
            }
            done += n as u64;
        }
    }
}

/// Installs `fresh` into an empty slot, or frees it if another core won the race.
fn install<T>(slot: &AtomicPtr<T>, fresh: *mut T, free: fn(*mut T)) -> *mut T {
    match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => fresh,
        Err(winner) => {
            free(fresh);
            winner
        }
    }
}

fn new_l2_table() -> *mut AtomicPtr<u8> {
    let table: Box<L2Table> = (0..L2_ENTRIES)
        .map(|_| AtomicPtr::new(ptr::null_mut()))
        .collect();
    Box::into_raw(table) as *mut AtomicPtr<u8>
}

fn free_l2_table(table: *mut AtomicPtr<u8>) {
    // SAFETY: `table` came from `new_l2_table` (a boxed slice of L2_ENTRIES) and was never
    // published.
    drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(table, L2_ENTRIES)) });
}

fn free_chunk(chunk: *mut u8) {
    // SAFETY: allocated with CHUNK_LAYOUT and never published.
    unsafe { alloc::dealloc(chunk, CHUNK_LAYOUT) }
}

impl Drop for SparseStore {
    fn drop(&mut self) {
        // A mapped store's chunks are its mapping, unmapped with it.
        let own_chunks = self.mapping.is_none();
        for l1 in self.l1.iter() {
            let table = l1.load(Ordering::Acquire);
            if table.is_null() {
                continue;
            }
            if own_chunks {
                for i in 0..L2_ENTRIES {
                    // SAFETY: the table has L2_ENTRIES entries; `&mut self` means no other
                    // user.
                    let chunk = unsafe { &*table.add(i) }.load(Ordering::Acquire);
                    if !chunk.is_null() {
                        free_chunk(chunk);
                    }
                }
            }
            free_l2_table(table);
        }
    }
}
