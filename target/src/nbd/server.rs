//! The listener: a small thread blocks in `accept` and hands each connection, round-robin,
//! to a reactor, where a [`Connection`] poller owns it from then on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmirror_nvme::BlockDevice;
use nvmirror_poller::ReactorHandle;

use super::connection::Connection;
use super::export::{Export, ExportTable};
use super::proto::MAX_NAME_LEN;
use super::{Error, Result};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// How long [`NbdServer::shutdown`] waits for connections to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Address to listen on (default `127.0.0.1:10809`; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Export names and their devices. The first export is also served under the empty
    /// name (the protocol's default export).
    pub exports: Vec<(String, Arc<dyn BlockDevice>)>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
            exports: Vec::new(),
        }
    }
}

/// Bounds on what clients can hold open ([`NbdServer::start_with_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// A connection still negotiating after this is closed.
    pub handshake_timeout: Duration,
    /// Bytes of request buffers per connection: bounds the maximum payload advertised and
    /// accepted (at most 32 MiB, at least 256 KiB).
    pub connection_buffer_budget: u64,
}

impl Default for NbdLimits {
    fn default() -> Self {
        Self {
            max_connections: crate::nvme_tcp::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: crate::nvme_tcp::DEFAULT_HANDSHAKE_TIMEOUT,
            connection_buffer_budget: crate::nvme_tcp::DEFAULT_CONNECTION_BUFFER_BUDGET,
        }
    }
}

/// State shared by the listener, the connections and the server handle.
#[derive(Debug)]
pub(crate) struct ServerState {
    stop: AtomicBool,
    connections: AtomicUsize,
    /// How long a connection may negotiate.
    pub(crate) handshake_timeout: Duration,
}

impl Default for ServerState {
    fn default() -> Self {
        Self {
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            handshake_timeout: crate::nvme_tcp::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl ServerState {
    /// Whether the server is shutting down (connections drain and close).
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Counts a connection as live until dropped, wherever it is dropped (on its reactor, or
/// in an undelivered message).
#[derive(Debug)]
pub(crate) struct LiveConnection(Arc<ServerState>);

impl LiveConnection {
    pub(crate) fn new(state: &Arc<ServerState>) -> Self {
        state.connections.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(state))
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running NBD server. Dropping it shuts it down like [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct NbdServer {
    local_addr: SocketAddr,
    state: Arc<ServerState>,
    acceptor: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Validates the exports, binds the listening socket and starts accepting; each
    /// connection is served by a poller on one of `reactors`, chosen round-robin. The
    /// default [`NbdLimits`] apply.
    pub fn start(cfg: NbdConfig, reactors: &ReactorHandle) -> Result<Self> {
        Self::start_with_limits(cfg, NbdLimits::default(), reactors)
    }

    /// [`start`](Self::start) with the given connection limits.
    pub fn start_with_limits(
        cfg: NbdConfig,
        limits: NbdLimits,
        reactors: &ReactorHandle,
    ) -> Result<Self> {
        if limits.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if limits.handshake_timeout.is_zero() {
            return Err(Error::Config("handshake_timeout must be above 0".into()));
        }
        let max_connections = limits.max_connections;
        let exports = validate(cfg.exports, limits.connection_buffer_budget)?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| Error::Listen {
            addr: cfg.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Socket {
            op: "getsockname",
            source,
        })?;
        let state = Arc::new(ServerState {
            handshake_timeout: limits.handshake_timeout,
            ..ServerState::default()
        });
        let acceptor = {
            let state = Arc::clone(&state);
            let reactors = reactors.clone();
            std::thread::Builder::new()
                .name("nvmirror-nbd-accept".into())
                .spawn(move || accept_loop(listener, exports, reactors, state, max_connections))
                .map_err(|source| Error::Socket {
                    op: "spawning the NBD accept thread",
                    source,
                })?
        };
        tracing::info!(%local_addr, "NBD server listening");
        Ok(Self {
            local_addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections open now (handshaking or transmitting).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets every connection finish the requests it has taken (their
    /// replies are sent), closes them, and waits for that. Returns `false` if connections
    /// were still open after the drain timeout (or their reactors are stopped).
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // Wake the accept call with a connection of our own; it sees the flag and exits.
            if TcpStream::connect_timeout(&wake_addr(self.local_addr), Duration::from_secs(1))
                .is_ok()
            {
                let _ = acceptor.join();
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.connections() > 0 {
            if Instant::now() > deadline {
                tracing::warn!(open = self.connections(), "NBD connections did not drain");
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop();
        }
    }
}

/// Checks names and devices; the first export comes first in the table.
fn validate(exports: Vec<(String, Arc<dyn BlockDevice>)>, budget: u64) -> Result<ExportTable> {
    if exports.is_empty() {
        return Err(Error::Config("at least one export is needed".into()));
    }
    let mut table = Vec::with_capacity(exports.len());
    for (name, device) in exports {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(Error::Config(format!(
                "export name {name:?} must be 1 to {MAX_NAME_LEN} bytes without NUL"
            )));
        }
        if table.iter().any(|e: &Export| e.name == name) {
            return Err(Error::Config(format!("export {name:?} is listed twice")));
        }
        if device.geometry().bytes() == 0 {
            return Err(Error::Config(format!(
                "export {name:?}: device {} is empty",
                device.name()
            )));
        }
        table.push(Export::new(name, device, budget));
    }
    Ok(ExportTable::new(table))
}

/// The address a local connect reaches the listener on.
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

fn accept_loop(
    listener: TcpListener,
    exports: ExportTable,
    reactors: ReactorHandle,
    state: Arc<ServerState>,
    max_connections: usize,
) {
    let mut next = 0usize;
    let mut refusals = crate::nvme_tcp::RefusalLog::new("NBD");
    loop {
        let accepted = listener.accept();
        if state.stopping() {
            return;
        }
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                // Out of descriptors and the like: do not spin on the error.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if state.connections.load(Ordering::SeqCst) >= max_connections {
            refusals.refused(peer, max_connections);
            drop(sock);
            continue;
        }
        if let Err(e) = sock.set_nonblocking(true).and(sock.set_nodelay(true)) {
            tracing::warn!(%peer, error = %e, "NBD connection setup failed");
            continue;
        }
        let reactor = next % reactors.count().max(1);
        next = next.wrapping_add(1);
        let live = LiveConnection::new(&state);
        let (exports, server) = (exports.clone(), Arc::clone(&state));
        let sent = reactors.send_msg(reactor, move |ctx| {
            let conn = Connection::new(sock, peer, exports, server, live);
            ctx.register_poller(Box::new(conn));
        });
        match sent {
            Ok(()) => tracing::debug!(%peer, reactor, "NBD connection accepted"),
            Err(e) => tracing::warn!(%peer, error = %e, "NBD connection dropped"),
        }
    }
}
