//! NVMe wire types shared by every crate: one file per spec area.
//!
//! Section numbers refer to the NVM Express Base Specification 2.0c ("Base") and the
//! NVM Command Set Specification 1.0c ("NVM").

pub mod admin;
pub mod ana;
pub mod auth;
pub mod cqe;
pub mod fabrics;
pub mod namespace;
pub mod nbd;
pub mod opcode;
pub mod reservation;
pub mod sqe;
pub mod status;
pub mod tcp;
pub mod wire;

pub use cqe::CompletionQueueEntry;
pub use namespace::Geometry;
pub use opcode::NvmOpcode;
pub use sqe::SubmissionQueueEntry;
pub use status::Status;

/// Compile-time check that a wire struct has the size the spec gives it.
#[macro_export]
macro_rules! assert_wire_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(::core::mem::size_of::<$t>() == $size);
    };
}

/// Compile-time check that a field sits at the byte offset the spec gives it.
#[macro_export]
macro_rules! assert_wire_offset {
    ($t:ty, $field:ident, $off:expr) => {
        const _: () = assert!(::core::mem::offset_of!($t, $field) == $off);
    };
}
