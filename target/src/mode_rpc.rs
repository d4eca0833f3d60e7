//! `leg_set_mode`: switch a leg with a journal (`[[volume.async_legs]]`) between `sync` and
//! its asynchronous mode (`async-journal` or `async-cycle`) at run time (`docs/journal.md`).
//! The mode is kept in the live configuration, so a restart starts the leg in it.
//! `cycle_now`: end the open cycle of `async-cycle` legs now (`docs/cycles.md`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::control::Registry;
use crate::rpc::{Methods, RpcError};

/// Longest drain a switch to `sync` waits for unless `timeout_s` says otherwise.
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

pub(crate) fn add_methods(m: &mut Methods, reg: &Arc<Registry>) {
    let r = Arc::clone(reg);
    m.add("leg_set_mode", move |p| leg_set_mode(&r, p));
    let r = Arc::clone(reg);
    m.add("cycle_now", move |p| cycle_now(&r, p));
}

/// `cycle_now {"volume", "leg"?, "timeout_s"?}`: ends the open cycle of the volume's
/// `async-cycle` legs (or of `leg`) now and waits until each far image holds every write
/// acknowledged before the call (`docs/cycles.md`).
fn cycle_now(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let name = p
        .get("volume")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'volume'"))?;
    let only = match p.get("leg") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| RpcError::invalid_params("leg: the index of a leg"))?
                as usize,
        ),
    };
    let limit = timeout_param(p, DEFAULT_DRAIN)?;
    let entry = reg
        .find_volume(name)
        .ok_or_else(|| RpcError::invalid_params(format!("no volume '{name}'")))?;
    let legs: Vec<usize> = match only {
        Some(i) => vec![i],
        None => (0..entry.volume.leg_states().len()).collect(),
    };
    let mut out = Vec::new();
    for i in legs {
        let dev = entry
            .volume
            .leg_device(i)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        match dev.cycle_now(limit) {
            Some(Ok(cycle)) => out.push(json!({ "leg": i, "cycle": cycle })),
            Some(Err(e)) => return Err(RpcError::failed(format!("leg {i}: {e}"))),
            None if only.is_some() => {
                return Err(RpcError::invalid_params(format!(
                    "leg {i} of volume '{name}' is not async-cycle"
                )))
            }
            None => {}
        }
    }
    if out.is_empty() {
        return Err(RpcError::invalid_params(format!(
            "volume '{name}' has no async-cycle leg"
        )));
    }
    Ok(json!({ "volume": name, "legs": out }))
}

/// `timeout_s`: a number of seconds, `default` when absent.
fn timeout_param(p: &Value, default: Duration) -> Result<Duration, RpcError> {
    match p.get("timeout_s") {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| RpcError::invalid_params("timeout_s: a number of seconds")),
    }
}

fn leg_set_mode(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let name = p
        .get("volume")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'volume'"))?
        .to_string();
    let leg = p
        .get("leg")
        .and_then(Value::as_u64)
        .ok_or_else(|| RpcError::invalid_params("missing integer parameter 'leg'"))?
        as usize;
    let mode = p
        .get("mode")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'mode'"))?
        .to_string();
    if !["sync", "async-journal", "async-cycle"].contains(&mode.as_str()) {
        return Err(RpcError::invalid_params(format!(
            "mode '{mode}': sync, async-journal or async-cycle"
        )));
    }
    let limit = timeout_param(p, DEFAULT_DRAIN)?;
    let entry = reg
        .find_volume(&name)
        .ok_or_else(|| RpcError::invalid_params(format!("no volume '{name}'")))?;
    let dev = entry
        .volume
        .leg_device(leg)
        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let live = reg
        .live
        .as_deref()
        .ok_or_else(|| RpcError::failed("no live configuration (not started by serve)"))?;
    live.change(
        "leg_set_mode",
        |c| {
            let v = c
                .volumes
                .iter_mut()
                .find(|v| v.name == name)
                .ok_or_else(|| format!("volume '{name}' is not in the configuration"))?;
            let a = v
                .async_legs
                .iter_mut()
                .find(|a| a.leg == leg)
                .ok_or_else(|| {
                    format!(
                        "leg {leg} of volume '{name}' has no journal: list it in [[volume.async_legs]] (with mode = \"sync\" to start it synchronous)"
                    )
                })?;
            if mode != "sync" && (mode == "async-cycle") != a.is_cycle() {
                return Err(format!(
                    "leg {leg} of volume '{name}' is {}: its asynchronous mode is {}",
                    if a.is_cycle() {
                        "shipped in cycles (it has a staging area and a cycle period)"
                    } else if a.staging.is_some() {
                        "journaled, its staging area for batches and catch-ups"
                    } else {
                        "journaled without a staging area"
                    },
                    if a.is_cycle() { "async-cycle" } else { "async-journal" },
                ));
            }
            if a.is_cycle() && a.cycle.is_none() {
                // In `sync` mode the period says the leg ships in cycles: keep the one it runs.
                a.cycle = Some(format!("{}s", crate::config::DEFAULT_CYCLE.as_secs()));
            }
            a.mode = mode.clone();
            Ok(())
        },
        |_| match dev.set_replication_mode(&mode, limit) {
            Some(r) => r,
            None => Err(format!(
                "leg {leg} of volume '{name}' was opened without its journal (restart to apply the configuration)"
            )),
        },
    )?;
    Ok(json!({
        "volume": name,
        "leg": leg,
        "replication": dev.replication().map(|r| json!({
            "mode": r.mode,
            "state": r.state,
            "lag_writes": r.lag_writes,
        })),
    }))
}
