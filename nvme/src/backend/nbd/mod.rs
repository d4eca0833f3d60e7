//! `nbd://` — an export of a Network Block Device server (nvmirror's own, `nbdkit`,
//! `qemu-nbd`, `nbd-server`) as a [`BlockDevice`]: nvmirror's NBD initiator.
//!
//! [`NbdDevice::connect`] opens one connection with the fixed-newstyle handshake
//! (`NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` for servers without it) to learn the export's
//! size, transmission flags and block sizes, and keeps it for the first queue pair. Every
//! further [`open_qpair`](BlockDevice::open_qpair) opens one more connection (NBD
//! multi-connection), so each [`NbdQueuePair`] owns its socket and its core drives it
//! without locks. Connections beyond the first need the server's `CAN_MULTI_CONN` flag.
//!
//! ```no_run
//! use nvmirror_nvme::backend::{NbdDevice, NbdOptions};
//! use nvmirror_nvme::BlockDevice;
//!
//! let dev = NbdDevice::connect("127.0.0.1:10809", &NbdOptions::new("vol0"))?;
//! let mut qp = dev.open_qpair(32)?;
//! # Ok::<(), nvmirror_nvme::Error>(())
//! ```

mod handshake;
mod qpair;
mod receive;
mod status;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use handshake::ExportInfo;
use handshake::Peer;
pub use qpair::NbdQueuePair;

use crate::queue::{BlockDevice, QueuePair};
use crate::spec::nbd::transmission_flags as tf;
use crate::spec::Geometry;
use crate::{Error, Result};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Connections (queue pairs) open at once when the URI does not say.
pub const DEFAULT_CONNECTIONS: u32 = 16;
/// Connect, handshake and I/O timeout when the URI does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect and handshake timeout when the I/O timeout is off.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to connect to and how (the path and query of an `nbd://` URI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Export name; empty selects the server's default export.
    pub export: String,
    /// Most connections open at once, one per queue pair (default 16). A server without
    /// `CAN_MULTI_CONN` gets one.
    pub connections: u32,
    /// Connect and handshake timeout, and how long a queue pair with commands outstanding
    /// may hear nothing from the server before its connection is declared dead (default
    /// 30 s). Zero turns the I/O timeout off (the handshake then gets 10 s).
    pub timeout: Duration,
    /// Logical block size; `None` takes 512, or the export's minimum block size if larger.
    pub lba_size: Option<u32>,
}

impl NbdOptions {
    /// The defaults for export `export`.
    pub fn new(export: impl Into<String>) -> Self {
        Self {
            export: export.into(),
            connections: DEFAULT_CONNECTIONS,
            timeout: DEFAULT_TIMEOUT,
            lba_size: None,
        }
    }

    fn handshake_timeout(&self) -> Duration {
        if self.timeout.is_zero() {
            HANDSHAKE_TIMEOUT
        } else {
            self.timeout
        }
    }
}

/// What the device and its queue pairs share.
#[derive(Debug)]
pub(super) struct Link {
    peer: Peer,
    opts: NbdOptions,
    info: ExportInfo,
    geo: Geometry,
    /// Connections open now (queue pairs, and the spare one).
    open: AtomicU32,
    /// Most connections allowed at once.
    max_open: u32,
    lost: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Link {
    /// Records that a connection died; the first reason is kept.
    fn lose(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.lost.store(true, Ordering::Release);
    }

    fn close_one(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An export on a remote NBD server.
#[derive(Debug)]
pub struct NbdDevice {
    name: String,
    link: Arc<Link>,
    /// The connection opened by `connect`, kept for the first queue pair.
    spare: Mutex<Option<TcpStream>>,
}

impl NbdDevice {
    /// Connects to the server at `host_port` and negotiates export `opts.export`. Errors name
    /// the step that failed and what the server answered.
    pub fn connect(host_port: &str, opts: &NbdOptions) -> Result<Self> {
        let peer = Peer::resolve(host_port, &opts.export)?;
        let (sock, info) = handshake::connect(&peer, &opts.export, opts.handshake_timeout())?;
        let geo = geometry(&info, opts.lba_size).map_err(|r| peer.err("check the export", r))?;
        let max_open = if info.has(tf::CAN_MULTI_CONN) {
            opts.connections.max(1)
        } else {
            1
        };
        tracing::debug!(target = %peer.label, ?info, "NBD export negotiated");
        Ok(Self {
            name: format!("nbd://{}", peer.label),
            link: Arc::new(Link {
                peer,
                opts: opts.clone(),
                info,
                geo,
                open: AtomicU32::new(1),
                max_open,
                lost: AtomicBool::new(false),
                reason: Mutex::new(None),
            }),
            spare: Mutex::new(Some(sock)),
        })
    }

    /// Renames the device (the URI it was opened from).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// What the server reported for the export.
    pub fn export_info(&self) -> &ExportInfo {
        &self.link.info
    }

    /// Why the device is considered gone (a connection to the server was lost), if it is.
    pub fn lost_reason(&self) -> Option<String> {
        if !self.link.lost.load(Ordering::Acquire) {
            return None;
        }
        self.link
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a connection to the server was lost.
    pub fn is_gone(&self) -> bool {
        self.link.lost.load(Ordering::Acquire)
    }

    /// Opens a queue pair as its concrete type, on a connection of its own. `depth`
    /// commands (1..=65536) may be outstanding at once.
    pub fn open_nbd_qpair(&self, depth: u32) -> Result<NbdQueuePair> {
        let link = &self.link;
        if !(1..=65536).contains(&depth) {
            return Err(Error::QueuePair(format!(
                "{}: depth {depth} is not in 1..=65536",
                link.peer.label
            )));
        }
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let sock = match spare {
            Some(s) => s,
            None => self.open_connection()?,
        };
        match NbdQueuePair::new(Arc::clone(link), sock, depth) {
            Ok(q) => Ok(q),
            Err(e) => {
                link.close_one();
                Err(e)
            }
        }
    }

    /// One more connection, counted in `open`; checked against the first one's export.
    fn open_connection(&self) -> Result<TcpStream> {
        let link = &self.link;
        let n = link.open.fetch_add(1, Ordering::AcqRel);
        if n >= link.max_open {
            link.close_one();
            let why = if link.info.has(tf::CAN_MULTI_CONN) {
                format!(
                    "{} connections are open (URI option connections=)",
                    link.max_open
                )
            } else {
                "the server does not allow more than one connection (no CAN_MULTI_CONN)".into()
            };
            return Err(link.peer.err("open a connection", why));
        }
        let r = handshake::connect(&link.peer, &link.opts.export, link.opts.handshake_timeout())
            .and_then(|(sock, info)| {
                if info.size != link.info.size || info.flags != link.info.flags {
                    Err(link.peer.err(
                        "open a connection",
                        format!(
                            "the export changed: size {} flags {:#x}, was size {} flags {:#x}",
                            info.size, info.flags, link.info.size, link.info.flags
                        ),
                    ))
                } else {
                    Ok(sock)
                }
            });
        if r.is_err() {
            link.close_one();
        }
        r
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        let spare = self
            .spare
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = spare {
            qpair::disconnect(s);
            self.link.close_one();
        }
    }
}

impl BlockDevice for NbdDevice {
    fn geometry(&self) -> Geometry {
        self.link.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(self.open_nbd_qpair(depth)?))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The namespace an export gives: blocks of `lba` (or 512, or the export's minimum block
/// size if larger); a tail shorter than a block is not used.
fn geometry(info: &ExportInfo, lba: Option<u32>) -> std::result::Result<Geometry, String> {
    let lba_size = match lba {
        Some(l) if l < info.min_block => {
            return Err(format!(
                "lba={l} is below the export's minimum block size {}",
                info.min_block
            ))
        }
        Some(l) => l,
        None if info.min_block <= 512 => 512,
        None if info.min_block <= 4096 => 4096,
        None => {
            return Err(format!(
                "the export's minimum block size {} is larger than 4096",
                info.min_block
            ))
        }
    };
    if info.max_block < lba_size {
        return Err(format!(
            "the export's maximum block size {} is below one block of {lba_size}",
            info.max_block
        ));
    }
    let geo = Geometry::from_bytes(info.size, lba_size)
        .ok_or_else(|| format!("block size {lba_size} is not 512 or 4096"))?;
    if geo.num_blocks == 0 {
        return Err(format!(
            "the export has {} bytes, less than one block",
            info.size
        ));
    }
    Ok(geo)
}

#[cfg(test)]
mod tests;
