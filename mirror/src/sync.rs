//! The atomics the join-table slot protocol and the write-intent bitmap's clear handshake
//! are built on: `std`'s, or loom's under `cfg(loom)` so the protocols can be model-checked
//! (`tests/loom_join.rs`, `tests/loom_bitmap.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Between a `SeqCst` store (or RMW) and a `SeqCst` load of another location in a Dekker-style
/// handshake. Without loom it is nothing: `SeqCst` accesses already sit in one total order.
/// loom does not model `SeqCst` loads (it treats them as `Acquire`) but does model `SeqCst`
/// fences, so under `cfg(loom)` the fence stands in for the ordering the accesses have.
#[inline(always)]
pub(crate) fn seqcst_handshake() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
