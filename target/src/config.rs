//! `nvmirror serve` configuration: a TOML file (or the embedded default) plus command-line
//! overrides. Unknown keys are refused; every error names the file, the line and the field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use nvmirror_nvme::uri::{parse_duration, parse_size, LegUri};

pub use crate::nvme_tcp_config::{NvmeTcpConfig, NvmeTcpListener};

/// The configuration `nvmirror serve` runs with no `--config`. `@DATA_DIR@` is replaced by the
/// data directory.
pub const DEFAULT_CONFIG: &str = r#"
data_dir = "./nvmirror-data"

[reactors]
cores = []
idle = "sleep"

[nvme_tcp]
listen = "127.0.0.1:4420"

[nbd]
listen = "127.0.0.1:10809"

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[metrics]
listen = "127.0.0.1:9420"

[[volume]]
name = "vol0"
legs = ["file://@DATA_DIR@/primary.img?create=1GiB", "file://@DATA_DIR@/mirror.img?create=1GiB"]

[[subsystem]]
nqn = "nqn.2026-11.io.nvmirror:vol0"
namespaces = ["vol0"]
"#;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key (the message carries line and column).
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value that parses but cannot be used.
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./nvmirror-data")
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub reactors: ReactorsConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme_tcp: Option<NvmeTcpConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<ListenConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ListenConfig>,
    #[serde(default)]
    pub resync: ResyncConfig,
    #[serde(default)]
    pub service: ServiceConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemConfig>,
    /// This node is one of an active/standby pair coordinated through etcd
    /// (`docs/pair.md`; needs the `cluster` build feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// The far site of `async-cycle` legs shipped with `far_apply`: apply the cycles
    /// committed to a staging volume onto an image volume here (`docs/cycles.md`).
    #[serde(default, rename = "cycle_apply", skip_serializing_if = "Vec::is_empty")]
    pub cycle_appliers: Vec<CycleApplyConfig>,
}

/// `[[cycle_apply]]`: one image volume and its staging volume, both served by this node.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CycleApplyConfig {
    /// The volume that is the far image of the leg.
    pub image: String,
    /// The volume the leg stages its cycles in (exported to the shipping site).
    pub staging: String,
    /// How often the staging header is read.
    #[serde(default = "default_apply_poll")]
    pub poll: String,
    /// Whether this node applies the staged cycles (the shipping leg has `far_apply`).
    /// `false` only pairs the two: the shipping site applies, and a promotion here fences
    /// the staging area with the image and rolls a committed cycle forward before it serves.
    #[serde(default = "default_true")]
    pub apply: bool,
}

fn default_apply_poll() -> String {
    "2ms".into()
}

fn default_true() -> bool {
    true
}

/// `[cluster]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://10.0.0.9:2379`).
    pub endpoints: Vec<String>,
    /// This node's name, stored in the volume's key while it is active.
    pub node: String,
    /// The volume the pair serves (a `[[volume]]` of this configuration: the preferred
    /// active node's, or a standby's).
    pub volume: String,
    /// Lease time to live (whole seconds).
    #[serde(default = "default_cluster_ttl")]
    pub ttl: String,
    /// How long before its lease could expire an active node that cannot renew it stops.
    #[serde(default = "default_cluster_margin")]
    pub margin: String,
    /// Key prefix: the volume's key is `PREFIX/VOLUME/active`.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
}

impl ClusterConfig {
    pub fn ttl(&self) -> Duration {
        parse_duration(&self.ttl).unwrap_or(Duration::from_secs(10))
    }

    pub fn margin(&self) -> Duration {
        parse_duration(&self.margin).unwrap_or(Duration::from_secs(3))
    }

    /// The key that says which node is active.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/active",
            self.prefix.trim_end_matches('/'),
            self.volume
        )
    }
}

fn default_cluster_ttl() -> String {
    "10s".into()
}
fn default_cluster_margin() -> String {
    "3s".into()
}
fn default_cluster_prefix() -> String {
    "/nvmirror".into()
}

/// `[reactors]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ReactorsConfig {
    /// CPUs to pin one reactor each to; empty = one unpinned reactor.
    #[serde(default)]
    pub cores: Vec<usize>,
    /// `sleep` (spin briefly, then sleep when idle; the default) or `spin` (lowest latency,
    /// one full CPU per reactor).
    #[serde(default)]
    pub idle: IdleConfig,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdleConfig {
    Spin,
    #[default]
    Sleep,
}

/// A listener (`[nvme_tcp]`, `[nbd]`, `[metrics]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub listen: String,
}

/// `[rpc]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    pub socket: PathBuf,
    /// Directories `leg_add` may open or create `file://` legs in (`leg_dirs.rs`); unset:
    /// the data directory and the directories of the configured legs.
    #[serde(default)]
    pub leg_dirs: Option<Vec<PathBuf>>,
}

/// `[service]`: bounds on the process's own life cycle.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// SIGTERM/SIGINT: how long draining hosts and legs may take before the process gives
    /// up and exits non-zero (a second signal exits at once).
    #[serde(default = "ten_seconds")]
    pub shutdown_timeout: String,
    /// At start-up, how long to wait for a leg whose exclusive claim is still held (a crashed
    /// predecessor's file descriptors are still being torn down by the kernel).
    #[serde(default = "ten_seconds")]
    pub claim_timeout: String,
    /// A reactor that has not finished a loop for this long is stuck: the process aborts
    /// (fail-stop) so crash recovery can bring the volumes back. `"0"` turns the watchdog off.
    #[serde(default = "thirty_seconds")]
    pub stall_timeout: String,
}

fn ten_seconds() -> String {
    "10s".into()
}
fn thirty_seconds() -> String {
    "30s".into()
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: ten_seconds(),
            claim_timeout: ten_seconds(),
            stall_timeout: thirty_seconds(),
        }
    }
}

impl ServiceConfig {
    /// `shutdown_timeout`, checked by [`Config::validate`].
    pub fn shutdown_timeout(&self) -> Duration {
        parse_duration(&self.shutdown_timeout).unwrap_or(Duration::from_secs(10))
    }
    pub fn claim_timeout(&self) -> Duration {
        parse_duration(&self.claim_timeout).unwrap_or(Duration::from_secs(10))
    }
    /// `None`: the watchdog is off.
    pub fn stall_timeout(&self) -> Option<Duration> {
        match parse_duration(&self.stall_timeout) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(_) => Some(Duration::from_secs(30)),
        }
    }
}

/// `[limits]`: what one host, or a flood of connections, can hold of the target.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once per front end (NVMe/TCP, NBD); more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that has not finished ICReq + Connect (NVMe/TCP) or the NBD handshake
    /// within this is closed.
    #[serde(default = "ten_seconds")]
    pub handshake_timeout: String,
    /// NVMe/TCP command-buffer bytes per connection (queue entries x MDTS); the largest
    /// queue advertised (CAP.MQES) is what fits.
    #[serde(default = "default_connection_buffer_budget")]
    pub connection_buffer_budget: String,
}

fn default_max_connections() -> usize {
    crate::nvme_tcp::DEFAULT_MAX_CONNECTIONS
}
fn default_connection_buffer_budget() -> String {
    "64MiB".into()
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            handshake_timeout: ten_seconds(),
            connection_buffer_budget: default_connection_buffer_budget(),
        }
    }
}

impl LimitsConfig {
    /// `handshake_timeout`, checked by [`Config::validate`].
    pub fn handshake_timeout(&self) -> Duration {
        parse_duration(&self.handshake_timeout)
            .unwrap_or(crate::nvme_tcp::DEFAULT_HANDSHAKE_TIMEOUT)
    }
    /// `connection_buffer_budget` in bytes, checked by [`Config::validate`].
    pub fn connection_buffer_budget(&self) -> u64 {
        parse_size(&self.connection_buffer_budget)
            .unwrap_or(crate::nvme_tcp::DEFAULT_CONNECTION_BUFFER_BUDGET)
    }
}

/// `[resync]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResyncConfig {
    /// Upper bound in bytes per second (`"200MiB"`); `"0"` = no bound.
    #[serde(default = "zero")]
    pub max_rate: String,
    /// Back off when host write p99 rises above `latency_factor` × its baseline.
    #[serde(default = "yes")]
    pub adaptive: bool,
    #[serde(default = "two")]
    pub latency_factor: f64,
    /// Regions copied in parallel.
    #[serde(default = "four")]
    pub parallel_regions: u32,
}

fn zero() -> String {
    "0".into()
}
fn yes() -> bool {
    true
}
fn two() -> f64 {
    2.0
}
fn four() -> u32 {
    4
}

impl ResyncConfig {
    /// The engine's resync configuration (checked by `validate`: a bad rate reads as no
    /// bound here).
    pub fn engine(&self) -> nvmirror_mirror::ResyncConfig {
        nvmirror_mirror::ResyncConfig {
            windows: self.parallel_regions.max(1),
            max_rate: parse_size(&self.max_rate).unwrap_or(0),
            adaptive: self.adaptive,
            latency_factor: self.latency_factor,
            ..nvmirror_mirror::ResyncConfig::default()
        }
    }
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            max_rate: zero(),
            adaptive: true,
            latency_factor: 2.0,
            parallel_regions: 4,
        }
    }
}

/// `[[volume]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    /// Leg URIs; the first is the primary.
    pub legs: Vec<String>,
    #[serde(default = "default_region_size")]
    pub region_size: String,
    /// `primary`, `round-robin` or `least-latency`.
    #[serde(default = "default_read_policy")]
    pub read_policy: String,
    #[serde(default = "default_io_timeout")]
    pub io_timeout: String,
    /// `sync` (the only mode so far).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Keep a superblock and a write-intent bitmap at the start of every leg (crash
    /// recovery copies only marked regions). `false` exports the legs raw.
    #[serde(default = "yes")]
    pub bitmap: bool,
    /// Resynchronise a remote (`nvme-tcp://`) leg by itself when its connection comes back
    /// after it was faulted, copying only the regions it missed (persistent volumes).
    #[serde(default = "yes")]
    pub auto_resync: bool,
    /// Promotable copy of a volume another site serves (`docs/promotion.md`): not opened at
    /// start; its export refuses I/O until `volume_promote` opens it from its legs. A leg
    /// `volume://NAME` is the leg of this node's raw (`bitmap = false`) one-leg volume NAME,
    /// which the other site mirrors onto.
    #[serde(default)]
    pub standby: bool,
    /// Legs mirrored asynchronously through a local journal (`docs/journal.md`); the others
    /// stay synchronous.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub async_legs: Vec<AsyncLegConfig>,
}

/// `[[volume.async_legs]]`: one leg of the volume mirrored asynchronously.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AsyncLegConfig {
    /// Index of the leg in `legs` (not 0, the primary).
    pub leg: usize,
    /// `async-journal`, `async-cycle` (`docs/cycles.md`; needs `staging`), or `sync`: the
    /// journal is ready but writes go straight to the leg until `leg_set_mode` makes it
    /// asynchronous.
    #[serde(default = "default_async_mode")]
    pub mode: String,
    /// The far site's staging area, a leg URI of the same block size as the leg. With
    /// `mode = "async-cycle"` or a `cycle` period the leg ships in cycles through it (large
    /// enough for one cycle's distinct data); an `async-journal` leg (or a `sync` one without
    /// `cycle`) ships a backlog in batches through it and stages a resync's catch-up, so its
    /// far image stays a consistent prefix (docs/journal.md, "With a staging area").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    /// `async-cycle`: the cycle period (default 30 s); `cycle_now` ends a cycle early. Given
    /// with `staging`, the leg ships in cycles whatever its `mode` says now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle: Option<String>,
    /// With `staging`: the far site applies the cycles, or an `async-journal` leg's batches
    /// (its `[[cycle_apply]]`); this node only stages them, so the link carries each changed
    /// block once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub far_apply: bool,
    /// The journal's device: a leg URI (`file:///var/lib/nvmirror/vol0.journal?create=1GiB`).
    /// Blank devices are formatted; anything else that is not this leg's journal is refused.
    pub journal: String,
    /// Journal bytes in use beyond which the leg steps down to bitmap tracking (default: the
    /// whole journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
    /// Age of the oldest write not yet applied beyond which the leg steps down (default
    /// 30 s; for `async-cycle`, 4 cycles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,
}

impl AsyncLegConfig {
    /// Whether the leg ships in cycles: it has a staging area, and `mode = "async-cycle"` or
    /// a `cycle` period (a `sync` leg keeps its period when switched: `leg_set_mode`).
    pub fn is_cycle(&self) -> bool {
        self.staging.is_some() && (self.mode == "async-cycle" || self.cycle.is_some())
    }

    /// The cycle period (validated with the configuration).
    pub fn cycle_period(&self) -> Duration {
        self.cycle
            .as_deref()
            .and_then(|c| parse_duration(c).ok())
            .unwrap_or(DEFAULT_CYCLE)
    }

    /// The step-down age (validated with the configuration).
    pub fn max_lag(&self) -> Duration {
        match self.max_lag.as_deref().and_then(|m| parse_duration(m).ok()) {
            Some(d) => d,
            None if self.is_cycle() => 4 * self.cycle_period(),
            None => Duration::from_secs(30),
        }
    }
}

/// `s` as a duration of at least `min_ms` ms; else what is wrong with it.
fn duration_at_least(s: &str, min_ms: u64) -> Result<Duration, String> {
    parse_duration(s)
        .ok()
        .filter(|d| *d >= Duration::from_millis(min_ms))
        .ok_or_else(|| format!("'{s}' is not a duration of at least {min_ms}ms"))
}

/// The cycle period of an `async-cycle` leg without `cycle`.
/// The least `max_bytes` of an async leg's journal.
const MIN_JOURNAL_BOUND: u64 = 4 << 20;

pub const DEFAULT_CYCLE: Duration = Duration::from_secs(30);

fn default_async_mode() -> String {
    "async-journal".into()
}

/// The scheme of a standby volume's leg that is a local raw volume's leg.
pub const LOCAL_VOLUME_SCHEME: &str = "volume://";

fn default_region_size() -> String {
    "1MiB".into()
}
fn default_read_policy() -> String {
    "primary".into()
}
fn default_io_timeout() -> String {
    "5s".into()
}
fn default_mode() -> String {
    "sync".into()
}

/// `[[subsystem]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    pub nqn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default = "default_model")]
    pub model: String,
    /// Host NQNs allowed to connect; empty = any host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Volume names, exported as namespaces 1, 2, … (may be empty).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// `[[subsystem.host]]`: hosts with DH-HMAC-CHAP secrets (each is an allowed host too).
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostConfig>,
}

/// `[[subsystem.host]]`: one host NQN and its DH-HMAC-CHAP secrets (`DHHC-1:XX:…:`, as
/// `nvme gen-dhchap-key` writes them).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub nqn: String,
    /// The host's secret: set, the host must authenticate every queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_secret: Option<String>,
    /// The controller's secret, for hosts that ask for bidirectional authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrl_secret: Option<String>,
}

impl HostConfig {
    /// The parsed secrets, or the field at fault and why.
    pub fn secrets(&self) -> Result<Option<crate::nvme_tcp::HostSecrets>, (&'static str, String)> {
        use nvmirror_nvme::dhchap::Secret;
        let parse = |field: &'static str, s: &Option<String>| {
            s.as_deref()
                .map(|t| Secret::parse(t).map_err(|e| (field, e.to_string())))
                .transpose()
        };
        let host = parse("dhchap_secret", &self.dhchap_secret)?;
        let ctrl = parse("dhchap_ctrl_secret", &self.dhchap_ctrl_secret)?;
        match (host, ctrl) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err((
                "dhchap_ctrl_secret",
                "set without dhchap_secret (the host authenticates first)".into(),
            )),
            (Some(host), ctrl) => Ok(Some(crate::nvme_tcp::HostSecrets { host, ctrl })),
        }
    }
}

fn default_model() -> String {
    "nvmirror".into()
}

impl Config {
    /// The embedded default with its data directory.
    pub fn embedded_default() -> Self {
        Self::parse_str(DEFAULT_CONFIG, "<embedded default>")
            .expect("the embedded default is valid")
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_str(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `file` names it in errors. `@DATA_DIR@` in any string
    /// is replaced by `data_dir`.
    pub fn parse_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.expand_data_dir();
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Parses TOML text without expanding `@DATA_DIR@` or validating (for applying flags
    /// first); `file` names it in errors.
    pub fn parse_raw(text: &str, file: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Makes the data directory absolute (a relative one, like the default, is resolved
    /// against the working directory once, at start) and replaces `@DATA_DIR@` in paths and
    /// leg URIs with it.
    pub fn expand_data_dir(&mut self) {
        self.data_dir = absolute(&self.data_dir);
        let dir = self.data_dir.to_string_lossy().into_owned();
        for v in &mut self.volumes {
            for leg in &mut v.legs {
                *leg = leg.replace("@DATA_DIR@", &dir);
            }
        }
        if let Some(rpc) = &mut self.rpc {
            rpc.socket = PathBuf::from(rpc.socket.to_string_lossy().replace("@DATA_DIR@", &dir));
            for d in rpc.leg_dirs.iter_mut().flatten() {
                *d = absolute(Path::new(&d.to_string_lossy().replace("@DATA_DIR@", &dir)));
            }
        }
    }

    /// Checks everything that parsing alone cannot.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |field: String, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            reason,
        };
        if let Some(n) = &self.nvme_tcp {
            n.check().map_err(|(field, reason)| bad(field, reason))?;
        }
        for (key, l) in [("nbd", &self.nbd), ("metrics", &self.metrics)] {
            if let Some(l) = l {
                l.listen
                    .parse::<SocketAddr>()
                    .map_err(|e| bad(format!("{key}.listen"), format!("'{}': {e}", l.listen)))?;
            }
        }
        for (key, v, zero_ok) in [
            (
                "service.shutdown_timeout",
                &self.service.shutdown_timeout,
                false,
            ),
            ("service.claim_timeout", &self.service.claim_timeout, true),
            ("service.stall_timeout", &self.service.stall_timeout, true),
        ] {
            let d = parse_duration(v).map_err(|e| bad(key.into(), e))?;
            if d.is_zero() && !zero_ok {
                return Err(bad(key.into(), "must be above 0".into()));
            }
        }
        let l = &self.limits;
        if !(1..=1_000_000).contains(&l.max_connections) {
            return Err(bad(
                "limits.max_connections".into(),
                format!("{} not in 1..=1000000", l.max_connections),
            ));
        }
        let d = parse_duration(&l.handshake_timeout)
            .map_err(|e| bad("limits.handshake_timeout".into(), e))?;
        if d.is_zero() {
            return Err(bad(
                "limits.handshake_timeout".into(),
                "must be above 0".into(),
            ));
        }
        let budget = parse_size(&l.connection_buffer_budget)
            .map_err(|e| bad("limits.connection_buffer_budget".into(), e))?;
        // Two commands of the default MDTS (128 KiB) at least.
        if budget < 256 << 10 {
            return Err(bad(
                "limits.connection_buffer_budget".into(),
                format!("{budget} bytes is below 256KiB (two 128 KiB commands)"),
            ));
        }
        let rate = &self.resync.max_rate;
        if rate != "0" {
            parse_size(rate).map_err(|e| bad("resync.max_rate".into(), e))?;
        }
        if !(1.0..=100.0).contains(&self.resync.latency_factor) {
            return Err(bad(
                "resync.latency_factor".into(),
                "must be between 1 and 100".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut legs_seen = HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let at = |k: &str| format!("volume[{i}] ({}).{k}", v.name);
            if v.name.is_empty()
                || !v
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(
                    format!("volume[{i}].name"),
                    format!("'{}': use letters, digits, '-', '_' or '.'", v.name),
                ));
            }
            if !names.insert(v.name.clone()) {
                return Err(bad(at("name"), "used by two volumes".into()));
            }
            if v.legs.is_empty() || v.legs.len() > 4 {
                return Err(bad(
                    at("legs"),
                    format!("{} legs given; a volume has 1 to 4", v.legs.len()),
                ));
            }
            if v.standby && !v.bitmap {
                return Err(bad(
                    at("standby"),
                    "a standby volume keeps a bitmap (bitmap = true)".into(),
                ));
            }
            for (j, leg) in v.legs.iter().enumerate() {
                if let Some(local) = leg.strip_prefix(LOCAL_VOLUME_SCHEME) {
                    let raw = self
                        .volumes
                        .iter()
                        .find(|o| o.name == local && !o.standby && !o.bitmap && o.legs.len() == 1);
                    if !v.standby || raw.is_none() {
                        return Err(bad(
                            format!("{}[{j}]", at("legs")),
                            format!("'{leg}': {LOCAL_VOLUME_SCHEME}NAME is a leg of a standby volume only, naming a raw (bitmap = false) one-leg volume of this node"),
                        ));
                    }
                    continue;
                }
                LegUri::parse(leg)
                    .map_err(|e| bad(format!("{}[{j}]", at("legs")), e.to_string()))?;
                let key = leg.split('?').next().unwrap_or(leg).to_string();
                if !key.starts_with("mem://")
                    && !key.starts_with("null://")
                    && !legs_seen.insert(key.clone())
                {
                    return Err(bad(
                        format!("{}[{j}]", at("legs")),
                        format!("'{key}' is used twice"),
                    ));
                }
            }
            let region = parse_size(&v.region_size).map_err(|e| bad(at("region_size"), e))?;
            if !region.is_power_of_two() || !(64 << 10..=64 << 20).contains(&region) {
                return Err(bad(
                    at("region_size"),
                    "a power of two from 64KiB to 64MiB".into(),
                ));
            }
            if !["primary", "round-robin", "least-latency"].contains(&v.read_policy.as_str()) {
                return Err(bad(
                    at("read_policy"),
                    format!("'{}': primary, round-robin or least-latency", v.read_policy),
                ));
            }
            duration_at_least(&v.io_timeout, 1).map_err(|e| bad(at("io_timeout"), e))?;
            if v.mode != "sync" {
                return Err(bad(
                    at("mode"),
                    format!(
                        "'{}': only 'sync' is available for a volume (a leg is made asynchronous with [[volume.async_legs]])",
                        v.mode
                    ),
                ));
            }
            let mut async_seen = HashSet::new();
            for (j, a) in v.async_legs.iter().enumerate() {
                let at = |k: &str| format!("volume[{i}].async_legs[{j}].{k}");
                if a.leg == 0 || a.leg >= v.legs.len() {
                    return Err(bad(
                        at("leg"),
                        format!(
                            "{}: the index of a leg in 'legs' other than 0 (the primary), 1 to {}",
                            a.leg,
                            v.legs.len().saturating_sub(1)
                        ),
                    ));
                }
                if !async_seen.insert(a.leg) {
                    return Err(bad(at("leg"), format!("leg {} is listed twice", a.leg)));
                }
                if !["async-journal", "async-cycle", "sync"].contains(&a.mode.as_str()) {
                    return Err(bad(
                        at("mode"),
                        format!(
                            "'{}': async-journal, async-cycle (with staging), or sync (journal ready, writes synchronous until leg_set_mode)",
                            a.mode
                        ),
                    ));
                }
                if a.mode == "async-cycle" && a.staging.is_none() {
                    return Err(bad(
                        at("staging"),
                        "async-cycle needs a staging area at the far site (a leg URI)".into(),
                    ));
                }
                if a.mode == "async-journal" && a.cycle.is_some() {
                    return Err(bad(
                        at("cycle"),
                        "a cycle period is for async-cycle (an async-journal leg with a staging area ships a backlog in batches, with no period)".into(),
                    ));
                }
                if a.staging.is_none() && a.cycle.is_some() {
                    return Err(bad(at("cycle"), "a cycle period is for async-cycle".into()));
                }
                if a.far_apply && a.staging.is_none() {
                    return Err(bad(
                        at("far_apply"),
                        "far_apply needs a staging area at the far site (staging)".into(),
                    ));
                }
                nvmirror_nvme::LegUri::parse(&a.journal)
                    .map_err(|e| bad(at("journal"), e.to_string()))?;
                if let Some(st) = &a.staging {
                    nvmirror_nvme::LegUri::parse(st)
                        .map_err(|e| bad(at("staging"), e.to_string()))?;
                    if st == &a.journal || st == &v.legs[a.leg] {
                        return Err(bad(
                            at("staging"),
                            "the staging area must be a device of its own, neither the journal nor the leg".into(),
                        ));
                    }
                }
                if let Some(c) = &a.cycle {
                    duration_at_least(c, 10).map_err(|e| bad(at("cycle"), e))?;
                }
                if let Some(m) = &a.max_bytes {
                    let max = parse_size(m).map_err(|e| bad(at("max_bytes"), e))?;
                    if max < MIN_JOURNAL_BOUND {
                        return Err(bad(
                            at("max_bytes"),
                            format!(
                                "{m}: at least 4MiB (a journal segment carries up to 1 MiB, a resync's copy command as much, and both must fit beside the host's writes or a catch-up never ends)"
                            ),
                        ));
                    }
                }
                if let Some(m) = &a.max_lag {
                    duration_at_least(m, 1).map_err(|e| bad(at("max_lag"), e))?;
                }
                if a.is_cycle() && a.max_lag() < 2 * a.cycle_period() {
                    return Err(bad(
                        at("max_lag"),
                        format!(
                            "{:?} is less than two cycles ({:?}): a write may wait a whole cycle and its shipping before it is applied",
                            a.max_lag(),
                            a.cycle_period()
                        ),
                    ));
                }
            }
        }
        for (i, c) in self.cycle_appliers.iter().enumerate() {
            let at = |k: &str| format!("cycle_apply[{i}].{k}");
            for (k, name) in [("image", &c.image), ("staging", &c.staging)] {
                if !self.volumes.iter().any(|v| &v.name == name) {
                    return Err(bad(at(k), format!("no [[volume]] named '{name}'")));
                }
            }
            if c.image == c.staging {
                return Err(bad(
                    at("staging"),
                    "the staging volume must not be the image".into(),
                ));
            }
            duration_at_least(&c.poll, 1).map_err(|e| bad(at("poll"), e))?;
        }
        if let Some(c) = &self.cluster {
            let at = |k: &str| format!("cluster.{k}");
            if c.endpoints.is_empty() {
                return Err(bad(at("endpoints"), "at least one etcd URL".into()));
            }
            for (i, e) in c.endpoints.iter().enumerate() {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(bad(
                        format!("cluster.endpoints[{i}]"),
                        format!("'{e}': an etcd client URL (http://HOST:PORT)"),
                    ));
                }
            }
            if c.node.is_empty() || c.node.contains('/') || c.node.len() > 64 {
                return Err(bad(
                    at("node"),
                    format!("'{}': 1 to 64 characters, no '/'", c.node),
                ));
            }
            if !self.volumes.iter().any(|v| v.name == c.volume) {
                return Err(bad(
                    at("volume"),
                    format!("no [[volume]] named '{}'", c.volume),
                ));
            }
            let ttl = parse_duration(&c.ttl)
                .ok()
                .filter(|d| d.subsec_nanos() == 0 && (2..=3600).contains(&d.as_secs()))
                .ok_or_else(|| {
                    bad(
                        at("ttl"),
                        format!("'{}': whole seconds, 2s to 3600s", c.ttl),
                    )
                })?;
            parse_duration(&c.margin)
                .ok()
                .filter(|m| !m.is_zero() && *m <= ttl / 2)
                .ok_or_else(|| {
                    bad(
                        at("margin"),
                        format!("'{}': more than 0 and at most half the ttl", c.margin),
                    )
                })?;
            if !c.prefix.starts_with('/') {
                return Err(bad(
                    at("prefix"),
                    format!("'{}': starts with '/'", c.prefix),
                ));
            }
        }
        let mut nqns = HashSet::new();
        for (i, s) in self.subsystems.iter().enumerate() {
            let at = |k: &str| format!("subsystem[{i}].{k}");
            if !s.nqn.starts_with("nqn.") || s.nqn.len() > 223 {
                return Err(bad(
                    at("nqn"),
                    format!(
                        "'{}' is not an NQN (nqn.yyyy-mm.reverse-domain:name, ≤ 223 bytes)",
                        s.nqn
                    ),
                ));
            }
            if !nqns.insert(s.nqn.clone()) {
                return Err(bad(at("nqn"), format!("'{}' is used twice", s.nqn)));
            }
            for (j, h) in s.hosts.iter().enumerate() {
                let at = |k: &str| format!("subsystem[{i}].host[{j}].{k}");
                if !h.nqn.starts_with("nqn.") || h.nqn.len() > 223 {
                    return Err(bad(at("nqn"), format!("'{}' is not an NQN", h.nqn)));
                }
                h.secrets().map_err(|(f, e)| bad(at(f), e))?;
            }
            // A subsystem may start empty: namespace_add fills it at run time.
            let mut exported = HashSet::new();
            for ns in &s.namespaces {
                if !names.contains(ns) {
                    return Err(bad(at("namespaces"), format!("no volume named '{ns}'")));
                }
                if !exported.insert(ns) {
                    return Err(bad(at("namespaces"), format!("'{ns}' is listed twice")));
                }
            }
            if let Some(serial) = &s.serial {
                if serial.len() > 20 || !serial.is_ascii() {
                    return Err(bad(at("serial"), "at most 20 ASCII characters".into()));
                }
            }
            if s.model.len() > 40 || !s.model.is_ascii() {
                return Err(bad(at("model"), "at most 40 ASCII characters".into()));
            }
        }
        Ok(())
    }
}

/// `path` made absolute against the current directory (without touching the file system).
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut out = cwd;
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse_str(text, "test.toml")
            .unwrap_err()
            .to_string()
    }

    const MINIMAL: &str = r#"
[[volume]]
name = "v"
legs = ["mem://64MiB", "mem://64MiB"]
"#;

    #[test]
    fn the_resync_section_is_what_the_resyncs_get() {
        let cfg = Config::parse_str(
            &format!("{MINIMAL}\n[resync]\nmax_rate = \"4MiB\"\nadaptive = false\nlatency_factor = 3.0\nparallel_regions = 2\n"),
            "test.toml",
        )
        .unwrap();
        let e = cfg.resync.engine();
        assert_eq!(
            (e.max_rate, e.adaptive, e.latency_factor, e.windows),
            (4 << 20, false, 3.0, 2)
        );
        let d = Config::parse_str(MINIMAL, "test.toml")
            .unwrap()
            .resync
            .engine();
        let want = nvmirror_mirror::ResyncConfig::default();
        assert_eq!((d.max_rate, d.adaptive, d.windows), (0, true, want.windows));
    }

    #[test]
    fn embedded_default_is_two_file_legs_on_the_usual_ports() {
        let cfg = Config::embedded_default();
        assert_eq!(cfg.volumes.len(), 1);
        let legs = &cfg.volumes[0].legs;
        assert!(
            legs[0].starts_with("file:///") && legs[0].contains("nvmirror-data/primary.img"),
            "{legs:?}"
        );
        assert!(legs[1].contains("nvmirror-data/mirror.img?create=1GiB"));
        assert_eq!(cfg.nvme_tcp.unwrap().listen, "127.0.0.1:4420");
        assert_eq!(cfg.nbd.unwrap().listen, "127.0.0.1:10809");
        assert_eq!(cfg.metrics.unwrap().listen, "127.0.0.1:9420");
        assert!(cfg
            .rpc
            .unwrap()
            .socket
            .ends_with("nvmirror-data/nvmirror.sock"));
        assert_eq!(cfg.subsystems[0].nqn, "nqn.2026-11.io.nvmirror:vol0");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nvmirror.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(
            cfg.limits,
            LimitsConfig::default(),
            "[limits] lists the defaults"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\n[limits]\n"),
            "the example documents [limits]"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = Config::parse_str(MINIMAL, "t").unwrap();
        assert_eq!(cfg.volumes[0].region_size, "1MiB");
        assert_eq!(cfg.volumes[0].io_timeout, "5s");
        assert!(cfg.nvme_tcp.is_none());
    }

    #[test]
    fn bad_toml_names_file_and_line() {
        let e = err("[[volume]]\nname = \"v\"\nlegs = [\"mem://1GiB\"\n");
        assert!(e.starts_with("test.toml: "), "{e}");
        assert!(e.contains("line 3") || e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{MINIMAL}colour = \"red\"\n"));
        assert!(e.contains("colour") && e.contains("line 5"), "{e}");
        let e = err("[reactors]\ncors = [1]\n");
        assert!(e.contains("cors") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases = [
            ("[[volume]]\nname = \"v\"\nlegs = [\"mem://1XB\"]\n", "volume[0] (v).legs[0]"),
            ("[[volume]]\nname = \"v\"\nlegs = []\n", "volume[0] (v).legs"),
            ("[[volume]]\nname = \"v\"\nlegs = [\"file:///a.img\", \"file:///a.img?create=1GiB\"]\n", "used twice"),
            ("[[volume]]\nname = \"v\"\nlegs = [\"mem://1GiB\"]\nregion_size = \"3MiB\"\n", "region_size"),
            ("[[volume]]\nname = \"v\"\nlegs = [\"mem://1GiB\"]\nread_policy = \"random\"\n", "read_policy"),
            ("[[volume]]\nname = \"v\"\nlegs = [\"mem://1GiB\"]\nio_timeout = \"5\"\n", "io_timeout"),
            ("[nvme_tcp]\nlisten = \"localhost\"\n", "nvme_tcp.listen"),
            ("[[subsystem]]\nnqn = \"nqn.x:y\"\nnamespaces = [\"nope\"]\n", "no volume named 'nope'"),
            ("[[subsystem]]\nnqn = \"vol0\"\nnamespaces = []\n", "subsystem[0].nqn"),
            ("[[subsystem]]\nnqn = \"nqn.x:y\"\nnamespaces = [\"vol0\"]\n[[subsystem.host]]\nnqn = \"nqn.h\"\ndhchap_secret = \"DHHC-1:00:abc:\"\n", "subsystem[0].host[0].dhchap_secret"),
            ("[[subsystem]]\nnqn = \"nqn.x:y\"\nnamespaces = [\"vol0\"]\n[[subsystem.host]]\nnqn = \"nqn.h\"\ndhchap_ctrl_secret = \"DHHC-1:00:qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqppAbGi:\"\n", "subsystem[0].host[0].dhchap_ctrl_secret"),
            ("[[subsystem]]\nnqn = \"nqn.x:y\"\nnamespaces = [\"vol0\"]\n[[subsystem.host]]\nnqn = \"host\"\n", "subsystem[0].host[0].nqn"),
            ("[resync]\nmax_rate = \"fast\"\n", "resync.max_rate"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nhandshake_timeout = \"0s\"\n", "limits.handshake_timeout"),
            ("[limits]\nhandshake_timeout = \"soon\"\n", "limits.handshake_timeout"),
            ("[limits]\nconnection_buffer_budget = \"4KiB\"\n", "limits.connection_buffer_budget"),
            ("[limits]\nconnection_buffer_budget = \"lots\"\n", "limits.connection_buffer_budget"),
            ("[[volume]]\nname = \"i\"\nlegs = [\"mem://1GiB\"]\n[[volume]]\nname = \"s\"\nlegs = [\"mem://1GiB\"]\n[[cycle_apply]]\nimage = \"i\"\nstaging = \"nope\"\n", "cycle_apply[0].staging: no [[volume]] named 'nope'"),
            ("[[volume]]\nname = \"i\"\nlegs = [\"mem://1GiB\"]\n[[volume]]\nname = \"s\"\nlegs = [\"mem://1GiB\"]\n[[cycle_apply]]\nimage = \"i\"\nstaging = \"i\"\n", "cycle_apply[0].staging: the staging volume"),
            ("[[volume]]\nname = \"i\"\nlegs = [\"mem://1GiB\"]\n[[volume]]\nname = \"s\"\nlegs = [\"mem://1GiB\"]\n[[cycle_apply]]\nimage = \"nope\"\nstaging = \"s\"\n", "cycle_apply[0].image"),
            ("[[volume]]\nname = \"i\"\nlegs = [\"mem://1GiB\"]\n[[volume]]\nname = \"s\"\nlegs = [\"mem://1GiB\"]\n[[cycle_apply]]\nimage = \"i\"\nstaging = \"s\"\npoll = \"0s\"\n", "cycle_apply[0].poll"),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(
                e.starts_with("test.toml: ") && e.contains(want),
                "want '{want}' in: {e}"
            );
        }
    }

    #[test]
    fn a_standby_volume_names_a_local_raw_volume() {
        let raw = "[[volume]]\nname = \"siteb\"\nbitmap = false\nlegs = [\"mem://64MiB\"]\n";
        let standby = |extra: &str| {
            format!("{raw}[[volume]]\nname = \"vol0\"\n{extra}legs = [\"nvme-tcp://10.0.0.1:4420/nqn.x:a\", \"volume://siteb\"]\n")
        };
        let cfg = Config::parse_str(&standby("standby = true\n"), "t").unwrap();
        assert!(cfg.volumes[1].standby && !cfg.volumes[0].standby);
        for (text, want) in [
            (standby(""), "a leg of a standby volume only"),
            (
                standby("standby = true\nbitmap = false\n"),
                "(vol0).standby",
            ),
            (
                standby("standby = true\n").replace("bitmap = false\n", ""),
                "raw (bitmap = false) one-leg volume",
            ),
            (
                standby("standby = true\n").replace("volume://siteb", "volume://nope"),
                "legs[1]",
            ),
        ] {
            let e = err(&text);
            assert!(e.contains(want), "want '{want}' in: {e}");
        }
    }

    #[test]
    fn limits_have_defaults_and_parse() {
        let cfg = Config::parse_str("", "test.toml").unwrap();
        assert_eq!(cfg.limits, LimitsConfig::default());
        assert_eq!(cfg.limits.max_connections, 1024);
        assert_eq!(cfg.limits.handshake_timeout(), Duration::from_secs(10));
        assert_eq!(cfg.limits.connection_buffer_budget(), 64 << 20);
        let cfg = Config::parse_str(
            "[limits]\nmax_connections = 8\nhandshake_timeout = \"250ms\"\nconnection_buffer_budget = \"1MiB\"\n",
            "test.toml",
        )
        .unwrap();
        assert_eq!(cfg.limits.max_connections, 8);
        assert_eq!(cfg.limits.handshake_timeout(), Duration::from_millis(250));
        assert_eq!(cfg.limits.connection_buffer_budget(), 1 << 20);
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/nvmirror.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/nvmirror.toml"), "{e}");
    }
}
