//! Front ends.
pub mod nbd;
