//! Submission queue entry (Base §4.2, "Common Command Format").

use crate::{assert_wire_offset, assert_wire_size};

/// A 64-byte NVMe submission queue entry, laid out as on the wire (little endian fields).
///
/// Data pointer (`dptr`) is kept as two quadwords: PRP1/PRP2 or one SGL descriptor (Base §4.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmissionQueueEntry {
    /// CDW0 bits 7:0.
    pub opcode: u8,
    /// CDW0 bits 15:8: fused operation (1:0) and PRP/SGL selection (7:6).
    pub flags: u8,
    /// CDW0 bits 31:16: command identifier, unique per submission queue.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer, first and second quadword.
    pub dptr: [u64; 2],
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

assert_wire_size!(SubmissionQueueEntry, 64);
assert_wire_offset!(SubmissionQueueEntry, cid, 2);
assert_wire_offset!(SubmissionQueueEntry, nsid, 4);
assert_wire_offset!(SubmissionQueueEntry, mptr, 16);
assert_wire_offset!(SubmissionQueueEntry, dptr, 24);
assert_wire_offset!(SubmissionQueueEntry, cdw10, 40);
assert_wire_offset!(SubmissionQueueEntry, cdw15, 60);

impl SubmissionQueueEntry {
    /// Size on the wire.
    pub const SIZE: usize = 64;

    /// Starting LBA of an NVM I/O command (NVM §3.2.4, CDW10–11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of logical blocks of an NVM I/O command, converted from the 0's based field
    /// (CDW12 bits 15:0), so the result is 1..=65536.
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// Force Unit Access of a Write or Write Zeroes (NVM §3.2.6, CDW12 bit 30).
    pub const CDW12_FUA: u32 = 1 << 30;

    /// Whether Force Unit Access is set (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12 & Self::CDW12_FUA != 0
    }

    /// Sets or clears Force Unit Access (CDW12 bit 30).
    pub fn set_fua(&mut self, fua: bool) {
        if fua {
            self.cdw12 |= Self::CDW12_FUA;
        } else {
            self.cdw12 &= !Self::CDW12_FUA;
        }
    }

    /// Sets SLBA and the 0's based NLB of an NVM I/O command. `nlb` is 1..=65536.
    pub fn set_lba_range(&mut self, slba: u64, nlb: u32) {
        debug_assert!((1..=65536).contains(&nlb));
        self.cdw10 = slba as u32;
        self.cdw11 = (slba >> 32) as u32;
        self.cdw12 = (self.cdw12 & !0xffff) | (nlb.wrapping_sub(1) & 0xffff);
    }

    /// Decodes a little-endian wire image.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            opcode: b[0],
            flags: b[1],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: u32_at(4),
            cdw2: u32_at(8),
            cdw3: u32_at(12),
            mptr: u64_at(16),
            dptr: [u64_at(24), u64_at(32)],
            cdw10: u32_at(40),
            cdw11: u32_at(44),
            cdw12: u32_at(48),
            cdw13: u32_at(52),
            cdw14: u32_at(56),
            cdw15: u32_at(60),
        }
    }

    /// Encodes the little-endian wire image.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dptr[0].to_le_bytes());
        b[32..40].copy_from_slice(&self.dptr[1].to_le_bytes());
        for (i, dw) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lba_range_round_trips_through_the_wire_image() {
        let mut sqe = SubmissionQueueEntry {
            opcode: 0x01,
            cid: 0xbeef,
            nsid: 1,
            ..Default::default()
        };
        sqe.set_lba_range(0x1_2345_6789, 65536);
        let back = SubmissionQueueEntry::from_bytes(&sqe.to_bytes());
        assert_eq!(back, sqe);
        assert_eq!(back.slba(), 0x1_2345_6789);
        assert_eq!(back.nlb(), 65536);
        assert_eq!(back.cdw12 & 0xffff, 0xffff);
        assert_eq!(&sqe.to_bytes()[2..4], &[0xef, 0xbe]);
    }
}
