//! The fixed-newstyle handshake of one connection ("Handshake phase" of the NBD protocol),
//! on a blocking socket with timeouts: greeting, client flags, then `NBD_OPT_GO` for the
//! export (asking for its block sizes), or `NBD_OPT_EXPORT_NAME` when the server does not
//! know `NBD_OPT_GO`. Structured replies are never asked for, so the server answers every
//! request with a simple reply. Every failure names its step.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::spec::nbd::{
    be16, be32, be64, client_flags, handshake_flags, info, option, reply, transmission_flags,
    DEFAULT_MAX_PAYLOAD, IHAVEOPT, NBDMAGIC, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC,
};
use crate::{Error, Result};

/// The magic an oldstyle server sends instead of `IHAVEOPT`.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Largest option reply data read; anything larger is a broken server.
const MAX_REPLY_DATA: usize = 64 << 10;
/// Option replies read for one `NBD_OPT_GO` before giving up on the server.
const MAX_INFO_REPLIES: usize = 64;

/// Who a connection talks to, for error messages.
#[derive(Clone, Debug)]
pub(super) struct Peer {
    /// `HOST:PORT/EXPORT`.
    pub label: String,
    pub addrs: Vec<SocketAddr>,
}

impl Peer {
    /// Resolves `host_port` for export `export`.
    pub fn resolve(host_port: &str, export: &str) -> Result<Self> {
        let label = format!("{host_port}/{export}");
        let addrs: Vec<SocketAddr> = match host_port.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => return Err(err(&label, "resolve the address", e.to_string())),
        };
        if addrs.is_empty() {
            return Err(err(&label, "resolve the address", "no address found"));
        }
        Ok(Self { label, addrs })
    }

    /// An error of `step`.
    pub fn err(&self, step: &str, reason: impl Into<String>) -> Error {
        err(&self.label, step, reason)
    }
}

fn err(label: &str, step: &str, reason: impl Into<String>) -> Error {
    Error::Nbd {
        target: label.to_string(),
        step: step.to_string(),
        reason: reason.into(),
    }
}

/// What the server told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`); zero when the server did not set `HAS_FLAGS`.
    pub flags: u16,
    /// Minimum, preferred and maximum block size (`NBD_INFO_BLOCK_SIZE`; 1, 4096 and
    /// 32 MiB when not reported).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Whether `NBD_OPT_EXPORT_NAME` was used because the server does not know `NBD_OPT_GO`.
    pub used_export_name: bool,
}

impl ExportInfo {
    /// Whether the server advertises transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Opens a TCP connection to `peer` and negotiates export `export`; returns the socket,
/// ready for the transmission phase (still blocking), and what the server said.
pub(super) fn connect(
    peer: &Peer,
    export: &str,
    timeout: Duration,
) -> Result<(TcpStream, ExportInfo)> {
    let mut last = None;
    let mut sock = None;
    for a in &peer.addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some((a, e)),
        }
    }
    let mut sock = match (sock, last) {
        (Some(s), _) => s,
        (None, Some((a, e))) => return Err(peer.err(&format!("TCP connect to {a}"), e.to_string())),
        (None, None) => return Err(peer.err("TCP connect", "no address")),
    };
    let setup = |r: std::io::Result<()>| r.map_err(|e| peer.err("socket setup", e.to_string()));
    setup(sock.set_nodelay(true))?;
    setup(sock.set_read_timeout(Some(timeout)))?;
    setup(sock.set_write_timeout(Some(timeout)))?;
    let info = negotiate(&mut sock, peer, export)?;
    Ok((sock, info))
}

/// The handshake on a connected socket.
fn negotiate(s: &mut TcpStream, peer: &Peer, export: &str) -> Result<ExportInfo> {
    let mut greeting = [0u8; 18];
    read(s, &mut greeting, peer, "read the greeting")?;
    if be64(&greeting[0..8]) != NBDMAGIC {
        return Err(peer.err("read the greeting", "not an NBD server (no NBDMAGIC)"));
    }
    match be64(&greeting[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(peer.err(
                "read the greeting",
                "the server speaks the oldstyle handshake, which names no export",
            ))
        }
        m => return Err(peer.err("read the greeting", format!("unknown magic {m:#x}"))),
    }
    let hflags = be16(&greeting[16..18]);
    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(peer.err(
            "read the greeting",
            "the server does not offer the fixed newstyle handshake",
        ));
    }
    let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
    let cflags = client_flags::FIXED_NEWSTYLE
        | if no_zeroes {
            client_flags::NO_ZEROES
        } else {
            0
        };
    write(s, &cflags.to_be_bytes(), peer, "send the client flags")?;

    // NBD_OPT_GO: name length, name, one information request (block sizes).
    let name = export.as_bytes();
    let mut data = Vec::with_capacity(name.len() + 8);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, option::GO, &data, peer)?;
    let mut got = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_block: DEFAULT_MAX_PAYLOAD,
        used_export_name: false,
    };
    let mut have_export = false;
    for _ in 0..MAX_INFO_REPLIES {
        let (kind, body) = read_option_reply(s, option::GO, peer)?;
        match kind {
            reply::INFO => parse_info(&body, &mut got, &mut have_export, peer)?,
            reply::ACK if have_export => return Ok(got),
            reply::ACK => {
                return Err(peer.err(
                    "NBD_OPT_GO",
                    "the server acknowledged without sending NBD_INFO_EXPORT",
                ))
            }
            reply::ERR_UNSUP => return export_name(s, peer, export, no_zeroes),
            reply::ERR_UNKNOWN => {
                return Err(peer.err(
                    "NBD_OPT_GO",
                    format!("no export named '{export}'{}", message(&body)),
                ))
            }
            k => {
                return Err(peer.err(
                    "NBD_OPT_GO",
                    format!("{}{}", reply::name(k), message(&body)),
                ))
            }
        }
    }
    Err(peer.err("NBD_OPT_GO", "too many information replies"))
}

/// One `NBD_REP_INFO` body.
fn parse_info(b: &[u8], got: &mut ExportInfo, have: &mut bool, peer: &Peer) -> Result<()> {
    let bad = |what: &str| peer.err("NBD_OPT_GO", format!("malformed {what} information"));
    if b.len() < 2 {
        return Err(bad("short"));
    }
    match be16(b) {
        info::EXPORT => {
            if b.len() != 12 {
                return Err(bad("NBD_INFO_EXPORT"));
            }
            got.size = be64(&b[2..10]);
            got.flags = export_flags(be16(&b[10..12]));
            *have = true;
        }
        info::BLOCK_SIZE => {
            if b.len() != 14 {
                return Err(bad("NBD_INFO_BLOCK_SIZE"));
            }
            let (min, pref, max) = (be32(&b[2..6]), be32(&b[6..10]), be32(&b[10..14]));
            if !min.is_power_of_two() || !pref.is_power_of_two() || max < min {
                return Err(peer.err(
                    "NBD_OPT_GO",
                    format!(
                        "inconsistent block sizes: minimum {min}, preferred {pref}, maximum {max}"
                    ),
                ));
            }
            got.min_block = min;
            got.preferred_block = pref;
            got.max_block = max;
        }
        // Name, description and types from later protocol versions carry nothing we use.
        _ => {}
    }
    Ok(())
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags (and 124 zero bytes unless
/// `NO_ZEROES` was agreed), or closes the connection if it has no such export.
fn export_name(
    s: &mut TcpStream,
    peer: &Peer,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    send_option(s, option::EXPORT_NAME, export.as_bytes(), peer)?;
    let step = "NBD_OPT_EXPORT_NAME";
    let mut b = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { b.len() };
    if let Err(e) = s.read_exact(&mut b[..len]) {
        return Err(peer.err(
            step,
            format!(
                "{e} (the server closes the connection when it has no export named '{export}')"
            ),
        ));
    }
    Ok(ExportInfo {
        size: be64(&b[0..8]),
        flags: export_flags(be16(&b[8..10])),
        min_block: 1,
        preferred_block: 4096,
        max_block: DEFAULT_MAX_PAYLOAD,
        used_export_name: true,
    })
}

/// Transmission flags mean nothing unless `HAS_FLAGS` is set.
fn export_flags(f: u16) -> u16 {
    if f & transmission_flags::HAS_FLAGS != 0 {
        f
    } else {
        0
    }
}

/// `: "message"` for an error reply that carries one.
fn message(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect();
    format!(": \"{text}\"")
}

fn send_option(s: &mut TcpStream, opt: u32, data: &[u8], peer: &Peer) -> Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    write(s, &m, peer, option_name(opt))
}

/// Reads one option reply to `opt`: its type and data.
fn read_option_reply(s: &mut TcpStream, opt: u32, peer: &Peer) -> Result<(u32, Vec<u8>)> {
    let step = option_name(opt);
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    read(s, &mut h, peer, step)?;
    if be64(&h[0..8]) != OPTION_REPLY_MAGIC {
        return Err(peer.err(step, "bad option reply magic"));
    }
    if be32(&h[8..12]) != opt {
        return Err(peer.err(step, format!("reply names option {}", be32(&h[8..12]))));
    }
    let len = be32(&h[16..20]) as usize;
    if len > MAX_REPLY_DATA {
        return Err(peer.err(step, format!("option reply of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    read(s, &mut body, peer, step)?;
    Ok((be32(&h[12..16]), body))
}

fn option_name(opt: u32) -> &'static str {
    match opt {
        option::GO => "NBD_OPT_GO",
        option::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        _ => "option",
    }
}

fn read(s: &mut TcpStream, b: &mut [u8], peer: &Peer, step: &str) -> Result<()> {
    s.read_exact(b).map_err(|e| peer.err(step, e.to_string()))
}

fn write(s: &mut TcpStream, b: &[u8], peer: &Peer, step: &str) -> Result<()> {
    s.write_all(b).map_err(|e| peer.err(step, e.to_string()))
}
