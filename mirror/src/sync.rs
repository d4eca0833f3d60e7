//! The atomics the join-table slot protocol is built on: `std`'s, or loom's under
//! `cfg(loom)` so the protocol can be model-checked (`tests/loom_join.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
