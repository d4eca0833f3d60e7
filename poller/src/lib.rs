//! Per-core reactors.
