//! In-band authentication (NVMe Base 2.0 §8.13, TP 8006): the Authentication Send and
//! Authentication Receive fabrics commands and the DH-HMAC-CHAP messages they carry
//! (Base §5.3 "Authentication Send/Receive", figures "AUTH_Negotiate", "DH-HMAC-CHAP_*").
//!
//! Every length in a message is the peer's: [`AuthMessage::parse`] checks each one against
//! the bytes actually received before it slices.

use super::SubmissionQueueEntry;

/// SECP of the authentication protocol (Base §8.13.3): NVMe in-band authentication.
pub const SECP_NVME_AUTH: u8 = 0xe9;
/// SPSP0 and SPSP1: the protocol-specific fields, both 01h for DH-HMAC-CHAP messages.
pub const SPSP_DHCHAP: u8 = 0x01;
/// AUTH-ID of DH-HMAC-CHAP in an AUTH_Negotiate protocol descriptor.
pub const AUTHID_DHCHAP: u8 = 0x01;
/// The NULL Diffie-Hellman group (no key exchange).
pub const DHGROUP_NULL: u8 = 0x00;
/// Connect response DW0 bit 17: the host must authenticate this queue (ATR).
pub const CONNECT_AUTHREQ_ATR: u32 = 1 << 17;
/// Connect response DW0 bit 18: secure channel concatenation required (ASCR).
pub const CONNECT_AUTHREQ_ASCR: u32 = 1 << 18;

/// Message type (AUTH-TYPE, byte 0).
mod auth_type {
    pub const COMMON: u8 = 0x00;
    pub const DHCHAP: u8 = 0x01;
}

/// Message identifiers (AUTH-ID, byte 1).
mod auth_id {
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xf0;
    pub const FAILURE1: u8 = 0xf1;
}

/// Authentication failure reason code explanations (RCEXP, Base figure "AUTH_Failure").
pub mod failure {
    /// Reason code: authentication failure.
    pub const REASON_FAILED: u8 = 0x01;
    pub const FAILED: u8 = 0x01;
    pub const NOT_USABLE: u8 = 0x02;
    pub const CONCAT_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_MESSAGE: u8 = 0x07;
}

/// Header sizes: AUTH_Negotiate without descriptors, one protocol descriptor, the fixed part
/// of Challenge/Reply/Success1/Success2, and AUTH_Failure.
pub const NEGOTIATE_HEADER: usize = 8;
pub const PROTOCOL_DESCRIPTOR: usize = 64;
pub const DHCHAP_HEADER: usize = 16;
pub const FAILURE_SIZE: usize = 8;
/// Longest message either side builds here (a Reply with SHA-512 and no DH value).
pub const MAX_MESSAGE: usize = DHCHAP_HEADER + 2 * 64;
/// Where the DH group IDs start in a descriptor's ID list (hash IDs come first).
const DHGROUP_LIST_OFFSET: usize = 30;

/// The fields of Authentication Send (FCTYPE 05h) and Receive (06h) SQEs: CDW10 holds SECP
/// (bits 31:24), SPSP1 (23:16) and SPSP0 (15:8); CDW11 the transfer length (TL) or the
/// allocation length (AL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthCommand {
    pub secp: u8,
    pub spsp0: u8,
    pub spsp1: u8,
    pub len: u32,
}

impl AuthCommand {
    /// The fields of a DH-HMAC-CHAP command carrying `len` bytes.
    pub fn dhchap(len: u32) -> Self {
        Self {
            secp: SECP_NVME_AUTH,
            spsp0: SPSP_DHCHAP,
            spsp1: SPSP_DHCHAP,
            len,
        }
    }

    pub fn from_sqe(sqe: &SubmissionQueueEntry) -> Self {
        Self {
            secp: (sqe.cdw10 >> 24) as u8,
            spsp1: (sqe.cdw10 >> 16) as u8,
            spsp0: (sqe.cdw10 >> 8) as u8,
            len: sqe.cdw11,
        }
    }

    pub fn write_to(&self, sqe: &mut SubmissionQueueEntry) {
        sqe.cdw10 =
            u32::from(self.secp) << 24 | u32::from(self.spsp1) << 16 | u32::from(self.spsp0) << 8;
        sqe.cdw11 = self.len;
    }

    /// Whether SECP/SPSP name DH-HMAC-CHAP.
    pub fn is_dhchap(&self) -> bool {
        self.secp == SECP_NVME_AUTH && self.spsp0 == SPSP_DHCHAP && self.spsp1 == SPSP_DHCHAP
    }
}

/// Which side sent an AUTH_Failure: the controller (Failure1) or the host (Failure2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureFrom {
    Controller,
    Host,
}

/// One authentication message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMessage {
    /// AUTH_Negotiate (host): the first DH-HMAC-CHAP descriptor's hash and DH group lists.
    Negotiate {
        tid: u16,
        sc_c: u8,
        hashes: Vec<u8>,
        dhgroups: Vec<u8>,
    },
    /// DH-HMAC-CHAP_Challenge (controller): C1, S1, the chosen hash and DH group.
    Challenge {
        tid: u16,
        hash: u8,
        dhgid: u8,
        seqnum: u32,
        challenge: Vec<u8>,
        dh_value: Vec<u8>,
    },
    /// DH-HMAC-CHAP_Reply (host): R1, and C2 with S2 when it wants the controller
    /// authenticated too.
    Reply {
        tid: u16,
        response: Vec<u8>,
        challenge: Option<Vec<u8>>,
        seqnum: u32,
        dh_value: Vec<u8>,
    },
    /// DH-HMAC-CHAP_Success1 (controller): R2 when the host sent C2.
    Success1 {
        tid: u16,
        hl: u8,
        response: Option<Vec<u8>>,
    },
    /// DH-HMAC-CHAP_Success2 (host): R2 checked.
    Success2 { tid: u16 },
    /// AUTH_Failure1 (controller) or AUTH_Failure2 (host).
    Failure {
        from: FailureFrom,
        tid: u16,
        reason: u8,
        explanation: u8,
    },
}

/// Why a message could not be decoded: the explanation an AUTH_Failure carries back, and a
/// reason for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct MessageError {
    pub explanation: u8,
    pub reason: &'static str,
}

fn payload(reason: &'static str) -> MessageError {
    MessageError {
        explanation: failure::INCORRECT_PAYLOAD,
        reason,
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl AuthMessage {
    /// Decodes the first `b.len()` bytes a peer sent (TL of an Authentication Send, or what
    /// an Authentication Receive returned).
    pub fn parse(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() < FAILURE_SIZE {
            return Err(payload("message shorter than its header"));
        }
        let tid = le16(b, 4);
        match (b[0], b[1]) {
            (auth_type::COMMON, auth_id::NEGOTIATE) => Self::parse_negotiate(b, tid),
            (
                auth_type::COMMON | auth_type::DHCHAP,
                id @ (auth_id::FAILURE1 | auth_id::FAILURE2),
            ) => Ok(Self::Failure {
                from: if id == auth_id::FAILURE1 {
                    FailureFrom::Controller
                } else {
                    FailureFrom::Host
                },
                tid,
                reason: b[6],
                explanation: b[7],
            }),
            (auth_type::DHCHAP, id) => {
                if b.len() < DHCHAP_HEADER {
                    return Err(payload("DH-HMAC-CHAP message shorter than 16 bytes"));
                }
                let hl = usize::from(b[6]);
                match id {
                    auth_id::CHALLENGE => {
                        let dhvlen = usize::from(le16(b, 10));
                        let end = DHCHAP_HEADER + hl + dhvlen;
                        if b.len() < end {
                            return Err(payload("Challenge shorter than HL + DHVLEN"));
                        }
                        Ok(Self::Challenge {
                            tid,
                            hash: b[8],
                            dhgid: b[9],
                            seqnum: le32(b, 12),
                            challenge: b[DHCHAP_HEADER..DHCHAP_HEADER + hl].to_vec(),
                            dh_value: b[DHCHAP_HEADER + hl..end].to_vec(),
                        })
                    }
                    auth_id::REPLY => {
                        let dhvlen = usize::from(le16(b, 10));
                        let end = DHCHAP_HEADER + 2 * hl + dhvlen;
                        if b.len() < end {
                            return Err(payload("Reply shorter than 2 x HL + DHVLEN"));
                        }
                        let r = &b[DHCHAP_HEADER..];
                        Ok(Self::Reply {
                            tid,
                            response: r[..hl].to_vec(),
                            challenge: (b[8] != 0).then(|| r[hl..2 * hl].to_vec()),
                            seqnum: le32(b, 12),
                            dh_value: r[2 * hl..2 * hl + dhvlen].to_vec(),
                        })
                    }
                    auth_id::SUCCESS1 => {
                        let rvalid = b[8] & 1 != 0;
                        if rvalid && b.len() < DHCHAP_HEADER + hl {
                            return Err(payload("Success1 shorter than HL"));
                        }
                        Ok(Self::Success1 {
                            tid,
                            hl: b[6],
                            response: rvalid.then(|| b[DHCHAP_HEADER..DHCHAP_HEADER + hl].to_vec()),
                        })
                    }
                    auth_id::SUCCESS2 => Ok(Self::Success2 { tid }),
                    _ => Err(MessageError {
                        explanation: failure::INCORRECT_MESSAGE,
                        reason: "unknown DH-HMAC-CHAP message",
                    }),
                }
            }
            _ => Err(MessageError {
                explanation: failure::INCORRECT_MESSAGE,
                reason: "unknown authentication message type",
            }),
        }
    }

    fn parse_negotiate(b: &[u8], tid: u16) -> Result<Self, MessageError> {
        let sc_c = b[6];
        let napd = usize::from(b[7]);
        if napd == 0 {
            return Err(payload("AUTH_Negotiate without protocol descriptors"));
        }
        let descs = &b[NEGOTIATE_HEADER..];
        for d in descs.chunks_exact(PROTOCOL_DESCRIPTOR).take(napd) {
            if d[0] != AUTHID_DHCHAP {
                continue;
            }
            let (halen, dhlen) = (usize::from(d[2]), usize::from(d[3]));
            if halen > DHGROUP_LIST_OFFSET || dhlen > DHGROUP_LIST_OFFSET {
                return Err(payload("protocol descriptor lists more than 30 IDs"));
            }
            let ids = &d[4..];
            return Ok(Self::Negotiate {
                tid,
                sc_c,
                hashes: ids[..halen].to_vec(),
                dhgroups: ids[DHGROUP_LIST_OFFSET..DHGROUP_LIST_OFFSET + dhlen].to_vec(),
            });
        }
        if descs.len() < napd * PROTOCOL_DESCRIPTOR {
            return Err(payload("AUTH_Negotiate shorter than its descriptors"));
        }
        Err(MessageError {
            explanation: failure::NOT_USABLE,
            reason: "no DH-HMAC-CHAP protocol descriptor",
        })
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let head = |out: &mut Vec<u8>, ty: u8, id: u8, tid: u16, size: usize| {
            out.resize(start + size, 0);
            out[start] = ty;
            out[start + 1] = id;
            out[start + 4..start + 6].copy_from_slice(&tid.to_le_bytes());
        };
        match self {
            Self::Negotiate {
                tid,
                sc_c,
                hashes,
                dhgroups,
            } => {
                head(
                    out,
                    auth_type::COMMON,
                    auth_id::NEGOTIATE,
                    *tid,
                    NEGOTIATE_HEADER + PROTOCOL_DESCRIPTOR,
                );
                let (h, d) = (hashes.len().min(30), dhgroups.len().min(30));
                let o = &mut out[start..];
                o[6] = *sc_c;
                o[7] = 1;
                let desc = &mut o[NEGOTIATE_HEADER..];
                desc[0] = AUTHID_DHCHAP;
                desc[2] = h as u8;
                desc[3] = d as u8;
                desc[4..4 + h].copy_from_slice(&hashes[..h]);
                let g = 4 + DHGROUP_LIST_OFFSET;
                desc[g..g + d].copy_from_slice(&dhgroups[..d]);
            }
            Self::Challenge {
                tid,
                hash,
                dhgid,
                seqnum,
                challenge,
                dh_value,
            } => {
                head(
                    out,
                    auth_type::DHCHAP,
                    auth_id::CHALLENGE,
                    *tid,
                    DHCHAP_HEADER,
                );
                let o = &mut out[start..];
                o[6] = challenge.len() as u8;
                o[8] = *hash;
                o[9] = *dhgid;
                o[10..12].copy_from_slice(&(dh_value.len() as u16).to_le_bytes());
                o[12..16].copy_from_slice(&seqnum.to_le_bytes());
                out.extend_from_slice(challenge);
                out.extend_from_slice(dh_value);
            }
            Self::Reply {
                tid,
                response,
                challenge,
                seqnum,
                dh_value,
            } => {
                head(out, auth_type::DHCHAP, auth_id::REPLY, *tid, DHCHAP_HEADER);
                let o = &mut out[start..];
                o[6] = response.len() as u8;
                o[8] = u8::from(challenge.is_some());
                o[10..12].copy_from_slice(&(dh_value.len() as u16).to_le_bytes());
                o[12..16].copy_from_slice(&seqnum.to_le_bytes());
                out.extend_from_slice(response);
                match challenge {
                    Some(c) => out.extend_from_slice(c),
                    None => out.resize(out.len() + response.len(), 0),
                }
                out.extend_from_slice(dh_value);
            }
            Self::Success1 { tid, hl, response } => {
                head(
                    out,
                    auth_type::DHCHAP,
                    auth_id::SUCCESS1,
                    *tid,
                    DHCHAP_HEADER,
                );
                out[start + 6] = *hl;
                out[start + 8] = u8::from(response.is_some());
                match response {
                    Some(r) => out.extend_from_slice(r),
                    None => out.resize(out.len() + usize::from(*hl), 0),
                }
            }
            Self::Success2 { tid } => {
                head(
                    out,
                    auth_type::DHCHAP,
                    auth_id::SUCCESS2,
                    *tid,
                    DHCHAP_HEADER,
                );
            }
            Self::Failure {
                from,
                tid,
                reason,
                explanation,
            } => {
                let id = match from {
                    FailureFrom::Controller => auth_id::FAILURE1,
                    FailureFrom::Host => auth_id::FAILURE2,
                };
                head(out, auth_type::COMMON, id, *tid, FAILURE_SIZE);
                out[start + 6] = *reason;
                out[start + 7] = *explanation;
            }
        }
    }

    /// The encoded message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_MESSAGE);
        self.encode(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn messages() -> impl Strategy<Value = AuthMessage> {
        let bytes = |n| prop::collection::vec(any::<u8>(), n);
        prop_oneof![
            (any::<u16>(), bytes(0..30usize), bytes(0..30usize)).prop_map(
                |(tid, hashes, dhgroups)| {
                    AuthMessage::Negotiate {
                        tid,
                        sc_c: 0,
                        hashes,
                        dhgroups,
                    }
                }
            ),
            (
                any::<u16>(),
                any::<u8>(),
                any::<u32>(),
                bytes(0..65usize),
                bytes(0..40usize)
            )
                .prop_map(|(tid, hash, seqnum, challenge, dh_value)| {
                    AuthMessage::Challenge {
                        tid,
                        hash,
                        dhgid: 0,
                        seqnum,
                        challenge,
                        dh_value,
                    }
                }),
            (any::<u16>(), bytes(1..65usize), any::<bool>(), any::<u32>()).prop_map(
                |(tid, response, bidi, seqnum)| AuthMessage::Reply {
                    tid,
                    challenge: bidi.then(|| vec![9; response.len()]),
                    response,
                    seqnum,
                    dh_value: Vec::new(),
                }
            ),
            (any::<u16>(), bytes(1..65usize), any::<bool>()).prop_map(|(tid, r, valid)| {
                AuthMessage::Success1 {
                    tid,
                    hl: r.len() as u8,
                    response: valid.then_some(r),
                }
            }),
            any::<u16>().prop_map(|tid| AuthMessage::Success2 { tid }),
            (any::<u16>(), any::<bool>(), any::<u8>()).prop_map(|(tid, c, explanation)| {
                AuthMessage::Failure {
                    from: if c {
                        FailureFrom::Controller
                    } else {
                        FailureFrom::Host
                    },
                    tid,
                    reason: failure::REASON_FAILED,
                    explanation,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in messages()) {
            prop_assert_eq!(AuthMessage::parse(&m.to_bytes()), Ok(m));
        }

        #[test]
        fn truncated_messages_are_errors_not_panics(m in messages(), cut in 0usize..200) {
            let b = m.to_bytes();
            let _ = AuthMessage::parse(&b[..cut.min(b.len())]);
        }

        #[test]
        fn any_bytes_parse_without_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = AuthMessage::parse(&b);
        }
    }

    #[test]
    fn lengths_beyond_the_data_are_refused() {
        let mut b = AuthMessage::Reply {
            tid: 1,
            response: vec![1; 32],
            challenge: None,
            seqnum: 5,
            dh_value: Vec::new(),
        }
        .to_bytes();
        b[6] = 64;
        assert_eq!(
            AuthMessage::parse(&b).unwrap_err().explanation,
            failure::INCORRECT_PAYLOAD
        );
        let mut n = AuthMessage::Negotiate {
            tid: 1,
            sc_c: 0,
            hashes: vec![1],
            dhgroups: vec![0],
        }
        .to_bytes();
        n[NEGOTIATE_HEADER + 2] = 31;
        assert!(AuthMessage::parse(&n).is_err());
        n[7] = 3;
        assert!(AuthMessage::parse(&n[..NEGOTIATE_HEADER + 10]).is_err());
    }

    #[test]
    fn command_fields_live_in_cdw10_and_cdw11() {
        let mut sqe = SubmissionQueueEntry::default();
        AuthCommand::dhchap(72).write_to(&mut sqe);
        assert_eq!(sqe.cdw10, 0xe901_0100);
        assert_eq!(sqe.cdw11, 72);
        assert!(AuthCommand::from_sqe(&sqe).is_dhchap());
    }
}
