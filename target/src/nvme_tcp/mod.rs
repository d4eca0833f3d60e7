//! The NVMe/TCP target (NVMe/TCP Transport 1.0, NVMe-oF 1.1).
//!
//! A listener thread accepts connections and hands each to a reactor, round robin. There a
//! `Connection` poller owns the socket, the queue's command slots,
//! their data buffers and, for an I/O queue, one queue pair per namespace opened on that
//! core: nothing on the I/O path crosses a core, takes a lock or allocates. Per poll a
//! connection does one `recv`, parses every complete PDU, submits, reaps completions and
//! does one `send`.
//!
//! Controllers are created by the admin queue's Connect (dynamic controller model) and torn
//! down when their admin queue goes away or the keep-alive timer expires; I/O queues attach
//! by controller ID and close with their controller.

mod admin;
mod ana;
mod async_event;
mod auth;
mod connection;
mod discovery;
mod dispatch;
mod fabrics;
mod io;
mod listener;
mod reconfigure;
mod request;
mod reservation;
mod subsystem;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::BlockDevice;
use nvmirror_poller::ReactorHandle;

use crate::{Error, Result};
pub use auth::HostSecrets;
pub(crate) use listener::RefusalLog;
pub use listener::{AnaGroupState, NamespaceInfo, NvmeTcpTarget, SubsystemInfo};
pub use nvmirror_nvme::spec::ana::AnaState;

/// One NVM subsystem to export.
#[derive(Clone, Debug)]
pub struct SubsystemConfig {
    /// NVMe qualified name hosts connect to.
    pub nqn: String,
    /// Serial number (Identify Controller SN, up to 20 ASCII characters).
    pub serial: String,
    /// Model number (up to 40 ASCII characters).
    pub model: String,
    /// Host NQNs allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
    /// DH-HMAC-CHAP secrets per host NQN: a host listed here must authenticate every queue.
    pub host_secrets: std::collections::HashMap<String, HostSecrets>,
    /// Namespaces, NSID 1.. in order.
    pub namespaces: Vec<Arc<dyn BlockDevice>>,
    /// Where each namespace's reservation state is kept while Persist Through Power Loss is
    /// set (`<device>.ns<NSID>.reservations.json`); `None`: PTPL is not offered and
    /// reservations last as long as the process.
    pub reservation_dir: Option<PathBuf>,
}

impl SubsystemConfig {
    /// A subsystem open to any host, with a serial derived from the NQN.
    pub fn new(nqn: impl Into<String>, namespaces: Vec<Arc<dyn BlockDevice>>) -> Self {
        let nqn = nqn.into();
        let serial = format!("{:08x}", crc32c::crc32c(nqn.as_bytes()));
        Self {
            nqn,
            serial,
            model: "nvmirror".into(),
            allowed_hosts: Vec::new(),
            host_secrets: std::collections::HashMap::new(),
            namespaces,
            reservation_dir: None,
        }
    }
}

/// Target-wide settings. Every limit is advertised to hosts and enforced.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// Address to listen on (NVM subsystem port 0).
    pub listen: SocketAddr,
    /// The ANA state every namespace's group starts in through `listen`.
    pub ana_state: AnaState,
    /// More addresses to listen on: ports 1, 2, ... of every subsystem, each with its own
    /// ANA states.
    pub more_listeners: Vec<ListenerConfig>,
    /// Dynamic controller IDs are taken from `cntlid_min..=cntlid_max`: two targets exporting
    /// the same subsystem give disjoint ranges, so a host sees distinct controllers.
    pub cntlid_min: u16,
    pub cntlid_max: u16,
    pub subsystems: Vec<SubsystemConfig>,
    /// Largest I/O queue a host may connect, in entries (CAP.MQES + 1).
    pub max_queue_size: u16,
    /// Largest admin queue a host may connect, in entries (ASQSZ in the discovery log; at
    /// least 32). SPDK's abort example asks for its queue depth + 8 to hold an Abort per
    /// outstanding command.
    pub max_admin_queue_size: u16,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// In-capsule data an I/O command may carry (ICCSZ minus the SQE).
    pub in_capsule_data_size: u32,
    /// Largest H2CData PDU payload (MAXH2CDATA).
    pub maxh2cdata: u32,
    /// Maximum data transfer size as a power of two of 4 KiB pages (Identify MDTS).
    pub mdts: u8,
    /// Connections open at once (handshaking or connected); more are closed at accept.
    pub max_connections: usize,
    /// A connection that has not finished ICReq and Fabrics Connect within this is closed.
    pub handshake_timeout: Duration,
    /// Command-buffer bytes one connection may hold (queue entries x MDTS): the largest queue
    /// advertised in CAP.MQES is what fits.
    pub connection_buffer_budget: u64,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4420)),
            ana_state: AnaState::Optimized,
            more_listeners: Vec::new(),
            cntlid_min: 1,
            cntlid_max: MAX_CNTLID,
            subsystems: Vec::new(),
            max_queue_size: 128,
            max_admin_queue_size: DEFAULT_MAX_ADMIN_QUEUE_SIZE,
            max_io_queues: 16,
            in_capsule_data_size: 8192,
            maxh2cdata: 128 * 1024,
            mdts: 5,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connection_buffer_budget: DEFAULT_CONNECTION_BUFFER_BUDGET,
        }
    }
}

/// One more listening address of a target and the ANA state its groups start in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    pub ana_state: AnaState,
}

/// Highest dynamic controller ID (0xFFF0..=0xFFFF are reserved).
pub const MAX_CNTLID: u16 = 0xffef;

/// The admin queue always accepts 8 KiB of in-capsule data (the Linux host sends up to that).
pub(crate) const ADMIN_IN_CAPSULE: u32 = 8192;
/// Buffer per admin command: an Identify page, a log page of up to 32 KiB (the discovery
/// log of 31 subsystems), 8 KiB of in-capsule data. The admin queue never moves I/O data.
pub(crate) const ADMIN_MAX_TRANSFER: u32 = 32 * 1024;

/// Smallest admin queue a fabrics controller must take (NVMe-oF: ASQSZ is at least 32).
pub const MIN_ADMIN_QUEUE_SIZE: u16 = 32;
/// Default largest admin queue: room for an Abort per command of a 128-deep I/O queue and
/// then some (SPDK's abort example at its defaults asks for 136).
pub const DEFAULT_MAX_ADMIN_QUEUE_SIZE: u16 = 256;

/// Default connections per front end.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default bound on ICReq + Connect (NVMe/TCP) and on the NBD handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default command-buffer budget per NVMe/TCP connection: 64 MiB, a 512-entry queue of
/// 128 KiB commands.
pub const DEFAULT_CONNECTION_BUFFER_BUDGET: u64 = 64 << 20;

impl TargetConfig {
    /// Largest transfer of one command in bytes.
    pub fn max_transfer(&self) -> u32 {
        4096u32 << self.mdts
    }

    /// Bytes one queue entry's buffer takes: MDTS on I/O queues, at least the admin
    /// in-capsule size.
    fn entry_bytes(&self) -> u64 {
        u64::from(self.max_transfer().max(ADMIN_IN_CAPSULE))
    }

    /// Buffer per admin command: [`ADMIN_MAX_TRANSFER`], or less where one I/O entry is less
    /// (the admin queue then fits the same budget).
    pub(crate) fn admin_transfer(&self) -> u32 {
        ADMIN_MAX_TRANSFER.min(self.entry_bytes() as u32)
    }

    /// The largest queue a host may connect: `max_queue_size`, less where the per-connection
    /// buffer budget does not cover that many entries of MDTS bytes (CAP.MQES + 1).
    pub fn effective_max_queue_size(&self) -> u16 {
        let fits = self.connection_buffer_budget / self.entry_bytes();
        self.max_queue_size
            .min(u16::try_from(fits).unwrap_or(u16::MAX))
            .max(2)
    }

    /// The largest admin queue a host may connect (ASQSZ): `max_admin_queue_size`, less
    /// where the buffer budget does not cover that many admin entries, never below 32.
    pub fn effective_max_admin_queue_size(&self) -> u16 {
        let fits = self.connection_buffer_budget / u64::from(self.admin_transfer());
        self.max_admin_queue_size
            .min(u16::try_from(fits).unwrap_or(u16::MAX))
            .max(MIN_ADMIN_QUEUE_SIZE)
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Config(s));
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be above 0".into());
        }
        if self.connection_buffer_budget < 2 * self.entry_bytes() {
            return bad(format!(
                "connection_buffer_budget {} below two commands of MDTS ({} bytes)",
                self.connection_buffer_budget,
                2 * self.entry_bytes()
            ));
        }
        if !(2..=4096).contains(&self.max_queue_size) {
            return bad(format!(
                "max_queue_size {} not in 2..=4096",
                self.max_queue_size
            ));
        }
        if !(MIN_ADMIN_QUEUE_SIZE..=4096).contains(&self.max_admin_queue_size) {
            return bad(format!(
                "max_admin_queue_size {} not in {MIN_ADMIN_QUEUE_SIZE}..=4096",
                self.max_admin_queue_size
            ));
        }
        if !(1..=256).contains(&self.max_io_queues) {
            return bad(format!(
                "max_io_queues {} not in 1..=256",
                self.max_io_queues
            ));
        }
        if self.mdts > 8 {
            return bad(format!("mdts {} above 8 (1 MiB)", self.mdts));
        }
        if self.maxh2cdata < 4096 || self.maxh2cdata % 4 != 0 {
            return bad(format!(
                "maxh2cdata {} below 4096 or unaligned",
                self.maxh2cdata
            ));
        }
        if self.in_capsule_data_size % 16 != 0 || self.in_capsule_data_size > 65536 {
            return bad(format!(
                "in_capsule_data_size {} not a multiple of 16 up to 64 KiB",
                self.in_capsule_data_size
            ));
        }
        if self.cntlid_min == 0 || self.cntlid_min > self.cntlid_max || self.cntlid_max > MAX_CNTLID
        {
            return bad(format!(
                "cntlid range {}..={} not within 1..={MAX_CNTLID}",
                self.cntlid_min, self.cntlid_max
            ));
        }
        for (i, s) in self.subsystems.iter().enumerate() {
            if s.nqn.is_empty() || s.nqn.len() > nvmirror_nvme::spec::fabrics::NQN_MAX_LEN {
                return bad(format!("subsystem {i}: NQN must be 1..=223 bytes"));
            }
            if s.nqn == nvmirror_nvme::spec::fabrics::DISCOVERY_NQN {
                return bad("the discovery NQN is reserved".into());
            }
            if self.subsystems[..i].iter().any(|o| o.nqn == s.nqn) {
                return bad(format!("subsystem NQN {} appears twice", s.nqn));
            }
            for ns in &s.namespaces {
                if ns.geometry().lba_size > self.max_transfer() {
                    return bad(format!("{}: block larger than MDTS", ns.name()));
                }
            }
        }
        Ok(())
    }
}

/// Pieces of the target the fuzz entry points in [`crate::fuzzing`] put together by hand.
pub(crate) mod fuzzing {
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;

    pub(crate) use super::connection::Connection;
    pub(crate) use super::subsystem::TargetShared;
    use super::TargetConfig;

    /// The state a listener on `cfg` would share with its connections.
    pub(crate) fn shared(cfg: TargetConfig) -> Arc<TargetShared> {
        cfg.validate().expect("a valid fuzz target configuration");
        let listen = cfg.listen;
        Arc::new(TargetShared::new(cfg, vec![listen]).expect("no saved reservation state"))
    }

    /// A connection as the listener sets it up for an accepted socket.
    pub(crate) fn connection(
        sock: TcpStream,
        peer: SocketAddr,
        shared: &Arc<TargetShared>,
    ) -> Connection {
        Connection::new(sock, peer, Arc::clone(shared)).expect("set up a loopback connection")
    }
}

/// Starts the target on the given reactors (also reachable as [`NvmeTcpTarget::start`]).
pub fn start(cfg: TargetConfig, reactors: &ReactorHandle) -> Result<NvmeTcpTarget> {
    NvmeTcpTarget::start(cfg, reactors)
}
