//! Run-time object management: `volume_create`, `volume_delete`, `subsystem_create`,
//! `subsystem_delete`, `namespace_add`, `namespace_remove`, `listener_add`,
//! `listener_remove` and `save_config`.
//!
//! Each change goes through [`LiveConfig::change`]: the new configuration is built and
//! checked by the same `validate` as the file (errors name the field), then applied, then
//! persisted atomically in `<data_dir>/nvmirror.live.toml` (see `live_config`).

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use nvmirror_nvme::BlockDevice;

use crate::config::{NvmeTcpListener, SubsystemConfig, VolumeConfig};
use crate::control::Registry;
use crate::live_config::{ChangeError, LiveConfig};
use crate::nvme_tcp::AnaState;
use crate::rpc::{Methods, RpcError};
use crate::NvmeTcpTarget;

impl From<ChangeError> for RpcError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Refused(m) => RpcError::invalid_params(m),
            ChangeError::Failed(m) => RpcError::failed(m),
        }
    }
}

fn live(reg: &Registry) -> Result<&LiveConfig, RpcError> {
    reg.live
        .as_deref()
        .ok_or_else(|| RpcError::failed("no live configuration (not started by serve)"))
}

fn target(reg: &Registry) -> Result<Arc<NvmeTcpTarget>, RpcError> {
    reg.nvme_tcp.upgrade().ok_or_else(|| {
        RpcError::failed("the NVMe/TCP front end is not running (configure [nvme_tcp])")
    })
}

fn string<'a>(p: &'a Value, k: &str) -> Result<&'a str, RpcError> {
    p.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params(format!("missing string parameter '{k}'")))
}

/// `p` as a configuration section, serde's message naming the field at fault.
fn section<T: serde::de::DeserializeOwned>(method: &str, p: &Value) -> Result<T, RpcError> {
    serde_json::from_value(p.clone())
        .map_err(|e| RpcError::invalid_params(format!("{method}: {e}")))
}

fn device(reg: &Registry, name: &str) -> Option<Arc<dyn BlockDevice>> {
    reg.find_volume(name)
        .map(|e| Arc::clone(&e.volume) as Arc<dyn BlockDevice>)
}

/// Registers the object methods.
pub(crate) fn add_methods(m: &mut Methods, reg: &Arc<Registry>) {
    let r = Arc::clone(reg);
    m.add("volume_create", move |p| volume_create(&r, p));
    let r = Arc::clone(reg);
    m.add("volume_delete", move |p| volume_delete(&r, p));
    let r = Arc::clone(reg);
    m.add("subsystem_create", move |p| subsystem_create(&r, p));
    let r = Arc::clone(reg);
    m.add("subsystem_delete", move |p| subsystem_delete(&r, p));
    let r = Arc::clone(reg);
    m.add("namespace_add", move |p| namespace_add(&r, p));
    let r = Arc::clone(reg);
    m.add("namespace_remove", move |p| namespace_remove(&r, p));
    let r = Arc::clone(reg);
    m.add("listener_add", move |p| listener_add(&r, p));
    let r = Arc::clone(reg);
    m.add("listener_remove", move |p| listener_remove(&r, p));
    let r = Arc::clone(reg);
    m.add("save_config", move |p| save_config(&r, p));
}

fn volume_create(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let v: VolumeConfig = section("volume_create", p)?;
    for (i, uri) in v.legs.iter().enumerate() {
        crate::leg_dirs::check(uri, &reg.leg_dirs)
            .map_err(|e| RpcError::invalid_params(format!("volume_create: legs[{i}]: {e}")))?;
    }
    let name = v.name.clone();
    live(reg)?.change(
        "volume_create",
        |c| {
            c.volumes.push(v);
            c.expand_data_dir();
            Ok(())
        },
        |c| {
            let vc = c.volumes.last().expect("pushed above").clone();
            let no_local: crate::serve::LocalLegs<'_> = &|_| None;
            let entry = crate::serve::open_entry(
                &c.data_dir,
                c.service.claim_timeout(),
                &vc,
                no_local,
                None,
            )
            .map_err(|e| e.to_string())?;
            reg.add_volume(entry);
            tracing::info!(volume = name, legs = ?vc.legs, "volume created");
            Ok(())
        },
    )?;
    let e = reg.find_volume(&name).expect("just added");
    Ok(reg.volume_status(&e))
}

fn volume_delete(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let name = string(p, "name")
        .or_else(|_| string(p, "volume"))?
        .to_string();
    if reg.nbd_exports.contains(&name) {
        return Err(RpcError::invalid_params(format!(
            "volume '{name}' is exported over NBD, whose exports are fixed while serve runs; \
             remove it from the configuration and restart"
        )));
    }
    live(reg)?.change(
        "volume_delete",
        |c| {
            if let Some(s) = c.subsystems.iter().find(|s| s.namespaces.contains(&name)) {
                return Err(format!(
                    "volume '{name}' is exported by subsystem '{}'; namespace_remove it first",
                    s.nqn
                ));
            }
            let before = c.volumes.len();
            c.volumes.retain(|v| v.name != name);
            if c.volumes.len() == before {
                return Err(format!("no volume named '{name}'"));
            }
            Ok(())
        },
        |_| {
            let entry = reg
                .take_volume(&name)
                .ok_or_else(|| format!("no volume named '{name}'"))?;
            close_volume(&name, entry);
            Ok(())
        },
    )?;
    Ok(json!({"deleted": name}))
}

/// Shuts a deleted volume down clean once nothing else holds it (the bitmap clearer and a
/// status call hold it briefly); a host connection that still holds it lets go when it
/// disconnects, and the volume closes then (its legs resync their marked regions at the
/// next open).
fn close_volume(name: &str, mut entry: Arc<crate::control::VolumeEntry>) {
    for _ in 0..50 {
        match Arc::try_unwrap(entry) {
            Ok(e) => {
                let mut vol = e.volume;
                for _ in 0..50 {
                    match Arc::try_unwrap(vol) {
                        Ok(v) => {
                            if v.metadata_layout().is_some() {
                                if let Err(err) = v.shutdown_clean() {
                                    tracing::warn!(volume = name, "not marked clean: {err}");
                                }
                            }
                            tracing::info!(volume = name, "volume deleted and closed");
                            return;
                        }
                        Err(v) => vol = v,
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                tracing::warn!(
                    volume = name,
                    "volume deleted; a host connection still holds it, it closes when that goes"
                );
                return;
            }
            Err(e) => entry = e,
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::warn!(
        volume = name,
        "volume deleted; still in use, it closes when released"
    );
}

fn subsystem_create(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let s: SubsystemConfig = section("subsystem_create", p)?;
    let t = target(reg)?;
    let nqn = s.nqn.clone();
    live(reg)?.change(
        "subsystem_create",
        |c| {
            c.subsystems.push(s);
            Ok(())
        },
        |c| {
            let sc = c.subsystems.last().expect("pushed above");
            let cfg = crate::serve::subsystem_config(c, sc, &|n| device(reg, n));
            t.add_subsystem(&cfg).map_err(|e| e.to_string())?;
            tracing::info!(nqn = sc.nqn, "subsystem created");
            Ok(())
        },
    )?;
    subsystem_json(&t, &nqn)
}

fn subsystem_json(t: &NvmeTcpTarget, nqn: &str) -> Result<Value, RpcError> {
    let s = t
        .subsystems()
        .into_iter()
        .find(|s| s.nqn == nqn)
        .ok_or_else(|| RpcError::failed(format!("subsystem '{nqn}' is not served")))?;
    let listeners: Vec<String> = t.local_addrs().iter().map(|a| a.to_string()).collect();
    Ok(json!({
        "nqn": s.nqn,
        "serial": s.serial,
        "model": s.model,
        "allowed_hosts": s.allowed_hosts,
        "listeners": listeners,
        "namespaces": s.namespaces.iter().map(|n| json!({"nsid": n.nsid, "volume": n.device})).collect::<Vec<_>>(),
    }))
}

fn subsystem_delete(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let nqn = string(p, "nqn")?.to_string();
    let force = p.get("force").and_then(Value::as_bool).unwrap_or(false);
    let t = target(reg)?;
    let hosts = t
        .subsystem_controllers(&nqn)
        .ok_or_else(|| RpcError::invalid_params(format!("no subsystem '{nqn}'")))?;
    if hosts > 0 && !force {
        return Err(RpcError::invalid_params(format!(
            "subsystem '{nqn}' has {hosts} connected controller(s); \"force\": true disconnects them"
        )));
    }
    live(reg)?.change(
        "subsystem_delete",
        |c| {
            c.subsystems.retain(|s| s.nqn != nqn);
            Ok(())
        },
        |_| t.remove_subsystem(&nqn).map_err(|e| e.to_string()),
    )?;
    tracing::info!(nqn, disconnected = hosts, "subsystem deleted");
    Ok(json!({"deleted": nqn, "disconnected_controllers": hosts}))
}

fn namespace_add(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let nqn = string(p, "nqn")?.to_string();
    let volume = string(p, "volume")?.to_string();
    let t = target(reg)?;
    let nsid = live(reg)?.change(
        "namespace_add",
        |c| {
            let s = c
                .subsystems
                .iter_mut()
                .find(|s| s.nqn == nqn)
                .ok_or_else(|| format!("no subsystem '{nqn}'"))?;
            s.namespaces.push(volume.clone());
            Ok(())
        },
        |_| {
            let dev = device(reg, &volume).ok_or_else(|| format!("no volume named '{volume}'"))?;
            t.add_namespace(&nqn, dev).map_err(|e| e.to_string())
        },
    )?;
    tracing::info!(nqn, volume, nsid, "namespace added");
    Ok(json!({"nqn": nqn, "nsid": nsid, "volume": volume}))
}

fn namespace_remove(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let nqn = string(p, "nqn")?.to_string();
    let t = target(reg)?;
    let served = t
        .subsystems()
        .into_iter()
        .find(|s| s.nqn == nqn)
        .ok_or_else(|| RpcError::invalid_params(format!("no subsystem '{nqn}'")))?;
    let ns = match (
        p.get("nsid").and_then(Value::as_u64),
        p.get("volume").and_then(Value::as_str),
    ) {
        (Some(nsid), _) => served.namespaces.iter().find(|n| u64::from(n.nsid) == nsid),
        (None, Some(v)) => served.namespaces.iter().find(|n| n.device == v),
        (None, None) => {
            return Err(RpcError::invalid_params(
                "give 'nsid' (integer) or 'volume' (string)",
            ))
        }
    }
    .ok_or_else(|| RpcError::invalid_params(format!("{nqn} has no such namespace")))?
    .clone();
    live(reg)?.change(
        "namespace_remove",
        |c| {
            if let Some(s) = c.subsystems.iter_mut().find(|s| s.nqn == nqn) {
                if let Some(i) = s.namespaces.iter().position(|n| *n == ns.device) {
                    s.namespaces.remove(i);
                }
            }
            Ok(())
        },
        |_| t.remove_namespace(&nqn, ns.nsid).map_err(|e| e.to_string()),
    )?;
    tracing::info!(nqn, nsid = ns.nsid, volume = ns.device, "namespace removed");
    Ok(json!({"nqn": nqn, "nsid": ns.nsid, "volume": ns.device}))
}

fn listener_add(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let l: NvmeTcpListener = section("listener_add", p)?;
    let t = target(reg)?;
    let bound = live(reg)?.change(
        "listener_add",
        |c| {
            c.nvme_tcp
                .as_mut()
                .ok_or("the configuration has no [nvme_tcp]")?
                .listeners
                .push(l);
            Ok(())
        },
        |c| {
            let n = c.nvme_tcp.as_mut().expect("checked in edit");
            let entry = n.listeners.last_mut().expect("pushed above");
            let addr: SocketAddr = entry.listen.parse().map_err(|e| format!("{e}"))?;
            let state = AnaState::parse(&entry.ana_state).unwrap_or(AnaState::Optimized);
            let bound = t.add_listener(addr, state).map_err(|e| e.to_string())?;
            // Port 0 is recorded as the port it got, so a restart listens there again.
            entry.listen = bound.to_string();
            Ok(bound)
        },
    )?;
    Ok(
        json!({"listen": bound.to_string(), "listeners": t.local_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>()}),
    )
}

fn listener_remove(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let listen = string(p, "listen")?;
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| RpcError::invalid_params(format!("listen: '{listen}': {e}")))?;
    let t = target(reg)?;
    live(reg)?.change(
        "listener_remove",
        |c| {
            let n = c
                .nvme_tcp
                .as_mut()
                .ok_or("the configuration has no [nvme_tcp]")?;
            // A listener configured on port 0 is known by the port it got.
            let any = SocketAddr::new(addr.ip(), 0).to_string();
            let i = n
                .listeners
                .iter()
                .position(|l| l.listen == listen)
                .or_else(|| n.listeners.iter().position(|l| l.listen == any));
            if let Some(i) = i {
                n.listeners.remove(i);
            }
            Ok(())
        },
        |_| t.remove_listener(addr).map_err(|e| e.to_string()),
    )?;
    Ok(
        json!({"removed": addr.to_string(), "listeners": t.local_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>()}),
    )
}

fn save_config(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let text = crate::live_config::to_toml(&live(reg)?.current());
    match p.get("path") {
        None | Some(Value::Null) => Ok(json!({"config": text})),
        Some(Value::String(path)) => {
            let path = std::path::Path::new(path);
            if path
                .parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
            {
                return Err(RpcError::invalid_params(format!(
                    "path: the directory of {} does not exist",
                    path.display()
                )));
            }
            crate::durable::replace_file(path, text.as_bytes())
                .map_err(|e| RpcError::failed(format!("cannot write {}: {e}", path.display())))?;
            tracing::info!(path = %path.display(), "configuration saved");
            Ok(json!({"path": path.display().to_string(), "bytes": text.len()}))
        }
        Some(_) => Err(RpcError::invalid_params("'path' must be a string")),
    }
}
