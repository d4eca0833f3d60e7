//! The control plane's view of what `nvmirror serve` runs: the volumes with their legs' fault
//! injectors, the JSON-RPC methods over them and the Prometheus exposition.

use std::sync::Arc;

use serde_json::{json, Value};

use nvmirror_mirror::fencing::LegFence;
use nvmirror_mirror::{LegRole, Volume};
use nvmirror_nvme::backend::{Fault, FaultInjector, OpFilter};
use nvmirror_nvme::{BlockDevice, Status};
use nvmirror_poller::ReactorHandle;

use crate::rpc::{Methods, RpcError};

/// One leg slot of a served volume.
#[derive(Debug, Clone)]
pub struct LegEntry {
    pub uri: String,
    /// The leg's fault switchboard (every leg is opened behind a `FaultyDevice`).
    pub injector: Arc<FaultInjector>,
}

/// One served volume.
#[derive(Debug)]
pub struct VolumeEntry {
    pub volume: Arc<Volume>,
    /// Every leg slot by index, legs added at run time included.
    pub legs: std::sync::Mutex<Vec<LegEntry>>,
    /// Where the run-time leg list is kept (persistent volumes only).
    pub members: Option<MembersFile>,
}

/// The file `leg_add` and `leg_remove` record the leg list in (`members`).
#[derive(Debug)]
pub struct MembersFile {
    pub path: std::path::PathBuf,
    /// The configured legs the list derives from: after a run-time change, the legs the
    /// live configuration lists (see `live_config`).
    pub configured: std::sync::Mutex<Vec<String>>,
}

impl VolumeEntry {
    /// Leg URIs by index.
    pub fn uris(&self) -> Vec<String> {
        lock(&self.legs).iter().map(|l| l.uri.clone()).collect()
    }

    /// The URIs of the legs that are members now (removed slots left out): what the live
    /// configuration lists.
    pub fn member_uris(&self) -> Vec<String> {
        let states = self.volume.leg_states();
        lock(&self.legs)
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                !states
                    .get(*i)
                    .is_some_and(|s| s.state == nvmirror_mirror::LegState::Removed)
            })
            .map(|(_, l)| l.uri.clone())
            .collect()
    }

    /// Saves the leg list as it is now: every slot's URI, and which slots are removed,
    /// derived from `configured` (the legs the live configuration lists from now on).
    fn persist_members(&self, configured: Vec<String>) -> Result<(), RpcError> {
        let Some(f) = &self.members else {
            return Ok(());
        };
        *lock(&f.configured) = configured.clone();
        let legs = lock(&self.legs);
        let states = self.volume.leg_states();
        let list = crate::members::Membership {
            volume: self.volume.name().to_string(),
            configured,
            legs: legs
                .iter()
                .enumerate()
                .map(|(i, l)| crate::members::MemberLeg {
                    uri: l.uri.clone(),
                    removed: states
                        .get(i)
                        .is_some_and(|s| s.state == nvmirror_mirror::LegState::Removed),
                })
                .collect(),
        };
        list.store(&f.path).map_err(|e| {
            RpcError::failed(format!(
                "the change is made but could not be saved to {}: {e}; a restart would not know it",
                f.path.display()
            ))
        })
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything the control plane can see.
#[derive(Debug)]
pub struct Registry {
    /// The served volumes; `volume_create` and `volume_delete` change the list (control
    /// path only: the I/O path holds its volumes itself).
    volumes: std::sync::RwLock<Vec<Arc<VolumeEntry>>>,
    /// Standby volumes (`promote.rs`); a promoted one serves as the volumes do.
    pub standby: Vec<crate::promote::StandbySlot>,
    pub reactors: ReactorHandle,
    /// The NVMe/TCP front end, while it runs (host access lists).
    pub nvme_tcp: std::sync::Weak<crate::NvmeTcpTarget>,
    /// The live configuration (`serve` only): the object RPCs change it.
    pub live: Option<Arc<crate::live_config::LiveConfig>>,
    /// Volumes the NBD front end exports (fixed while it runs).
    pub nbd_exports: Vec<String>,
    /// The data directory, absolute (shown in `volume_status`).
    pub data_dir: std::path::PathBuf,
    /// Where `leg_add` and `volume_create` may open or create `file://` legs, canonical
    /// (`leg_dirs.rs`).
    pub leg_dirs: Vec<std::path::PathBuf>,
    /// The volume of this node's `[cluster]` section, and the operator's request that it hand
    /// the volume to its peer (`cluster_resign`), read by the pair controller.
    pub cluster_volume: Option<String>,
    pub resign: std::sync::atomic::AtomicBool,
    /// Per image volume of a `[[cycle_apply]]`: what its far-site applier did last (shown
    /// in `volume_status` as `cycle_apply`).
    pub cycle_apply: std::sync::Mutex<std::collections::BTreeMap<String, Value>>,
    /// Image volumes whose applier has stopped for good: a promotion made them a leg of a
    /// volume this node serves. The applier holds the lock through each apply, so a
    /// promotion that has inserted an image knows no apply of it is under way.
    pub retired_appliers: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// How the resyncs this node starts copy (`[resync]`).
    pub resync: nvmirror_mirror::ResyncConfig,
}

impl Registry {
    /// A registry over `volumes`.
    pub fn new(
        volumes: Vec<VolumeEntry>,
        reactors: ReactorHandle,
        nvme_tcp: std::sync::Weak<crate::NvmeTcpTarget>,
        live: Option<Arc<crate::live_config::LiveConfig>>,
    ) -> Self {
        Self {
            volumes: std::sync::RwLock::new(volumes.into_iter().map(Arc::new).collect()),
            standby: Vec::new(),
            reactors,
            nvme_tcp,
            live,
            nbd_exports: Vec::new(),
            data_dir: std::path::PathBuf::new(),
            leg_dirs: Vec::new(),
            cluster_volume: None,
            resign: std::sync::atomic::AtomicBool::new(false),
            cycle_apply: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            retired_appliers: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            resync: nvmirror_mirror::ResyncConfig::default(),
        }
    }

    /// The same registry with standby volumes (`promote.rs`).
    pub fn with_standby(mut self, standby: Vec<crate::promote::StandbySlot>) -> Self {
        self.standby = standby;
        self
    }

    /// The volumes served now: the configured and RPC-created ones, then the standby
    /// volumes promoted so far.
    pub fn volumes(&self) -> Vec<Arc<VolumeEntry>> {
        let mut v = self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.extend(self.standby.iter().filter_map(|s| s.entry.get().cloned()));
        v
    }

    /// Starts serving `entry` (its name is checked free by the caller's validation).
    pub(crate) fn add_volume(&self, entry: VolumeEntry) -> Arc<VolumeEntry> {
        let e = Arc::new(entry);
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&e));
        e
    }

    /// Stops serving volume `name`; returns it.
    pub(crate) fn take_volume(&self, name: &str) -> Option<Arc<VolumeEntry>> {
        let mut v = self.volumes.write().unwrap_or_else(|e| e.into_inner());
        let i = v.iter().position(|e| e.volume.name() == name)?;
        Some(v.remove(i))
    }

    /// Takes every configured and RPC-created volume out (shutdown; promoted standby
    /// volumes are let go with their slots).
    pub(crate) fn take_all(&self) -> Vec<Arc<VolumeEntry>> {
        std::mem::take(&mut *self.volumes.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// The volume named `name`.
    pub fn find_volume(&self, name: &str) -> Option<Arc<VolumeEntry>> {
        self.volumes().into_iter().find(|v| v.volume.name() == name)
    }

    fn volume(&self, params: &Value) -> Result<Arc<VolumeEntry>, RpcError> {
        let name = params
            .get("volume")
            .or_else(|| params.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("missing string parameter 'volume'"))?;
        self.find_volume(name).ok_or_else(|| {
            match self.standby.iter().any(|s| s.cfg.name == name) {
                true => RpcError::failed(format!(
                    "volume '{name}' is a standby: not served until volume_promote"
                )),
                false => RpcError::invalid_params(format!("no volume named '{name}'")),
            }
        })
    }

    /// Refuses `leg_add` of `uri` to `v` where the configuration file would refuse the
    /// volume with that leg (a URI that does not parse, a leg another volume uses, a fifth
    /// leg); the error names the field.
    fn check_legs(&self, v: &VolumeEntry, uri: &str) -> Result<(), RpcError> {
        let Some(live) = &self.live else {
            return Ok(());
        };
        let mut cfg = live.current();
        let name = v.volume.name();
        if let Some(vc) = cfg.volumes.iter_mut().find(|vc| vc.name == name) {
            vc.legs = v.member_uris();
            vc.legs.push(uri.to_string());
        }
        cfg.validate("leg_add")
            .map_err(|e| RpcError::invalid_params(e.to_string()))
    }

    /// After `leg_add`/`leg_remove` on `v`: the live configuration lists its member legs,
    /// and the run-time leg list is recorded as derived from them.
    fn legs_changed(&self, v: &VolumeEntry) -> Result<(), RpcError> {
        let uris = v.member_uris();
        if let Some(live) = &self.live {
            let name = v.volume.name().to_string();
            let set = uris.clone();
            live.change(
                "leg change",
                move |c| {
                    if let Some(vc) = c.volumes.iter_mut().find(|vc| vc.name == name) {
                        vc.legs = set;
                    }
                    Ok(())
                },
                |_| Ok(()),
            )
            .map_err(|e| RpcError::failed(e.to_string()))?;
        }
        v.persist_members(uris)
    }

    fn leg(&self, params: &Value) -> Result<(Arc<VolumeEntry>, usize), RpcError> {
        let v = self.volume(params)?;
        let leg = params.get("leg").and_then(Value::as_u64).ok_or_else(|| {
            RpcError::invalid_params("missing integer parameter 'leg' (0 = primary)")
        })? as usize;
        let count = v.volume.leg_states().len();
        if leg >= count {
            return Err(RpcError::invalid_params(format!(
                "volume '{}' has no leg {leg} (it has {count})",
                v.volume.name()
            )));
        }
        Ok((v, leg))
    }

    /// Runs a resync or verify job as a poller on the last reactor.
    pub fn run_job(&self, job: Box<dyn nvmirror_poller::Poller>) -> Result<(), RpcError> {
        let last = self.reactors.count().saturating_sub(1);
        self.reactors
            .send_msg(last, move |ctx| ctx.register_poller(job))
            .map_err(|e| RpcError::failed(format!("cannot start the job: {e}")))
    }

    /// Leg URI and fault switchboard of leg `leg`, including legs added at run time.
    pub(crate) fn leg_meta(
        &self,
        v: &VolumeEntry,
        leg: usize,
    ) -> Option<(String, Arc<FaultInjector>)> {
        lock(&v.legs)
            .get(leg)
            .map(|l| (l.uri.clone(), Arc::clone(&l.injector)))
    }

    /// The `volume_status` document of one volume.
    pub fn volume_status(&self, v: &VolumeEntry) -> Value {
        let geo = v.volume.geometry();
        let stats = v.volume.stats();
        let infos = v.volume.leg_states();
        let fences = v.volume.leg_fences();
        let legs: Vec<Value> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let s = stats.legs.get(i).cloned().unwrap_or_default();
                json!({
                    "index": i,
                    "uri": self.leg_meta(v, i).map(|m| m.0).unwrap_or_default(),
                    "role": match info.role { LegRole::Primary => "primary", LegRole::Mirror => "mirror" },
                    "state": info.state.as_str(),
                    "ops": s.ops,
                    "bytes": s.bytes,
                    "errors": s.errors,
                    "timeouts": s.timeouts,
                    "late_completions": s.late_completions,
                    "completed_last": s.completed_last,
                    "lat_p50_us": s.latency.p50.as_secs_f64() * 1e6,
                    "lat_p99_us": s.latency.p99.as_secs_f64() * 1e6,
                    "lat_max_us": s.latency.max.as_secs_f64() * 1e6,
                    "missed_regions": v.volume.missed_region_count(i).unwrap_or(0),
                    "faults_armed": self.leg_meta(v, i).map_or(0, |m| m.1.armed().len()),
                    "fencing": fences.get(i).map(|f| json!({
                        "state": f.name(),
                        "detail": match f {
                            LegFence::Held { key } => format!("key {key:#018x}"),
                            LegFence::Unfenced { why } => format!("WARNING: unfenced: {why}"),
                            LegFence::Lost { why } => why.clone(),
                            LegFence::Local => String::new(),
                        },
                    })),
                    "replication": v.volume.leg_device(i).ok().and_then(|d| d.replication()).map(|r| replication_json(&r)),
                    "link": v.volume.leg_device(i).ok().and_then(|d| d.link()).map(|l| json!({
                        "connected": l.connected,
                        "last_error": l.last_error,
                        "reconnect_attempts": l.reconnect_attempts,
                        "reconnects": l.generation.saturating_sub(1),
                        "rtt_us": l.rtt.map(|d| d.as_secs_f64() * 1e6),
                        "fenced_commands": l.fenced_commands,
                        "fence_remaining_s": l.fence_remaining.as_secs_f64(),
                        "given_up": l.given_up,
                    })),
                })
            })
            .collect();
        json!({
            "name": v.volume.name(),
            "data_dir": self.data_dir.display().to_string(),
            "capacity_bytes": geo.bytes(),
            "num_blocks": geo.num_blocks,
            "lba_size": geo.lba_size,
            "primary": v.volume.primary(),
            "region_size": v.volume.region_size(),
            "ana": crate::ana_rpc::volume_ana(self, v.volume.name()),
            "epoch": v.volume.epoch(),
            "fenced": v.volume.fenced(),
            "legs": legs,
            "overlap_waits": stats.overlap_waits,
            "resource_waits": stats.resource_waits,
            "read_retries": stats.read_retries,
            "read_repairs": v.volume.read_repairs(),
            "bitmap": match v.volume.metadata_layout() {
                None => Value::Null,
                Some(m) => json!({
                    "regions": m.regions,
                    "region_size": m.region_size,
                    "dirty_regions": v.volume.marked_region_count(),
                    "metadata_writes": stats.metadata_writes,
                    "hit_rate": stats.bitmap_hit_rate(),
                    "data_offset": m.data_offset,
                    "event_counter": v.volume.event_counter(),
                }),
            },
            "cycle_apply": self
                .cycle_apply
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(v.volume.name())
                .cloned(),
            "resync": match v.volume.resync_status() {
                Ok(r) => json!({
                    "leg": r.leg,
                    "state": r.state.as_str(),
                    "passes": r.passes,
                    "regions_copied": r.regions_copied,
                    "bytes_copied": r.bytes_copied,
                    "bytes_total": r.bytes_total,
                    "percent": r.percent,
                    "rate_bytes_per_sec": r.rate,
                    "eta_s": r.eta.map(|d| d.as_secs_f64()),
                    "max_rate": r.max_rate,
                    "adaptive": r.adaptive,
                    "elapsed_s": r.elapsed.as_secs_f64(),
                    "error": r.error,
                }),
                Err(_) => Value::Null,
            },
        })
    }
}

fn parse_fault(p: &Value) -> Result<Fault, RpcError> {
    let kind = p.get("fault").and_then(Value::as_str).ok_or_else(|| {
        RpcError::invalid_params(
            "missing 'fault': gone, hang, fail_reads, fail_writes or fail_after",
        )
    })?;
    let u = |k: &str, default: u64| p.get(k).and_then(Value::as_u64).unwrap_or(default);
    let status = match p.get("status") {
        None => Status::from_raw(0x4281),
        Some(v) => {
            let raw = v
                .as_u64()
                .and_then(|r| u16::try_from(r).ok())
                .filter(|r| *r <= 0x7fff)
                .ok_or_else(|| {
                    RpcError::invalid_params(format!(
                        "'status' must be a 15-bit NVMe status field (DNR << 14 | SCT << 8 | SC), got {v}"
                    ))
                })?;
            let status = Status::from_raw(raw);
            if status.is_success() {
                // An injected "failure" that reports success would drop writes silently.
                return Err(RpcError::invalid_params(
                    "'status' must be an error status; 0 is success",
                ));
            }
            status
        }
    };
    Ok(match kind {
        "gone" => Fault::Gone,
        "hang" => Fault::Hang { ops: OpFilter::All },
        "fail_reads" | "fail_writes" => Fault::FailRange {
            ops: if kind == "fail_reads" {
                OpFilter::Reads
            } else {
                OpFilter::Writes
            },
            slba: u("slba", 0),
            nlb: u("nlb", u64::MAX),
            status: if p.get("status").is_some() {
                status
            } else if kind == "fail_reads" {
                Status::UNRECOVERED_READ_ERROR
            } else {
                Status::WRITE_FAULT
            },
        },
        "fail_after" => Fault::FailAfter {
            n: u("n", 0),
            status: if p.get("status").is_some() {
                status
            } else {
                Status::INTERNAL_ERROR
            },
        },
        other => return Err(RpcError::invalid_params(format!("unknown fault '{other}'"))),
    })
}

/// Why the active node must not hand `v` to its peer yet: a leg that is not in sync (the
/// peer's own copy, as a rule, while it is resynced) may lack acknowledged writes, and the
/// peer would serve from it. `force` in `cluster_resign` skips this.
fn resign_refusal(v: &VolumeEntry) -> Result<(), RpcError> {
    use nvmirror_mirror::LegState;
    let uris = v.uris();
    for (i, s) in v.volume.leg_states().iter().enumerate() {
        if !matches!(s.state, LegState::InSync | LegState::Removed) {
            let uri = uris.get(i).map(String::as_str).unwrap_or("?");
            return Err(RpcError::failed(format!(
                "cluster_resign refused: leg {i} ({uri}) is {}, not in sync, so the peer may \
                 not hold every acknowledged write; wait until volume_status shows every leg \
                 in sync, or pass \"force\": true",
                s.state
            )));
        }
    }
    Ok(())
}

/// The JSON-RPC methods over `reg`.
pub fn methods(reg: Arc<Registry>) -> Methods {
    let mut m = Methods::new();
    let r = Arc::clone(&reg);
    m.add("volume_list", move |_| {
        Ok(Value::Array(
            r.volumes()
                .iter()
                .map(|v| {
                    let states = v.volume.leg_states();
                    let in_sync = states
                        .iter()
                        .filter(|s| s.state.as_str() == "in_sync")
                        .count();
                    json!({"name": v.volume.name(), "capacity_bytes": v.volume.geometry().bytes(),
                           "legs": states.len(), "legs_in_sync": in_sync})
                })
                .collect(),
        ))
    });
    let r = Arc::clone(&reg);
    m.add("volume_status", move |p| {
        let v = r.volume(p)?;
        Ok(r.volume_status(&v))
    });
    let r = Arc::clone(&reg);
    m.add("leg_detach", move |p| {
        let (v, leg) = r.leg(p)?;
        v.volume
            .detach_leg(leg)
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(r.volume_status(&v))
    });
    let r = Arc::clone(&reg);
    m.add("leg_fault_inject", move |p| {
        let (v, leg) = r.leg(p)?;
        let fault = parse_fault(p)?;
        let (_, injector) = r
            .leg_meta(&v, leg)
            .ok_or_else(|| RpcError::invalid_params("no such leg"))?;
        let id = injector.arm(fault);
        Ok(json!({"id": id, "fault": format!("{fault:?}")}))
    });
    let r = Arc::clone(&reg);
    m.add("leg_fault_clear", move |p| {
        let (v, leg) = r.leg(p)?;
        let (_, injector) = r
            .leg_meta(&v, leg)
            .ok_or_else(|| RpcError::invalid_params("no such leg"))?;
        match p.get("id").and_then(Value::as_u64) {
            Some(id) => Ok(json!({"cleared": injector.clear(id)})),
            None => {
                injector.clear_all();
                Ok(json!({"cleared": true}))
            }
        }
    });
    let r = Arc::clone(&reg);
    m.add("stats", move |_| {
        let vols: Vec<Value> = r.volumes().iter().map(|v| r.volume_status(v)).collect();
        let reactors: Vec<Value> = (0..r.reactors.count())
            .filter_map(|i| r.reactors.stats(i).ok().map(|s| (i, s)))
            .map(|(i, s)| {
                json!({"reactor": i, "busy_ratio": s.busy_ratio(),
                                  "messages": s.messages.load(std::sync::atomic::Ordering::Relaxed),
                                  "pollers": s.pollers.load(std::sync::atomic::Ordering::Relaxed)})
            })
            .collect();
        Ok(json!({"volumes": vols, "reactors": reactors}))
    });
    let r = Arc::clone(&reg);
    m.add("leg_attach", move |p| {
        let (v, leg) = r.leg(p)?;
        let job = v
            .volume
            .attach_leg_with(leg, r.resync.clone())
            .map_err(|e| RpcError::failed(e.to_string()))?;
        r.run_job(Box::new(job))?;
        Ok(r.volume_status(&v))
    });
    let r = Arc::clone(&reg);
    m.add("leg_add", move |p| {
        let v = r.volume(p)?;
        let uri = p
            .get("uri")
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("missing string parameter 'uri'"))?;
        crate::leg_dirs::check(uri, &r.leg_dirs).map_err(RpcError::invalid_params)?;
        r.check_legs(&v, uri)?;
        let dev =
            nvmirror_nvme::open_leg(uri).map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let faulty = nvmirror_nvme::backend::FaultyDevice::wrap(dev);
        let injector = Arc::clone(faulty.injector());
        let mut legs = lock(&v.legs);
        let job = v
            .volume
            .add_leg_with(Arc::new(faulty), r.resync.clone())
            .map_err(|e| RpcError::failed(e.to_string()))?;
        legs.push(LegEntry {
            uri: uri.to_string(),
            injector,
        });
        drop(legs);
        r.run_job(Box::new(job))?;
        r.legs_changed(&v)?;
        Ok(r.volume_status(&v))
    });
    let r = Arc::clone(&reg);
    m.add("leg_remove", move |p| {
        let (v, leg) = r.leg(p)?;
        v.volume
            .remove_leg(leg)
            .map_err(|e| RpcError::failed(e.to_string()))?;
        r.legs_changed(&v)?;
        Ok(r.volume_status(&v))
    });
    type Control = fn(&Volume) -> nvmirror_mirror::Result<()>;
    let controls: [(&str, Control); 3] = [
        ("resync_pause", Volume::resync_pause),
        ("resync_resume", Volume::resync_resume),
        ("resync_cancel", Volume::resync_cancel),
    ];
    for (name, f) in controls {
        let r = Arc::clone(&reg);
        m.add(name, move |p| {
            let v = r.volume(p)?;
            f(&v.volume).map_err(|e| RpcError::failed(e.to_string()))?;
            Ok(r.volume_status(&v)["resync"].clone())
        });
    }
    let r = Arc::clone(&reg);
    m.add("resync_set_rate", move |p| {
        let v = r.volume(p)?;
        let rate = match p.get("max_rate") {
            None => 0,
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| RpcError::invalid_params("'max_rate' must be a byte count"))?,
            Some(Value::String(s)) if s == "0" => 0,
            Some(Value::String(s)) => {
                nvmirror_nvme::uri::parse_size(s).map_err(RpcError::invalid_params)?
            }
            Some(_) => {
                return Err(RpcError::invalid_params(
                    "'max_rate' is bytes per second (number or \"200MiB\")",
                ))
            }
        };
        let adaptive = p.get("adaptive").and_then(Value::as_bool).unwrap_or(true);
        v.volume
            .resync_set_rate(rate, adaptive)
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(r.volume_status(&v)["resync"].clone())
    });
    let r = Arc::clone(&reg);
    m.add("verify_start", move |p| {
        let v = r.volume(p)?;
        let repair = p.get("repair").and_then(Value::as_bool).unwrap_or(false);
        let job = v
            .volume
            .verify_start(repair)
            .map_err(|e| RpcError::failed(e.to_string()))?;
        r.run_job(Box::new(job))?;
        Ok(json!({"started": true, "repair": repair}))
    });
    let r = Arc::clone(&reg);
    m.add("verify_status", move |p| {
        let v = r.volume(p)?;
        let s = v
            .volume
            .verify_status()
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(json!({
            "state": s.state.as_str(),
            "repair": s.repair,
            "regions_checked": s.regions_checked,
            "regions_total": s.regions_total,
            "bytes_checked": s.bytes_checked,
            "percent": s.percent,
            "mismatched_regions": s.mismatched_regions,
            "regions_repaired": s.regions_repaired,
            "elapsed_s": s.elapsed.as_secs_f64(),
            "error": s.error,
        }))
    });
    for (name, add) in [
        ("subsystem_add_host", true),
        ("subsystem_remove_host", false),
    ] {
        let r = Arc::clone(&reg);
        m.add(name, move |p| {
            let field = |k: &str| {
                p.get(k).and_then(Value::as_str).ok_or_else(|| {
                    RpcError::invalid_params(format!("missing string parameter '{k}'"))
                })
            };
            let (nqn, host) = (field("nqn")?, field("host")?);
            let target = r
                .nvme_tcp
                .upgrade()
                .ok_or_else(|| RpcError::failed("the NVMe/TCP front end is not running"))?;
            let hosts = if add {
                target.add_host(nqn, host)
            } else {
                target.remove_host(nqn, host)
            }
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
            Ok(json!({"nqn": nqn, "allowed_hosts": hosts}))
        });
    }
    crate::promote::add_methods(&mut m, &reg);
    crate::ana_rpc::add_methods(&mut m, &reg);
    crate::objects_rpc::add_methods(&mut m, &reg);
    crate::mode_rpc::add_methods(&mut m, &reg);
    let r = Arc::clone(&reg);
    m.add("cluster_resign", move |p| {
        let Some(volume) = r.cluster_volume.clone() else {
            return Err(RpcError::invalid_params(
                "this node has no [cluster] section: nothing to hand over",
            ));
        };
        let force = p.get("force").and_then(Value::as_bool).unwrap_or(false);
        if let Some(v) = r.find_volume(&volume).filter(|_| !force) {
            resign_refusal(&v)?;
        }
        r.resign.store(true, std::sync::atomic::Ordering::Release);
        Ok(json!({"volume": volume, "resigning": true}))
    });
    crate::spdk_rpc::add_methods(&mut m, &reg);
    if std::env::var_os(TEST_HOOKS_ENV).is_some_and(|v| v == "1") {
        add_test_hooks(&mut m, &reg);
    }
    let names = {
        let mut n = m.names();
        n.push("rpc_get_methods".into());
        n.sort();
        n
    };
    m.add("rpc_get_methods", move |p| {
        if p.get("detail").and_then(Value::as_bool) == Some(true) {
            Ok(Value::Array(
                names.iter().map(|n| crate::rpc_docs::describe(n)).collect(),
            ))
        } else {
            Ok(json!(names))
        }
    });
    m
}

/// With this variable set to `1` at start-up, `serve` offers the fault hooks below, for the
/// fail-stop tests. Never set it in production.
pub const TEST_HOOKS_ENV: &str = "NVMIRROR_TEST_HOOKS";

/// `test_reactor_panic` and `test_reactor_stall` (`{"reactor": N}`): make reactor N panic, or
/// block it for good, as a bug in a poller would.
fn add_test_hooks(m: &mut Methods, reg: &Arc<Registry>) {
    let reactor = |p: &Value, reg: &Registry| -> Result<usize, RpcError> {
        let n = p.get("reactor").and_then(Value::as_u64).unwrap_or(0) as usize;
        if n >= reg.reactors.count() {
            return Err(RpcError::invalid_params(format!("no reactor {n}")));
        }
        Ok(n)
    };
    let r = Arc::clone(reg);
    m.add("test_reactor_panic", move |p| {
        let n = reactor(p, &r)?;
        r.reactors
            .send_msg(n, |_| panic!("test_reactor_panic: injected reactor panic"))
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(json!({"reactor": n}))
    });
    let r = Arc::clone(reg);
    m.add("test_reactor_stall", move |p| {
        let n = reactor(p, &r)?;
        r.reactors
            .send_msg(n, |_| loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            })
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(json!({"reactor": n}))
    });
}

/// An asynchronous leg's replication state, as `volume_status` shows it.
fn replication_json(r: &nvmirror_nvme::ReplicationStatus) -> Value {
    json!({
        "mode": r.mode,
        "state": r.state,
        "rpo_seconds": r.rpo_seconds,
        "lag_bytes": r.lag_bytes,
        "lag_writes": r.lag_writes,
        "consistent": r.consistent,
        "consistent_point": { "seq": r.consistent_seq, "unix_ms": r.consistent_unix_ms },
        "host_bytes": r.host_bytes,
        "journal_bytes": r.journal_bytes,
        "journal_used": r.journal_used,
        "journal_capacity": r.journal_capacity,
        "step_downs": r.step_downs,
        "error": r.error,
        "cycle": r.cycle.map(|c| json!({
            "cycle": c.cycle,
            "cycle_unix_ms": c.cycle_unix_ms,
            "interval_s": c.interval_ms as f64 / 1000.0,
            "cycle_bytes": c.cycle_bytes,
            "changed_bytes": c.changed_bytes,
            "staged_bytes": c.staged_bytes,
            "image_bytes": c.image_bytes,
            "far_apply": c.far_apply,
            "ship_seconds": c.ship_us as f64 / 1e6,
            "copy_rate_bytes_per_second": if c.ship_us > 0 { c.cycle_bytes as f64 * 1e6 / c.ship_us as f64 } else { 0.0 },
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn injected_faults_must_carry_an_error_status() {
        let err = parse_fault(&json!({"fault": "fail_writes", "status": 0})).unwrap_err();
        assert!(err.message.contains("0 is success"), "{err}");
        let err = parse_fault(&json!({"fault": "fail_after", "status": 0x10000})).unwrap_err();
        assert!(err.message.contains("'status'"), "{err}");
        let err = parse_fault(&json!({"fault": "fail_reads", "status": "x"})).unwrap_err();
        assert!(err.message.contains("'status'"), "{err}");
        match parse_fault(&json!({"fault": "fail_writes", "status": 0x281})).unwrap() {
            Fault::FailRange { status, .. } => assert_eq!(status.raw(), 0x281),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_fault(&json!({"fault": "fail_writes"})).unwrap(),
            Fault::FailRange { status, .. } if status == Status::WRITE_FAULT
        ));
    }
}
