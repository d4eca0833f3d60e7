//! Network Block Device wire constants and fixed-size messages, big-endian on the wire: shared
//! by the NBD server (`nvmirror-target`) and the `nbd://` initiator back end.
//!
//! Names and values follow the NBD protocol document (`doc/proto.md` of the reference
//! implementation): "Handshake phase" for the negotiation, "Transmission phase" for requests
//! and simple replies, "Error values" for the errno-like codes.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first 4 bytes of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: a structured reply chunk (only after negotiating them).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (16 bits, server → client).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client → server).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag the protocol defines.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, sent with the export's size).
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option types (`NBD_OPT_*`).
pub mod option {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod reply {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    /// Bit 31: the reply is an error.
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;

    /// The reply type in words, for error messages.
    pub fn name(kind: u32) -> &'static str {
        match kind {
            ACK => "NBD_REP_ACK",
            SERVER => "NBD_REP_SERVER",
            INFO => "NBD_REP_INFO",
            ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
            ERR_POLICY => "NBD_REP_ERR_POLICY (refused by server policy)",
            ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option data)",
            ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on this platform)",
            ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (TLS required)",
            ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
            ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
            ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
            ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too big)",
            k if k & ERR_BIT != 0 => "unknown NBD_REP_ERR",
            _ => "unknown option reply",
        }
    }
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types (`NBD_CMD_*`).
pub mod command {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod command_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
}

/// Error values of the reply's error field ("Error values").
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Bytes of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const REPLY_LEN: usize = 16;
/// Largest payload a client may assume without a block-size report ("Block size
/// constraints": 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Longest export name (the protocol's upper bound for strings).
pub const MAX_NAME_LEN: usize = 4096;

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Self {
        Self {
            magic: be32(&b[0..4]),
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        }
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header: magic, error, handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub magic: u32,
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn parse(b: &[u8; REPLY_LEN]) -> Self {
        Self {
            magic: be32(&b[0..4]),
            error: be32(&b[4..8]),
            handle: be64(&b[8..16]),
        }
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }
}

/// Big-endian u16 from the first 2 bytes of `b`.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Big-endian u32 from the first 4 bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Big-endian u64 from the first 8 bytes of `b`.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_header_round_trips_big_endian() {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: command_flags::NO_HOLE,
            kind: command::WRITE_ZEROES,
            handle: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            len: 0xa0b0_c0d0,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[6..8], &[0, 6]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(RequestHeader::parse(&b), h);
    }

    #[test]
    fn simple_reply_round_trips() {
        let r = SimpleReply {
            magic: SIMPLE_REPLY_MAGIC,
            error: errno::ENOSPC,
            handle: 9,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(be32(&b[4..8]), 28);
        assert_eq!(SimpleReply::parse(&b), r);
    }

    #[test]
    fn reply_names_flag_errors() {
        assert!(reply::name(reply::ERR_UNKNOWN).contains("no such export"));
        assert!(reply::name(reply::ERR_BIT + 99).contains("unknown NBD_REP_ERR"));
    }
}
