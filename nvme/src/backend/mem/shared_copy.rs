//! Copies into and out of memory that other cores may access at the same time.
//!
//! Chunk memory of the RAM store is shared by every queue pair, and two concurrent commands
//! may touch the same bytes (overlapping writes have no defined order in NVMe, but they must
//! not be undefined behaviour). So every access to it has the meaning of a loop of relaxed
//! byte-sized atomic loads or stores: the portable code below is exactly that loop (a byte at
//! each end, aligned 8-byte words in between). On x86-64 the same thing is one `rep movsb` or
//! `rep stosb`: every byte it moves is a single-copy-atomic byte access in the processor's
//! memory model, so the instruction does what the loop specifies, and on processors with
//! fast string operations (ERMS/FSRM) it runs at memcpy speed instead of one word per
//! cycle (docs/mirror.md, "The cost of a mirrored write").

#[cfg(not(target_arch = "x86_64"))]
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Copies `n` bytes from shared memory at `src` to `dst` (the caller's own).
///
/// # Safety
/// `src` is valid for `n` bytes of reads and only ever accessed atomically (or by these
/// functions); `dst` is valid for `n` bytes of writes and overlaps neither `src` nor shared
/// memory.
#[inline]
pub(super) unsafe fn copy_out(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract is `rep_movsb`'s; the source bytes are the shared ones.
    unsafe {
        rep_movsb(src, dst, n)
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: every address read is inside `[src, src + n)`, read atomically; the word loads
    // are 8-byte aligned (after `head`). `dst` is the caller's, written with plain (possibly
    // unaligned) stores.
    unsafe {
        let head = head_bytes(src, n);
        let words = (n - head) / 8;
        for i in 0..head {
            *dst.add(i) = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed);
        }
        for w in 0..words {
            let at = head + w * 8;
            let v = AtomicU64::from_ptr(src.add(at).cast_mut().cast()).load(Ordering::Relaxed);
            dst.add(at).cast::<u64>().write_unaligned(v);
        }
        for i in head + words * 8..n {
            *dst.add(i) = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed);
        }
    }
}

/// Copies `n` bytes from `src` (the caller's own) into shared memory at `dst`.
///
/// # Safety
/// `dst` is valid for `n` bytes of writes and only ever accessed atomically (or by these
/// functions); `src` is valid for `n` bytes of reads and overlaps neither `dst` nor shared
/// memory.
#[inline]
pub(super) unsafe fn copy_in(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract is `rep_movsb`'s; the destination bytes are the shared
    // ones.
    unsafe {
        rep_movsb(src, dst, n)
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as in `copy_out`, with the roles swapped: shared memory is written atomically.
    unsafe {
        let head = head_bytes(dst, n);
        let words = (n - head) / 8;
        for i in 0..head {
            AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed);
        }
        for w in 0..words {
            let at = head + w * 8;
            let v = src.add(at).cast::<u64>().read_unaligned();
            AtomicU64::from_ptr(dst.add(at).cast()).store(v, Ordering::Relaxed);
        }
        for i in head + words * 8..n {
            AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed);
        }
    }
}

/// Zeroes `n` bytes of shared memory at `dst`.
///
/// # Safety
/// `dst` is valid for `n` bytes of writes and only ever accessed atomically (or by these
/// functions).
#[inline]
pub(super) unsafe fn fill_zero(dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `[dst, dst + n)` is writable (caller); `rep stosb` stores each byte once with an
    // atomic byte store; the direction flag is clear on entry to an asm block.
    unsafe {
        std::arch::asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") 0u8,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as in `copy_in`.
    unsafe {
        let head = head_bytes(dst, n);
        let words = (n - head) / 8;
        for i in 0..head {
            AtomicU8::from_ptr(dst.add(i)).store(0, Ordering::Relaxed);
        }
        for w in 0..words {
            AtomicU64::from_ptr(dst.add(head + w * 8).cast()).store(0, Ordering::Relaxed);
        }
        for i in head + words * 8..n {
            AtomicU8::from_ptr(dst.add(i)).store(0, Ordering::Relaxed);
        }
    }
}

/// Copies `n` bytes from `src` to `dst` with one `rep movsb`: each byte is read once with an
/// atomic byte load and written once with an atomic byte store, which is what relaxed
/// `AtomicU8` accesses are on x86-64, so either side may be memory other cores access.
///
/// # Safety
/// `src` is valid for `n` bytes of reads, `dst` for `n` bytes of writes, and they do not
/// overlap; whichever side is shared is only ever accessed atomically (or by these functions).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn rep_movsb(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: the ranges are valid and disjoint (caller). The direction flag is clear on
    // entry to an asm block (Rust's inline-asm rules), so it copies upwards.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Bytes of `[p, p + n)` before the first 8-byte boundary, capped at `n`.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn head_bytes(p: *const u8, n: usize) -> usize {
    (p.align_offset(8)).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length and misalignment up to two words past a 64-byte line, both directions,
    /// and the bytes around the range untouched.
    #[test]
    fn copies_and_zeroes_exactly_the_range_at_every_alignment() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        for off in 0..9 {
            for n in 0..80 {
                let mut shared = vec![0xa5u8; 200];
                // SAFETY: both ranges lie inside their vectors, which do not overlap.
                unsafe { copy_in(src.as_ptr().add(off), shared.as_mut_ptr().add(off + 3), n) };
                assert_eq!(
                    &shared[off + 3..off + 3 + n],
                    &src[off..off + n],
                    "in {off}+{n}"
                );
                assert!(shared[..off + 3].iter().all(|&b| b == 0xa5));
                assert!(shared[off + 3 + n..].iter().all(|&b| b == 0xa5));

                let mut out = vec![0x5au8; 200];
                // SAFETY: as above.
                unsafe { copy_out(shared.as_ptr().add(off + 3), out.as_mut_ptr().add(off), n) };
                assert_eq!(&out[off..off + n], &src[off..off + n], "out {off}+{n}");
                assert!(out[..off].iter().all(|&b| b == 0x5a));
                assert!(out[off + n..].iter().all(|&b| b == 0x5a));

                // SAFETY: the range lies inside `shared`.
                unsafe { fill_zero(shared.as_mut_ptr().add(off + 3), n) };
                assert!(shared[off + 3..off + 3 + n].iter().all(|&b| b == 0));
                assert!(shared[..off + 3].iter().all(|&b| b == 0xa5));
                assert!(shared[off + 3 + n..].iter().all(|&b| b == 0xa5));
            }
        }
    }
}
