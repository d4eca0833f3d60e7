//! `nvme-tcp://` — a namespace of a remote NVMe/TCP controller (nvmirror, SPDK `nvmf_tgt`,
//! Linux `nvmet`) as a [`BlockDevice`]: nvmirror's own NVMe/TCP initiator.
//!
//! [`NvmeTcpDevice::connect`] brings the controller up over the admin queue (Connect,
//! CC.EN, Identify, Number of Queues; `docs/backends.md` lists the steps) and leaves the admin connection to a small thread that sends
//! Keep Alive every KATO/2. Each [`open_qpair`](BlockDevice::open_qpair) opens one more TCP
//! connection as one I/O queue, a [`TcpQueuePair`] that the calling core drives without
//! locks or blocking. Queue pairs keep the controller alive: it is shut down (CC.SHN) and
//! disconnected when the device and every queue pair opened on it are gone.
//!
//! A lost controller is reconnected in the background (`reconnect`): Linux's
//! `reconnect_delay`, `ctrl_loss_tmo` and `fast_io_fail_tmo`, and a fence before the leg may
//! be resynchronised.
//!
//! ```no_run
//! use nvmirror_nvme::backend::{NvmeTcpDevice, NvmeTcpOptions};
//! use nvmirror_nvme::BlockDevice;
//!
//! let dev = NvmeTcpDevice::connect("127.0.0.1:4420", &NvmeTcpOptions::new("nqn.2024-01.io.nvmirror:mem0"))?;
//! let mut qp = dev.open_qpair(32)?;
//! # Ok::<(), nvmirror_nvme::Error>(())
//! ```

mod auth;
mod control;
mod controller;
mod keep_alive;
mod qpair;
mod reconnect;
mod reservation;
mod slot;
mod stream;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use auth::DhchapKeys;
use control::{ControlConn, Peer};
pub use controller::ControllerInfo;
use controller::IoQueueConnect;
use keep_alive::{AdminQueue, Health};
pub use qpair::TcpQueuePair;
pub use reconnect::FENCE_QUIESCE;
use reconnect::{Supervisor, SupervisorThread};

use crate::queue::{BlockDevice, QueuePair};
use crate::spec::Geometry;
use crate::{Result, Uuid};

/// The IANA port for NVMe/TCP I/O controllers.
pub const DEFAULT_PORT: u16 = 4420;
/// I/O queue size when the URI does not say.
pub const DEFAULT_QUEUE_SIZE: u32 = 128;
/// Keep-alive timeout when the URI does not say.
pub const DEFAULT_KATO: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts when the URI does not say (doubled after each failure,
/// up to 8×).
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long reconnecting goes on when the URI does not say (Linux's default).
pub const DEFAULT_CTRL_LOSS_TMO: Duration = Duration::from_secs(600);
/// How long an I/O queue Connect retries a queue ID the controller still holds.
const QID_RETRY: Duration = Duration::from_secs(2);

/// What to connect to and how (the query part of an `nvme-tcp://` URI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeTcpOptions {
    /// Subsystem NQN.
    pub subnqn: String,
    /// Namespace ID (default 1).
    pub nsid: u32,
    /// Ask for header digests.
    pub hdgst: bool,
    /// Ask for data digests.
    pub ddgst: bool,
    /// Host NQN; `None` uses this process's generated
    /// `nqn.2014-08.org.nvmexpress:uuid:<uuid>`.
    pub hostnqn: Option<String>,
    /// Largest I/O queue, in entries (default 128; the controller's CAP.MQES and MAXCMD
    /// lower it).
    pub queue_size: u32,
    /// Keep-alive timeout; zero disables keep-alive (default 10 s).
    pub kato: Duration,
    /// Pause before the first reconnect attempt after a loss, and between attempts (doubled
    /// after each failure, up to 8×; default 2 s).
    pub reconnect_delay: Duration,
    /// Reconnecting stops once the controller has been unreachable this long; `None`: never
    /// (default 600 s).
    pub ctrl_loss_tmo: Option<Duration>,
    /// How long a queue pair whose connection died holds new commands, waiting for the
    /// reconnect, before it fails them with a path error (default 0: at once, which lets a
    /// mirror fail over to its other legs without waiting).
    pub fast_io_fail_tmo: Duration,
    /// DH-HMAC-CHAP secrets, for a target that asks this host to authenticate
    /// (`dhchap_secret_file=`, `dhchap_ctrl_secret_file=`).
    pub dhchap: Option<DhchapKeys>,
}

impl NvmeTcpOptions {
    /// The defaults for subsystem `subnqn`.
    pub fn new(subnqn: impl Into<String>) -> Self {
        Self {
            subnqn: subnqn.into(),
            nsid: 1,
            hdgst: false,
            ddgst: false,
            hostnqn: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            kato: DEFAULT_KATO,
            reconnect_delay: DEFAULT_RECONNECT_DELAY,
            ctrl_loss_tmo: Some(DEFAULT_CTRL_LOSS_TMO),
            fast_io_fail_tmo: Duration::ZERO,
            dhchap: None,
        }
    }
}

/// This process's host identity: a random UUID, as host ID and in the default host NQN.
fn host_identity() -> &'static (String, [u8; 16]) {
    static ID: OnceLock<(String, [u8; 16])> = OnceLock::new();
    ID.get_or_init(|| {
        let id = Uuid::new_random();
        (format!("nqn.2014-08.org.nvmexpress:uuid:{id}"), id.0)
    })
}

/// The host ID for `hostnqn`: the UUID it ends with, if any, else this process's.
fn host_id_for(hostnqn: &str) -> [u8; 16] {
    hostnqn
        .rsplit_once("uuid:")
        .and_then(|(_, u)| Uuid::parse(u))
        .map_or(host_identity().1, |u| u.0)
}

/// What the device and its queue pairs share: the controller's identity and limits, the
/// I/O queue IDs in use, the admin queue's health. The admin queue stops when the last
/// holder is dropped.
#[derive(Debug)]
pub(super) struct Link {
    /// The address the admin queue reached; I/O queues connect there too.
    peer: Peer,
    opts: NvmeTcpOptions,
    hostnqn: String,
    hostid: [u8; 16],
    info: ControllerInfo,
    geo: Geometry,
    /// `qids[q - 1]`: I/O queue `q` is in use; `next` is where the search starts, so a
    /// just-released ID is reused last.
    qids: Mutex<QidTable>,
    health: Arc<Health>,
    admin: AdminQueue,
}

#[derive(Debug)]
struct QidTable {
    used: Vec<bool>,
    next: usize,
}

impl Link {
    fn alloc_qid(&self, skip: &[u16]) -> Option<u16> {
        let mut t = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.used.len();
        for k in 0..n {
            let i = (t.next + k) % n;
            let qid = (i + 1) as u16;
            if !t.used[i] && !skip.contains(&qid) {
                t.used[i] = true;
                t.next = (i + 1) % n;
                return Some(qid);
            }
        }
        None
    }

    fn release_qid(&self, qid: u16) {
        let mut t = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = t.used.get_mut(usize::from(qid).wrapping_sub(1)) {
            *u = false;
        }
    }
}

/// Connects a new I/O queue of `size` entries; returns its connection and queue ID. A queue
/// ID the controller still holds (a queue of ours that is closing there) is retried with the
/// next free one, and then again for a short while.
fn connect_io_queue(link: &Arc<Link>, size: u32) -> Result<(ControlConn, u16)> {
    let deadline = std::time::Instant::now() + QID_RETRY;
    let mut busy: Vec<u16> = Vec::new();
    loop {
        let qid = match link.alloc_qid(&busy) {
            Some(q) => q,
            None if !busy.is_empty() => {
                busy.clear();
                continue;
            }
            None => {
                return Err(link.peer.err(
                    "open an I/O queue",
                    format!(
                        "all {} I/O queues the controller granted are in use",
                        link.info.io_queues
                    ),
                ))
            }
        };
        let ids = (link.hostnqn.as_str(), link.hostid);
        let r =
            controller::connect_io_queue(&link.peer, &link.opts, ids, link.info.cntlid, qid, size);
        match r {
            Ok(IoQueueConnect::Connected(c)) => return Ok((c, qid)),
            Ok(IoQueueConnect::QidBusy(e)) => {
                link.release_qid(qid);
                if std::time::Instant::now() > deadline {
                    return Err(e);
                }
                busy.push(qid);
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                link.release_qid(qid);
                return Err(e);
            }
        }
    }
}

/// Connects to the controller of subsystem `opts.subnqn` at `host_port` and brings it up:
/// one association.
fn connect_link(host_port: &str, opts: &NvmeTcpOptions) -> Result<Link> {
    let peers = Peer::resolve(host_port, &opts.subnqn)?;
    let hostnqn = opts
        .hostnqn
        .clone()
        .unwrap_or_else(|| host_identity().0.clone());
    let hostid = host_id_for(&hostnqn);
    let (admin, info, geo) = controller::bring_up(&peers, opts, &hostnqn, hostid)?;
    let peer = admin.peer.clone();
    let health = Arc::new(Health::default());
    let admin_queue = AdminQueue::start(admin, opts.kato, info.cc, Arc::clone(&health))?;
    let used = vec![false; usize::from(info.io_queues.max(1))];
    Ok(Link {
        peer,
        opts: opts.clone(),
        hostnqn,
        hostid,
        info,
        geo,
        qids: Mutex::new(QidTable { used, next: 0 }),
        health,
        admin: admin_queue,
    })
}

/// A namespace on a remote NVMe/TCP controller.
#[derive(Debug)]
pub struct NvmeTcpDevice {
    name: String,
    sup: Arc<Supervisor>,
    /// Declared after `sup` only for readability; the thread holds its own `Arc`.
    _thread: SupervisorThread,
}

impl NvmeTcpDevice {
    /// Connects to the controller of subsystem `opts.subnqn` at `host_port` and brings it up
    /// for namespace `opts.nsid`. Errors name the step that failed and the NVMe status or
    /// the termination request's FES. A controller lost later is reconnected in the
    /// background (`opts.reconnect_delay`, `opts.ctrl_loss_tmo`).
    pub fn connect(host_port: &str, opts: &NvmeTcpOptions) -> Result<Self> {
        let link = Arc::new(connect_link(host_port, opts)?);
        let name = format!("nvme-tcp://{host_port}/{}?nsid={}", opts.subnqn, opts.nsid);
        let sup = Arc::new(Supervisor::new(host_port, opts, link));
        let thread = SupervisorThread::start(Arc::clone(&sup))?;
        Ok(Self {
            name,
            sup,
            _thread: thread,
        })
    }

    /// A device for a controller that cannot be reached now (`reason`): it reports `geo` —
    /// what the namespace is expected to be, e.g. the size of the volume's other legs — and
    /// fails every queue-pair open until it has connected in the background; a namespace of
    /// another geometry is refused then. A volume started while its remote site is down
    /// opens the leg this way, faulted, and resyncs it when the site returns.
    pub fn connect_later(
        host_port: &str,
        opts: &NvmeTcpOptions,
        geo: Geometry,
        reason: String,
    ) -> Result<Self> {
        let name = format!("nvme-tcp://{host_port}/{}?nsid={}", opts.subnqn, opts.nsid);
        let sup = Arc::new(Supervisor::offline(host_port, opts, geo, reason));
        let thread = SupervisorThread::start(Arc::clone(&sup))?;
        Ok(Self {
            name,
            sup,
            _thread: thread,
        })
    }

    /// Renames the device (the URI it was opened from).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// What the controller reported at the last bring-up.
    pub fn controller(&self) -> ControllerInfo {
        self.sup
            .link()
            .map(|l| l.info.clone())
            .unwrap_or_else(|| self.sup.last_info())
    }

    /// The host NQN this device connects with.
    pub fn host_nqn(&self) -> String {
        self.sup.hostnqn()
    }

    /// Why the controller is considered lost (its keep-alive failed, an I/O queue died, a
    /// reconnect failed), if it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.sup.lost_reason()
    }

    /// The connection's state: connected, last error, reconnect attempts, round trip, fence.
    pub fn link_status(&self) -> crate::LinkStatus {
        self.sup.status()
    }

    /// Opens a queue pair as its concrete type. `depth` commands may be outstanding at once,
    /// at most the queue size (URI `queue_size`, CAP.MQES + 1, MAXCMD).
    pub fn open_tcp_qpair(&self, depth: u32) -> Result<TcpQueuePair> {
        let link = self.sup.live("open an I/O queue")?;
        qpair::open(&self.sup, &link, depth)
    }
}

impl BlockDevice for NvmeTcpDevice {
    fn geometry(&self) -> Geometry {
        self.sup.geometry()
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(self.open_tcp_qpair(depth)?))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn link(&self) -> Option<crate::LinkStatus> {
        Some(self.sup.status())
    }

    fn link_generation(&self) -> Option<u64> {
        Some(self.sup.generation())
    }

    fn volatile_write_cache(&self) -> bool {
        // Not connected yet: assume a cache.
        self.sup.link().map_or(true, |l| l.info.volatile_cache)
    }

    fn reservations(&self) -> Option<&dyn crate::Reservations> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
