//! `leg_set_mode`: switch a leg with a journal (`[[volume.async_legs]]`) between `sync` and
//! `async-journal` at run time (`docs/journal.md`). The mode is kept in the live
//! configuration, so a restart starts the leg in it.

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
    if mode != "sync" && mode != "async-journal" {
        return Err(RpcError::invalid_params(format!(
            "mode '{mode}': sync or async-journal"
        )));
    }
    let limit = match p.get("timeout_s") {
        None => DEFAULT_DRAIN,
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| RpcError::invalid_params("timeout_s: a number of seconds"))?,
    };
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
