//! The PCIe-only admin commands (queue management) and the statuses they and PRP transfers
//! report, shared by the driver and the fake controller.

use crate::spec::status::StatusCodeType;
use crate::spec::Status;

/// Admin opcodes of queue management (NVMe Base 2.0 §5, figure 28) and the admin commands
/// the driver sends.
pub mod op {
    /// Delete I/O Submission Queue (§5.7).
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue (§5.5).
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue (§5.6).
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue (§5.4).
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify (§5.17).
    pub const IDENTIFY: u8 = 0x06;
    /// Abort (§5.1).
    pub const ABORT: u8 = 0x08;
    /// Set Features (§5.27).
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features (§5.15).
    pub const GET_FEATURES: u8 = 0x0a;
}

/// Create I/O CQ/SQ CDW11 bit 0: Physically Contiguous.
pub const QUEUE_PC: u32 = 1;

/// Generic status 13h: PRP Offset Invalid (§4.2.3.1).
pub const INVALID_PRP_OFFSET: Status = Status::new(StatusCodeType::Generic, 0x13);
/// Command specific 00h of Create I/O SQ: Completion Queue Invalid.
pub const COMPLETION_QUEUE_INVALID: Status = Status::new(StatusCodeType::CommandSpecific, 0x00);
/// Command specific 01h of queue creation/deletion: Invalid Queue Identifier.
pub const INVALID_QUEUE_ID: Status = Status::new(StatusCodeType::CommandSpecific, 0x01);
/// Command specific 02h of queue creation: Invalid Queue Size.
pub const INVALID_QUEUE_SIZE: Status = Status::new(StatusCodeType::CommandSpecific, 0x02);
/// Command specific 0Ch of Delete I/O CQ: Invalid Queue Deletion.
pub const INVALID_QUEUE_DELETION: Status = Status::new(StatusCodeType::CommandSpecific, 0x0c);
