//! The listening socket: a small thread accepts connections and hands each one to a
//! reactor, round robin, where it lives as a [`Connection`] poller until it closes.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmirror_poller::ReactorHandle;

use super::connection::Connection;
use super::subsystem::TargetShared;
use super::TargetConfig;
use crate::{Error, Result};

/// How long the accept thread sleeps when no connection is pending.
const ACCEPT_NAP: Duration = Duration::from_millis(2);

/// Connections refused for `max_connections`, logged at most once per interval with the
/// count since the last line (a connection storm must not become a log storm). Shared by
/// the NVMe/TCP and NBD listeners.
#[derive(Debug)]
pub(crate) struct RefusalLog {
    front_end: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn new(front_end: &'static str) -> Self {
        Self {
            front_end,
            last: None,
            suppressed: 0,
        }
    }

    /// Records one connection from `peer` closed at accept because `limit` are open.
    pub(crate) fn refused(&mut self, peer: SocketAddr, limit: usize) {
        self.suppressed += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            return;
        }
        tracing::warn!(
            %peer,
            max_connections = limit,
            refused = self.suppressed,
            "{}: connection limit reached; closing new connections at once",
            self.front_end
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// A running NVMe/TCP target. Dropping it (or [`shutdown`](Self::shutdown)) stops
/// accepting and closes every connection at its next poll.
#[derive(Debug)]
pub struct NvmeTcpTarget {
    shared: Arc<TargetShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl NvmeTcpTarget {
    /// Allows `host` to connect to subsystem `nqn` (an empty list allows every host, so the
    /// first host added restricts the subsystem to the hosts listed). Returns the list.
    /// Controllers already connected are not affected.
    pub fn add_host(&self, nqn: &str, host: &str) -> Result<Vec<String>> {
        self.edit_hosts(nqn, |hosts| {
            if !hosts.iter().any(|h| h == host) {
                hosts.push(host.to_string());
            }
        })
    }

    /// Removes `host` from subsystem `nqn`'s allowed hosts (an emptied list allows every
    /// host). Returns the list.
    pub fn remove_host(&self, nqn: &str, host: &str) -> Result<Vec<String>> {
        self.edit_hosts(nqn, |hosts| hosts.retain(|h| h != host))
    }

    fn edit_hosts(&self, nqn: &str, f: impl FnOnce(&mut Vec<String>)) -> Result<Vec<String>> {
        let sub = self
            .shared
            .subsystems
            .iter()
            .find(|s| s.nqn == nqn)
            .ok_or_else(|| Error::Config(format!("no subsystem '{nqn}'")))?;
        let mut hosts = sub.allowed_hosts.write().unwrap_or_else(|e| e.into_inner());
        f(&mut hosts);
        Ok(hosts.clone())
    }

    /// Validates `cfg`, binds `cfg.listen` and starts accepting; connections are served by
    /// the reactors behind `reactors`.
    pub fn start(cfg: TargetConfig, reactors: &ReactorHandle) -> Result<Self> {
        cfg.validate()?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| Error::Listen {
            addr: cfg.listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| Error::Sys {
            op: "getsockname",
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Sys {
                op: "set listener non-blocking",
                source,
            })?;
        let shared = Arc::new(TargetShared::new(cfg, local).map_err(Error::Config)?);
        let thread_shared = Arc::clone(&shared);
        let reactors = reactors.clone();
        let acceptor = std::thread::Builder::new()
            .name("nvmirror-accept".into())
            .spawn(move || accept_loop(listener, thread_shared, reactors))
            .map_err(|source| Error::Sys {
                op: "spawn accept thread",
                source,
            })?;
        tracing::info!(%local, "NVMe/TCP target listening");
        Ok(Self {
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Connections open now (handshaking or connected).
    pub fn connection_count(&self) -> usize {
        self.shared.open_connections.load(Ordering::Acquire)
    }

    /// Controllers currently alive.
    pub fn controller_count(&self) -> usize {
        self.shared.controller_count()
    }

    /// Stops accepting and asks every connection to close.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NvmeTcpTarget {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<TargetShared>, reactors: ReactorHandle) {
    let mut next = 0usize;
    let mut refusals = RefusalLog::new("NVMe/TCP");
    let limit = shared.cfg.max_connections;
    while !shared.stopping.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((sock, peer)) => {
                if shared.open_connections.load(Ordering::Acquire) >= limit {
                    refusals.refused(peer, limit);
                    drop(sock);
                    continue;
                }
                let core = next % reactors.count().max(1);
                next = next.wrapping_add(1);
                let conn = match Connection::new(sock, peer, Arc::clone(&shared)) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%peer, "cannot set up connection: {e}");
                        continue;
                    }
                };
                tracing::debug!(%peer, core, "connection accepted");
                if let Err(e) = reactors.send_msg(core, move |ctx| {
                    ctx.register_poller(Box::new(conn));
                }) {
                    tracing::warn!(%peer, "cannot hand connection to reactor {core}: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_NAP);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(ACCEPT_NAP * 10);
            }
        }
    }
}
