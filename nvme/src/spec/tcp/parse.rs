//! The validating PDU parser: every field is checked before use, and a failure carries the
//! fatal error status (FES) and field offset a TermReq reports (§3.6.2.4, §7.4.6).

use std::fmt;

use super::{
    digest_bits, flags, CapsuleCmdHeader, CapsuleRespHeader, CommonHeader, DataHeader, IcReq,
    IcResp, PduType, R2tHeader, TermReqHeader, DIGEST_LEN, MIN_MAXH2CDATA, PFV_1_0,
    TERM_REQ_MAX_DATA, TERM_REQ_MAX_PLEN,
};
use crate::spec::{CompletionQueueEntry, SubmissionQueueEntry};

/// Fatal error status of a terminate-connection request (§3.6.2.4, figure "FES").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataTransferOutOfRange = 0x04,
    DataTransferLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

impl Fes {
    /// Decodes the FES field.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x01 => Self::InvalidHeaderField,
            0x02 => Self::PduSequenceError,
            0x03 => Self::HeaderDigestError,
            0x04 => Self::DataTransferOutOfRange,
            0x05 => Self::DataTransferLimitExceeded,
            0x06 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// Why a PDU was rejected. Fatal: the receiver answers with a TermReq and closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduError {
    pub fes: Fes,
    /// Field error information: byte offset of the offending field in the PDU.
    pub fei: u32,
    /// How many bytes of the offending PDU to echo in the TermReq (≤ 128).
    pub echo_len: usize,
    pub reason: &'static str,
}

impl PduError {
    /// An error of `fes` at byte offset `fei`.
    pub fn new(fes: Fes, fei: u32, reason: &'static str) -> Self {
        Self {
            fes,
            fei,
            echo_len: 0,
            reason,
        }
    }

    fn echo(mut self, available: usize, hlen: usize) -> Self {
        self.echo_len = available.min(hlen).min(TERM_REQ_MAX_DATA);
        self
    }
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}, field offset {})",
            self.reason, self.fes, self.fei
        )
    }
}

impl std::error::Error for PduError {}

/// Which end of the connection is parsing: it decides which PDU types may arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The controller receives host-to-controller PDUs.
    Controller,
    /// The host receives controller-to-host PDUs.
    Host,
}

/// What was negotiated and advertised; bounds every length the parser accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduLimits {
    /// Header digests in force.
    pub hdgst: bool,
    /// Data digests in force.
    pub ddgst: bool,
    /// Largest in-capsule data of a command capsule (controller side).
    pub max_icdata: u32,
    /// Largest H2CData payload (MAXH2CDATA).
    pub maxh2cdata: u32,
    /// Largest C2HData payload (host side).
    pub max_c2hdata: u32,
}

impl Default for PduLimits {
    /// Before ICReq/ICResp: no digests, minimal sizes.
    fn default() -> Self {
        Self {
            hdgst: false,
            ddgst: false,
            max_icdata: 8192,
            maxh2cdata: MIN_MAXH2CDATA,
            max_c2hdata: 1 << 20,
        }
    }
}

/// A parsed PDU; data slices borrow the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu<'a> {
    IcReq(IcReq),
    IcResp(IcResp),
    /// H2CTermReq or C2HTermReq; `data` is the echoed header of the offending PDU.
    TermReq {
        header: TermReqHeader,
        data: &'a [u8],
    },
    CapsuleCmd {
        header: CapsuleCmdHeader,
        /// In-capsule data (empty if none).
        data: &'a [u8],
        /// False if a data digest was present and did not match (not fatal: the command
        /// completes with a transient transport error).
        ddgst_ok: bool,
    },
    CapsuleResp(CapsuleRespHeader),
    H2CData {
        header: DataHeader,
        data: &'a [u8],
        ddgst_ok: bool,
    },
    C2HData {
        header: DataHeader,
        data: &'a [u8],
        ddgst_ok: bool,
    },
    R2T(R2tHeader),
}

fn invalid(fei: u32, reason: &'static str) -> PduError {
    PduError::new(Fes::InvalidHeaderField, fei, reason)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Parses the PDU at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole PDU (call again with more
/// bytes; everything needed to bound the wait has been validated by then),
/// `Ok(Some((pdu, len)))` with the PDU's total length, or the fatal error.
pub fn parse_pdu<'a>(
    buf: &'a [u8],
    role: Role,
    lim: &PduLimits,
) -> Result<Option<(Pdu<'a>, usize)>, PduError> {
    let Some(chb) = buf.first_chunk::<{ CommonHeader::SIZE }>() else {
        return Ok(None);
    };
    let ch = CommonHeader::from_bytes(chb);
    let ty = PduType::from_u8(ch.pdu_type)
        .filter(|t| receivable(*t, role))
        .ok_or_else(|| {
            invalid(
                CommonHeader::OFF_TYPE,
                "unknown PDU type for this direction",
            )
        })
        .map_err(|e| e.echo(buf.len(), CommonHeader::SIZE))?;
    let hlen = ty.hlen();
    let err = |e: PduError| e.echo(buf.len(), hlen);
    if usize::from(ch.hlen) != hlen {
        return Err(err(invalid(CommonHeader::OFF_HLEN, "wrong header length")));
    }
    let hd = if lim.hdgst && ty.has_hdgst() {
        DIGEST_LEN
    } else {
        0
    };
    if (ch.flags & flags::HDGSTF != 0) != (hd != 0) {
        return Err(err(invalid(
            CommonHeader::OFF_FLAGS,
            "header digest flag disagrees with the negotiated digests",
        )));
    }
    if buf.len() < hlen + hd {
        return Ok(None);
    }
    if hd != 0 {
        let want = u32_at(buf, hlen);
        if super::crc32c(&buf[..hlen]) != want {
            return Err(err(PduError::new(
                Fes::HeaderDigestError,
                0,
                "header digest mismatch",
            )));
        }
    }
    let plen = ch.plen as usize;
    if plen < hlen + hd {
        return Err(err(invalid(
            CommonHeader::OFF_PLEN,
            "PDU length shorter than its header",
        )));
    }
    let (data_off, data_len, dd) = framing(&ch, ty, hlen + hd, lim).map_err(err)?;
    check_fields(ty, buf, &ch, data_len, lim).map_err(err)?;
    if buf.len() < plen {
        return Ok(None);
    }
    let data = &buf[data_off..data_off + data_len];
    let ddgst_ok = dd == 0 || super::crc32c(data) == u32_at(buf, data_off + data_len);
    let hb = &buf[..hlen];
    let pdu = match ty {
        PduType::IcReq => Pdu::IcReq(IcReq {
            ch,
            pfv: u16_at(hb, 8),
            hpda: hb[10],
            digest: hb[11],
            maxr2t: u32_at(hb, 12),
            rsvd: [0; 112],
        }),
        PduType::IcResp => Pdu::IcResp(IcResp {
            ch,
            pfv: u16_at(hb, 8),
            cpda: hb[10],
            digest: hb[11],
            maxh2cdata: u32_at(hb, 12),
            rsvd: [0; 112],
        }),
        PduType::H2CTermReq | PduType::C2HTermReq => Pdu::TermReq {
            header: TermReqHeader {
                ch,
                fes: u16_at(hb, 8),
                fei: [hb[10], hb[11], hb[12], hb[13]],
                rsvd: [0; 10],
            },
            data: &buf[hlen..plen],
        },
        PduType::CapsuleCmd => {
            let sqe: &[u8; 64] = hb[8..72].try_into().expect("hlen checked");
            Pdu::CapsuleCmd {
                header: CapsuleCmdHeader {
                    ch,
                    sqe: SubmissionQueueEntry::from_bytes(sqe),
                },
                data,
                ddgst_ok,
            }
        }
        PduType::CapsuleResp => {
            let cqe: &[u8; 16] = hb[8..24].try_into().expect("hlen checked");
            Pdu::CapsuleResp(CapsuleRespHeader {
                ch,
                cqe: CompletionQueueEntry::from_bytes(cqe),
            })
        }
        PduType::H2CData => Pdu::H2CData {
            header: DataHeader::decode(ch, hb),
            data,
            ddgst_ok,
        },
        PduType::C2HData => Pdu::C2HData {
            header: DataHeader::decode(ch, hb),
            data,
            ddgst_ok,
        },
        PduType::R2T => Pdu::R2T(R2tHeader {
            ch,
            cccid: u16_at(hb, 8),
            ttag: u16_at(hb, 10),
            r2to: u32_at(hb, 12),
            r2tl: u32_at(hb, 16),
            rsvd: [0; 4],
        }),
    };
    Ok(Some((pdu, plen)))
}

fn receivable(ty: PduType, role: Role) -> bool {
    use PduType::*;
    match role {
        Role::Controller => matches!(ty, IcReq | H2CTermReq | CapsuleCmd | H2CData),
        Role::Host => matches!(ty, IcResp | C2HTermReq | CapsuleResp | C2HData | R2T),
    }
}

/// Checks PLEN, PDO and the data digest flag against the type and the limits; returns the
/// data offset, data length and data digest length.
fn framing(
    ch: &CommonHeader,
    ty: PduType,
    header_end: usize,
    lim: &PduLimits,
) -> Result<(usize, usize, usize), PduError> {
    let plen = ch.plen as usize;
    let pdo = usize::from(ch.pdo);
    let ddgstf = ch.flags & flags::DDGSTF != 0;
    if !ty.may_carry_data() {
        if ddgstf {
            return Err(invalid(
                CommonHeader::OFF_FLAGS,
                "data digest flag on a PDU without data",
            ));
        }
        if pdo != 0 {
            return Err(invalid(
                CommonHeader::OFF_PDO,
                "data offset on a PDU without data",
            ));
        }
        let max = match ty {
            PduType::H2CTermReq | PduType::C2HTermReq => TERM_REQ_MAX_PLEN,
            _ => header_end,
        };
        if plen > max {
            return Err(invalid(
                CommonHeader::OFF_PLEN,
                "PDU length too large for its type",
            ));
        }
        return Ok((header_end, plen - header_end, 0));
    }
    if plen == header_end {
        // A command capsule without in-capsule data.
        if ty != PduType::CapsuleCmd {
            return Err(invalid(CommonHeader::OFF_PLEN, "data PDU without data"));
        }
        if pdo != 0 {
            return Err(invalid(CommonHeader::OFF_PDO, "data offset without data"));
        }
        if ddgstf {
            return Err(invalid(
                CommonHeader::OFF_FLAGS,
                "data digest flag without data",
            ));
        }
        return Ok((header_end, 0, 0));
    }
    if ddgstf != lim.ddgst {
        return Err(invalid(
            CommonHeader::OFF_FLAGS,
            "data digest flag disagrees with the negotiated digests",
        ));
    }
    let dd = if lim.ddgst { DIGEST_LEN } else { 0 };
    if pdo < header_end || pdo + dd > plen {
        return Err(invalid(
            CommonHeader::OFF_PDO,
            "data offset outside the PDU",
        ));
    }
    let data_len = plen - pdo - dd;
    if data_len == 0 {
        return Err(invalid(CommonHeader::OFF_PLEN, "data PDU without data"));
    }
    let max = match ty {
        PduType::CapsuleCmd => lim.max_icdata,
        PduType::H2CData => lim.maxh2cdata,
        _ => lim.max_c2hdata,
    };
    if data_len > max as usize {
        return Err(PduError::new(
            Fes::DataTransferLimitExceeded,
            CommonHeader::OFF_PLEN,
            "PDU data longer than the negotiated limit",
        ));
    }
    Ok((pdo, data_len, dd))
}

/// Type-specific header fields, once the header is complete.
fn check_fields(
    ty: PduType,
    b: &[u8],
    ch: &CommonHeader,
    data_len: usize,
    lim: &PduLimits,
) -> Result<(), PduError> {
    match ty {
        PduType::IcReq | PduType::IcResp => {
            if ch.flags != 0 {
                return Err(invalid(
                    CommonHeader::OFF_FLAGS,
                    "flags on a connection PDU",
                ));
            }
            if u16_at(b, 8) != PFV_1_0 {
                return Err(PduError::new(
                    Fes::UnsupportedParameter,
                    IcReq::OFF_PFV,
                    "unsupported PDU format version",
                ));
            }
            if b[10] > 31 {
                return Err(invalid(IcReq::OFF_HPDA, "data alignment above 31"));
            }
            if b[11] & !(digest_bits::HDGST_ENABLE | digest_bits::DDGST_ENABLE) != 0 {
                return Err(invalid(IcReq::OFF_DIGEST, "reserved digest bits set"));
            }
            if ty == PduType::IcResp {
                let maxh2c = u32_at(b, 12);
                if maxh2c < MIN_MAXH2CDATA || maxh2c % 4 != 0 {
                    return Err(invalid(
                        IcResp::OFF_MAXH2CDATA,
                        "MAXH2CDATA too small or unaligned",
                    ));
                }
            }
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            if Fes::from_u16(u16_at(b, 8)).is_none() {
                return Err(invalid(8, "unknown fatal error status"));
            }
        }
        PduType::H2CData | PduType::C2HData => {
            let datal = u32_at(b, 16) as usize;
            if datal != data_len {
                return Err(invalid(
                    DataHeader::OFF_DATAL,
                    "DATAL disagrees with the PDU length",
                ));
            }
            let datao = u32_at(b, 12) as u64;
            let limit = if ty == PduType::H2CData {
                lim.maxh2cdata
            } else {
                lim.max_c2hdata
            };
            if datal as u64 > u64::from(limit) || datao + datal as u64 > u64::from(u32::MAX) {
                return Err(PduError::new(
                    Fes::DataTransferLimitExceeded,
                    DataHeader::OFF_DATAL,
                    "data PDU longer than allowed",
                ));
            }
        }
        PduType::R2T => {
            if u32_at(b, 16) == 0 {
                return Err(invalid(16, "R2T of zero length"));
            }
        }
        PduType::CapsuleCmd | PduType::CapsuleResp => {}
    }
    Ok(())
}
