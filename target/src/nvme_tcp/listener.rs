//! The listening sockets (one per NVM subsystem port): a small thread accepts connections
//! on all of them and hands each one to a reactor, round robin, where it lives as a
//! [`Connection`] poller until it closes. The control plane adds and removes listeners,
//! subsystems and namespaces while the target runs (see `subsystem`).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmirror_poller::ReactorHandle;

use super::connection::Connection;
use super::subsystem::TargetShared;
use super::TargetConfig;
use crate::{Error, Result};
use nvmirror_nvme::spec::ana::AnaState;

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
    /// The sockets the accept thread polls, with their port index.
    listeners: Arc<Mutex<Vec<(usize, TcpListener)>>>,
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
            .subsystems()
            .into_iter()
            .find(|s| s.nqn == nqn)
            .ok_or_else(|| Error::Config(format!("no subsystem '{nqn}'")))?;
        let mut hosts = sub.allowed_hosts.write().unwrap_or_else(|e| e.into_inner());
        f(&mut hosts);
        Ok(hosts.clone())
    }

    /// Validates `cfg`, binds `cfg.listen` and every `cfg.more_listeners` address and starts
    /// accepting; connections are served by the reactors behind `reactors`.
    pub fn start(cfg: TargetConfig, reactors: &ReactorHandle) -> Result<Self> {
        cfg.validate()?;
        let addrs: Vec<SocketAddr> = std::iter::once(cfg.listen)
            .chain(cfg.more_listeners.iter().map(|l| l.listen))
            .collect();
        let mut listeners = Vec::with_capacity(addrs.len());
        let mut ports = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.into_iter().enumerate() {
            let (l, local) = bind(addr)?;
            listeners.push((i, l));
            ports.push(local);
        }
        let listeners = Arc::new(Mutex::new(listeners));
        let shared = Arc::new(TargetShared::new(cfg, ports.clone()).map_err(Error::Config)?);
        let thread_shared = Arc::clone(&shared);
        let thread_listeners = Arc::clone(&listeners);
        let reactors = reactors.clone();
        let acceptor = std::thread::Builder::new()
            .name("nvmirror-accept".into())
            .spawn(move || accept_loop(thread_listeners, thread_shared, reactors))
            .map_err(|source| Error::Sys {
                op: "spawn accept thread",
                source,
            })?;
        for local in &ports {
            tracing::info!(%local, "NVMe/TCP target listening");
        }
        Ok(Self {
            shared,
            listeners,
            acceptor: Some(acceptor),
        })
    }

    /// Binds one more listener (a new NVM subsystem port of every subsystem) whose groups
    /// start in `state`; returns the address bound.
    pub fn add_listener(&self, addr: SocketAddr, state: AnaState) -> Result<SocketAddr> {
        if self.local_addrs().contains(&addr) {
            return Err(Error::Config(format!("already listening on {addr}")));
        }
        let (l, local) = bind(addr)?;
        let port = self.shared.add_port(local, state).map_err(Error::Config)?;
        lock(&self.listeners).push((port, l));
        tracing::info!(%local, port, "NVMe/TCP listener added");
        Ok(local)
    }

    /// Closes the listener bound to `addr` and tears down the controllers connected through
    /// it. The first listener (port 0) stays.
    pub fn remove_listener(&self, addr: SocketAddr) -> Result<()> {
        let ports = self.shared.ports();
        let port = ports
            .iter()
            .position(|p| *p == Some(addr))
            .ok_or_else(|| Error::Config(format!("no listener on {addr}")))?;
        if port == 0 {
            return Err(Error::Config(format!(
                "{addr} is the first listener (nvme_tcp.listen); it stays while the target runs"
            )));
        }
        lock(&self.listeners).retain(|(p, _)| *p != port);
        self.shared.remove_port(port);
        tracing::info!(%addr, port, "NVMe/TCP listener removed");
        Ok(())
    }

    /// Starts serving a new subsystem on every listener.
    pub fn add_subsystem(&self, cfg: &super::SubsystemConfig) -> Result<()> {
        self.shared.add_subsystem(cfg).map_err(Error::Config)
    }

    /// Controllers of subsystem `nqn` alive now (`None`: no such subsystem).
    pub fn subsystem_controllers(&self, nqn: &str) -> Option<usize> {
        self.shared
            .find_subsystem(nqn)
            .map(|r| self.shared.controllers_of(r))
    }

    /// Stops serving subsystem `nqn`, tearing down its controllers.
    pub fn remove_subsystem(&self, nqn: &str) -> Result<()> {
        self.shared.remove_subsystem(nqn).map_err(Error::Config)
    }

    /// Exports `dev` as the next namespace of `nqn`; returns its NSID.
    pub fn add_namespace(
        &self,
        nqn: &str,
        dev: Arc<dyn nvmirror_nvme::BlockDevice>,
    ) -> Result<u32> {
        self.shared.add_namespace(nqn, dev).map_err(Error::Config)
    }

    /// Stops exporting namespace `nsid` of `nqn`; its commands fail with Invalid Namespace
    /// from now on.
    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<()> {
        self.shared
            .remove_namespace(nqn, nsid)
            .map(drop)
            .map_err(Error::Config)
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Every bound address, port 0 first (removed listeners left out).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.ports().into_iter().flatten().collect()
    }

    /// Sets the ANA state of `group` through the listener bound to `listener`, in subsystem
    /// `nqn` or in every subsystem that has the group; controllers on that listener get an
    /// ANA Change notice. Returns the NQNs whose state changed.
    pub fn set_ana_state(
        &self,
        listener: SocketAddr,
        nqn: Option<&str>,
        group: u32,
        state: AnaState,
    ) -> Result<Vec<String>> {
        let port = self
            .shared
            .ports()
            .iter()
            .position(|p| *p == Some(listener))
            .ok_or_else(|| Error::Config(format!("no listener on {listener}")))?;
        self.shared
            .set_ana_state(port, nqn, group, state)
            .map_err(Error::Config)
    }

    /// Tells every controller of subsystem `nqn` that namespace `nsid` changed its
    /// attributes (Identify Namespace data): it joins their Changed Namespace List (log 04h)
    /// and a Namespace Attribute notice is raised where the host enabled it.
    pub fn namespace_changed(&self, nqn: &str, nsid: u32) -> Result<()> {
        let r = self
            .shared
            .find_subsystem(nqn)
            .filter(|r| *r != super::subsystem::SubsystemRef::Discovery)
            .ok_or_else(|| Error::Config(format!("no subsystem '{nqn}'")))?;
        if self
            .shared
            .subsystem(r)
            .map_or(true, |s| s.namespace(nsid).is_none())
        {
            return Err(Error::Config(format!("{nqn} has no namespace {nsid}")));
        }
        self.shared.namespace_changed(r, nsid);
        Ok(())
    }

    /// The ANA state of every group of every subsystem through every listener.
    pub fn ana_states(&self) -> Vec<AnaGroupState> {
        let mut out = Vec::new();
        let ports = self.shared.ports();
        for s in self.shared.subsystems() {
            for (port, listener) in ports.iter().enumerate() {
                let Some(listener) = listener else { continue };
                for (group, ns) in s.active() {
                    out.push(AnaGroupState {
                        nqn: s.nqn.clone(),
                        namespace: ns.dev.name().to_string(),
                        listener: *listener,
                        group,
                        state: s.ana.state(port, group),
                    });
                }
            }
        }
        out
    }

    /// Every NVM subsystem as served: NQN, serial, model, allowed hosts and namespaces.
    pub fn subsystems(&self) -> Vec<SubsystemInfo> {
        self.shared
            .subsystems()
            .iter()
            .map(|s| SubsystemInfo {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allowed_hosts: s
                    .allowed_hosts
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
                namespaces: s
                    .active()
                    .map(|(nsid, n)| NamespaceInfo {
                        nsid,
                        device: n.dev.name().to_string(),
                        nguid: n.ids().0,
                        uuid: n.ids().1,
                    })
                    .collect(),
            })
            .collect()
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

/// The ANA state of one group through one listener, as the control plane reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroupState {
    pub nqn: String,
    /// The device exported as the group's namespace (a volume's name).
    pub namespace: String,
    pub listener: SocketAddr,
    /// ANA group ID (the NSID of its namespace).
    pub group: u32,
    pub state: AnaState,
}

/// A non-blocking listening socket on `addr` and the address it got.
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
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
    Ok((listener, local))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listeners: Arc<Mutex<Vec<(usize, TcpListener)>>>,
    shared: Arc<TargetShared>,
    reactors: ReactorHandle,
) {
    let mut next = 0usize;
    let mut refusals = RefusalLog::new("NVMe/TCP");
    let limit = shared.cfg.max_connections;
    let (mut turn, mut idle) = (0usize, 0);
    while !shared.stopping.load(Ordering::Acquire) {
        // The list changes only through the control plane (listener_add/remove).
        let accepted = {
            let ls = lock(&listeners);
            let n = ls.len().max(1);
            // After a full round of listeners with nothing pending, nap.
            if idle >= n {
                idle = 0;
                drop(ls);
                std::thread::sleep(ACCEPT_NAP);
                continue;
            }
            let k = turn % n;
            turn = turn.wrapping_add(1);
            match ls.get(k) {
                Some((_, l)) => l.accept(),
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        };
        match accepted {
            Ok((sock, peer)) => {
                if shared.open_connections.load(Ordering::Acquire) >= limit {
                    refusals.refused(peer, limit);
                    drop(sock);
                    continue;
                }
                idle = 0;
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
                idle += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(ACCEPT_NAP * 10);
            }
        }
    }
}

/// One served subsystem, as the control plane lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsystemInfo {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// Empty: any host.
    pub allowed_hosts: Vec<String>,
    pub namespaces: Vec<NamespaceInfo>,
}

/// One namespace of a served subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    /// The exported device's name (a volume's name).
    pub device: String,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
}
