//! The mirror engine.

pub mod superblock;
