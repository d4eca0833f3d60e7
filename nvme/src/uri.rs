//! Leg URIs, parsed in one place:
//!
//! | URI | back end |
//! | --- | --- |
//! | `mem://1GiB?latency=20us&dist=lognormal&sigma=0.5&lba=4096&hugepages=1&prealloc=1` | [`MemDevice`] |
//! | `null://1TiB` | [`NullDevice`] |
//! | `file:///abs/path.img?buffered=1&sqpoll=1&create=1GiB` | [`UringDevice`] |
//! | `/dev/nvme0n1` (same query keys as `file://`) | [`UringDevice`] |
//! | `nvme-ng:///dev/ng0n1?sqpoll=1&timeout=30s&max_transfer=256KiB` | [`NgDevice`] (io_uring NVMe passthrough) |
//! | `nvme-tcp://HOST:PORT/SUBNQN?nsid=1&hdgst=1&ddgst=1&hostnqn=…&queue_size=128&kato=10s&reconnect_delay=2s&ctrl_loss_tmo=600s&fast_io_fail_tmo=0` | [`NvmeTcpDevice`] |
//! | `nbd://HOST:PORT/EXPORT?connections=16&timeout=30s&lba=512` | [`NbdDevice`] |
//! | `pcie://0000:01:00.0?nsid=1&timeout=30s&max_transfer=128KiB&queues=64&queue_size=1024&hugepages=1` | [`PcieDevice`] over VFIO |
//! | `pcie://fake?size=64MiB&lba=512&mdts=5` (same keys) | [`PcieDevice`] over the [fake controller](crate::backend::pcie::fake) |
//!
//! Errors name the offending part of the URI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::nbd::{self, NbdDevice, NbdOptions};
use crate::backend::pcie::{FakeConfig, FakeController, PcieDevice, PcieOptions};
use crate::backend::tcp::{DhchapKeys, NvmeTcpDevice, NvmeTcpOptions, DEFAULT_PORT};
use crate::backend::{
    LatencyModel, MemDevice, MemOptions, NgDevice, NgOptions, NullDevice, UringDevice, UringOptions,
};
use crate::dhchap::Secret;
use crate::queue::BlockDevice;
use crate::spec::fabrics::NQN_MAX_LEN;
use crate::{Error, Result};

/// A parsed leg URI.
#[derive(Clone, Debug, PartialEq)]
pub enum LegUri {
    Mem {
        bytes: u64,
        lba_size: u32,
        latency: LatencyModel,
        /// `prealloc=1` asks for hugepages too unless `hugepages=0` says otherwise.
        opts: MemOptions,
    },
    Null {
        bytes: u64,
        lba_size: u32,
    },
    /// A regular file (`file://`) or a block device (`/dev/…`).
    Uring {
        path: PathBuf,
        opts: UringOptions,
    },
    /// An NVMe namespace's generic char device, through io_uring passthrough.
    NvmeNg {
        path: PathBuf,
        opts: NgOptions,
    },
    /// A namespace of a remote NVMe/TCP controller.
    NvmeTcp {
        /// `HOST:PORT` (an IPv6 host in brackets).
        addr: String,
        opts: NvmeTcpOptions,
    },
    /// An export of a remote NBD server.
    Nbd {
        /// `HOST:PORT` (an IPv6 host in brackets).
        addr: String,
        opts: NbdOptions,
    },
    /// A namespace of a local PCIe NVMe controller driven from userspace.
    Pcie {
        /// The PCI function (`0000:01:00.0`), or `None` for the fake controller.
        bdf: Option<String>,
        opts: PcieOptions,
        /// The fake controller's shape (`pcie://fake`).
        fake: FakeConfig,
    },
}

impl LegUri {
    /// Parses a leg URI.
    pub fn parse(uri: &str) -> Result<Self> {
        let err = |part: &str, reason: String| Error::Uri {
            uri: uri.to_string(),
            part: part.to_string(),
            reason,
        };
        let (base, query) = match uri.split_once('?') {
            Some((b, q)) => (b, q),
            None => (uri, ""),
        };
        let mut params = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(kv, "query parameters are key=value".into()))?;
            params.push((k, v));
        }
        let take = |params: &mut Vec<(&str, &str)>, key: &str| -> Option<String> {
            let i = params.iter().position(|(k, _)| *k == key)?;
            Some(params.remove(i).1.to_string())
        };
        let lba = |params: &mut Vec<(&str, &str)>| -> Result<Option<u32>> {
            match take(params, "lba") {
                None => Ok(None),
                Some(v) => match v.parse::<u32>() {
                    Ok(n @ (512 | 4096)) => Ok(Some(n)),
                    _ => Err(err(
                        &format!("lba={v}"),
                        "block size must be 512 or 4096".into(),
                    )),
                },
            }
        };
        // `key=N` with N an integer in `lo..=hi`; `expected` says so in the error.
        let int = |params: &mut Vec<(&str, &str)>,
                   key: &str,
                   lo: u64,
                   hi: u64,
                   expected: &str|
         -> Result<Option<u64>> {
            match take(params, key) {
                None => Ok(None),
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (lo..=hi).contains(n))
                    .map(Some)
                    .ok_or_else(|| err(&format!("{key}={v}"), expected.into())),
            }
        };
        // `max_transfer=SIZE`: whole 4 KiB pages from 4 KiB to 64 MiB.
        let max_transfer = |params: &mut Vec<(&str, &str)>| -> Result<Option<u32>> {
            let Some(v) = take(params, "max_transfer") else {
                return Ok(None);
            };
            let part = format!("max_transfer={v}");
            let n = parse_size(&v).map_err(|r| err(&part, r))?;
            if !(4096..=(64 << 20)).contains(&n) || n % 4096 != 0 {
                return Err(err(
                    &part,
                    "expected 4KiB..=64MiB in whole 4 KiB pages".into(),
                ));
            }
            Ok(Some(n as u32))
        };
        // `nsid=N`: a namespace ID other than 0 and the broadcast value 0xffffffff.
        let nsid = |params: &mut Vec<(&str, &str)>| -> Result<Option<u32>> {
            Ok(
                int(params, "nsid", 1, 0xffff_ffff - 1, "expected 1..4294967294")?
                    .map(|n| n as u32),
            )
        };
        let flag = |params: &mut Vec<(&str, &str)>, key: &str| -> Result<bool> {
            match take(params, key).as_deref() {
                None | Some("0") | Some("false") => Ok(false),
                Some("1") | Some("true") => Ok(true),
                Some(v) => Err(err(
                    &format!("{key}={v}"),
                    "expected 0/1 or true/false".into(),
                )),
            }
        };

        let parsed = if let Some(size) = base.strip_prefix("mem://") {
            let bytes = parse_size(size).map_err(|r| err(size, r))?;
            let lba_size = lba(&mut params)?.unwrap_or(512);
            let latency = match take(&mut params, "latency") {
                None => LatencyModel::None,
                Some(v) => {
                    let mean = parse_duration(&v).map_err(|r| err(&format!("latency={v}"), r))?;
                    let dist = take(&mut params, "dist").unwrap_or_else(|| "fixed".into());
                    match dist.as_str() {
                        "fixed" => LatencyModel::Fixed(mean),
                        "uniform" => {
                            let s = take(&mut params, "spread").unwrap_or_else(|| "0".into());
                            let spread =
                                parse_duration(&s).map_err(|r| err(&format!("spread={s}"), r))?;
                            LatencyModel::Uniform { mean, spread }
                        }
                        "lognormal" => {
                            let s = take(&mut params, "sigma").unwrap_or_else(|| "0.5".into());
                            let sigma = s
                                .parse::<f64>()
                                .ok()
                                .filter(|v| v.is_finite() && *v > 0.0 && *v < 10.0)
                                .ok_or_else(|| {
                                    err(
                                        &format!("sigma={s}"),
                                        "expected a number in (0, 10)".into(),
                                    )
                                })?;
                            LatencyModel::LogNormal { mean, sigma }
                        }
                        other => {
                            return Err(err(
                                &format!("dist={other}"),
                                "expected fixed, uniform or lognormal".into(),
                            ))
                        }
                    }
                }
            };
            let prealloc = flag(&mut params, "prealloc")?;
            let hugepages = if params.iter().any(|(k, _)| *k == "hugepages") {
                flag(&mut params, "hugepages")?
            } else {
                prealloc
            };
            Self::Mem {
                bytes,
                lba_size,
                latency,
                opts: MemOptions {
                    hugepages,
                    prealloc,
                },
            }
        } else if let Some(size) = base.strip_prefix("null://") {
            let bytes = parse_size(size).map_err(|r| err(size, r))?;
            Self::Null {
                bytes,
                lba_size: lba(&mut params)?.unwrap_or(512),
            }
        } else if base.starts_with("file://") || base.starts_with("/dev/") {
            let path = base.strip_prefix("file://").unwrap_or(base);
            if !path.starts_with('/') {
                return Err(err(
                    path,
                    "the path must be absolute (file:///abs/path)".into(),
                ));
            }
            let create_size = match take(&mut params, "create") {
                None => None,
                Some(v) => Some(parse_size(&v).map_err(|r| err(&format!("create={v}"), r))?),
            };
            let opts = UringOptions {
                buffered: flag(&mut params, "buffered")?,
                sqpoll: flag(&mut params, "sqpoll")?,
                lba_size: lba(&mut params)?,
                create_size,
            };
            Self::Uring {
                path: PathBuf::from(path),
                opts,
            }
        } else if let Some(path) = base.strip_prefix("nvme-ng://") {
            if !path.starts_with("/dev/") {
                return Err(err(
                    path,
                    "expected the generic char device's path, nvme-ng:///dev/ngXnY".into(),
                ));
            }
            let mut opts = NgOptions {
                sqpoll: flag(&mut params, "sqpoll")?,
                ..NgOptions::default()
            };
            if let Some(v) = take(&mut params, "timeout") {
                let part = format!("timeout={v}");
                let d = parse_duration(&v).map_err(|r| err(&part, r))?;
                if d < Duration::from_millis(1) || d.as_millis() > u128::from(u32::MAX) {
                    return Err(err(&part, "expected 1ms up to 49 days".into()));
                }
                opts.timeout = Some(d);
            }
            if let Some(n) = max_transfer(&mut params)? {
                opts.max_transfer = Some(n);
            }
            Self::NvmeNg {
                path: PathBuf::from(path),
                opts,
            }
        } else if let Some(rest) = base.strip_prefix("nvme-tcp://") {
            let (hostport, subnqn) = rest
                .split_once('/')
                .ok_or_else(|| err(rest, "expected nvme-tcp://HOST:PORT/SUBNQN".into()))?;
            let addr = parse_host_port(hostport, DEFAULT_PORT).map_err(|r| err(hostport, r))?;
            check_nqn(subnqn).map_err(|r| err(subnqn, format!("subsystem NQN {r}")))?;
            let mut opts = NvmeTcpOptions::new(subnqn);
            if let Some(n) = nsid(&mut params)? {
                opts.nsid = n;
            }
            opts.hdgst = flag(&mut params, "hdgst")?;
            opts.ddgst = flag(&mut params, "ddgst")?;
            if let Some(v) = take(&mut params, "hostnqn") {
                check_nqn(&v).map_err(|r| err(&format!("hostnqn={v}"), format!("host NQN {r}")))?;
                opts.hostnqn = Some(v);
            }
            if let Some(n) = int(
                &mut params,
                "queue_size",
                2,
                65536,
                "expected 2..=65536 entries",
            )? {
                opts.queue_size = n as u32;
            }
            if let Some(v) = take(&mut params, "kato") {
                let part = format!("kato={v}");
                let kato = parse_duration(&v).map_err(|r| err(&part, r))?;
                if kato.as_millis() > u128::from(u32::MAX)
                    || (!kato.is_zero() && kato < Duration::from_millis(100))
                {
                    return Err(err(&part, "expected 0 (off) or 100ms up to 49 days".into()));
                }
                opts.kato = kato;
            }
            if let Some(v) = take(&mut params, "reconnect_delay") {
                let part = format!("reconnect_delay={v}");
                let d = parse_duration(&v).map_err(|r| err(&part, r))?;
                if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                    return Err(err(&part, "expected 10ms up to 1h".into()));
                }
                opts.reconnect_delay = d;
            }
            if let Some(v) = take(&mut params, "ctrl_loss_tmo") {
                let part = format!("ctrl_loss_tmo={v}");
                opts.ctrl_loss_tmo = match v.as_str() {
                    "off" | "-1" => None,
                    _ => Some(parse_duration(&v).map_err(|r| err(&part, r))?),
                };
            }
            if let Some(v) = take(&mut params, "fast_io_fail_tmo") {
                let part = format!("fast_io_fail_tmo={v}");
                opts.fast_io_fail_tmo = parse_duration(&v).map_err(|r| err(&part, r))?;
            }
            // Secrets come from files, so they never appear in a URI, a log line or status.
            let mut secret = |key: &str| -> Result<Option<Secret>> {
                let Some(path) = take(&mut params, key) else {
                    return Ok(None);
                };
                let part = format!("{key}={path}");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err(&part, format!("cannot read the secret: {e}")))?;
                Secret::parse(text.trim())
                    .map(Some)
                    .map_err(|e| err(&part, format!("not a DHHC-1 secret: {e}")))
            };
            let host = secret("dhchap_secret_file")?;
            let ctrl = secret("dhchap_ctrl_secret_file")?;
            opts.dhchap = match (host, ctrl) {
                (None, None) => None,
                (Some(host), ctrl) => Some(DhchapKeys { host, ctrl }),
                (None, Some(_)) => {
                    return Err(err(
                        "dhchap_ctrl_secret_file",
                        "checking the controller needs the host's secret too \
                         (dhchap_secret_file)"
                            .into(),
                    ))
                }
            };
            Self::NvmeTcp { addr, opts }
        } else if let Some(rest) = base.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let addr =
                parse_host_port(hostport, nbd::DEFAULT_PORT).map_err(|r| err(hostport, r))?;
            if export.len() > crate::spec::nbd::MAX_NAME_LEN || export.contains(char::is_control) {
                return Err(err(
                    export,
                    "an export name is at most 4096 bytes without control characters".into(),
                ));
            }
            let mut opts = NbdOptions::new(export);
            if let Some(n) = int(&mut params, "connections", 1, 1024, "expected 1..=1024")? {
                opts.connections = n as u32;
            }
            if let Some(v) = take(&mut params, "timeout") {
                opts.timeout = parse_duration(&v).map_err(|r| err(&format!("timeout={v}"), r))?;
            }
            opts.lba_size = lba(&mut params)?;
            Self::Nbd { addr, opts }
        } else if let Some(addr) = base.strip_prefix("pcie://") {
            let bdf = if addr == "fake" {
                None
            } else if is_pci_address(addr) {
                Some(addr.to_ascii_lowercase())
            } else {
                return Err(err(
                    addr,
                    "expected a PCI address DDDD:BB:DD.F (e.g. 0000:01:00.0) or 'fake'".into(),
                ));
            };
            let mut opts = PcieOptions::default();
            if let Some(n) = nsid(&mut params)? {
                opts.nsid = n;
            }
            if let Some(v) = take(&mut params, "timeout") {
                let part = format!("timeout={v}");
                opts.timeout = parse_duration(&v)
                    .map_err(|r| err(&part, r))
                    .and_then(|d| {
                        if d >= Duration::from_millis(10) {
                            Ok(d)
                        } else {
                            Err(err(&part, "expected at least 10ms".into()))
                        }
                    })?;
            }
            if let Some(n) = max_transfer(&mut params)? {
                opts.max_transfer = n as usize;
            }
            if let Some(n) = int(&mut params, "queues", 1, 1024, "expected 1..=1024")? {
                opts.io_queues = n as u16;
            }
            if let Some(n) = int(
                &mut params,
                "queue_size",
                2,
                4096,
                "expected 2..=4096 entries",
            )? {
                opts.queue_size = n as u16;
            }
            if params.iter().any(|(k, _)| *k == "hugepages") {
                opts.hugepages = flag(&mut params, "hugepages")?;
            }
            let mut fake = FakeConfig::default();
            if bdf.is_none() {
                if let Some(v) = take(&mut params, "size") {
                    let part = format!("size={v}");
                    fake.bytes = parse_size(&v)
                        .ok()
                        .filter(|n| (4096..=(4 << 30)).contains(n))
                        .ok_or_else(|| err(&part, "expected 4KiB..=4GiB".into()))?;
                }
                if let Some(n) = lba(&mut params)? {
                    fake.lba_size = n;
                }
                if let Some(v) = take(&mut params, "mdts") {
                    fake.mdts = v
                        .parse::<u8>()
                        .ok()
                        .filter(|n| *n <= 10)
                        .ok_or_else(|| err(&format!("mdts={v}"), "expected 0..=10".into()))?;
                }
            }
            Self::Pcie { bdf, opts, fake }
        } else {
            let scheme = base.split_once("://").map_or(base, |(s, _)| s);
            return Err(err(
                scheme,
                "unknown scheme; expected mem://, null://, file://, /dev/…, nvme-ng://, nvme-tcp://, nbd:// or pcie://"
                    .into(),
            ));
        };
        if let Some((k, v)) = params.first() {
            return Err(err(&format!("{k}={v}"), "unknown parameter".into()));
        }
        Ok(parsed)
    }

    /// Opens the device the URI names.
    pub fn open(&self, uri: &str) -> Result<Arc<dyn BlockDevice>> {
        Ok(match self {
            Self::Mem {
                bytes,
                lba_size,
                latency,
                opts,
            } => Arc::new(
                MemDevice::with_options(*bytes, *lba_size, *latency, *opts)?.with_name(uri),
            ),
            Self::Null { bytes, lba_size } => {
                Arc::new(NullDevice::new(*bytes, *lba_size)?.with_name(uri))
            }
            Self::Uring { path, opts } => Arc::new(UringDevice::open(path, opts)?),
            Self::NvmeNg { path, opts } => Arc::new(NgDevice::open(path, opts)?),
            Self::NvmeTcp { addr, opts } => {
                Arc::new(NvmeTcpDevice::connect(addr, opts)?.with_name(uri))
            }
            Self::Nbd { addr, opts } => Arc::new(NbdDevice::connect(addr, opts)?.with_name(uri)),
            Self::Pcie { bdf, opts, fake } => {
                let dev = match bdf {
                    #[cfg(target_os = "linux")]
                    Some(bdf) => PcieDevice::open_vfio(bdf, opts)?,
                    #[cfg(not(target_os = "linux"))]
                    Some(bdf) => {
                        return Err(Error::Pcie {
                            device: bdf.clone(),
                            step: "open".into(),
                            reason: "VFIO needs Linux".into(),
                        })
                    }
                    None => {
                        let func = FakeController::new(fake.clone());
                        PcieDevice::new(Arc::new(func), opts)?
                    }
                };
                Arc::new(dev.with_name(uri))
            }
        })
    }
}

/// Parses and opens a leg URI.
pub fn open_leg(uri: &str) -> Result<Arc<dyn BlockDevice>> {
    LegUri::parse(uri)?.open(uri)
}

/// A PCI address `DDDD:BB:DD.F` (domain, bus, device, function in hex).
fn is_pci_address(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|c| c.is_ascii_hexdigit());
    let mut it = s.split(':');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(dom), Some(bus), Some(devfn), None) => match devfn.split_once('.') {
            Some((dev, func)) => {
                hex(dom, 4)
                    && hex(bus, 2)
                    && hex(dev, 2)
                    && u8::from_str_radix(dev, 16).is_ok_and(|d| d < 32)
                    && func.len() == 1
                    && func.as_bytes()[0].is_ascii_digit()
                    && func.as_bytes()[0] < b'8'
            }
            None => false,
        },
        _ => false,
    }
}

/// Checks `HOST:PORT`, `HOST` (port `default_port`), `[V6]:PORT` or `[V6]`; returns
/// `HOST:PORT`.
fn parse_host_port(s: &str, default_port: u16) -> std::result::Result<String, String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, rest) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{host}' is not an IPv6 address"));
        }
        match rest {
            "" => (format!("[{host}]"), None),
            r => match r.strip_prefix(':') {
                Some(p) => (format!("[{host}]"), Some(p)),
                None => return Err("expected ':PORT' after ']'".into()),
            },
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err("expected a host name or address".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{p}' is not a TCP port"))?,
    };
    Ok(format!("{host}:{port}"))
}

/// An NQN: 1..=223 bytes of printable ASCII without spaces.
fn check_nqn(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > NQN_MAX_LEN {
        return Err(format!("must be 1..={NQN_MAX_LEN} bytes"));
    }
    if !s.bytes().all(|c| c.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Parses `4096`, `64KiB`, `1GiB`, `1TiB`, `1G` (binary units), `1.5GiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        u => return Err(format!("unknown size unit '{u}' (use KiB, MiB, GiB, TiB)")),
    };
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
        (f * mult as f64) as u64
    } else {
        let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
        n.checked_mul(mult)
            .ok_or_else(|| format!("'{s}' is too large"))?
    };
    if value == 0 {
        return Err("size must be greater than zero".into());
    }
    Ok(value)
}

/// Parses `20us`, `1.5ms`, `5s`, `100ns`, `2µs`, `0`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let f: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration"))?;
    let ns = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "" => return Err(format!("'{s}' needs a unit (ns, us, ms, s)")),
        u => return Err(format!("unknown duration unit '{u}' (use ns, us, ms, s)")),
    };
    let total = f * ns;
    if !(0.0..=86_400e9).contains(&total) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcie_uris_parse_and_name_their_bad_parts() {
        let u = LegUri::parse("pcie://0000:01:00.0?nsid=2&timeout=5s&max_transfer=256KiB&queues=8&queue_size=256&hugepages=0").unwrap();
        let LegUri::Pcie { bdf, opts, .. } = u else {
            panic!("{u:?}");
        };
        assert_eq!(bdf.as_deref(), Some("0000:01:00.0"));
        assert_eq!(
            opts,
            PcieOptions {
                nsid: 2,
                timeout: Duration::from_secs(5),
                max_transfer: 256 << 10,
                io_queues: 8,
                queue_size: 256,
                hugepages: false,
            }
        );
        for (bad, part) in [
            ("pcie://01:00.0", "01:00.0"),
            ("pcie://0000:01:20.0", "0000:01:20.0"),
            ("pcie://0000:01:00.8", "0000:01:00.8"),
            ("pcie://0000:01:00.0?nsid=0", "nsid=0"),
            ("pcie://0000:01:00.0?max_transfer=1000", "max_transfer=1000"),
            ("pcie://0000:01:00.0?queue_size=1", "queue_size=1"),
            ("pcie://0000:01:00.0?size=1GiB", "size=1GiB"),
            ("pcie://fake?mdts=11", "mdts=11"),
        ] {
            match LegUri::parse(bad) {
                Err(Error::Uri { part: p, .. }) => assert_eq!(p, part, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let dev = open_leg("pcie://fake?size=1MiB&lba=4096&mdts=2").unwrap();
        assert_eq!(dev.geometry().num_blocks, 256);
        assert_eq!(dev.name(), "pcie://fake?size=1MiB&lba=4096&mdts=2");
    }

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            LegUri::parse("mem://1GiB?latency=20us").unwrap(),
            LegUri::Mem {
                bytes: 1 << 30,
                lba_size: 512,
                latency: LatencyModel::Fixed(Duration::from_micros(20)),
                opts: MemOptions::default(),
            }
        );
        assert_eq!(
            LegUri::parse("null://1TiB?lba=4096").unwrap(),
            LegUri::Null {
                bytes: 1 << 40,
                lba_size: 4096
            }
        );
        match LegUri::parse("file:///tmp/a.img?buffered=1&create=64MiB").unwrap() {
            LegUri::Uring { path, opts } => {
                assert_eq!(path, PathBuf::from("/tmp/a.img"));
                assert!(opts.buffered && !opts.sqpoll);
                assert_eq!(opts.create_size, Some(64 << 20));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            LegUri::parse("/dev/nvme0n1").unwrap(),
            LegUri::Uring { .. }
        ));
        assert!(matches!(
            LegUri::parse("mem://1MiB?latency=1ms&dist=lognormal&sigma=0.3").unwrap(),
            LegUri::Mem {
                latency: LatencyModel::LogNormal { .. },
                ..
            }
        ));
    }

    #[test]
    fn parses_mem_layout_options() {
        let opts = |u: &str| match LegUri::parse(u).unwrap() {
            LegUri::Mem { opts, .. } => opts,
            other => panic!("{u}: {other:?}"),
        };
        let (hugepages, prealloc) = (true, true);
        assert_eq!(
            opts("mem://1GiB?hugepages=1"),
            MemOptions {
                hugepages,
                prealloc: false
            }
        );
        // prealloc asks for hugepages too, unless told not to.
        assert_eq!(
            opts("mem://1GiB?prealloc=1"),
            MemOptions {
                hugepages,
                prealloc
            }
        );
        assert_eq!(
            opts("mem://1GiB?prealloc=true&hugepages=0"),
            MemOptions {
                hugepages: false,
                prealloc
            }
        );
        assert_eq!(
            opts("mem://1GiB?latency=5us&hugepages=false&lba=4096"),
            MemOptions::default()
        );
        for (bad, part) in [
            ("mem://1GiB?hugepages=2", "hugepages=2"),
            ("mem://1GiB?prealloc=yes", "prealloc=yes"),
            ("mem://1GiB?prealloc=1&hugepages=on", "hugepages=on"),
            ("mem://1GiB?hugepage=1", "hugepage=1"),
        ] {
            let e = LegUri::parse(bad).unwrap_err();
            assert!(
                matches!(&e, Error::Uri { part: p, .. } if p == part),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains(part), "{e}");
        }
        let dev = open_leg("mem://4MiB?prealloc=1&hugepages=0").unwrap();
        assert_eq!(dev.name(), "mem://4MiB?prealloc=1&hugepages=0");
        assert_eq!(dev.geometry().num_blocks, 8192);
    }

    #[test]
    fn parses_nvme_ng() {
        let u =
            LegUri::parse("nvme-ng:///dev/ng0n1?sqpoll=1&timeout=5s&max_transfer=128KiB").unwrap();
        assert_eq!(
            u,
            LegUri::NvmeNg {
                path: PathBuf::from("/dev/ng0n1"),
                opts: NgOptions {
                    sqpoll: true,
                    timeout: Some(Duration::from_secs(5)),
                    max_transfer: Some(128 << 10),
                },
            }
        );
        assert_eq!(
            LegUri::parse("nvme-ng:///dev/ng1n2").unwrap(),
            LegUri::NvmeNg {
                path: PathBuf::from("/dev/ng1n2"),
                opts: NgOptions::default(),
            }
        );
        let msg = |u: &str| LegUri::parse(u).unwrap_err().to_string();
        for (uri, part) in [
            ("nvme-ng://ng0n1", "'ng0n1'"),
            ("nvme-ng:///dev/ng0n1?timeout=0s", "timeout=0s"),
            (
                "nvme-ng:///dev/ng0n1?max_transfer=1000",
                "max_transfer=1000",
            ),
            ("nvme-ng:///dev/ng0n1?buffered=1", "buffered=1"),
            ("nvme-ng:///dev/ng0n1?sqpoll=2", "sqpoll=2"),
        ] {
            assert!(msg(uri).contains(part), "{uri}: {}", msg(uri));
        }
    }

    #[test]
    fn errors_name_the_bad_part() {
        let msg = |u: &str| LegUri::parse(u).unwrap_err().to_string();
        assert!(msg("mem://1XB").contains("'1XB'"), "{}", msg("mem://1XB"));
        assert!(msg("mem://1GiB?latency=20").contains("latency=20"));
        assert!(msg("mem://1GiB?lba=1024").contains("lba=1024"));
        assert!(msg("mem://1GiB?colour=red").contains("colour=red"));
        assert!(msg("ftp://x").contains("ftp"));
        assert!(msg("file://relative.img").contains("absolute"));
        assert!(msg("null://0").contains("greater than zero"));
        assert!(msg("mem://1GiB?latency=5us&dist=zipf").contains("dist=zipf"));
    }

    #[test]
    fn parses_nvme_tcp() {
        let LegUri::NvmeTcp { addr, opts } =
            LegUri::parse("nvme-tcp://10.0.0.2:4421/nqn.2024-01.io.nvmirror:vol0").unwrap()
        else {
            panic!("not nvme-tcp")
        };
        assert_eq!(addr, "10.0.0.2:4421");
        assert_eq!(opts, NvmeTcpOptions::new("nqn.2024-01.io.nvmirror:vol0"));
        assert_eq!(opts.nsid, 1);
        assert!(!opts.hdgst && !opts.ddgst && opts.hostnqn.is_none());
        assert_eq!(opts.queue_size, 128);
        let LegUri::NvmeTcp { addr, opts } = LegUri::parse(
            "nvme-tcp://[::1]/nqn.x:y?nsid=3&hdgst=1&ddgst=true&hostnqn=nqn.h:1&queue_size=32&kato=2500ms",
        )
        .unwrap() else {
            panic!("not nvme-tcp")
        };
        assert_eq!(addr, "[::1]:4420");
        assert_eq!(opts.nsid, 3);
        assert!(opts.hdgst && opts.ddgst);
        assert_eq!(opts.hostnqn.as_deref(), Some("nqn.h:1"));
        assert_eq!(opts.queue_size, 32);
        assert_eq!(opts.kato, Duration::from_millis(2500));
        let LegUri::NvmeTcp { opts, .. } = LegUri::parse(
            "nvme-tcp://h/nqn.a?reconnect_delay=250ms&ctrl_loss_tmo=30s&fast_io_fail_tmo=1s",
        )
        .unwrap() else {
            panic!("an nvme-tcp URI")
        };
        assert_eq!(opts.reconnect_delay, Duration::from_millis(250));
        assert_eq!(opts.ctrl_loss_tmo, Some(Duration::from_secs(30)));
        assert_eq!(opts.fast_io_fail_tmo, Duration::from_secs(1));
        match LegUri::parse("nvme-tcp://h/nqn.a?ctrl_loss_tmo=off").unwrap() {
            LegUri::NvmeTcp { opts, .. } => assert_eq!(opts.ctrl_loss_tmo, None),
            other => panic!("{other:?}"),
        }
        match LegUri::parse("nvme-tcp://localhost:4420/nqn.a?kato=0").unwrap() {
            LegUri::NvmeTcp { opts, .. } => assert!(opts.kato.is_zero()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nvme_tcp_errors_name_the_bad_part() {
        let msg = |u: &str| LegUri::parse(u).unwrap_err().to_string();
        for (uri, part) in [
            ("nvme-tcp://10.0.0.2:4420", "10.0.0.2:4420"),
            ("nvme-tcp://10.0.0.2:99999/nqn.a", "99999"),
            ("nvme-tcp://:4420/nqn.a", "expected a host"),
            ("nvme-tcp://[::1/nqn.a", "closing ']'"),
            ("nvme-tcp://h:1/", "subsystem NQN"),
            ("nvme-tcp://h:1/nqn.a?nsid=0", "nsid=0"),
            ("nvme-tcp://h:1/nqn.a?nsid=x", "nsid=x"),
            ("nvme-tcp://h:1/nqn.a?hdgst=2", "hdgst=2"),
            ("nvme-tcp://h:1/nqn.a?queue_size=1", "queue_size=1"),
            ("nvme-tcp://h:1/nqn.a?kato=10", "kato=10"),
            ("nvme-tcp://h:1/nqn.a?kato=1us", "kato=1us"),
            (
                "nvme-tcp://h:1/nqn.a?reconnect_delay=1ms",
                "reconnect_delay=1ms",
            ),
            (
                "nvme-tcp://h:1/nqn.a?ctrl_loss_tmo=soon",
                "ctrl_loss_tmo=soon",
            ),
            (
                "nvme-tcp://h:1/nqn.a?fast_io_fail_tmo=x",
                "fast_io_fail_tmo=x",
            ),
            ("nvme-tcp://h:1/nqn.a?hostnqn=", "hostnqn="),
            ("nvme-tcp://h:1/nqn.a?digest=1", "digest=1"),
        ] {
            let m = msg(uri);
            assert!(m.contains(part), "{uri}: {m}");
        }
        let long = format!("nvme-tcp://h:1/nqn.{}", "a".repeat(230));
        assert!(msg(&long).contains("1..=223"), "{}", msg(&long));
    }

    #[test]
    fn dhchap_secrets_come_from_files_and_never_show_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = crate::dhchap::Secret {
            transform: Some(crate::dhchap::HashId::Sha256),
            key: vec![7; 32],
        };
        let host = dir.path().join("host.key");
        std::fs::write(&host, format!("{}\n", good.encode())).unwrap();
        let bad = dir.path().join("bad.key");
        let mut text = good.encode();
        text.replace_range(12..13, if &text[12..13] == "A" { "B" } else { "A" });
        std::fs::write(&bad, &text).unwrap();
        let uri = |q: String| format!("nvme-tcp://h:1/nqn.a?{q}");

        let LegUri::NvmeTcp { opts, .. } =
            LegUri::parse(&uri(format!("dhchap_secret_file={}", host.display()))).unwrap()
        else {
            panic!("not nvme-tcp");
        };
        let keys = opts.dhchap.unwrap();
        assert_eq!(keys.host, good);
        assert!(keys.ctrl.is_none());

        let msg = |u: String| LegUri::parse(&u).unwrap_err().to_string();
        let m = msg(uri(format!("dhchap_secret_file={}", bad.display())));
        assert!(
            m.contains("not a DHHC-1 secret") && !m.contains(&text),
            "{m}"
        );
        let m = msg(uri("dhchap_secret_file=/nonexistent/key".into()));
        assert!(m.contains("cannot read the secret"), "{m}");
        let m = msg(uri(format!("dhchap_ctrl_secret_file={}", host.display())));
        assert!(m.contains("needs the host's secret too"), "{m}");
    }

    #[test]
    fn parses_nbd() {
        let LegUri::Nbd { addr, opts } = LegUri::parse("nbd://127.0.0.1:10809/vol0").unwrap()
        else {
            panic!("not nbd")
        };
        assert_eq!(addr, "127.0.0.1:10809");
        assert_eq!(opts, NbdOptions::new("vol0"));
        let LegUri::Nbd { addr, opts } =
            LegUri::parse("nbd://[::1]/a/b?connections=4&timeout=2s&lba=4096").unwrap()
        else {
            panic!("not nbd")
        };
        assert_eq!(addr, "[::1]:10809");
        assert_eq!(opts.export, "a/b");
        assert_eq!(opts.connections, 4);
        assert_eq!(opts.timeout, Duration::from_secs(2));
        assert_eq!(opts.lba_size, Some(4096));
        match LegUri::parse("nbd://host?timeout=0").unwrap() {
            LegUri::Nbd { addr, opts } => {
                assert_eq!(addr, "host:10809");
                assert_eq!(opts.export, "", "the default export");
                assert!(opts.timeout.is_zero());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nbd_errors_name_the_bad_part() {
        let msg = |u: &str| LegUri::parse(u).unwrap_err().to_string();
        for (uri, part) in [
            ("nbd://h:0/e", "'0' is not a TCP port"),
            ("nbd://:1/e", "expected a host"),
            ("nbd://h/e?connections=0", "connections=0"),
            ("nbd://h/e?connections=x", "connections=x"),
            ("nbd://h/e?timeout=5", "timeout=5"),
            ("nbd://h/e?lba=1024", "lba=1024"),
            ("nbd://h/e?nsid=1", "nsid=1"),
            ("nbd://h/a\tb", "control characters"),
        ] {
            let m = msg(uri);
            assert!(m.contains(part), "{uri}: {m}");
        }
        assert!(msg("nbd://h/e?timeout=5").contains("bad leg URI"));
        let unreachable = open_leg("nbd://127.0.0.1:1/e").unwrap_err().to_string();
        assert!(unreachable.contains("TCP connect"), "{unreachable}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert!(parse_size("99999999999999TiB").is_err());
        assert_eq!(parse_duration("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("20µs"), Ok(Duration::from_micros(20)));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
