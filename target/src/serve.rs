//! `nvmirror serve`: opens the configured volumes, starts the reactors, the NVMe/TCP and NBD
//! front ends, the RPC socket and the metrics endpoint, prints how to connect, and runs until
//! SIGINT/SIGTERM, then shuts down cleanly (stop accepting, drain, stop the reactors).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_mirror::{ReadPolicy, Volume, VolumeConfig as EngineVolumeConfig};
use nvmirror_nvme::backend::FaultyDevice;
use nvmirror_nvme::uri::{parse_duration, parse_size};
use nvmirror_nvme::{open_leg, BlockDevice};
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};

use crate::config::{Config, IdleConfig, ListenConfig, NvmeTcpConfig, RpcConfig, DEFAULT_CONFIG};
use crate::control::{self, LegEntry, MembersFile, Registry, VolumeEntry};
use crate::members::Membership;
use crate::metrics::MetricsServer;
use crate::nbd::{NbdConfig, NbdLimits, NbdServer};
use crate::nvme_tcp::{SubsystemConfig, TargetConfig};
use crate::rpc::RpcServer;
use crate::NvmeTcpTarget;

/// Flags of `nvmirror serve`; each overrides the matching configuration field.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration (see examples/nvmirror.toml); the embedded default without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (default leg images, RPC socket).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// NVMe/TCP listen address.
    #[arg(long)]
    pub listen: Option<String>,
    /// NBD listen address.
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// JSON-RPC socket path.
    #[arg(long)]
    pub rpc_socket: Option<PathBuf>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Reactor CPUs, e.g. `0,1` or `0-3`.
    #[arg(long)]
    pub cores: Option<String>,
    /// Leg URI of the first volume (repeat; the first is the primary). Replaces its legs.
    #[arg(long = "leg")]
    pub legs: Vec<String>,
    /// Log as JSON lines instead of human text.
    #[arg(long)]
    pub log_json: bool,
}

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{what}: {reason}")]
    Start { what: String, reason: String },
}

fn start_err(what: impl Into<String>, reason: impl ToString) -> ServeError {
    ServeError::Start {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Parses `0,2,4-7` into CPU ids.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("'{part}' is not a CPU or a range like 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// Loads the configuration and applies the flags.
pub fn resolve_config(args: &ServeArgs) -> Result<Config, ServeError> {
    resolve_live(args).map(|(cfg, _)| cfg)
}

/// Loads the configuration, or the live configuration derived from it (see
/// `live_config` for the rule), applies the flags, and returns it with the base of the
/// configuration text.
pub fn resolve_live(args: &ServeArgs) -> Result<(Config, String), ServeError> {
    let (text, file) = configuration_text(args)?;
    // The flags are part of what the operator configured: the same text with other flags
    // is another configuration.
    let base = crate::live_config::base_of(&format!("{text}\n# flags: {args:?}"));
    let mut cfg = with_flags(Config::parse_raw(&text, &file)?, args, &file)?;
    let live = crate::live_config::path_in(&cfg.data_dir);
    if let Some(live_text) = crate::live_config::choose(&live, &base, &file)? {
        // Derived from this very text and these flags: the flags are in it already (and
        // applying `--leg` again would undo a leg_add).
        let name = live.display().to_string();
        cfg = Config::parse_raw(&live_text, &name)?;
        cfg.expand_data_dir();
        cfg.validate(&name)?;
    }
    Ok((cfg, base))
}

fn configuration_text(args: &ServeArgs) -> Result<(String, String), ServeError> {
    Ok(match &args.config {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| crate::config::ConfigError::Read {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_string(), "<embedded default>".to_string()),
    })
}

/// `cfg` with the command-line flags applied, expanded and validated.
fn with_flags(mut cfg: Config, args: &ServeArgs, file: &str) -> Result<Config, ServeError> {
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    let flag = |name: &str, reason: String| crate::config::ConfigError::Invalid {
        file: "command line".into(),
        field: name.into(),
        reason,
    };
    if let Some(l) = &args.listen {
        match &mut cfg.nvme_tcp {
            Some(n) => n.listen = l.clone(),
            None => cfg.nvme_tcp = Some(NvmeTcpConfig::at(l.clone())),
        }
    }
    if let Some(l) = &args.nbd_listen {
        cfg.nbd = Some(ListenConfig { listen: l.clone() });
    }
    if let Some(l) = &args.metrics_listen {
        cfg.metrics = Some(ListenConfig { listen: l.clone() });
    }
    if let Some(s) = &args.rpc_socket {
        let leg_dirs = cfg.rpc.take().and_then(|r| r.leg_dirs);
        cfg.rpc = Some(RpcConfig {
            socket: s.clone(),
            leg_dirs,
        });
    }
    if let Some(c) = &args.cores {
        cfg.reactors.cores = parse_cores(c).map_err(|e| flag("--cores", e))?;
    }
    if !args.legs.is_empty() {
        let v = cfg
            .volumes
            .first_mut()
            .ok_or_else(|| flag("--leg", "the configuration has no volume".into()))?;
        v.legs = args.legs.clone();
    }
    cfg.expand_data_dir();
    cfg.validate(file)?;
    Ok(cfg)
}

fn engine_config(v: &crate::config::VolumeConfig) -> EngineVolumeConfig {
    EngineVolumeConfig {
        io_timeout: parse_duration(&v.io_timeout).unwrap_or(Duration::from_secs(5)),
        read_policy: match v.read_policy.as_str() {
            "round-robin" => ReadPolicy::RoundRobin,
            "least-latency" => ReadPolicy::LeastLatency,
            _ => ReadPolicy::Primary,
        },
        region_size: parse_size(&v.region_size).unwrap_or(1 << 20),
        ..EngineVolumeConfig::default()
    }
}

/// The journal settings of an `async-journal` leg (validated with the configuration).
fn journal_config(
    v: &crate::config::VolumeConfig,
    a: &crate::config::AsyncLegConfig,
) -> nvmirror_mirror::JournalConfig {
    nvmirror_mirror::JournalConfig {
        io_timeout: parse_duration(&v.io_timeout).unwrap_or(Duration::from_secs(5)),
        max_bytes: a.max_bytes.as_deref().and_then(|m| parse_size(m).ok()),
        max_lag: a.max_lag(),
        start_sync: a.mode == "sync",
        ..nvmirror_mirror::JournalConfig::default()
    }
}

/// A persistent volume (superblock and write-intent bitmap on every leg) is formatted when
/// every leg is blank and opened otherwise; a leg of another volume or with foreign data is
/// refused, never overwritten. With `bitmap = false` the legs are exported raw.
///
/// A standby volume being promoted is opened, never formatted, and not fenced here: the
/// promotion raises the epoch first (`promote.rs`).
fn open_volume(
    v: &crate::config::VolumeConfig,
    legs: Vec<Arc<dyn BlockDevice>>,
) -> nvmirror_mirror::Result<Volume> {
    let cfg = engine_config(v);
    if !v.bitmap {
        return Volume::new(&v.name, legs, cfg);
    }
    if v.standby {
        return Volume::open_persistent(&v.name, legs, cfg);
    }
    let vol = match Volume::format(&v.name, legs.clone(), cfg.clone(), false) {
        Ok(vol) => {
            tracing::info!(volume = v.name, "formatted blank legs");
            vol
        }
        Err(nvmirror_mirror::Error::LegNotBlank { .. }) => {
            Volume::open_persistent(&v.name, legs, cfg)?
        }
        Err(e) => return Err(e),
    };
    // Remote legs: register this volume's key and hold the reservation (docs/promotion.md).
    // A start that was promoted away from is fenced already and sends nothing.
    if vol.fenced().is_none() {
        vol.fence_remote_legs(false);
    }
    Ok(vol)
}

/// Opens leg `uri`; while its exclusive claim is held by someone else (a crashed
/// predecessor whose file descriptors the kernel is still tearing down), retries for up to
/// `wait`, saying once what it waits for.
fn open_leg_waiting(
    uri: &str,
    wait: Duration,
    what: &str,
) -> nvmirror_nvme::Result<Arc<dyn BlockDevice>> {
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match open_leg(uri) {
            Err(nvmirror_nvme::Error::Busy { path }) if std::time::Instant::now() < deadline => {
                if !said {
                    tracing::warn!(
                        leg = what,
                        path = %path.display(),
                        wait_s = wait.as_secs_f64(),
                        "leg is claimed by another process; waiting for the claim to be released"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => {
                if said && other.is_ok() {
                    tracing::info!(leg = what, "claim released; leg opened");
                }
                return other;
            }
        }
    }
}

/// The device of a `volume://NAME` leg: `NAME`'s leg among `volumes` (a standby volume's).
pub(crate) type LocalLegs<'a> = &'a dyn Fn(&str) -> Option<Arc<dyn BlockDevice>>;

/// Opens one configured volume: its legs as the run-time leg list says (see `members`), a
/// placeholder for each removed slot, then the volume itself. `local` resolves
/// `volume://NAME` legs.
/// What runs on the opened legs before the volume reads or writes them (a promotion fences
/// them there); its error fails the open.
pub(crate) type BeforeOpen<'a> = &'a dyn Fn(&[Arc<dyn BlockDevice>]) -> Result<(), String>;

pub(crate) fn open_entry(
    data_dir: &std::path::Path,
    claim_wait: Duration,
    v: &crate::config::VolumeConfig,
    local: LocalLegs<'_>,
    before_open: Option<BeforeOpen<'_>>,
) -> Result<VolumeEntry, ServeError> {
    let vol_err = |e: String| start_err(format!("volume {}", v.name), e);
    let members_path = Membership::path(data_dir, &v.name);
    let members = if v.bitmap {
        Membership::resolve(&members_path, &v.name, &v.legs).map_err(vol_err)?
    } else {
        Membership::from_config(&v.name, &v.legs)
    };
    let mut opened: Vec<Option<Arc<dyn BlockDevice>>> = Vec::new();
    // Remote legs whose site cannot be reached: opened once the local legs say what size
    // they are, to connect in the background (persistent volumes, which know what they miss).
    let mut unreachable = Vec::new();
    for (i, m) in members.legs.iter().enumerate() {
        if m.removed {
            opened.push(None);
            continue;
        }
        let what = format!("volume {} leg {i}", v.name);
        if let Some(name) = m.uri.strip_prefix(crate::config::LOCAL_VOLUME_SCHEME) {
            let dev = local(name)
                .ok_or_else(|| start_err(&what, format!("no local raw volume '{name}'")))?;
            opened.push(Some(dev));
            continue;
        }
        match open_leg_waiting(&m.uri, claim_wait, &what) {
            Ok(dev) => opened.push(Some(dev)),
            Err(e @ nvmirror_nvme::Error::NvmeTcp { .. }) if v.bitmap => {
                tracing::warn!(volume = v.name, leg = i, error = %e, "remote leg unreachable at start; it reconnects in the background");
                unreachable.push((i, e.to_string()));
                opened.push(None);
            }
            Err(e) => return Err(start_err(what, e)),
        }
    }
    let Some(first) = opened.iter().flatten().next().map(|d| d.geometry()) else {
        return Err(vol_err(match unreachable.first() {
            Some((_, e)) => format!("no leg can be opened: {e}"),
            None => "every leg has been removed".into(),
        }));
    };
    for (i, reason) in unreachable {
        let uri = &members.legs[i].uri;
        let what = format!("volume {} leg {i}", v.name);
        let Ok(nvmirror_nvme::LegUri::NvmeTcp { addr, opts }) = nvmirror_nvme::LegUri::parse(uri)
        else {
            return Err(start_err(what, reason));
        };
        let dev = nvmirror_nvme::backend::NvmeTcpDevice::connect_later(&addr, &opts, first, reason)
            .map_err(|e| start_err(what, e))?
            .with_name(uri.clone());
        opened[i] = Some(Arc::new(dev));
    }
    for a in &v.async_legs {
        let Some(Some(far)) = opened.get(a.leg).cloned() else {
            continue;
        };
        let what = format!("volume {} leg {} journal", v.name, a.leg);
        // A restart finds the far side still reserved by the process before it: take the
        // reservation back (the volume's key, read from a synchronous leg) before the
        // journal ships what it holds. A far side taken over by a promotion elsewhere is not
        // shipped to: the volume's own fencing then fences this node.
        let sync_leg = opened
            .iter()
            .enumerate()
            .filter(|(i, _)| !v.async_legs.iter().any(|x| x.leg == *i))
            .find_map(|(_, d)| d.clone());
        // Read once, and only for a device that has reservations to take back.
        let sb = std::cell::OnceCell::new();
        // Why `dev` is held by another epoch, when the volume's key could not take it back.
        let taken_over = |dev: &dyn nvmirror_nvme::BlockDevice| {
            let res = dev.reservations()?;
            let sb = sb
                .get_or_init(|| {
                    let local = sync_leg.as_ref()?;
                    nvmirror_mirror::promotion::read_superblock(&**local, Duration::from_secs(5))
                        .ok()
                        .flatten()
                })
                .as_ref()?;
            match nvmirror_mirror::fencing::fence_leg(res, sb.volume_uuid, sb.epoch, false) {
                nvmirror_mirror::fencing::LegFence::Lost { why } => Some(why),
                _ => None,
            }
        };
        if let Some(why) = taken_over(&*far) {
            tracing::error!(volume = v.name, leg = a.leg, why, "the far side of the asynchronous leg is reserved by a newer epoch: its journal is not shipped");
            continue;
        }
        let journal =
            open_leg_waiting(&a.journal, claim_wait, &what).map_err(|e| start_err(&what, e))?;
        let leg = match &a.staging {
            None => nvmirror_mirror::JournaledLeg::open(far, journal, journal_config(v, a)),
            Some(st) => {
                let what = format!("volume {} leg {} staging area", v.name, a.leg);
                let staging =
                    open_leg_waiting(st, claim_wait, &what).map_err(|e| start_err(&what, e))?;
                // The staging area too is reserved by the process before this one: take it
                // back before anything is staged (its shipper stops at a conflict for good).
                if let Some(why) = taken_over(&*staging) {
                    return Err(start_err(
                        &what,
                        format!("reserved by another host ({why}), though the leg's image is not: fence or free it where it is exported"),
                    ));
                }
                if !a.is_cycle() {
                    nvmirror_mirror::JournaledLeg::open_staged(
                        far,
                        journal,
                        staging,
                        a.far_apply,
                        journal_config(v, a),
                    )
                } else {
                    nvmirror_mirror::JournaledLeg::open_cycle(
                        far,
                        journal,
                        staging,
                        nvmirror_mirror::CycleConfig {
                            interval: a.cycle_period(),
                            far_apply: a.far_apply,
                        },
                        journal_config(v, a),
                    )
                }
            }
        }
        .map_err(|e| start_err(&what, e))?;
        tracing::info!(
            volume = v.name,
            leg = a.leg,
            journal = a.journal,
            mode = a.mode,
            "leg mirrored asynchronously"
        );
        opened[a.leg] = Some(Arc::new(leg));
    }
    let mut legs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut entries = Vec::new();
    for (m, dev) in members.legs.iter().zip(opened) {
        // A removed slot keeps its index; a device that discards everything stands in for it
        // (the volume never sends it I/O).
        let dev = match dev {
            Some(d) => d,
            None => Arc::new(
                nvmirror_nvme::backend::NullDevice::new(first.bytes(), first.lba_size)
                    .map_err(|e| vol_err(e.to_string()))?,
            ),
        };
        let faulty = FaultyDevice::wrap(dev);
        entries.push(LegEntry {
            uri: m.uri.clone(),
            injector: Arc::clone(faulty.injector()),
        });
        legs.push(Arc::new(faulty));
    }
    let sizes: Vec<u64> = legs.iter().map(|l| l.geometry().bytes()).collect();
    if sizes.iter().any(|&b| b != sizes[0]) {
        let list: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, b)| format!("leg {i}: {b} bytes"))
            .collect();
        return Err(vol_err(format!(
            "legs differ in size ({}); mirror legs must be the same size",
            list.join(", ")
        )));
    }
    if let Some(f) = before_open {
        f(&legs).map_err(vol_err)?;
    }
    let volume = open_volume(v, legs).map_err(|e| vol_err(e.to_string()))?;
    Ok(VolumeEntry {
        volume: Arc::new(volume),
        legs: std::sync::Mutex::new(entries),
        members: v.bitmap.then(|| MembersFile {
            path: members_path,
            configured: std::sync::Mutex::new(v.legs.clone()),
        }),
    })
}

/// The target's view of configured subsystem `s`; `device` finds a volume by name.
pub(crate) fn subsystem_config(
    cfg: &Config,
    s: &crate::config::SubsystemConfig,
    device: &dyn Fn(&str) -> Option<Arc<dyn BlockDevice>>,
) -> SubsystemConfig {
    let mut sub = SubsystemConfig::new(
        s.nqn.clone(),
        s.namespaces.iter().filter_map(|n| device(n)).collect(),
    );
    if let Some(serial) = &s.serial {
        sub.serial = serial.clone();
    }
    sub.model = s.model.clone();
    sub.allowed_hosts = s.allowed_hosts.clone();
    for h in &s.hosts {
        if !sub.allowed_hosts.contains(&h.nqn) {
            sub.allowed_hosts.push(h.nqn.clone());
        }
        // Validated with the config.
        if let Ok(Some(k)) = h.secrets() {
            sub.host_secrets.insert(h.nqn.clone(), k);
        }
    }
    // Reservations set to persist through power loss are kept here.
    sub.reservation_dir = Some(cfg.data_dir.clone());
    sub
}

fn addr(what: &str, s: &str) -> Result<SocketAddr, ServeError> {
    s.parse()
        .map_err(|e| start_err(what, format!("'{s}': {e}")))
}

/// A background thread of the service and the flag that stops it.
type Worker = (Arc<AtomicBool>, std::thread::JoinHandle<()>);

/// The running service.
#[derive(Debug)]
pub struct Service {
    pub registry: Arc<Registry>,
    pub nvme_tcp: Option<Arc<NvmeTcpTarget>>,
    pub nbd: Option<NbdServer>,
    pub rpc: Option<RpcServer>,
    pub metrics: Option<MetricsServer>,
    pool: Option<ReactorPool>,
    clearer: Option<Worker>,
    legs_watch: Option<Worker>,
    /// The far-site appliers of `[[cycle_apply]]`.
    appliers: Option<Worker>,
    /// The pair controller (`[cluster]`).
    #[cfg(feature = "cluster")]
    cluster: Option<crate::cluster::Cluster>,
}

impl Service {
    /// Opens everything `cfg` describes; run-time changes are kept in the live
    /// configuration with an empty base (see [`start_live`](Self::start_live)).
    pub fn start(cfg: &Config) -> Result<Self, ServeError> {
        Self::start_live(cfg, String::new())
    }

    /// Opens everything `cfg` describes; `cfg` derives from configuration text with
    /// `base`, which the live configuration file records.
    pub fn start_live(cfg: &Config, base: String) -> Result<Self, ServeError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| start_err(format!("data directory {}", cfg.data_dir.display()), e))?;
        tracing::info!(data_dir = %cfg.data_dir.display(), "data directory");
        let idle = match cfg.reactors.idle {
            IdleConfig::Spin => IdlePolicy::Spin,
            IdleConfig::Sleep => IdlePolicy::SpinThenSleep {
                spin: Duration::from_millis(2),
                sleep: Duration::from_micros(250),
            },
        };
        let rcfg = if cfg.reactors.cores.is_empty() {
            ReactorConfig::unpinned(1)
        } else {
            ReactorConfig::pinned(&cfg.reactors.cores)
        }
        .with_idle(idle);
        let pool = ReactorPool::start(rcfg).map_err(|e| start_err("reactors", e))?;
        // The reactors are pinned; from here on this thread and every thread it starts
        // (legs' keep-alive and reconnect threads, listeners, RPC, the bitmap clearer) stay
        // off their CPUs.
        keep_off_reactor_cores(&cfg.reactors.cores);

        let mut volumes = Vec::new();
        let no_local: LocalLegs<'_> = &|_| None;
        for v in cfg.volumes.iter().filter(|v| !v.standby) {
            volumes.push(open_entry(
                &cfg.data_dir,
                cfg.service.claim_timeout(),
                v,
                no_local,
                None,
            )?);
        }
        let standby = crate::promote::standby_slots(cfg, &volumes)?;
        let device = |name: &str| -> Option<Arc<dyn BlockDevice>> {
            volumes
                .iter()
                .find(|e| e.volume.name() == name)
                .map(|e| Arc::clone(&e.volume) as Arc<dyn BlockDevice>)
                .or_else(|| {
                    standby
                        .iter()
                        .find(|s| s.cfg.name == name)
                        .map(|s| Arc::clone(&s.device) as Arc<dyn BlockDevice>)
                })
        };
        let handle = pool.handle();

        let nvme_tcp = match &cfg.nvme_tcp {
            None => None,
            Some(l) => {
                let subsystems = cfg
                    .subsystems
                    .iter()
                    .map(|s| subsystem_config(cfg, s, &device))
                    .collect();
                let (listen, ana_state) = l.first().map_err(|(f, e)| start_err(f, e))?;
                let tcfg = TargetConfig {
                    listen,
                    ana_state,
                    more_listeners: l.more().map_err(|(f, e)| start_err(f, e))?,
                    cntlid_min: l.cntlid_min,
                    cntlid_max: l.cntlid_max,
                    max_admin_queue_size: l.max_admin_queue_size,
                    subsystems,
                    max_connections: cfg.limits.max_connections,
                    handshake_timeout: cfg.limits.handshake_timeout(),
                    connection_buffer_budget: cfg.limits.connection_buffer_budget(),
                    ..TargetConfig::default()
                };
                Some(Arc::new(NvmeTcpTarget::start(tcfg, &handle).map_err(
                    |e| start_err(format!("NVMe/TCP on {}", l.listen), e),
                )?))
            }
        };
        let nbd = match &cfg.nbd {
            None => None,
            // NBD exports are fixed while it runs; with none there is nothing to serve.
            Some(l) if volumes.is_empty() => {
                tracing::info!(listen = l.listen, "NBD not started: no volume to export (volumes created by RPC are exported over NBD from the next start)");
                None
            }
            Some(l) => {
                let exports = volumes
                    .iter()
                    .map(|e| {
                        (
                            e.volume.name().to_string(),
                            Arc::clone(&e.volume) as Arc<dyn BlockDevice>,
                        )
                    })
                    .chain(standby.iter().map(|s| {
                        (
                            s.cfg.name.clone(),
                            Arc::clone(&s.device) as Arc<dyn BlockDevice>,
                        )
                    }))
                    .collect();
                let ncfg = NbdConfig {
                    listen: addr("nbd.listen", &l.listen)?,
                    exports,
                };
                let limits = NbdLimits {
                    max_connections: cfg.limits.max_connections,
                    handshake_timeout: cfg.limits.handshake_timeout(),
                    connection_buffer_budget: cfg.limits.connection_buffer_budget(),
                };
                Some(
                    NbdServer::start_with_limits(ncfg, limits, &handle)
                        .map_err(|e| start_err(format!("NBD on {}", l.listen), e))?,
                )
            }
        };
        let live = Arc::new(crate::live_config::LiveConfig::new(cfg.clone(), base));
        live.persist()
            .map_err(|e| start_err(format!("live configuration {}", live.path().display()), e))?;
        let nbd_exports = match &nbd {
            Some(_) => volumes
                .iter()
                .map(|e| e.volume.name().to_string())
                .collect(),
            None => Vec::new(),
        };
        let mut registry = Registry::new(
            volumes,
            handle,
            nvme_tcp.as_ref().map(Arc::downgrade).unwrap_or_default(),
            Some(live),
        )
        .with_standby(standby);
        registry.nbd_exports = nbd_exports;
        registry.data_dir = cfg.data_dir.clone();
        registry.leg_dirs = crate::leg_dirs::allowed(cfg);
        registry.cluster_volume = cfg.cluster.as_ref().map(|c| c.volume.clone());
        registry.resync = cfg.resync.engine();
        let registry = Arc::new(registry);
        // Legs that came up out of sync (stale after a crash or an outage) are rebuilt from
        // the write-intent bitmap at once, one per volume at a time.
        for e in &registry.volumes() {
            for (i, info) in e.volume.leg_states().iter().enumerate() {
                if info.state.as_str() != "faulted" {
                    continue;
                }
                match e.volume.attach_leg_with(i, registry.resync.clone()) {
                    Ok(job) => {
                        tracing::info!(volume = e.volume.name(), leg = i, "resyncing a stale leg");
                        registry
                            .run_job(Box::new(job))
                            .map_err(|e| start_err("resync", e))?;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(volume = e.volume.name(), leg = i, "not resynced: {err}")
                    }
                }
            }
        }
        let rpc = match &cfg.rpc {
            None => None,
            Some(r) => Some(
                RpcServer::start(&r.socket, control::methods(Arc::clone(&registry)))
                    .map_err(|e| start_err(format!("RPC socket {}", r.socket.display()), e))?,
            ),
        };
        let metrics = match &cfg.metrics {
            None => None,
            Some(l) => {
                let reg = Arc::clone(&registry);
                Some(
                    MetricsServer::start(
                        addr("metrics.listen", &l.listen)?,
                        Arc::new(move || reg.render_metrics()),
                    )
                    .map_err(|e| start_err(format!("metrics on {}", l.listen), e))?,
                )
            }
        };
        let clearer = Some(start_clearer(Arc::clone(&registry)));
        let legs_watch = Some(start_leg_watcher(Arc::clone(&registry)));
        let appliers = start_appliers(&registry, cfg)?;
        #[cfg(feature = "cluster")]
        let cluster = match &cfg.cluster {
            None => None,
            Some(c) => Some(
                crate::cluster::Cluster::start(Arc::clone(&registry), c.clone())
                    .map_err(|e| start_err("cluster controller", e))?,
            ),
        };
        #[cfg(not(feature = "cluster"))]
        if cfg.cluster.is_some() {
            return Err(start_err(
                "cluster",
                "this nvmirror was built without the pair controller: build it with `--features cluster` (needs protoc)",
            ));
        }
        Ok(Self {
            registry,
            nvme_tcp,
            nbd,
            rpc,
            metrics,
            pool: Some(pool),
            clearer,
            legs_watch,
            appliers,
            #[cfg(feature = "cluster")]
            cluster,
        })
    }

    /// What is served and how to connect, for the start-up banner.
    pub fn banner(&self, cfg: &Config) -> String {
        let mut s = String::new();
        for e in &self.registry.volumes() {
            let geo = e.volume.geometry();
            s += &format!(
                "volume {}: {} bytes ({} x {} B blocks), legs: {}\n",
                e.volume.name(),
                geo.bytes(),
                geo.num_blocks,
                geo.lba_size,
                e.uris().join(", ")
            );
        }
        if let Some(t) = &self.nvme_tcp {
            let addrs = t.local_addrs();
            for (sub, a) in cfg
                .subsystems
                .iter()
                .flat_map(|s| addrs.iter().map(move |a| (s, a)))
            {
                s += &format!(
                    "NVMe/TCP {a} subsystem {}\n  connect: nvme connect -t tcp -a {} -s {} -n {}\n",
                    sub.nqn,
                    a.ip(),
                    a.port(),
                    sub.nqn
                );
            }
            if cfg.subsystems.is_empty() {
                for a in &addrs {
                    s += &format!("NVMe/TCP {a} (no subsystem yet: subsystem_create adds one)\n");
                }
            }
        }
        if let Some(n) = &self.nbd {
            let a = n.local_addr();
            for e in &self.registry.volumes() {
                s += &format!(
                    "NBD {a} export {name}\n  fio:     fio --name=t --ioengine=nbd --uri=nbd://{a}/{name} --rw=randwrite --bs=4k --iodepth=32 --size=64m\n  qemu:    qemu-img info nbd://{a}/{name}\n",
                    name = e.volume.name()
                );
            }
        }
        if let Some(r) = &self.rpc {
            s += &format!(
                "RPC {}\n  status:  nvmirror status --socket {}\n",
                r.path().display(),
                r.path().display()
            );
        }
        if let Some(m) = &self.metrics {
            s += &format!("metrics http://{}/metrics\n", m.local_addr());
        }
        s
    }

    /// Stops the front ends (draining their I/O), then the reactors.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // The pair controller first: a node holding the key fences itself and revokes its
        // lease (the peer takes over at once) before the front ends go.
        #[cfg(feature = "cluster")]
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
        // Then the front ends: from here a host's connect is refused (it sees the target
        // gone at once, and tries its other paths) instead of reaching a target that is
        // going away.
        self.nvme_tcp.take();
        self.nbd.take();
        for (stop, t) in [
            self.appliers.take(),
            self.legs_watch.take(),
            self.clearer.take(),
        ]
        .into_iter()
        .flatten()
        {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
        self.metrics.take();
        self.rpc.take();
        if let Some(pool) = self.pool.take() {
            pool.shutdown();
        }
    }

    /// Stops everything, then marks persistent volumes clean so the next start needs no
    /// resync. Returns the volumes that could not be marked clean, with the reason.
    pub fn shutdown_clean(mut self) -> Vec<(String, String)> {
        self.stop();
        let mut failed = Vec::new();
        let reactors = self.registry.reactors.clone();
        let registry = std::mem::replace(
            &mut self.registry,
            Arc::new(Registry::new(
                Vec::new(),
                reactors,
                std::sync::Weak::new(),
                None,
            )),
        );
        let Ok(registry) = Arc::try_unwrap(registry) else {
            return vec![(
                "*".into(),
                "the control plane still holds the volumes".into(),
            )];
        };
        let mut registry = registry;
        let promoted: Vec<Arc<VolumeEntry>> = std::mem::take(&mut registry.standby)
            .into_iter()
            .filter_map(|s| {
                // The export's device holds the volume too: let it go first.
                let crate::promote::StandbySlot { device, entry, .. } = s;
                drop(device);
                entry.into_inner()
            })
            .collect();
        for entry in registry.take_all().into_iter().chain(promoted) {
            let name = entry.volume.name().to_string();
            let Ok(entry) = Arc::try_unwrap(entry) else {
                failed.push((name, "still in use".into()));
                continue;
            };
            match Arc::try_unwrap(entry.volume) {
                Ok(vol) if vol.metadata_layout().is_some() => {
                    if let Err(e) = vol.shutdown_clean() {
                        failed.push((name, e.to_string()));
                    }
                }
                Ok(_) => {}
                Err(_) => failed.push((name, "still in use".into())),
            }
        }
        failed
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The far site of `async-cycle` legs with `far_apply` (`[[cycle_apply]]`): one thread
/// reads each staging volume's header every `poll` and applies a committed cycle onto its
/// image volume (`docs/cycles.md`). A failure is logged once per change and tried again.
fn start_appliers(reg: &Arc<Registry>, cfg: &Config) -> Result<Option<Worker>, ServeError> {
    let mut appliers = Vec::new();
    for c in cfg.cycle_appliers.iter().filter(|c| c.apply) {
        let what = format!("cycle_apply {} -> {}", c.staging, c.image);
        let dev = |name: &str| -> Result<Arc<dyn BlockDevice>, ServeError> {
            reg.find_volume(name)
                .map(|e| Arc::clone(&e.volume) as Arc<dyn BlockDevice>)
                .ok_or_else(|| start_err(&what, format!("no volume '{name}'")))
        };
        let applier = nvmirror_mirror::FarApplier::new(
            dev(&c.image)?,
            dev(&c.staging)?,
            Duration::from_secs(10),
        )
        .map_err(|e| start_err(&what, e))?;
        let poll = parse_duration(&c.poll).unwrap_or(Duration::from_millis(2));
        appliers.push((c.clone(), applier, poll, AppliedSoFar::default()));
    }
    if appliers.is_empty() {
        return Ok(None);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let reg = Arc::clone(reg);
    let t = std::thread::Builder::new()
        .name("nvmirror-apply".into())
        .spawn(move || {
            let poll = appliers.iter().map(|a| a.2).min().unwrap_or(Duration::from_millis(2));
            while !stop2.load(Ordering::Acquire) {
                for (c, applier, _, so_far) in &mut appliers {
                    let retired = reg
                        .retired_appliers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if retired.contains(&c.image) {
                        continue;
                    }
                    let before = (so_far.cycle, so_far.error.clone());
                    match applier.apply() {
                        Ok(Some(r)) => {
                            if r.rolled_forward {
                                tracing::debug!(image = c.image, staging = c.staging, cycle = r.cycle, bytes = r.data_bytes, "cycle applied");
                                so_far.applied += 1;
                                so_far.bytes += r.data_bytes;
                            }
                            (so_far.cycle, so_far.cut_unix_ms) = (r.cycle, r.cut_unix_ms);
                            so_far.error = None;
                        }
                        Ok(None) => so_far.error = None,
                        Err(e) => {
                            if so_far.error.as_deref() != Some(e.as_str()) {
                                tracing::warn!(image = c.image, staging = c.staging, error = %e, "cannot apply the staged cycle; trying again");
                                so_far.error = Some(e);
                            }
                        }
                    }
                    if before != (so_far.cycle, so_far.error.clone()) {
                        reg.cycle_apply
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(c.image.clone(), so_far.json(&c.staging));
                    }
                }
                std::thread::sleep(poll);
            }
        })
        .map_err(|e| start_err("the cycle applier thread", e))?;
    Ok(Some((stop, t)))
}

/// What one `[[cycle_apply]]` applier has done since the start.
#[derive(Debug, Default)]
struct AppliedSoFar {
    /// The cycle the image holds, and when its cut was taken.
    cycle: u64,
    cut_unix_ms: u64,
    /// Cycles rolled onto the image here, and their distinct bytes.
    applied: u64,
    bytes: u64,
    error: Option<String>,
}

impl AppliedSoFar {
    fn json(&self, staging: &str) -> serde_json::Value {
        serde_json::json!({
            "staging": staging,
            "cycle": self.cycle,
            "cycle_unix_ms": self.cut_unix_ms,
            "applied_cycles": self.applied,
            "applied_bytes": self.bytes,
            "last_error": self.error,
        })
    }
}

/// Once a second: rewrites ranges that failed to read (read-repair) and clears idle regions
/// of the persistent volumes' write-intent bitmaps.
fn start_clearer(reg: Arc<Registry>) -> Worker {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let t = std::thread::Builder::new()
        .name("nvmirror-bitmap".into())
        .spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                for e in &reg.volumes() {
                    if let Err(err) = e.volume.repair_read_errors() {
                        tracing::warn!(volume = e.volume.name(), "read-repair: {err}");
                    }
                    if e.volume.metadata_layout().is_some() {
                        if let Err(err) = e.volume.clear_idle_regions(std::time::Instant::now()) {
                            tracing::warn!(
                                volume = e.volume.name(),
                                "clearing idle regions: {err}"
                            );
                        }
                    }
                }
                for _ in 0..20 {
                    if stop2.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .expect("spawn the bitmap clearer");
    (stop, t)
}

/// Every 100 ms: a remote leg that was faulted and whose device has reconnected since (a
/// newer link generation) and is past its fence is resynchronised from the write-intent
/// bitmap — only the regions it missed — on volumes with `auto_resync` (as the live
/// configuration says, so volumes created at run time are watched too). A leg faulted
/// without losing its connection (an I/O error the remote reported, an operator's
/// `leg_detach`) is left to the operator.
fn start_leg_watcher(reg: Arc<Registry>) -> Worker {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let t = std::thread::Builder::new()
        .name("nvmirror-legs".into())
        .spawn(move || {
            // Per volume and leg: the link generation the leg was last seen in sync with
            // (or resynchronised for).
            let mut seen: std::collections::HashMap<String, Vec<u64>> =
                std::collections::HashMap::new();
            while !stop2.load(Ordering::Acquire) {
                let cfg = reg.live.as_ref().map(|l| l.current());
                let volumes = reg.volumes();
                seen.retain(|name, _| volumes.iter().any(|e| e.volume.name() == name));
                for e in &volumes {
                    let on = cfg.as_ref().is_some_and(|c| {
                        c.volumes
                            .iter()
                            .any(|v| v.name == e.volume.name() && v.auto_resync && v.bitmap)
                    });
                    // A volume promoted from standby: any connection its remote legs make
                    // counts (the old primary's leg comes back as a mirror).
                    let promoted = reg.standby.iter().any(|s| s.cfg.name == e.volume.name());
                    let s = seen.entry(e.volume.name().to_string()).or_insert_with(|| {
                        (0..e.volume.leg_count())
                            .map(|i| match promoted {
                                true => 0,
                                false => leg_generation(e, i).unwrap_or(0),
                            })
                            .collect()
                    });
                    watch_volume(&reg, e, on, s);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .expect("spawn the leg watcher");
    (stop, t)
}

fn leg_generation(e: &VolumeEntry, leg: usize) -> Option<u64> {
    e.volume.leg_device(leg).ok()?.link().map(|l| l.generation)
}

fn watch_volume(reg: &Registry, e: &VolumeEntry, auto: bool, seen: &mut Vec<u64>) {
    let states = e.volume.leg_states();
    seen.resize(states.len(), 0);
    let resyncing = e
        .volume
        .resync_status()
        .is_ok_and(|r| r.state.as_str() == "running" || r.state.as_str() == "paused");
    for (i, info) in states.iter().enumerate() {
        let Some(link) = e.volume.leg_device(i).ok().and_then(|d| d.link()) else {
            continue;
        };
        match info.state.as_str() {
            "in_sync" | "resyncing" => seen[i] = link.generation,
            "faulted" if auto && !resyncing && link.generation > seen[i] => {
                if !link.ready_for_resync() {
                    continue;
                }
                // A leg this volume holds no reservation on (unreachable when the volume
                // opened: the old primary's leg of a promoted volume) is fenced with this
                // volume's key before it takes writes; a newer holder there fences the
                // volume instead.
                let held = matches!(
                    e.volume.leg_fences().get(i),
                    Some(nvmirror_mirror::fencing::LegFence::Held { .. })
                );
                if !held {
                    e.volume.fence_remote_legs(false);
                    if e.volume.fenced().is_some() {
                        return;
                    }
                }
                match e.volume.attach_leg_with(i, reg.resync.clone()) {
                    Ok(job) => {
                        tracing::info!(
                            volume = e.volume.name(),
                            leg = i,
                            reconnects = link.generation - 1,
                            "remote leg reconnected; resyncing the regions it missed"
                        );
                        seen[i] = link.generation;
                        if let Err(err) = reg.run_job(Box::new(job)) {
                            tracing::warn!(volume = e.volume.name(), leg = i, "auto-resync: {err}");
                        }
                        return;
                    }
                    Err(err) => {
                        tracing::debug!(
                            volume = e.volume.name(),
                            leg = i,
                            "auto-resync not yet: {err}"
                        )
                    }
                }
            }
            _ => {}
        }
    }
}

/// Keeps the calling thread, and every thread it starts from now on, off the reactor CPUs
/// when other CPUs exist (call it after the reactors have pinned themselves: the pool checks
/// its CPUs against the caller's affinity): the control plane, the accept loops and each `nvme-tcp://` leg's
/// keep-alive and reconnect threads then never time-slice with a spinning reactor (a
/// reactor sets its own affinity when it starts).
pub fn keep_off_reactor_cores(reactor_cores: &[usize]) {
    if reactor_cores.is_empty() {
        return;
    }
    // SAFETY: `cpu_set_t` is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, initialised cpu_set_t owned by this frame.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return;
    }
    let mut left = 0;
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, the bounds of `set`.
        if unsafe { libc::CPU_ISSET(cpu, &set) } {
            if reactor_cores.contains(&cpu) {
                // SAFETY: as above.
                unsafe { libc::CPU_CLR(cpu, &mut set) };
            } else {
                left += 1;
            }
        }
    }
    if left == 0 {
        return;
    }
    // SAFETY: `set` is a valid cpu_set_t; 0 names the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::warn!(
            "cannot keep the control threads off the reactor CPUs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sets up logging from `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `nvmirror serve`.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    init_logging(args.log_json);
    crate::failstop::install_panic_hook();
    let (cfg, base) = resolve_live(&args)?;
    // Before anything starts (and before the banner tells anyone we are up): a signal that
    // comes during start-up stops the service once it is up.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once; the first sets `stop`.
        signal_hook::flag::register_conditional_shutdown(
            sig,
            crate::failstop::EXIT_SHUTDOWN_TIMEOUT,
            Arc::clone(&stop),
        )
        .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)))
        .map_err(|e| start_err("signal handler", e))?;
    }
    let service = Service::start_live(&cfg, base)?;
    print!(
        "nvmirror {} serving\n{}",
        env!("CARGO_PKG_VERSION"),
        service.banner(&cfg)
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    if let Some(limit) = cfg.service.stall_timeout() {
        crate::failstop::start_watchdog(
            service.registry.reactors.clone(),
            limit,
            Arc::clone(&watchdog_stop),
        );
    }
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    watchdog_stop.store(true, Ordering::Release);
    crate::failstop::start_shutdown_deadline(cfg.service.shutdown_timeout());
    tracing::info!("shutting down");
    let failed = service.shutdown_clean();
    if failed.is_empty() {
        tracing::info!("stopped cleanly");
        Ok(())
    } else {
        for (volume, reason) in &failed {
            tracing::error!(
                volume,
                "not marked clean: {reason}; the next start resyncs its marked regions"
            );
        }
        Err(start_err(
            "clean shutdown",
            format!("{} volume(s) not marked clean", failed.len()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_parse() {
        assert_eq!(parse_cores("0,2,4-6"), Ok(vec![0, 2, 4, 5, 6]));
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("x").unwrap_err().contains("'x'"));
    }

    #[test]
    fn flags_override_the_default() {
        let args = ServeArgs {
            data_dir: Some("/tmp/nvm-test-dir".into()),
            listen: Some("127.0.0.1:5420".into()),
            legs: vec!["mem://64MiB".into(), "mem://64MiB".into()],
            cores: Some("0".into()),
            ..ServeArgs::default()
        };
        let cfg = resolve_config(&args).unwrap();
        assert_eq!(cfg.nvme_tcp.unwrap().listen, "127.0.0.1:5420");
        assert_eq!(cfg.volumes[0].legs, vec!["mem://64MiB", "mem://64MiB"]);
        assert_eq!(cfg.reactors.cores, vec![0]);
        assert_eq!(
            cfg.rpc.unwrap().socket,
            PathBuf::from("/tmp/nvm-test-dir/nvmirror.sock")
        );
        let bad = ServeArgs {
            listen: Some("nowhere".into()),
            ..ServeArgs::default()
        };
        assert!(resolve_config(&bad)
            .unwrap_err()
            .to_string()
            .contains("nvme_tcp.listen"));
        let bad = ServeArgs {
            legs: vec!["ftp://x".into()],
            ..ServeArgs::default()
        };
        assert!(resolve_config(&bad)
            .unwrap_err()
            .to_string()
            .contains("legs[0]"));
    }
}
