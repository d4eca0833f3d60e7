//! Standby volumes and `volume_promote` (`docs/promotion.md`).
//!
//! A site that another site mirrors onto exports its leg raw (a one-leg volume with
//! `bitmap = false`): the leg holds the other site's volume, superblock and bitmap included.
//! The same site declares that volume with `standby = true` and its legs in the volume's
//! order, its own leg as `volume://RAW`. A standby volume is not opened at start; its
//! export is there (with the geometry its metadata layout gives the leg) but opens no queue
//! pair. `volume_promote` then, step by step:
//!
//! 1. reads the local leg's superblock: the volume's UUID and the epoch it was written at;
//! 2. preempts the old primary on this node's own export of the leg: it registers the key
//!    of the next epoch from a host of its own and takes the Write Exclusive reservation with
//!    Preempt and Abort, so every later write of the old primary meets Reservation Conflict;
//! 3. takes the reservation over with the same key on every remote leg it can reach, then
//!    opens the volume from its legs (the old primary's leg, unreachable, comes up faulted
//!    and keeps a record of every region written from now on: its missed regions);
//! 4. raises the epoch by one in every in-sync leg's superblock;
//! 5. fences its remote legs with takeover, and serves.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use nvmirror_mirror::bitmap::MetadataLayout;
use nvmirror_mirror::fencing::{fence_leg, LegFence};
use nvmirror_mirror::promotion::read_superblock;
use nvmirror_mirror::Volume;
use nvmirror_nvme::backend::{NvmeTcpDevice, NvmeTcpOptions};
use nvmirror_nvme::spec::Geometry;
use nvmirror_nvme::{BlockDevice, QueuePair};

use crate::config::{Config, VolumeConfig, LOCAL_VOLUME_SCHEME};
use crate::control::{Registry, VolumeEntry};
use crate::rpc::{Methods, RpcError};
use crate::serve::{open_entry, ServeError};

/// The export of a standby volume: the promoted volume once there is one.
#[derive(Debug)]
pub struct StandbyDevice {
    name: String,
    geo: Geometry,
    /// The volume's UUID, from the local copy's superblock: the namespace then has the
    /// identity the primary's export has (multipath). Read again while unknown (a copy the
    /// primary formats after this node started).
    identity: OnceLock<[u8; 16]>,
    /// The local copy, for that.
    copy: Arc<dyn BlockDevice>,
    /// The promoted volume (shared with the queue pairs opened before the promotion).
    volume: Arc<OnceLock<Arc<Volume>>>,
}

impl StandbyDevice {
    /// The volume's UUID as the local copy's superblock holds it (`None`: blank, or another
    /// volume's). Control plane: one read of the copy's first block while unknown.
    pub(crate) fn copy_identity(&self) -> Option<[u8; 16]> {
        if let Some(id) = self.identity.get() {
            return Some(*id);
        }
        let id = read_superblock(&*self.copy, Duration::from_secs(10))
            .ok()
            .flatten()
            .filter(|sb| sb.volume_name == self.name)
            .map(|sb| sb.volume_uuid.0)?;
        Some(*self.identity.get_or_init(|| id))
    }
}

impl BlockDevice for StandbyDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Before the promotion a host may connect (a multipath host keeps this path ready):
    /// its queue pair answers every command with ANA Inaccessible, a path error it retries
    /// on the other node, and forwards to the volume once it is promoted.
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(StandbyQueuePair {
            volume: Arc::clone(&self.volume),
            inner: None,
            depth,
            ready: std::collections::VecDeque::with_capacity(depth as usize),
        }))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> Option<[u8; 16]> {
        self.copy_identity()
    }
}

/// A queue pair on a standby export: see [`StandbyDevice::open_qpair`].
#[derive(Debug)]
struct StandbyQueuePair {
    volume: Arc<OnceLock<Arc<Volume>>>,
    /// The promoted volume's queue pair, opened at the first command after the promotion.
    inner: Option<Box<dyn QueuePair>>,
    depth: u32,
    /// Commands answered here before the promotion (capacity = depth).
    ready: std::collections::VecDeque<nvmirror_nvme::Completion>,
}

impl StandbyQueuePair {
    fn inner(&mut self) -> Option<&mut Box<dyn QueuePair>> {
        if self.inner.is_none() {
            let vol = self.volume.get()?;
            match vol.open_qpair(self.depth) {
                Ok(qp) => self.inner = Some(qp),
                Err(e) => {
                    tracing::warn!(volume = vol.name(), error = %e, "promoted volume: cannot open a queue pair");
                    return None;
                }
            }
        }
        self.inner.as_mut()
    }
}

impl QueuePair for StandbyQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.ready.len() as u32 + self.inner.as_ref().map_or(0, |q| q.outstanding())
    }

    unsafe fn submit(
        &mut self,
        cmd: nvmirror_nvme::IoCommand,
    ) -> std::result::Result<(), nvmirror_nvme::SubmitError> {
        if self.outstanding() >= self.depth {
            return Err(nvmirror_nvme::SubmitError::QueueFull);
        }
        match self.inner() {
            // SAFETY: the caller's promise for `cmd.buf` carries over to the volume's queue
            // pair, which completes the command before this one reports it.
            Some(q) => unsafe { q.submit(cmd) },
            None => {
                self.ready.push_back(nvmirror_nvme::Completion {
                    tag: cmd.tag,
                    status: nvmirror_nvme::spec::ana::status::ANA_INACCESSIBLE,
                });
                Ok(())
            }
        }
    }

    fn poll(&mut self, out: &mut [nvmirror_nvme::Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.ready.pop_front() else {
                break;
            };
            out[n] = c;
            n += 1;
        }
        if let Some(q) = self.inner.as_mut() {
            n += q.poll(&mut out[n..]);
        }
        n
    }

    fn buffer_lent(&self, tag: u64) -> bool {
        self.inner.as_ref().is_some_and(|q| q.buffer_lent(tag))
    }

    fn poll_released(&mut self, out: &mut [u64]) -> usize {
        self.inner.as_mut().map_or(0, |q| q.poll_released(out))
    }

    fn cancel(&mut self, tags: &[u64]) -> usize {
        self.inner.as_mut().map_or(0, |q| q.cancel(tags))
    }

    fn close(self: Box<Self>) -> nvmirror_nvme::Fence {
        match self.inner {
            Some(q) => q.close(),
            None => nvmirror_nvme::Fence::done(),
        }
    }
}

/// A standby volume of this node.
#[derive(Debug)]
pub struct StandbySlot {
    pub cfg: VolumeConfig,
    pub device: Arc<StandbyDevice>,
    /// The promoted volume, once `volume_promote` has opened it.
    pub entry: OnceLock<Arc<VolumeEntry>>,
    /// Its `volume://` legs: leg index and the local raw volume's leg.
    local: Vec<(usize, Arc<dyn BlockDevice>)>,
    /// The namespaces (subsystem NQN, NSID) exporting those local raw volumes and their
    /// staging areas: where the old primary holds its reservation.
    fence_at: Vec<(String, u32)>,
    /// The staging areas paired with those raw volumes (`[[cycle_apply]]`).
    staged: Vec<StagedCopy>,
    data_dir: std::path::PathBuf,
    claim_wait: Duration,
    /// Serialises promotions; keeps the connections the reservations were taken over with.
    promoter: Mutex<Vec<NvmeTcpDevice>>,
}

/// A local raw volume that is the far image of an asynchronous leg with a staging area, and
/// that area: a committed cycle there is rolled onto the image before it is promoted.
#[derive(Debug)]
struct StagedCopy {
    image: String,
    staging: String,
    image_dev: Arc<dyn BlockDevice>,
    staging_dev: Arc<dyn BlockDevice>,
}

/// The namespaces of `cfg`'s subsystems that export the volume `name`.
fn exports_of(cfg: &Config, name: &str) -> Vec<(String, u32)> {
    cfg.subsystems
        .iter()
        .filter_map(|s| {
            let at = s.namespaces.iter().position(|n| n == name)?;
            Some((s.nqn.clone(), at as u32 + 1))
        })
        .collect()
}

/// The standby volumes `cfg` declares, over the raw volumes opened already.
pub(crate) fn standby_slots(
    cfg: &Config,
    volumes: &[VolumeEntry],
) -> Result<Vec<StandbySlot>, ServeError> {
    let mut out = Vec::new();
    for v in cfg.volumes.iter().filter(|v| v.standby) {
        let err = |reason: String| ServeError::Start {
            what: format!("standby volume {}", v.name),
            reason,
        };
        let mut local = Vec::new();
        let mut fence_at = Vec::new();
        let mut staged = Vec::new();
        for (i, uri) in v.legs.iter().enumerate() {
            let Some(raw) = uri.strip_prefix(LOCAL_VOLUME_SCHEME) else {
                continue;
            };
            let entry = |name: &str| {
                volumes
                    .iter()
                    .find(|e| e.volume.name() == name)
                    .ok_or_else(|| err(format!("no raw volume '{name}'")))
            };
            let e = entry(raw)?;
            let dev = e.volume.leg_device(0).map_err(|e| err(e.to_string()))?;
            local.push((i, dev));
            fence_at.extend(exports_of(cfg, raw));
            for c in cfg.cycle_appliers.iter().filter(|c| c.image == raw) {
                let as_dev = |e: &VolumeEntry| Arc::clone(&e.volume) as Arc<dyn BlockDevice>;
                staged.push(StagedCopy {
                    image: c.image.clone(),
                    staging: c.staging.clone(),
                    image_dev: as_dev(e),
                    staging_dev: as_dev(entry(&c.staging)?),
                });
                fence_at.extend(exports_of(cfg, &c.staging));
            }
        }
        let Some((_, first)) = local.first() else {
            return Err(err(format!(
                "a standby volume has a {LOCAL_VOLUME_SCHEME}NAME leg: its copy on this node"
            )));
        };
        let g = first.geometry();
        let region = nvmirror_nvme::uri::parse_size(&v.region_size).map_err(err)?;
        let layout = MetadataLayout::compute(g.bytes(), g.lba_size, region)
            .ok_or_else(|| err("the leg is too small for the metadata".into()))?;
        let device = Arc::new(StandbyDevice {
            name: v.name.clone(),
            geo: Geometry {
                lba_size: g.lba_size,
                num_blocks: layout.data_blocks,
            },
            identity: OnceLock::new(),
            copy: Arc::clone(first),
            volume: Arc::new(OnceLock::new()),
        });
        device.copy_identity();
        out.push(StandbySlot {
            cfg: v.clone(),
            device,
            entry: OnceLock::new(),
            local,
            fence_at,
            staged,
            data_dir: cfg.data_dir.clone(),
            claim_wait: cfg.service.claim_timeout(),
            promoter: Mutex::new(Vec::new()),
        });
    }
    Ok(out)
}

/// The host NQN a promotion registers with on this node's own exports.
fn promoter_hostnqn(volume: &nvmirror_mirror::superblock::Uuid, epoch: u64) -> String {
    let mut b = volume.0;
    b[..8]
        .iter_mut()
        .zip(epoch.to_be_bytes())
        .for_each(|(x, e)| *x ^= e ^ 0x5a);
    format!(
        "nqn.2014-08.org.nvmexpress:uuid:{}",
        nvmirror_mirror::superblock::Uuid(b)
    )
}

/// Takes the reservation of namespace `nsid` of `nqn` (an export of this node) over for
/// `volume` at `epoch`, through this node's own NVMe/TCP listener.
fn preempt_at_own_export(
    reg: &Registry,
    (nqn, nsid): (&str, u32),
    volume: nvmirror_mirror::superblock::Uuid,
    epoch: u64,
) -> Result<NvmeTcpDevice, RpcError> {
    let target = reg
        .nvme_tcp
        .upgrade()
        .ok_or_else(|| RpcError::failed("the NVMe/TCP front end is not running"))?;
    let mut addr = *target
        .local_addrs()
        .first()
        .ok_or_else(|| RpcError::failed("the NVMe/TCP front end has no listener"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut opts = NvmeTcpOptions::new(nqn);
    opts.nsid = nsid;
    opts.hostnqn = Some(promoter_hostnqn(&volume, epoch));
    let dev = NvmeTcpDevice::connect(&addr.to_string(), &opts)
        .map_err(|e| RpcError::failed(format!("cannot reach this node's export {nqn}: {e}")))?;
    match fence_leg(&dev, volume, epoch, true) {
        LegFence::Held { key } => {
            tracing::warn!(
                nqn,
                nsid,
                key = format!("{key:#018x}"),
                epoch,
                "the old primary is preempted on this node's export"
            );
            Ok(dev)
        }
        other => Err(RpcError::failed(format!(
            "cannot take the reservation of {nqn} namespace {nsid} over at epoch {epoch}: {other:?}"
        ))),
    }
}

/// `volume_promote {"name": VOLUME}`: see the module documentation. What was found in each
/// staging area (step 2b).
pub(crate) fn promote(reg: &Registry, slot: &StandbySlot) -> Result<Vec<Value>, RpcError> {
    let mut promoter = slot.promoter.lock().unwrap_or_else(|e| e.into_inner());
    let name = &slot.cfg.name;
    if slot.entry.get().is_some() {
        return Err(RpcError::failed(format!(
            "volume '{name}' is promoted already"
        )));
    }
    // 1. Which volume the local copy holds, and at which epoch.
    let mut found = None;
    for (i, dev) in &slot.local {
        let sb = read_superblock(&**dev, Duration::from_secs(10))
            .map_err(|e| RpcError::failed(e.to_string()))?
            .ok_or_else(|| {
                RpcError::failed(format!(
                    "leg {i} of '{name}' is blank: this site holds no copy to promote"
                ))
            })?;
        if sb.volume_name != *name {
            return Err(RpcError::failed(format!(
                "leg {i} holds volume '{}', not '{name}'",
                sb.volume_name
            )));
        }
        found = Some(match found {
            Some((u, _)) if u != sb.volume_uuid => {
                return Err(RpcError::failed(format!(
                    "the local legs hold two volumes ({u}, {})",
                    sb.volume_uuid
                )))
            }
            Some((u, e)) => (u, std::cmp::max(e, sb.epoch)),
            None => (sb.volume_uuid, sb.epoch),
        });
    }
    let (uuid, old) = found.expect("a standby volume has a local leg");
    let epoch = old + 1;
    // 2. The old primary writes the local copy (and its staging areas) no more.
    for (nqn, nsid) in &slot.fence_at {
        promoter.push(preempt_at_own_export(reg, (nqn, *nsid), uuid, epoch)?);
    }
    // 2b. A cycle committed to a staging area is rolled onto its image, as
    // `nvmirror cycle-recover` would: the image is then the cut of that cycle, a crash
    // state of the old primary's writes, and no applier writes it again.
    let staged = slot
        .staged
        .iter()
        .map(|s| roll_forward_staged(reg, s))
        .collect::<Result<Vec<_>, _>>()?;
    // 3. Open the volume from its legs.
    let locals = |n: &str| -> Option<Arc<dyn BlockDevice>> {
        let at = slot.cfg.legs.iter().position(|l| {
            l.strip_prefix(LOCAL_VOLUME_SCHEME)
                .is_some_and(|raw| raw == n)
        })?;
        slot.local
            .iter()
            .find(|(i, _)| *i == at)
            .map(|(_, d)| Arc::clone(d))
    };
    // Remote legs it can reach (an old primary that rejoined as a mirror, fenced by this
    // node's previous run at an older epoch) are taken over with the new key before the
    // open writes their bitmap and superblock.
    let fence_first = |legs: &[Arc<dyn BlockDevice>]| -> Result<(), String> {
        for (i, leg) in legs.iter().enumerate() {
            let Some(res) = leg.reservations() else {
                continue;
            };
            if !leg.link().is_some_and(|l| l.connected) {
                continue;
            }
            if let LegFence::Lost { why } = fence_leg(res, uuid, epoch, true) {
                return Err(format!("leg {i}: reservation {why}"));
            }
        }
        Ok(())
    };
    let entry = open_entry(
        &slot.data_dir,
        slot.claim_wait,
        &slot.cfg,
        &locals,
        Some(&fence_first),
    )
    .map_err(|e| RpcError::failed(e.to_string()))?;
    let vol = Arc::clone(&entry.volume);
    if let Some(why) = vol.fenced() {
        return Err(RpcError::failed(format!(
            "volume '{name}' opened fenced ({why}): a newer epoch holds it elsewhere"
        )));
    }
    if vol.geometry() != slot.device.geo {
        return Err(RpcError::failed(format!(
            "volume '{name}' has {:?}, its standby export was started with {:?} (region_size differs from the primary's?)",
            vol.geometry(),
            slot.device.geo
        )));
    }
    // 4. The new epoch, on disk before anything is served.
    let now = vol
        .bump_epoch()
        .map_err(|e| RpcError::failed(e.to_string()))?;
    if now != epoch {
        return Err(RpcError::failed(format!(
            "the volume opened at epoch {}, the local legs said {old}",
            now - 1
        )));
    }
    // 5. Remote legs this node can reach are fenced with the new key; then serve.
    vol.fence_remote_legs(true);
    let _ = slot.device.volume.set(vol);
    let _ = slot.entry.set(Arc::new(entry));
    tracing::warn!(volume = %name, epoch, "promoted: serving");
    Ok(staged)
}

/// Step 2b of a promotion for one staging area: its applier stops for good, then a
/// committed cycle is rolled forward.
fn roll_forward_staged(reg: &Registry, s: &StagedCopy) -> Result<Value, RpcError> {
    // Once inserted, no apply of the image is under way (the applier holds the lock through
    // each one) and none starts.
    reg.retired_appliers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(s.image.clone());
    let timeout = Duration::from_secs(10);
    // Not one cycle committed there (a blank staging area): the image is what was written to
    // it directly.
    let mut out = json!({
        "image": s.image,
        "staging": s.staging,
        "cycle": 0,
        "rolled_forward": false,
    });
    match nvmirror_mirror::recover_cycle(
        Arc::clone(&s.image_dev),
        Arc::clone(&s.staging_dev),
        timeout,
    ) {
        Ok(r) => {
            tracing::warn!(
                image = s.image,
                staging = s.staging,
                cycle = r.cycle,
                rolled_forward = r.rolled_forward,
                cut_seq = r.cut_seq,
                "the image is at the staged cycle's cut"
            );
            out["cycle"] = r.cycle.into();
            out["rolled_forward"] = r.rolled_forward.into();
            out["cut_seq"] = r.cut_seq.into();
            out["cut_unix_ms"] = r.cut_unix_ms.into();
        }
        Err(e) if e.contains("blank") => {}
        Err(e) => {
            return Err(RpcError::failed(format!(
                "cannot roll the cycle staged in '{}' onto '{}': {e}; the image may hold part of a cycle (run `nvmirror cycle-recover`, or remove the [[cycle_apply]] pairing to promote it as it is)",
                s.staging, s.image
            )))
        }
    }
    Ok(out)
}

pub(crate) fn add_methods(m: &mut Methods, reg: &Arc<Registry>) {
    let r = Arc::clone(reg);
    m.add("volume_promote", move |p| {
        let name = p
            .get("name")
            .or_else(|| p.get("volume"))
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("missing string parameter 'name'"))?;
        let slot = r
            .standby
            .iter()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| RpcError::invalid_params(format!("no standby volume named '{name}'")))?;
        let staging = promote(&r, slot)?;
        let v = slot.entry.get().expect("promoted");
        Ok(json!({"promoted": name, "staging": staging, "status": r.volume_status(v)}))
    });
}
