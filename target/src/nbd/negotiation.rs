//! The fixed-newstyle handshake as a state machine over received bytes: client flags, then
//! options until `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` picks an export.
//!
//! Pure: it reads from a byte slice and appends replies to a vector, so the connection owns
//! the socket and this file can be tested without one.

use super::export::{Export, ExportTable, TRANSMISSION_FLAGS};
use super::proto::{
    be16, be32, client_flags, info, option, put_option_reply, reply, OptionHeader, IHAVEOPT,
    MAX_OPTION_DATA, OPTION_HEADER_LEN,
};

/// Where the handshake stands after consuming some input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Not enough bytes for the next message; nothing consumed.
    NeedMore,
    /// Consumed this many bytes; call again with the rest.
    Consumed(usize),
    /// Consumed this many bytes and the client chose the export with this name: enter the
    /// transmission phase once the replies are sent.
    Transmission { consumed: usize, export: usize },
    /// Consumed this many bytes; the client aborted: send the replies, then close.
    Abort { consumed: usize },
    /// The client broke the protocol: close at once.
    Reject(&'static str),
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub(crate) struct Negotiation {
    exports: ExportTable,
    /// Client flags received (options follow).
    flags_received: bool,
    /// The client asked to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    no_zeroes: bool,
}

impl Negotiation {
    pub(crate) fn new(exports: ExportTable) -> Self {
        Self {
            exports,
            flags_received: false,
            no_zeroes: false,
        }
    }

    /// Handles the next client message in `input`, appending any replies to `out`.
    pub(crate) fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        if !self.flags_received {
            let Some(b) = input.get(..4) else {
                return Step::NeedMore;
            };
            let flags = be32(b);
            if flags & !client_flags::KNOWN != 0 {
                return Step::Reject("unknown client flags");
            }
            self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
            self.flags_received = true;
            return Step::Consumed(4);
        }
        let Some(h) = input.get(..OPTION_HEADER_LEN) else {
            return Step::NeedMore;
        };
        let h = OptionHeader::parse(h.try_into().expect("16 bytes"));
        if h.magic != IHAVEOPT {
            return Step::Reject("bad option magic");
        }
        if h.len > MAX_OPTION_DATA {
            return Step::Reject("option data too large");
        }
        let total = OPTION_HEADER_LEN + h.len as usize;
        let Some(data) = input.get(OPTION_HEADER_LEN..total) else {
            return Step::NeedMore;
        };
        match h.option {
            option::EXPORT_NAME => match self.index_of(data) {
                Some(i) => {
                    let e = self.export(i);
                    out.extend_from_slice(&e.size().to_be_bytes());
                    out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    if !self.no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    Step::Transmission {
                        consumed: total,
                        export: i,
                    }
                }
                // The protocol gives this option no way to report an error.
                None => Step::Reject("unknown export requested with NBD_OPT_EXPORT_NAME"),
            },
            option::ABORT => {
                put_option_reply(out, h.option, reply::ACK, &[]);
                Step::Abort { consumed: total }
            }
            option::LIST => {
                if data.is_empty() {
                    for e in self.exports.iter() {
                        let name = e.name.as_bytes();
                        let len = (name.len() as u32).to_be_bytes();
                        put_option_reply(out, h.option, reply::SERVER, &[&len, name]);
                    }
                    put_option_reply(out, h.option, reply::ACK, &[]);
                } else {
                    error_reply(
                        out,
                        h.option,
                        reply::ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                }
                Step::Consumed(total)
            }
            option::INFO | option::GO => self.info_or_go(h.option, data, total, out),
            option::STARTTLS => {
                error_reply(out, h.option, reply::ERR_POLICY, "TLS is not offered");
                Step::Consumed(total)
            }
            _ => {
                // Includes NBD_OPT_STRUCTURED_REPLY: only simple replies are sent.
                error_reply(out, h.option, reply::ERR_UNSUP, "option not supported");
                Step::Consumed(total)
            }
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, request count, requested info types.
    fn info_or_go(&self, opt: u32, data: &[u8], total: usize, out: &mut Vec<u8>) -> Step {
        let Some(parsed) = parse_info_request(data) else {
            error_reply(out, opt, reply::ERR_INVALID, "malformed info request");
            return Step::Consumed(total);
        };
        let (name, requests) = parsed;
        let Some(i) = self.index_of(name) else {
            error_reply(out, opt, reply::ERR_UNKNOWN, "no such export");
            return Step::Consumed(total);
        };
        let e = self.export(i);
        let mut export_info = [0u8; 12];
        export_info[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
        export_info[2..10].copy_from_slice(&e.size().to_be_bytes());
        export_info[10..12].copy_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        put_option_reply(out, opt, reply::INFO, &[&export_info]);
        // Block sizes are sent whether or not the client asked: the protocol allows it, and
        // requests not aligned to the minimum are refused.
        let (min, preferred, max) = e.block_sizes();
        let mut sizes = [0u8; 14];
        sizes[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        sizes[2..6].copy_from_slice(&min.to_be_bytes());
        sizes[6..10].copy_from_slice(&preferred.to_be_bytes());
        sizes[10..14].copy_from_slice(&max.to_be_bytes());
        put_option_reply(out, opt, reply::INFO, &[&sizes]);
        // Each info type is answered once, however often it is asked for: the reply to one
        // option stays a few KiB whatever its request list (up to 32 767 entries) says.
        let (mut name_sent, mut description_sent) = (false, false);
        for req in requests.chunks_exact(2).map(be16) {
            let first = match req {
                info::NAME => !std::mem::replace(&mut name_sent, true),
                info::DESCRIPTION => !std::mem::replace(&mut description_sent, true),
                _ => false,
            };
            if !first {
                continue;
            }
            match req {
                info::NAME => put_option_reply(
                    out,
                    opt,
                    reply::INFO,
                    &[&info::NAME.to_be_bytes(), e.name.as_bytes()],
                ),
                info::DESCRIPTION => put_option_reply(
                    out,
                    opt,
                    reply::INFO,
                    &[&info::DESCRIPTION.to_be_bytes(), e.device.name().as_bytes()],
                ),
                // EXPORT and BLOCK_SIZE went out above; unknown requests are ignored.
                _ => {}
            }
        }
        put_option_reply(out, opt, reply::ACK, &[]);
        if opt == option::GO {
            Step::Transmission {
                consumed: total,
                export: i,
            }
        } else {
            Step::Consumed(total)
        }
    }

    fn index_of(&self, name: &[u8]) -> Option<usize> {
        self.exports.find(name)
    }

    /// The export at an index `index_of` returned.
    fn export(&self, index: usize) -> &Export {
        self.exports.get(index).expect("index from index_of")
    }
}

/// Splits INFO/GO data into the export name and the list of requested info types (2 bytes
/// each); `None` if the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_len = be32(data.get(..4)?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count = be16(data.get(name_end..name_end + 2)?) as usize;
    let requests = data.get(name_end + 2..)?;
    (requests.len() == count * 2).then_some((name, requests))
}

fn error_reply(out: &mut Vec<u8>, opt: u32, kind: u32, message: &str) {
    put_option_reply(out, opt, kind, &[message.as_bytes()]);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nvmirror_nvme::backend::NullDevice;

    use super::*;
    use crate::nbd::proto::{be64, OPTION_REPLY_MAGIC};

    fn table() -> ExportTable {
        ExportTable::new(vec![
            Export::new(
                "vol0".into(),
                Arc::new(NullDevice::new(1 << 20, 512).unwrap()),
                u64::MAX,
            ),
            Export::new(
                "big".into(),
                Arc::new(NullDevice::new(1 << 30, 4096).unwrap()),
                u64::MAX,
            ),
        ])
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// Splits option replies into (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(be64(&out[0..8]), OPTION_REPLY_MAGIC);
            let len = be32(&out[16..20]) as usize;
            v.push((
                be32(&out[8..12]),
                be32(&out[12..16]),
                out[20..20 + len].to_vec(),
            ));
            out = &out[20 + len..];
        }
        v
    }

    fn negotiated() -> Negotiation {
        let mut n = Negotiation::new(table());
        let mut out = Vec::new();
        assert_eq!(n.advance(&3u32.to_be_bytes(), &mut out), Step::Consumed(4));
        n
    }

    #[test]
    fn go_sends_export_and_block_size_then_ack() {
        let mut n = negotiated();
        let mut out = Vec::new();
        let msg = opt(option::GO, &go_data("big", &[info::BLOCK_SIZE, info::NAME]));
        assert_eq!(
            n.advance(&msg[..msg.len() - 1], &mut out),
            Step::NeedMore,
            "a partial option waits"
        );
        assert_eq!(
            n.advance(&msg, &mut out),
            Step::Transmission {
                consumed: msg.len(),
                export: 1
            }
        );
        let r = replies(&out);
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].0, r[0].1), (option::GO, reply::INFO));
        assert_eq!(be16(&r[0].2[0..2]), info::EXPORT);
        assert_eq!(be64(&r[0].2[2..10]), 1 << 30);
        assert_eq!(be16(&r[0].2[10..12]), TRANSMISSION_FLAGS);
        assert_eq!(be16(&r[1].2[0..2]), info::BLOCK_SIZE);
        assert_eq!(be32(&r[1].2[2..6]), 4096);
        assert_eq!(be32(&r[1].2[10..14]), 32 << 20);
        assert_eq!(&r[2].2[2..], b"big");
        assert_eq!(r[3].1, reply::ACK);
    }

    #[test]
    fn repeated_info_requests_are_answered_once() {
        let mut n = negotiated();
        let mut out = Vec::new();
        let asks: Vec<u16> = (0..20_000)
            .map(|i| {
                if i % 2 == 0 {
                    info::NAME
                } else {
                    info::DESCRIPTION
                }
            })
            .collect();
        let msg = opt(option::INFO, &go_data("big", &asks));
        assert_eq!(n.advance(&msg, &mut out), Step::Consumed(msg.len()));
        let r = replies(&out);
        // EXPORT, BLOCK_SIZE, NAME, DESCRIPTION, ACK: not 20 000 replies.
        assert_eq!(
            r.len(),
            5,
            "{:?}",
            r.iter().map(|x| x.1).collect::<Vec<_>>()
        );
        assert!(out.len() < 512, "{} bytes of replies", out.len());
    }

    #[test]
    fn unknown_export_and_malformed_info_are_errors_not_closes() {
        let mut n = negotiated();
        let mut out = Vec::new();
        let msg = opt(option::INFO, &go_data("nope", &[]));
        assert_eq!(n.advance(&msg, &mut out), Step::Consumed(msg.len()));
        assert_eq!(replies(&out)[0].1, reply::ERR_UNKNOWN);
        out.clear();
        let mut bad = go_data("vol0", &[info::NAME]);
        bad.pop();
        let msg = opt(option::GO, &bad);
        assert_eq!(n.advance(&msg, &mut out), Step::Consumed(msg.len()));
        assert_eq!(replies(&out)[0].1, reply::ERR_INVALID);
        out.clear();
        let msg = opt(option::GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(n.advance(&msg, &mut out), Step::Consumed(msg.len()));
        assert_eq!(replies(&out)[0].1, reply::ERR_INVALID);
    }

    #[test]
    fn list_unsupported_abort_and_export_name() {
        let mut n = negotiated();
        let mut out = Vec::new();
        let msg = opt(option::LIST, &[]);
        n.advance(&msg, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, &r[0].2[4..]), (reply::SERVER, &b"vol0"[..]));
        assert_eq!((r[1].1, &r[1].2[4..]), (reply::SERVER, &b"big"[..]));
        assert_eq!(r[2].1, reply::ACK);
        out.clear();
        for o in [option::STRUCTURED_REPLY, 99] {
            let msg = opt(o, b"xyz");
            assert_eq!(n.advance(&msg, &mut out), Step::Consumed(msg.len()));
            assert_eq!(replies(&out).pop().unwrap().1, reply::ERR_UNSUP);
        }
        out.clear();
        let msg = opt(option::EXPORT_NAME, b"");
        assert_eq!(
            n.advance(&msg, &mut out),
            Step::Transmission {
                consumed: msg.len(),
                export: 0
            },
            "the empty name is the default export"
        );
        assert_eq!(out.len(), 10, "no zeroes were negotiated");
        let msg = opt(option::EXPORT_NAME, b"missing");
        assert!(matches!(n.advance(&msg, &mut out), Step::Reject(_)));
        out.clear();
        let msg = opt(option::ABORT, &[]);
        assert_eq!(
            n.advance(&msg, &mut out),
            Step::Abort {
                consumed: msg.len()
            }
        );
        assert_eq!(replies(&out)[0].1, reply::ACK);
    }

    #[test]
    fn bad_flags_bad_magic_and_huge_options_close() {
        let mut n = Negotiation::new(table());
        assert!(matches!(
            n.advance(&0x8000_0001u32.to_be_bytes(), &mut Vec::new()),
            Step::Reject(_)
        ));
        let mut n = negotiated();
        let mut msg = opt(option::LIST, &[]);
        msg[0] ^= 1;
        assert!(matches!(n.advance(&msg, &mut Vec::new()), Step::Reject(_)));
        let mut msg = opt(option::LIST, &[]);
        msg[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        assert!(matches!(n.advance(&msg, &mut Vec::new()), Step::Reject(_)));
    }

    #[test]
    fn zeroes_follow_export_name_unless_declined() {
        let mut n = Negotiation::new(table());
        let mut out = Vec::new();
        n.advance(&1u32.to_be_bytes(), &mut out);
        n.advance(&opt(option::EXPORT_NAME, b"vol0"), &mut out);
        assert_eq!(out.len(), 8 + 2 + 124);
    }
}
