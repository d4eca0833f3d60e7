//! Subsystems, their namespaces, and the controllers hosts create on them.
//!
//! Everything here is shared by all reactors. A [`Subsystem`] value is immutable: the control
//! plane changes the set of subsystems, their namespaces and the listeners at run time by
//! putting a new value (a new *generation*) into the target's table, under a lock only the
//! control path takes (Connect, discovery, RPC). A controller keeps the generation it
//! connected to, so the I/O path reads it without a lock; a namespace removed later is
//! flagged on the shared [`Namespace`] itself (one atomic load per command) and its I/O
//! fails with Invalid Namespace. The controller table is touched only by Connect and
//! teardown, and a controller's liveness is an atomic the I/O queues read once per poll.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nvmirror_nvme::spec::ana::AnaState;
use nvmirror_nvme::spec::Geometry;
use nvmirror_nvme::BlockDevice;

use super::ana::AnaTable;
use super::async_event::{AsyncEvent, AsyncEvents};
use super::reservation::{HostId, NamespaceReservation, Notice, NotificationLog};
use super::{SubsystemConfig, TargetConfig};

/// One exported namespace.
#[derive(Debug)]
pub(crate) struct Namespace {
    pub dev: Arc<dyn BlockDevice>,
    pub geo: Geometry,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// Registrants and reservation, shared by every controller of the subsystem.
    pub reservation: NamespaceReservation,
    /// Removed by the control plane: controllers that still hold it fail its commands
    /// with Invalid Namespace.
    pub(super) removed: AtomicBool,
}

impl Namespace {
    pub(super) fn open(
        dev: &Arc<dyn BlockDevice>,
        nqn: &str,
        nsid: u32,
        reservation_dir: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let store =
            reservation_dir.map(|d| d.join(format!("{}.ns{nsid}.reservations.json", dev.name())));
        // The device's own identity (a volume's UUID) where it has one: a re-created
        // volume under the same NQN is then a different disk to the host, and every node
        // exporting the same volume reports the same one (multipath). Otherwise an
        // identity stable for the NQN and NSID.
        let (nguid, uuid) = match dev.identity() {
            Some(id) => (id, uuid_v4_shape(id)),
            None => (
                stable_id(nqn, nsid, 0),
                uuid_v4_shape(stable_id(nqn, nsid, 1)),
            ),
        };
        Ok(Self {
            dev: Arc::clone(dev),
            geo: dev.geometry(),
            nguid,
            uuid,
            reservation: NamespaceReservation::open(store, nqn, nsid)?,
            removed: AtomicBool::new(false),
        })
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The NGUID and UUID as hosts see them now: the device's identity once it has one
    /// (a standby's copy the primary formats after this node started), else the ones made
    /// at open.
    pub fn ids(&self) -> ([u8; 16], [u8; 16]) {
        match self.dev.identity() {
            Some(id) => (id, uuid_v4_shape(id)),
            None => (self.nguid, self.uuid),
        }
    }
}

/// An NVM subsystem as served.
#[derive(Debug)]
pub(crate) struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// Host NQNs allowed to connect (empty: any). Read at Connect and discovery only; changed
    /// at run time by the control plane.
    pub allowed_hosts: std::sync::RwLock<Vec<String>>,
    /// DH-HMAC-CHAP secrets per host NQN (fixed while the target runs).
    pub host_secrets: HashMap<String, super::HostSecrets>,
    /// By NSID - 1; `None`: a namespace removed at run time (its NSID is not reused while
    /// the target runs).
    pub namespaces: Vec<Option<Arc<Namespace>>>,
    /// ANA state of each namespace's group (ANAGRPID = NSID) through each port.
    pub ana: AnaTable,
    /// Where PTPL reservation state is kept (see [`SubsystemConfig::reservation_dir`]).
    pub(super) reservation_dir: Option<std::path::PathBuf>,
}

impl Subsystem {
    pub(super) fn new(cfg: &SubsystemConfig, ana_defaults: &[AnaState]) -> Result<Self, String> {
        let mut namespaces = Vec::with_capacity(cfg.namespaces.len());
        for (i, dev) in cfg.namespaces.iter().enumerate() {
            let ns = Namespace::open(dev, &cfg.nqn, i as u32 + 1, cfg.reservation_dir.as_deref())?;
            namespaces.push(Some(Arc::new(ns)));
        }
        Ok(Self {
            nqn: cfg.nqn.clone(),
            serial: cfg.serial.clone(),
            model: cfg.model.clone(),
            allowed_hosts: std::sync::RwLock::new(cfg.allowed_hosts.clone()),
            host_secrets: cfg.host_secrets.clone(),
            ana: AnaTable::new(namespaces.len() as u32, ana_defaults),
            namespaces,
            reservation_dir: cfg.reservation_dir.clone(),
        })
    }

    /// The next generation with `namespaces`: the same identity and hosts, and the ANA states
    /// of the groups both have.
    pub(super) fn with_namespaces(
        &self,
        namespaces: Vec<Option<Arc<Namespace>>>,
        ana_defaults: &[AnaState],
    ) -> Self {
        let ana = AnaTable::new(namespaces.len() as u32, ana_defaults);
        ana.copy_states(&self.ana);
        Self {
            nqn: self.nqn.clone(),
            serial: self.serial.clone(),
            model: self.model.clone(),
            allowed_hosts: RwLock::new(
                self.allowed_hosts
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ),
            host_secrets: self.host_secrets.clone(),
            ana,
            namespaces,
            reservation_dir: self.reservation_dir.clone(),
        }
    }

    /// The namespaces served now, with their NSIDs.
    pub fn active(&self) -> impl Iterator<Item = (u32, &Namespace)> {
        self.namespaces.iter().enumerate().filter_map(|(i, n)| {
            n.as_deref()
                .filter(|n| !n.is_removed())
                .map(|n| (i as u32 + 1, n))
        })
    }

    /// The namespace at index `ns` (NSID - 1) while it is served.
    #[inline]
    pub fn namespace_at(&self, ns: usize) -> Option<&Namespace> {
        self.namespaces
            .get(ns)
            .and_then(Option::as_deref)
            .filter(|n| !n.is_removed())
    }

    /// Whether the subsystem admits every host (its allowed-hosts list is empty).
    pub fn allows_any_host(&self) -> bool {
        let hosts = self.allowed_hosts.read().unwrap_or_else(|e| e.into_inner());
        hosts.is_empty()
    }

    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        let hosts = self.allowed_hosts.read().unwrap_or_else(|e| e.into_inner());
        hosts.is_empty() || hosts.iter().any(|h| h == hostnqn)
    }

    /// The namespace with this NSID (1-based) while it is served.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        (nsid as usize)
            .checked_sub(1)
            .and_then(|i| self.namespace_at(i))
    }
}

/// A 16-byte identifier that stays the same for a subsystem NQN and NSID across restarts.
fn stable_id(nqn: &str, nsid: u32, salt: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut crc = crc32c::crc32c_append(salt, nqn.as_bytes());
    for (i, chunk) in out.chunks_mut(4).enumerate() {
        crc = crc32c::crc32c_append(crc, &(nsid ^ ((i as u32) << 24)).to_le_bytes());
        chunk.copy_from_slice(&crc.to_be_bytes());
    }
    out
}

fn uuid_v4_shape(mut b: [u8; 16]) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// Which subsystem a controller belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubsystemRef {
    Discovery,
    Nvm(usize),
}

/// A controller: created by an admin-queue Connect, shared with its I/O queues.
#[derive(Debug)]
pub(crate) struct Controller {
    pub cntlid: u16,
    pub subsys: SubsystemRef,
    /// The subsystem's generation this controller connected to (`None`: discovery).
    subsystem: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    /// Host Identifier from the Connect data: who this controller is to reservations.
    pub hostid: HostId,
    /// The port (listener index) its admin queue connected through; its I/O queues use it.
    pub port: usize,
    /// Reservation notices for this controller (log page 0x80) and its masks.
    pub reservation_log: Mutex<NotificationLog>,
    /// Asynchronous event configuration, waiting events, log pages awaiting a read.
    pub events: Mutex<AsyncEvents>,
    /// An event waits for an Asynchronous Event Request (one atomic load per admin poll).
    pub event_pending: AtomicBool,
    /// CC.EN is set and CSTS.RDY reported: I/O queues may connect.
    pub enabled: AtomicBool,
    /// Torn down (admin queue gone, keep-alive expired, reset): every queue closes.
    pub gone: AtomicBool,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues: AtomicU16,
    /// Bit per connected I/O queue ID (1..=256), four words of 64.
    connected: Mutex<[u64; 5]>,
}

impl Controller {
    /// The NVM subsystem as this controller sees it (`None`: a discovery controller).
    #[inline]
    pub fn subsystem(&self) -> Option<&Subsystem> {
        self.subsystem.as_deref()
    }

    /// Claims I/O queue `qid`; false if it is connected already.
    pub fn claim_queue(&self, qid: u16) -> bool {
        let mut c = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        let (w, b) = (usize::from(qid) / 64, qid % 64);
        if c[w] & (1 << b) != 0 {
            return false;
        }
        c[w] |= 1 << b;
        true
    }

    /// Releases I/O queue `qid`.
    pub fn release_queue(&self, qid: u16) {
        let mut c = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        c[usize::from(qid) / 64] &= !(1 << (qid % 64));
    }

    /// Marks the controller gone; its queues notice at their next poll.
    pub fn tear_down(&self) {
        self.enabled.store(false, Ordering::Release);
        self.gone.store(true, Ordering::Release);
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Raises an asynchronous event for this controller.
    pub fn raise_event(&self, ev: AsyncEvent) {
        let mut e = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if e.raise(ev) {
            self.event_pending.store(true, Ordering::Release);
        }
    }
}

/// Most listeners (NVM subsystem ports) one target has over its life, removed ones
/// included: the ANA tables are sized for them.
pub(crate) const MAX_PORTS: usize = 16;

/// State every connection of one target shares.
#[derive(Debug)]
pub(crate) struct TargetShared {
    pub cfg: TargetConfig,
    /// Subsystem slots; `SubsystemRef::Nvm(i)` names slot `i`, which a deleted subsystem
    /// leaves empty (never reused). Control path only.
    pub(super) subsystems: RwLock<Vec<Option<Arc<Subsystem>>>>,
    /// The first bound address (port 0).
    pub listen: SocketAddr,
    /// Every bound address by port index; `None`: a listener removed at run time.
    pub(super) ports: RwLock<Vec<Option<SocketAddr>>>,
    /// The ANA state a port's groups start in, by port index.
    pub(super) port_states: RwLock<Vec<AnaState>>,
    pub stopping: AtomicBool,
    /// Connections alive now (counted from `Connection::new` to its drop).
    pub open_connections: AtomicUsize,
    pub(super) controllers: Mutex<ControllerTable>,
    /// Bumped by every change of subsystems, namespaces or listeners (discovery GENCTR).
    pub generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct ControllerTable {
    next: u16,
    pub(super) live: HashMap<u16, Arc<Controller>>,
}

pub(super) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl TargetShared {
    /// The shared state for `cfg`; fails when a namespace's saved reservation state cannot
    /// be read.
    /// `ports` are the bound addresses: `cfg.listen`'s, then `cfg.more_listeners`'.
    pub fn new(mut cfg: TargetConfig, ports: Vec<SocketAddr>) -> Result<Self, String> {
        let port_states: Vec<AnaState> = std::iter::once(cfg.ana_state)
            .chain(cfg.more_listeners.iter().map(|l| l.ana_state))
            .collect();
        let ana_defaults = padded(&port_states);
        let subsystems = cfg
            .subsystems
            .iter()
            .map(|s| Subsystem::new(s, &ana_defaults).map(|s| Some(Arc::new(s))))
            .collect::<Result<_, _>>()?;
        cfg.subsystems.clear();
        let listen = ports.first().copied().unwrap_or(cfg.listen);
        Ok(Self {
            controllers: Mutex::new(ControllerTable {
                next: cfg.cntlid_min,
                live: HashMap::new(),
            }),
            cfg,
            subsystems: RwLock::new(subsystems),
            listen,
            ports: RwLock::new(ports.into_iter().map(Some).collect()),
            port_states: RwLock::new(port_states),
            stopping: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub(super) fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The bound addresses by port index (`None`: removed).
    pub fn ports(&self) -> Vec<Option<SocketAddr>> {
        read(&self.ports).clone()
    }

    /// The port a connection accepted on `local` came through: the bound address itself,
    /// or a wildcard one on the same port number.
    pub fn port_of(&self, local: SocketAddr) -> usize {
        let ports = read(&self.ports);
        ports
            .iter()
            .position(|p| *p == Some(local))
            .or_else(|| {
                ports.iter().position(|p| {
                    p.is_some_and(|p| p.ip().is_unspecified() && p.port() == local.port())
                })
            })
            .unwrap_or(0)
    }

    /// The NVM subsystems served now, with their slot.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        read(&self.subsystems).iter().flatten().cloned().collect()
    }

    fn slots(&self) -> Vec<(usize, Arc<Subsystem>)> {
        read(&self.subsystems)
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.clone().map(|s| (i, s)))
            .collect()
    }

    /// Finds a subsystem by NQN (the discovery NQN included).
    pub fn find_subsystem(&self, nqn: &str) -> Option<SubsystemRef> {
        if nqn == nvmirror_nvme::spec::fabrics::DISCOVERY_NQN {
            return Some(SubsystemRef::Discovery);
        }
        read(&self.subsystems)
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.nqn == nqn))
            .map(SubsystemRef::Nvm)
    }

    /// The current generation of a subsystem.
    pub fn subsystem(&self, r: SubsystemRef) -> Option<Arc<Subsystem>> {
        match r {
            SubsystemRef::Discovery => None,
            SubsystemRef::Nvm(i) => read(&self.subsystems).get(i).cloned().flatten(),
        }
    }

    /// Creates a controller with a fresh dynamic ID; `None` when all IDs are taken.
    pub fn create_controller(
        &self,
        subsys: SubsystemRef,
        hostnqn: &str,
        hostid: HostId,
        port: usize,
    ) -> Option<Arc<Controller>> {
        let (lo, hi) = (self.cfg.cntlid_min, self.cfg.cntlid_max);
        let mut t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        if t.live.len() > usize::from(hi - lo) {
            return None;
        }
        let wrap = |id: u16| if id >= hi { lo } else { id + 1 };
        let mut id = t.next;
        while !(lo..=hi).contains(&id) || t.live.contains_key(&id) {
            id = wrap(id);
        }
        t.next = wrap(id);
        let ctrl = Arc::new(Controller {
            cntlid: id,
            subsys,
            subsystem: self.subsystem(subsys),
            hostnqn: hostnqn.to_string(),
            hostid,
            port,
            reservation_log: Mutex::new(NotificationLog::default()),
            events: Mutex::new(AsyncEvents::default()),
            event_pending: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            io_queues: AtomicU16::new(self.cfg.max_io_queues),
            connected: Mutex::new([0; 5]),
        });
        t.live.insert(id, Arc::clone(&ctrl));
        Some(ctrl)
    }

    /// The live controller with this ID.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        t.live.get(&cntlid).cloned()
    }

    /// Tears a controller down and forgets it.
    pub fn remove_controller(&self, ctrl: &Controller) {
        ctrl.tear_down();
        let mut t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        if t.live
            .get(&ctrl.cntlid)
            .is_some_and(|c| std::ptr::eq(&**c, ctrl))
        {
            t.live.remove(&ctrl.cntlid);
        }
    }

    /// Queues reservation notices about namespace `nsid` of `subsys` for every controller
    /// of each notified host (control path: reservation commands only).
    pub fn notify_reservation(&self, subsys: SubsystemRef, nsid: u32, notices: &[Notice]) {
        if notices.is_empty() {
            return;
        }
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t.live.values().filter(|c| c.subsys == subsys) {
            let mut queued = false;
            let mut log = ctrl
                .reservation_log
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for n in notices.iter().filter(|n| n.host == ctrl.hostid) {
                queued |= log.push(nsid, n.kind);
            }
            drop(log);
            if queued {
                ctrl.raise_event(AsyncEvent::RESERVATION);
            }
        }
    }

    /// Sets the ANA state of `group` through port `port` in subsystem `nqn` (every subsystem
    /// that has the group when `None`) and raises an ANA Change notice on each controller
    /// of that port whose page changed. Returns the NQNs whose state changed; an error when
    /// no subsystem has the group.
    pub fn set_ana_state(
        &self,
        port: usize,
        nqn: Option<&str>,
        group: u32,
        state: AnaState,
    ) -> Result<Vec<String>, String> {
        let mut found = false;
        let mut changed = Vec::new();
        let slots = self.slots();
        for (i, s) in slots.iter() {
            let i = *i;
            if nqn.is_some_and(|n| n != s.nqn) {
                continue;
            }
            match s.ana.set(port, group, state) {
                None => {}
                Some(false) => found = true,
                Some(true) => {
                    found = true;
                    changed.push(s.nqn.clone());
                    self.raise_on_port(SubsystemRef::Nvm(i), port, AsyncEvent::ANA_CHANGE);
                }
            }
        }
        // Controllers that connected to an earlier generation (before a namespace was added
        // or removed) read that generation's table: it follows too.
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t.live.values() {
            let Some(snap) = ctrl.subsystem() else {
                continue;
            };
            let current = slots
                .iter()
                .find(|(i, _)| ctrl.subsys == SubsystemRef::Nvm(*i));
            if nqn.is_some_and(|n| n != snap.nqn)
                || current.is_some_and(|(_, c)| std::ptr::eq(&**c, snap))
            {
                continue;
            }
            if snap.ana.set(port, group, state) == Some(true) && ctrl.port == port {
                ctrl.raise_event(AsyncEvent::ANA_CHANGE);
            }
        }
        drop(t);
        if !found {
            return Err(match nqn {
                Some(n) if slots.iter().all(|(_, s)| s.nqn != n) => {
                    format!("no subsystem '{n}'")
                }
                _ => format!("no ANA group {group}"),
            });
        }
        Ok(changed)
    }

    /// Raises `ev` on every controller of `subsys` connected through `port`.
    fn raise_on_port(&self, subsys: SubsystemRef, port: usize, ev: AsyncEvent) {
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t
            .live
            .values()
            .filter(|c| c.subsys == subsys && c.port == port)
        {
            ctrl.raise_event(ev);
        }
    }

    /// Records that namespace `nsid` of `subsys` changed its attributes: every controller of
    /// the subsystem adds it to its Changed Namespace List and raises the Namespace
    /// Attribute notice.
    pub fn namespace_changed(&self, subsys: SubsystemRef, nsid: u32) {
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t.live.values().filter(|c| c.subsys == subsys) {
            let mut e = ctrl.events.lock().unwrap_or_else(|e| e.into_inner());
            if e.namespace_changed(nsid) {
                ctrl.event_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Number of live controllers.
    pub fn controller_count(&self) -> usize {
        self.controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .len()
    }
}

/// `defaults` (one state per bound port) extended to [`MAX_PORTS`] with Optimized, so a
/// listener added later has a column in every ANA table.
pub(super) fn padded(defaults: &[AnaState]) -> Vec<AnaState> {
    let mut d = defaults.to_vec();
    d.resize(MAX_PORTS.max(d.len()), AnaState::Optimized);
    d
}
