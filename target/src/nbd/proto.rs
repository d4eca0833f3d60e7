//! NBD wire messages as the server uses them. The protocol's constants and fixed-size
//! headers are shared with the `nbd://` initiator and live in
//! [`nvmirror_nvme::spec::nbd`]; this file adds the server's own limits and encoders.
//!
//! Names and values follow the NBD protocol document (`doc/proto.md` of the reference
//! implementation): "Handshake phase" for the negotiation, "Transmission phase" for requests
//! and simple replies, "Error values" for the errno-like codes.

pub use nvmirror_nvme::spec::nbd::{
    client_flags, command, command_flags, errno, handshake_flags, info, option, reply,
    transmission_flags, RequestHeader, GREETING_LEN, IHAVEOPT, MAX_NAME_LEN, NBDMAGIC,
    OPTION_HEADER_LEN, OPTION_REPLY_MAGIC, REPLY_LEN, REQUEST_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
};

pub(crate) use nvmirror_nvme::spec::nbd::{be16, be32, be64};

/// Largest read or write payload accepted (and advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data accepted during negotiation; a larger option closes the connection.
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// The server's greeting, with `FIXED_NEWSTYLE | NO_ZEROES`.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    g
}

/// An option header as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Self {
        Self {
            magic: be64(&b[0..8]),
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        }
    }
}

/// Appends an option reply header and its data to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[&[u8]]) {
    let len: usize = data.iter().map(|d| d.len()).sum();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for d in data {
        out.extend_from_slice(d);
    }
}

/// A simple reply header: magic, error, handle.
pub fn simple_reply(error: u32, handle: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be16(&g[16..18]), 3);
    }

    #[test]
    fn option_reply_carries_its_length() {
        let mut out = Vec::new();
        put_option_reply(
            &mut out,
            option::LIST,
            reply::SERVER,
            &[&[0, 0, 0, 2], b"ab"],
        );
        assert_eq!(be64(&out[0..8]), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&out[8..12]), option::LIST);
        assert_eq!(be32(&out[12..16]), reply::SERVER);
        assert_eq!(be32(&out[16..20]), 6);
        assert_eq!(&out[20..], &[0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(errno::ENOSPC, 9);
        assert_eq!(be32(&r[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&r[4..8]), 28);
        assert_eq!(be64(&r[8..16]), 9);
    }
}
