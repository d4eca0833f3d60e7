//! Completion queue entry (Base §4.2.1, "Common Completion Queue Entry").

use super::Status;
use crate::{assert_wire_offset, assert_wire_size};

/// A 16-byte completion queue entry as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionQueueEntry {
    /// DW0: command specific.
    pub dw0: u32,
    /// DW1: command specific.
    pub dw1: u32,
    /// SQ head pointer at the time of completion.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier of the completed command.
    pub cid: u16,
    /// Bit 0: phase tag; bits 15:1: status field (see [`Status`]).
    pub status: u16,
}

assert_wire_size!(CompletionQueueEntry, 16);
assert_wire_offset!(CompletionQueueEntry, sq_head, 8);
assert_wire_offset!(CompletionQueueEntry, cid, 12);
assert_wire_offset!(CompletionQueueEntry, status, 14);

impl CompletionQueueEntry {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// Phase tag (bit 0 of DW3 bits 31:16).
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// The status field without the phase tag.
    pub fn status(&self) -> Status {
        Status::from_raw(self.status >> 1)
    }

    /// Sets the status field, keeping the phase tag.
    pub fn set_status(&mut self, status: Status) {
        self.status = (self.status & 1) | (status.raw() << 1);
    }

    /// Decodes a little-endian wire image.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            dw1: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sq_head: u16::from_le_bytes([b[8], b[9]]),
            sq_id: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            status: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// Encodes the little-endian wire image.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_phase_share_the_last_word() {
        let mut cqe = CompletionQueueEntry {
            cid: 7,
            status: 1,
            ..Default::default()
        };
        cqe.set_status(Status::LBA_OUT_OF_RANGE.with_dnr());
        assert!(cqe.phase());
        assert_eq!(cqe.status(), Status::LBA_OUT_OF_RANGE.with_dnr());
        let back = CompletionQueueEntry::from_bytes(&cqe.to_bytes());
        assert_eq!(back, cqe);
        // SC 0x80 in bits 8:1, DNR in bit 15, phase in bit 0.
        assert_eq!(back.status, (0x80 << 1) | (1 << 15) | 1);
    }
}
