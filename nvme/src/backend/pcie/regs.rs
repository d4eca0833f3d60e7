//! Controller registers of a PCIe NVMe controller (NVMe Base 2.0 §3.1.3, "Controller
//! Properties"), as offsets into BAR0 and decoders for the fields the driver uses.

/// Controller Capabilities, 64-bit (§3.1.3.1).
pub const CAP: u32 = 0x00;
/// Version (§3.1.3.2).
pub const VS: u32 = 0x08;
/// Interrupt Mask Set (§3.1.3.3).
pub const INTMS: u32 = 0x0c;
/// Controller Configuration (§3.1.3.5).
pub const CC: u32 = 0x14;
/// Controller Status (§3.1.3.6).
pub const CSTS: u32 = 0x1c;
/// Admin Queue Attributes (§3.1.3.8).
pub const AQA: u32 = 0x24;
/// Admin Submission Queue Base Address, 64-bit (§3.1.3.9).
pub const ASQ: u32 = 0x28;
/// Admin Completion Queue Base Address, 64-bit (§3.1.3.10).
pub const ACQ: u32 = 0x30;
/// Start of the doorbells (§3.1.4.x, "SQyTDBL" / "CQyHDBL").
pub const DOORBELL_BASE: u32 = 0x1000;

/// The memory page size the driver configures (CC.MPS = 0): 4 KiB.
pub const PAGE_SIZE: usize = 4096;
/// log2 of an SQ entry size (64 bytes), for CC.IOSQES.
pub const IOSQES: u32 = 6;
/// log2 of a CQ entry size (16 bytes), for CC.IOCQES.
pub const IOCQES: u32 = 4;

/// CC bits (§3.1.3.5).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected, bits 6:4 (0 = NVM command set).
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size, bits 10:7 (2^(12+MPS)).
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected, bits 13:11 (0 = round robin).
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification, bits 15:14 (1 = normal).
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// I/O Submission Queue Entry Size, bits 19:16.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size, bits 23:20.
    pub const IOCQES_SHIFT: u32 = 20;
}

/// CSTS bits (§3.1.3.6).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status, bits 3:2 (2 = shutdown processing complete).
    pub const SHST_MASK: u32 = 0b11 << 2;
    pub const SHST_COMPLETE: u32 = 0b10 << 2;
}

/// The fields of CAP the driver uses (§3.1.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum Queue Entries Supported, converted from the 0's based field: entries per queue.
    pub mqes: u32,
    /// Contiguous Queues Required.
    pub cqr: bool,
    /// Timeout: worst-case time to wait for CSTS.RDY to change, in 500 ms units.
    pub to: u8,
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart.
    pub dstrd: u8,
    /// Command Sets Supported, bit 0 of the field = NVM command set.
    pub css_nvm: bool,
    /// Memory Page Size Minimum, 2^(12+n).
    pub mpsmin: u8,
    /// Memory Page Size Maximum, 2^(12+n).
    pub mpsmax: u8,
}

impl Capabilities {
    /// Decodes CAP.
    pub fn decode(cap: u64) -> Self {
        Self {
            mqes: (cap & 0xffff) as u32 + 1,
            cqr: cap & (1 << 16) != 0,
            to: ((cap >> 24) & 0xff) as u8,
            dstrd: ((cap >> 32) & 0xf) as u8,
            css_nvm: (cap >> 37) & 1 != 0,
            mpsmin: ((cap >> 48) & 0xf) as u8,
            mpsmax: ((cap >> 52) & 0xf) as u8,
        }
    }

    /// Encodes CAP (the fake controller's register value).
    pub fn encode(&self) -> u64 {
        u64::from(self.mqes.saturating_sub(1).min(0xffff))
            | (u64::from(self.cqr) << 16)
            | (u64::from(self.to) << 24)
            | (u64::from(self.dstrd & 0xf) << 32)
            | (u64::from(self.css_nvm) << 37)
            | (u64::from(self.mpsmin & 0xf) << 48)
            | (u64::from(self.mpsmax & 0xf) << 52)
    }

    /// CAP.TO as a duration (at least 500 ms: a controller reporting 0 still gets one unit).
    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(500 * u64::from(self.to.max(1)))
    }
}

/// Offset of Submission Queue `qid`'s Tail Doorbell: `0x1000 + (2 * qid) * (4 << DSTRD)`.
pub fn sq_tail_doorbell(qid: u16, dstrd: u8) -> u32 {
    DOORBELL_BASE + (2 * u32::from(qid)) * (4 << dstrd)
}

/// Offset of Completion Queue `qid`'s Head Doorbell: `0x1000 + (2 * qid + 1) * (4 << DSTRD)`.
pub fn cq_head_doorbell(qid: u16, dstrd: u8) -> u32 {
    DOORBELL_BASE + (2 * u32::from(qid) + 1) * (4 << dstrd)
}

/// The CC value the driver writes to enable the controller: NVM command set, 4 KiB pages,
/// round robin, 64-byte SQ and 16-byte CQ entries.
pub fn cc_enable() -> u32 {
    cc::EN | (IOSQES << cc::IOSQES_SHIFT) | (IOCQES << cc::IOCQES_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_round_trips_and_doorbells_follow_the_stride() {
        let cap = Capabilities {
            mqes: 1024,
            cqr: true,
            to: 20,
            dstrd: 2,
            css_nvm: true,
            mpsmin: 0,
            mpsmax: 4,
        };
        assert_eq!(Capabilities::decode(cap.encode()), cap);
        assert_eq!(cap.encode() & 0xffff, 1023);
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(3, 0), 0x1018);
        assert_eq!(sq_tail_doorbell(1, 2), 0x1000 + 2 * 16);
        assert_eq!(cq_head_doorbell(1, 2), 0x1000 + 3 * 16);
        assert_eq!(cap.ready_timeout(), std::time::Duration::from_secs(10));
    }
}
