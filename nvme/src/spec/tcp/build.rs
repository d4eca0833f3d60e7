//! PDU encoders. Each writes one PDU (or its header) into a caller-provided slice and returns
//! the bytes written, so the I/O path encodes straight into its send buffer without
//! allocating. The caller makes sure the slice is long enough (the `*_len` functions say how
//! long); a too-short slice panics like any out-of-bounds slice write.

use super::{
    flags, CapsuleCmdHeader, CapsuleRespHeader, CommonHeader, DataHeader, IcReq, IcResp, PduType,
    R2tHeader, TermReqHeader, DIGEST_LEN, PFV_1_0, TERM_REQ_MAX_DATA,
};
use crate::spec::{CompletionQueueEntry, SubmissionQueueEntry};

/// Digests in force on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub hdgst: bool,
    pub ddgst: bool,
}

impl Digests {
    /// Header digest length for digest-carrying PDU types.
    pub fn hd(self) -> usize {
        if self.hdgst {
            DIGEST_LEN
        } else {
            0
        }
    }

    /// Data digest length when data is present.
    pub fn dd(self) -> usize {
        if self.ddgst {
            DIGEST_LEN
        } else {
            0
        }
    }

    fn flags(self, has_data: bool) -> u8 {
        let mut f = 0;
        if self.hdgst {
            f |= flags::HDGSTF;
        }
        if self.ddgst && has_data {
            f |= flags::DDGSTF;
        }
        f
    }
}

fn put_hdgst(out: &mut [u8], hlen: usize, dg: Digests) -> usize {
    if dg.hdgst {
        let crc = super::crc32c(&out[..hlen]);
        out[hlen..hlen + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
        hlen + DIGEST_LEN
    } else {
        hlen
    }
}

/// The 128-byte ICReq.
pub fn icreq_bytes(hpda: u8, digest: u8, maxr2t: u32) -> [u8; IcReq::SIZE] {
    let mut b = [0u8; IcReq::SIZE];
    CommonHeader {
        pdu_type: PduType::IcReq as u8,
        flags: 0,
        hlen: IcReq::SIZE as u8,
        pdo: 0,
        plen: IcReq::SIZE as u32,
    }
    .write(&mut b);
    b[8..10].copy_from_slice(&PFV_1_0.to_le_bytes());
    b[10] = hpda;
    b[11] = digest;
    b[12..16].copy_from_slice(&maxr2t.to_le_bytes());
    b
}

/// The 128-byte ICResp.
pub fn icresp_bytes(cpda: u8, digest: u8, maxh2cdata: u32) -> [u8; IcResp::SIZE] {
    let mut b = [0u8; IcResp::SIZE];
    CommonHeader {
        pdu_type: PduType::IcResp as u8,
        flags: 0,
        hlen: IcResp::SIZE as u8,
        pdo: 0,
        plen: IcResp::SIZE as u32,
    }
    .write(&mut b);
    b[8..10].copy_from_slice(&PFV_1_0.to_le_bytes());
    b[10] = cpda;
    b[11] = digest;
    b[12..16].copy_from_slice(&maxh2cdata.to_le_bytes());
    b
}

/// A termination request (`ty` is [`PduType::H2CTermReq`] or [`PduType::C2HTermReq`])
/// echoing up to 128 bytes of the offending PDU. Needs 152 bytes of room at most.
pub fn write_term_req(out: &mut [u8], ty: PduType, fes: u16, fei: u32, offending: &[u8]) -> usize {
    let echo = &offending[..offending.len().min(TERM_REQ_MAX_DATA)];
    let plen = TermReqHeader::SIZE + echo.len();
    out[..TermReqHeader::SIZE].fill(0);
    CommonHeader {
        pdu_type: ty as u8,
        flags: 0,
        hlen: TermReqHeader::SIZE as u8,
        pdo: 0,
        plen: plen as u32,
    }
    .write(out);
    out[8..10].copy_from_slice(&fes.to_le_bytes());
    out[10..14].copy_from_slice(&fei.to_le_bytes());
    out[TermReqHeader::SIZE..plen].copy_from_slice(echo);
    plen
}

/// Length of a command capsule with `data_len` bytes of in-capsule data.
pub fn capsule_cmd_len(data_len: usize, dg: Digests) -> usize {
    let base = CapsuleCmdHeader::SIZE + dg.hd();
    if data_len == 0 {
        base
    } else {
        base + data_len + dg.dd()
    }
}

/// A command capsule with optional in-capsule data.
pub fn write_capsule_cmd(
    out: &mut [u8],
    sqe: &SubmissionQueueEntry,
    data: &[u8],
    dg: Digests,
) -> usize {
    let mut n = write_capsule_cmd_header(out, sqe, data.len(), dg);
    if !data.is_empty() {
        n += put_data(&mut out[n..], data, dg);
    }
    debug_assert_eq!(n, capsule_cmd_len(data.len(), dg));
    n
}

/// The header (and header digest) of a command capsule that carries `data_len` bytes of
/// in-capsule data; returns its length, which is also where the data goes. The caller sends
/// the data and, with data digests, its [`write_data_digest`] right after.
pub fn write_capsule_cmd_header(
    out: &mut [u8],
    sqe: &SubmissionQueueEntry,
    data_len: usize,
    dg: Digests,
) -> usize {
    let has_data = data_len > 0;
    let pdo = if has_data {
        CapsuleCmdHeader::SIZE + dg.hd()
    } else {
        0
    };
    CommonHeader {
        pdu_type: PduType::CapsuleCmd as u8,
        flags: dg.flags(has_data),
        hlen: CapsuleCmdHeader::SIZE as u8,
        pdo: pdo as u8,
        plen: capsule_cmd_len(data_len, dg) as u32,
    }
    .write(out);
    out[8..72].copy_from_slice(&sqe.to_bytes());
    put_hdgst(out, CapsuleCmdHeader::SIZE, dg)
}

fn put_data(out: &mut [u8], data: &[u8], dg: Digests) -> usize {
    out[..data.len()].copy_from_slice(data);
    if dg.ddgst {
        let crc = super::crc32c(data);
        out[data.len()..data.len() + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    data.len() + dg.dd()
}

/// Length of a response capsule.
pub fn capsule_resp_len(dg: Digests) -> usize {
    CapsuleRespHeader::SIZE + dg.hd()
}

/// A response capsule.
pub fn write_capsule_resp(out: &mut [u8], cqe: &CompletionQueueEntry, dg: Digests) -> usize {
    CommonHeader {
        pdu_type: PduType::CapsuleResp as u8,
        flags: dg.flags(false),
        hlen: CapsuleRespHeader::SIZE as u8,
        pdo: 0,
        plen: capsule_resp_len(dg) as u32,
    }
    .write(out);
    out[8..24].copy_from_slice(&cqe.to_bytes());
    put_hdgst(out, CapsuleRespHeader::SIZE, dg)
}

/// Fields of an H2CData or C2HData PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPdu {
    /// [`PduType::H2CData`] or [`PduType::C2HData`].
    pub ty: PduType,
    /// Extra flags: [`flags::LAST_PDU`], [`flags::SUCCESS`].
    pub flags: u8,
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
}

/// Length of a data PDU carrying `datal` bytes.
pub fn data_pdu_len(datal: usize, dg: Digests) -> usize {
    DataHeader::SIZE + dg.hd() + datal + dg.dd()
}

/// The header (and header digest) of a data PDU; returns its length, which is also where
/// the data goes. The caller appends `datal` bytes and, with data digests,
/// [`write_data_digest`].
pub fn write_data_pdu_header(out: &mut [u8], d: &DataPdu, dg: Digests) -> usize {
    let hd = dg.hd();
    out[..DataHeader::SIZE].fill(0);
    CommonHeader {
        pdu_type: d.ty as u8,
        flags: dg.flags(true) | d.flags,
        hlen: DataHeader::SIZE as u8,
        pdo: (DataHeader::SIZE + hd) as u8,
        plen: data_pdu_len(d.datal as usize, dg) as u32,
    }
    .write(out);
    out[8..10].copy_from_slice(&d.cccid.to_le_bytes());
    out[10..12].copy_from_slice(&d.ttag.to_le_bytes());
    out[12..16].copy_from_slice(&d.datao.to_le_bytes());
    out[16..20].copy_from_slice(&d.datal.to_le_bytes());
    put_hdgst(out, DataHeader::SIZE, dg)
}

/// Writes the data digest of `data` into the first four bytes of `out`.
pub fn write_data_digest(out: &mut [u8], data: &[u8]) -> usize {
    out[..DIGEST_LEN].copy_from_slice(&super::crc32c(data).to_le_bytes());
    DIGEST_LEN
}

/// A whole data PDU: header, data, digests.
pub fn write_data_pdu(out: &mut [u8], d: &DataPdu, data: &[u8], dg: Digests) -> usize {
    debug_assert_eq!(d.datal as usize, data.len());
    let n = write_data_pdu_header(out, d, dg);
    n + put_data(&mut out[n..], data, dg)
}

/// Length of an R2T.
pub fn r2t_len(dg: Digests) -> usize {
    R2tHeader::SIZE + dg.hd()
}

/// A Ready to Transfer PDU.
pub fn write_r2t(
    out: &mut [u8],
    cccid: u16,
    ttag: u16,
    r2to: u32,
    r2tl: u32,
    dg: Digests,
) -> usize {
    out[..R2tHeader::SIZE].fill(0);
    CommonHeader {
        pdu_type: PduType::R2T as u8,
        flags: dg.flags(false),
        hlen: R2tHeader::SIZE as u8,
        pdo: 0,
        plen: r2t_len(dg) as u32,
    }
    .write(out);
    out[8..10].copy_from_slice(&cccid.to_le_bytes());
    out[10..12].copy_from_slice(&ttag.to_le_bytes());
    out[12..16].copy_from_slice(&r2to.to_le_bytes());
    out[16..20].copy_from_slice(&r2tl.to_le_bytes());
    put_hdgst(out, R2tHeader::SIZE, dg)
}
