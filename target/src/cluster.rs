//! The pair controller's etcd side (`[cluster]`, `docs/pair.md`): one thread holds the etcd
//! client, turns what etcd says into [`pair`](crate::pair) events and carries out the actions:
//! the volume's fence and ANA states, `volume_promote`, the lease.
//!
//! Every etcd request has a short deadline, so a node cut off from etcd keeps ticking and
//! fences itself when its lease may have run out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};

use crate::config::ClusterConfig;
use crate::control::Registry;
use crate::nvme_tcp::AnaState;
use crate::pair::{Action, Event, PairController, Role};

/// Deadline of one etcd request.
const REQUEST: Duration = Duration::from_millis(800);
/// How often the key is read.
const POLL: Duration = Duration::from_millis(200);
/// How long a node that hands the volume over (resign, stop) lets host commands already past
/// the ANA check finish between going inaccessible and fencing the volume.
const DRAIN: Duration = Duration::from_millis(100);

/// The running controller.
#[derive(Debug)]
pub(crate) struct Cluster {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Cluster {
    /// Starts the controller of `cfg.volume` on `reg`. The volume's listeners go
    /// inaccessible until this node holds the key.
    pub(crate) fn start(reg: Arc<Registry>, cfg: ClusterConfig) -> std::io::Result<Self> {
        set_ana(&reg, &cfg.volume, AnaState::Inaccessible);
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nvm-cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: no async runtime; fencing the volume");
                        fence(&reg, &cfg.volume, "the cluster controller could not start");
                        return;
                    }
                };
                rt.block_on(Node::new(reg, cfg, s).run());
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the controller; a node holding the key revokes its lease first (the peer takes
    /// over without waiting for the TTL).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets every ANA group that exports `volume`, through every listener, to `state`.
fn set_ana(reg: &Registry, volume: &str, state: AnaState) {
    let Some(t) = reg.nvme_tcp.upgrade() else {
        return;
    };
    for s in t.ana_states().iter().filter(|s| s.namespace == volume) {
        if let Err(e) = t.set_ana_state(s.listener, Some(&s.nqn), s.group, state) {
            tracing::warn!(volume, listener = %s.listener, error = %e, "cluster: cannot set the ANA state");
        }
    }
}

/// Stops the volume acknowledging anything and sets its paths inaccessible.
fn fence(reg: &Registry, volume: &str, why: &str) {
    if let Some(e) = reg.find_volume(volume) {
        e.volume.fence_out(format!("cluster: {why}"));
    }
    set_ana(reg, volume, AnaState::Inaccessible);
}

struct Node {
    reg: Arc<Registry>,
    cfg: ClusterConfig,
    key: String,
    stop: Arc<AtomicBool>,
    pc: PairController,
    client: Option<Client>,
    lease: Option<i64>,
    keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    said_campaign_refused: bool,
    /// The key has been seen held by another node since this one started.
    seen_active: bool,
}

impl Node {
    fn new(reg: Arc<Registry>, cfg: ClusterConfig, stop: Arc<AtomicBool>) -> Self {
        Self {
            key: cfg.key(),
            pc: PairController::new(cfg.node.clone(), cfg.ttl(), cfg.margin()),
            reg,
            cfg,
            stop,
            client: None,
            lease: None,
            keeper: None,
            said_campaign_refused: false,
            seen_active: false,
        }
    }

    fn holds(&self) -> bool {
        matches!(
            self.pc.role(),
            Role::Promoting { .. } | Role::Active { .. } | Role::Resigning
        )
    }

    async fn run(mut self) {
        tracing::info!(
            node = self.cfg.node,
            volume = self.cfg.volume,
            key = self.key,
            "cluster: controller started"
        );
        let mut next_poll = Instant::now();
        let mut next_keepalive = Instant::now();
        let mut role = self.pc.role().clone();
        while !self.stop.load(Ordering::Acquire) {
            let acts = self.pc.tick(Instant::now());
            self.execute(acts).await;
            if self.reg.resign.swap(false, Ordering::AcqRel) {
                tracing::warn!(node = self.cfg.node, volume = self.cfg.volume, role = ?self.pc.role(), "cluster: handing the volume to the peer (cluster_resign)");
                let acts = self.pc.on(Event::Resign, Instant::now());
                self.execute(acts).await;
            }
            if self.client.is_none() {
                self.connect().await;
            }
            let now = Instant::now();
            if self.client.is_some() && now >= next_poll {
                next_poll = now + POLL;
                if let Some(ev) = self.read_key().await {
                    if matches!(&ev, Event::Key { holder: Some(h), .. } if *h != self.cfg.node) {
                        self.seen_active = true;
                    }
                    let acts = self.pc.on(ev, Instant::now());
                    self.execute(acts).await;
                }
            }
            if self.holds() && now >= next_keepalive {
                next_keepalive = now + self.cfg.ttl() / 4;
                if let Some(ev) = self.keep_alive().await {
                    let acts = self.pc.on(ev, Instant::now());
                    self.execute(acts).await;
                }
            }
            if *self.pc.role() != role {
                role = self.pc.role().clone();
                tracing::warn!(node = self.cfg.node, volume = self.cfg.volume, role = ?role, "cluster: role changed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.holds() {
            // Hosts move off this path first (ANA inaccessible is a path error they retry
            // elsewhere); then nothing more is acknowledged here, and only then may the peer
            // take the key.
            set_ana(&self.reg, &self.cfg.volume, AnaState::Inaccessible);
            tokio::time::sleep(DRAIN).await;
            fence(&self.reg, &self.cfg.volume, "this node is stopping");
            self.revoke().await;
            tracing::warn!(
                node = self.cfg.node,
                volume = self.cfg.volume,
                "cluster: stopped; the key is released"
            );
        }
    }

    async fn connect(&mut self) {
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST)
            .with_timeout(REQUEST);
        match tokio::time::timeout(
            REQUEST * 2,
            Client::connect(self.cfg.endpoints.clone(), Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => self.client = Some(c),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cluster: etcd unreachable");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }

    /// The key as etcd has it; `None` when etcd did not answer (the client is dropped, to
    /// connect again).
    async fn read_key(&mut self) -> Option<Event> {
        let c = self.client.as_mut()?;
        match tokio::time::timeout(REQUEST, c.get(self.key.clone(), None)).await {
            Ok(Ok(r)) => {
                let kv = r.kvs().first();
                Some(Event::Key {
                    holder: kv.and_then(|kv| kv.value_str().ok().map(str::to_string)),
                    revision: kv.map_or(0, |kv| kv.create_revision() as u64),
                })
            }
            _ => {
                self.client = None;
                None
            }
        }
    }

    async fn keep_alive(&mut self) -> Option<Event> {
        let id = self.lease?;
        if self.keeper.is_none() {
            let c = self.client.as_mut()?;
            match tokio::time::timeout(REQUEST, c.lease_keep_alive(id)).await {
                Ok(Ok(k)) => self.keeper = Some(k),
                _ => {
                    self.client = None;
                    return None;
                }
            }
        }
        let (keeper, stream) = self.keeper.as_mut()?;
        let sent = Instant::now();
        let answer = tokio::time::timeout(REQUEST, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => Some(Event::KeepAliveOk { sent }),
            Ok(Ok(Some(_))) => Some(Event::LeaseGone),
            _ => {
                self.keeper = None;
                self.client = None;
                None
            }
        }
    }

    async fn revoke(&mut self) {
        let Some(id) = self.lease.take() else { return };
        self.keeper = None;
        if let Some(c) = self.client.as_mut() {
            let _ = tokio::time::timeout(REQUEST, c.lease_revoke(id)).await;
        }
    }

    /// Creates the key under a new lease if nobody holds it.
    async fn campaign(&mut self) -> Option<Event> {
        let c = self.client.as_mut()?;
        let sent = Instant::now();
        let ttl = self.cfg.ttl().as_secs() as i64;
        let grant = match tokio::time::timeout(REQUEST, c.lease_grant(ttl, None)).await {
            Ok(Ok(g)) => g,
            _ => return Some(Event::Lost { holder: "?".into() }),
        };
        let id = grant.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.clone(),
                self.cfg.node.clone(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        match tokio::time::timeout(REQUEST, c.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => {
                self.lease = Some(id);
                self.keeper = None;
                let revision = r.header().map_or(0, |h| h.revision() as u64);
                tracing::warn!(
                    node = self.cfg.node,
                    volume = self.cfg.volume,
                    revision,
                    "cluster: this node holds the key"
                );
                Some(Event::Won { revision, sent })
            }
            _ => {
                let _ = tokio::time::timeout(REQUEST, c.lease_revoke(id)).await;
                Some(Event::Lost {
                    holder: "another node".into(),
                })
            }
        }
    }

    /// Why this node must not campaign: it is a standby that has not yet seen an active
    /// node hold the key since it started (it takes over from an active node, never races
    /// the primary at bring-up), or whose local copy holds no superblock of the volume yet.
    /// Said once per change.
    fn campaign_refused(&mut self) -> Option<String> {
        let slot = self
            .reg
            .standby
            .iter()
            .find(|s| s.cfg.name == self.cfg.volume)?;
        if slot.entry.get().is_some() {
            return None;
        }
        let why = if !self.seen_active {
            "this standby has not seen an active node yet"
        } else if slot.device.copy_identity().is_none() {
            "this standby holds no copy of the volume yet"
        } else {
            self.said_campaign_refused = false;
            return None;
        };
        if !self.said_campaign_refused {
            tracing::warn!(
                node = self.cfg.node,
                volume = self.cfg.volume,
                why,
                "cluster: the key is free; not campaigning"
            );
            self.said_campaign_refused = true;
        }
        Some(format!("nobody: {why}"))
    }

    /// Makes the volume servable here: a standby is promoted (fence the old primary with the
    /// next epoch, bump it, open the volume); a volume already open must not be fenced.
    fn promote(&self) -> Event {
        let name = &self.cfg.volume;
        if let Some(slot) = self.reg.standby.iter().find(|s| s.cfg.name == *name) {
            if slot.entry.get().is_none() {
                return match crate::promote::promote(&self.reg, slot) {
                    Ok(_) => Event::PromoteDone,
                    Err(e) => Event::PromoteFailed { why: e.message },
                };
            }
        }
        match self.reg.find_volume(name) {
            Some(e) => match e.volume.fenced() {
                None => Event::PromoteDone,
                Some(why) => Event::PromoteFailed { why },
            },
            None => Event::PromoteFailed {
                why: format!("no volume '{name}'"),
            },
        }
    }

    async fn execute(&mut self, acts: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = acts.into();
        while let Some(a) = queue.pop_front() {
            let ev = match a {
                Action::Fence { why } => {
                    // Fenced and resigning alike: this process acknowledges nothing more.
                    tracing::warn!(
                        node = self.cfg.node,
                        volume = self.cfg.volume,
                        why,
                        "cluster: not serving"
                    );
                    if *self.pc.role() == Role::Resigning {
                        // A planned handover: hosts move off this path first (ANA
                        // inaccessible is a path error they retry on the peer), so that no
                        // command of theirs meets the fence's Reservation Conflict.
                        set_ana(&self.reg, &self.cfg.volume, AnaState::Inaccessible);
                        tokio::time::sleep(DRAIN).await;
                    }
                    fence(&self.reg, &self.cfg.volume, &why);
                    None
                }
                Action::Campaign => match self.campaign_refused() {
                    Some(why) => Some(Event::Lost { holder: why }),
                    None => self.campaign().await,
                },
                Action::Promote { epoch } => {
                    tracing::warn!(
                        node = self.cfg.node,
                        volume = self.cfg.volume,
                        revision = epoch,
                        "cluster: promoting"
                    );
                    Some(self.promote())
                }
                Action::SetOptimized => {
                    set_ana(&self.reg, &self.cfg.volume, AnaState::Optimized);
                    tracing::warn!(
                        node = self.cfg.node,
                        volume = self.cfg.volume,
                        "cluster: serving (ANA optimized)"
                    );
                    None
                }
                Action::Revoke => {
                    self.revoke().await;
                    (*self.pc.role() == Role::Resigning).then_some(Event::Resigned)
                }
            };
            if let Some(ev) = ev {
                queue.extend(self.pc.on(ev, Instant::now()));
            }
        }
    }
}
