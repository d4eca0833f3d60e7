//! The ANA control plane: `listener_set_ana_state` and `listener_list`, and the ANA states
//! `volume_status` reports for a volume. A pair controller drives failover through the same
//! call: [`NvmeTcpTarget::set_ana_state`](crate::NvmeTcpTarget::set_ana_state).

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::control::Registry;
use crate::nvme_tcp::{AnaGroupState, AnaState};
use crate::rpc::{Methods, RpcError};
use crate::NvmeTcpTarget;

fn target(reg: &Registry) -> Result<Arc<NvmeTcpTarget>, RpcError> {
    reg.nvme_tcp
        .upgrade()
        .ok_or_else(|| RpcError::failed("the NVMe/TCP front end is not running"))
}

fn state_json(s: &AnaGroupState) -> Value {
    json!({"listener": s.listener.to_string(), "nqn": s.nqn, "group": s.group,
           "nsid": s.group, "namespace": s.namespace, "state": s.state.as_str()})
}

/// The parameters of `listener_set_ana_state`, checked.
fn set_params(p: &Value) -> Result<(SocketAddr, Option<&str>, u32, AnaState), RpcError> {
    let listener = p
        .get("listener")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'listener'"))?;
    let listener: SocketAddr = listener
        .parse()
        .map_err(|e| RpcError::invalid_params(format!("'listener' {listener}: {e}")))?;
    let group = p
        .get("group")
        .and_then(Value::as_u64)
        .filter(|g| (1..=u64::from(u32::MAX)).contains(g))
        .ok_or_else(|| RpcError::invalid_params("'group' must be an ANA group ID (1 or more)"))?;
    let state = p
        .get("state")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'state'"))?;
    let state = AnaState::parse(state).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "'state' {state}: optimized, non-optimized, inaccessible, persistent-loss or change"
        ))
    })?;
    let nqn = match p.get("nqn") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(RpcError::invalid_params("'nqn' must be a string")),
    };
    Ok((listener, nqn, group as u32, state))
}

/// Registers the ANA methods.
pub(crate) fn add_methods(m: &mut Methods, reg: &Arc<Registry>) {
    let r = Arc::clone(reg);
    m.add("listener_set_ana_state", move |p| {
        let (listener, nqn, group, state) = set_params(p)?;
        let t = target(&r)?;
        let changed = t
            .set_ana_state(listener, nqn, group, state)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        tracing::info!(%listener, group, state = state.as_str(), ?changed, "ANA state set");
        Ok(json!({"listener": listener.to_string(), "group": group,
                  "state": state.as_str(), "changed": changed}))
    });
    let r = Arc::clone(reg);
    m.add("listener_list", move |_| {
        let t = target(&r)?;
        let states: Vec<Value> = t.ana_states().iter().map(state_json).collect();
        let listeners: Vec<String> = t.local_addrs().iter().map(|a| a.to_string()).collect();
        Ok(json!({"listeners": listeners, "ana": states}))
    });
}

/// The ANA state of every group that exports `volume`, through every listener (empty when
/// the NVMe/TCP front end is not running).
pub(crate) fn volume_ana(reg: &Registry, volume: &str) -> Value {
    let Some(t) = reg.nvme_tcp.upgrade() else {
        return json!([]);
    };
    Value::Array(
        t.ana_states()
            .iter()
            .filter(|s| s.namespace == volume)
            .map(state_json)
            .collect(),
    )
}
