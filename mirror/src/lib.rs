//! The mirror engine.
