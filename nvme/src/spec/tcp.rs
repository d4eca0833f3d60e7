//! NVMe/TCP transport PDUs (NVMe/TCP Transport Specification 1.0, §3.6 "PDU formats").
//!
//! Every PDU starts with an 8-byte [`CommonHeader`]; the PDU-specific header follows, then an
//! optional header digest (HDGST, CRC32C over the header), padding up to the PDU data offset
//! (PDO), the data, and an optional data digest (DDGST, CRC32C over the data). Digests are
//! negotiated by ICReq/ICResp and stored little endian.
//!
//! The structs below pin the wire layout with size/offset asserts; the byte-level encoders
//! and the validating parser live in [`build`] and [`parse`] so both the target and the
//! initiator use one implementation.

pub mod build;
pub mod parse;

use super::{CompletionQueueEntry, SubmissionQueueEntry};
use crate::{assert_wire_offset, assert_wire_size};

pub use build::*;
pub use parse::{parse_pdu, Fes, Pdu, PduError, PduLimits, Role};

/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// The only PDU format version (PFV) there is.
pub const PFV_1_0: u16 = 0;
/// Smallest MAXH2CDATA a controller may advertise (§3.6.2.3).
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Terminate-connection PDUs carry at most this much of the offending header (§3.6.2.4).
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Largest plen of a termination request.
pub const TERM_REQ_MAX_PLEN: usize = TermReqHeader::SIZE + TERM_REQ_MAX_DATA;

/// PDU types (§3.6.1, figure "PDU Type").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    /// Decodes the type byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// Length of this type's header (HLEN) including the common header.
    pub fn hlen(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => IcReq::SIZE,
            Self::CapsuleCmd => CapsuleCmdHeader::SIZE,
            Self::CapsuleResp => CapsuleRespHeader::SIZE,
            Self::H2CTermReq | Self::C2HTermReq => TermReqHeader::SIZE,
            Self::H2CData | Self::C2HData => DataHeader::SIZE,
            Self::R2T => R2tHeader::SIZE,
        }
    }

    /// Whether the header digest, when negotiated, applies to this type (all but the
    /// connection-setup and termination PDUs).
    pub fn has_hdgst(self) -> bool {
        matches!(
            self,
            Self::CapsuleCmd | Self::CapsuleResp | Self::H2CData | Self::C2HData | Self::R2T
        )
    }

    /// Whether this type may carry data (and so a data digest).
    pub fn may_carry_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
}

/// Common header flags (§3.6.1).
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 0x02;
    /// H2CData/C2HData: last PDU of the transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// ICReq/ICResp digest bits (§3.6.2.2).
pub mod digest_bits {
    /// Header digest enable.
    pub const HDGST_ENABLE: u8 = 0x01;
    /// Data digest enable.
    pub const DDGST_ENABLE: u8 = 0x02;
}

/// The 8-byte common header of every PDU (§3.6.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommonHeader {
    /// [`PduType`] byte.
    pub pdu_type: u8,
    /// [`flags`].
    pub flags: u8,
    /// Header length (HLEN): common plus PDU-specific header, without the digest.
    pub hlen: u8,
    /// PDU data offset (PDO) from the start of the PDU; 0 if no data.
    pub pdo: u8,
    /// Total PDU length (PLEN) including digests and padding.
    pub plen: u32,
}
assert_wire_size!(CommonHeader, 8);
assert_wire_offset!(CommonHeader, hlen, 2);
assert_wire_offset!(CommonHeader, pdo, 3);
assert_wire_offset!(CommonHeader, plen, 4);

impl CommonHeader {
    pub const SIZE: usize = 8;
    /// Byte offsets, reported as the field error information (FEI) of a TermReq.
    pub const OFF_TYPE: u32 = 0;
    pub const OFF_FLAGS: u32 = 1;
    pub const OFF_HLEN: u32 = 2;
    pub const OFF_PDO: u32 = 3;
    pub const OFF_PLEN: u32 = 4;

    /// Decodes the first 8 bytes of `b` (which must hold them).
    pub fn from_bytes(b: &[u8; 8]) -> Self {
        Self {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encodes into the first 8 bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.pdu_type;
        out[1] = self.flags;
        out[2] = self.hlen;
        out[3] = self.pdo;
        out[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }
}

/// Initialize Connection Request, host to controller (§3.6.2.2). 128 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub ch: CommonHeader,
    /// PDU format version, 0.
    pub pfv: u16,
    /// Host PDU data alignment (HPDA), 0's based dwords.
    pub hpda: u8,
    /// [`digest_bits`] the host asks for.
    pub digest: u8,
    /// Maximum outstanding R2Ts per command (MAXR2T), 0's based.
    pub maxr2t: u32,
    pub rsvd: [u8; 112],
}
assert_wire_size!(IcReq, 128);
assert_wire_offset!(IcReq, pfv, 8);
assert_wire_offset!(IcReq, hpda, 10);
assert_wire_offset!(IcReq, digest, 11);
assert_wire_offset!(IcReq, maxr2t, 12);

impl IcReq {
    pub const SIZE: usize = 128;
    pub const OFF_PFV: u32 = 8;
    pub const OFF_HPDA: u32 = 10;
    pub const OFF_DIGEST: u32 = 11;
}

/// Initialize Connection Response, controller to host (§3.6.2.3). 128 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub ch: CommonHeader,
    pub pfv: u16,
    /// Controller PDU data alignment (CPDA), 0's based dwords.
    pub cpda: u8,
    /// [`digest_bits`] in force.
    pub digest: u8,
    /// Largest H2CData payload the controller accepts (MAXH2CDATA).
    pub maxh2cdata: u32,
    pub rsvd: [u8; 112],
}
assert_wire_size!(IcResp, 128);
assert_wire_offset!(IcResp, cpda, 10);
assert_wire_offset!(IcResp, digest, 11);
assert_wire_offset!(IcResp, maxh2cdata, 12);

impl IcResp {
    pub const SIZE: usize = 128;
    pub const OFF_PFV: u32 = 8;
    pub const OFF_CPDA: u32 = 10;
    pub const OFF_MAXH2CDATA: u32 = 12;
}

/// H2CTermReq / C2HTermReq header (§3.6.2.4, §3.6.2.5). The offending PDU header
/// (up to 128 bytes) follows as data.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReqHeader {
    pub ch: CommonHeader,
    /// Fatal error status ([`Fes`]).
    pub fes: u16,
    /// Field error information: the byte offset of the offending field for
    /// "invalid header field" and "unsupported parameter" (little endian; the field is not
    /// 4-byte aligned on the wire).
    pub fei: [u8; 4],
    pub rsvd: [u8; 10],
}
assert_wire_size!(TermReqHeader, 24);
assert_wire_offset!(TermReqHeader, fes, 8);
assert_wire_offset!(TermReqHeader, fei, 10);

impl TermReqHeader {
    pub const SIZE: usize = 24;
}

/// Command capsule PDU header: the common header and the 64-byte SQE (§3.6.2.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleCmdHeader {
    pub ch: CommonHeader,
    pub sqe: SubmissionQueueEntry,
}
assert_wire_size!(CapsuleCmdHeader, 72);
assert_wire_offset!(CapsuleCmdHeader, sqe, 8);

impl CapsuleCmdHeader {
    pub const SIZE: usize = 72;
}

/// Response capsule PDU header: the common header and the 16-byte CQE (§3.6.2.7).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleRespHeader {
    pub ch: CommonHeader,
    pub cqe: CompletionQueueEntry,
}
assert_wire_size!(CapsuleRespHeader, 24);
assert_wire_offset!(CapsuleRespHeader, cqe, 8);

impl CapsuleRespHeader {
    pub const SIZE: usize = 24;
}

/// H2CData / C2HData header (§3.6.2.8, §3.6.2.9).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataHeader {
    pub ch: CommonHeader,
    /// Command capsule CID (CCCID) of the command the data belongs to.
    pub cccid: u16,
    /// Transfer tag (TTAG) from the R2T (H2CData only; reserved in C2HData).
    pub ttag: u16,
    /// Data offset (DATAO) within the command's transfer.
    pub datao: u32,
    /// Data length (DATAL) of this PDU.
    pub datal: u32,
    pub rsvd: [u8; 4],
}
assert_wire_size!(DataHeader, 24);
assert_wire_offset!(DataHeader, cccid, 8);
assert_wire_offset!(DataHeader, ttag, 10);
assert_wire_offset!(DataHeader, datao, 12);
assert_wire_offset!(DataHeader, datal, 16);

impl DataHeader {
    pub const SIZE: usize = 24;
    pub const OFF_CCCID: u32 = 8;
    pub const OFF_TTAG: u32 = 10;
    pub const OFF_DATAO: u32 = 12;
    pub const OFF_DATAL: u32 = 16;

    fn decode(ch: CommonHeader, b: &[u8]) -> Self {
        Self {
            ch,
            cccid: u16::from_le_bytes([b[8], b[9]]),
            ttag: u16::from_le_bytes([b[10], b[11]]),
            datao: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            datal: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            rsvd: [0; 4],
        }
    }
}

/// Ready to Transfer header, controller to host (§3.6.2.10).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R2tHeader {
    pub ch: CommonHeader,
    /// CID of the command whose data is requested.
    pub cccid: u16,
    /// Transfer tag the host echoes in its H2CData PDUs.
    pub ttag: u16,
    /// Offset of the requested data (R2TO).
    pub r2to: u32,
    /// Length of the requested data (R2TL).
    pub r2tl: u32,
    pub rsvd: [u8; 4],
}
assert_wire_size!(R2tHeader, 24);
assert_wire_offset!(R2tHeader, cccid, 8);
assert_wire_offset!(R2tHeader, ttag, 10);
assert_wire_offset!(R2tHeader, r2to, 12);
assert_wire_offset!(R2tHeader, r2tl, 16);

impl R2tHeader {
    pub const SIZE: usize = 24;
}

/// CRC32C as NVMe/TCP digests use it (Castagnoli, initial and final XOR with all ones).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over more bytes (`crc` is a previous [`crc32c()`] result).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests;
