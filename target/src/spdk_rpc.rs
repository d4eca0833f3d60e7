//! Read-only JSON-RPC methods in SPDK's shapes, so SPDK's own client (`rpc.py`, `spdk-rpc`
//! from `pip install spdk`) and scripts written for `nvmf_tgt` can list what nvmirror serves:
//! `spdk_get_version`, `bdev_get_bdevs` (each volume as a bdev) and `nvmf_get_subsystems`
//! (the discovery subsystem and every NVM subsystem, with listeners, hosts and namespaces).

use std::sync::Arc;

use serde_json::{json, Value};

use nvmirror_nvme::BlockDevice;

use crate::control::Registry;
use crate::rpc::{Methods, RpcError};

/// The NQN of the discovery subsystem.
const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// `nvmirror --version`'s version and commit.
pub fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0));
    json!({
        "version": format!("nvmirror {v}"),
        "fields": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "patch": parts.next().unwrap_or(0),
            "suffix": "",
            "commit": crate::GIT_COMMIT,
        }
    })
}

/// A 16-byte identifier in the 8-4-4-4-12 form (the superblock's UUID text).
fn uuid_text(b: &[u8; 16]) -> String {
    nvmirror_nvme::Uuid(*b).to_string()
}

fn bdevs(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let want = p.get("name").and_then(Value::as_str);
    let list: Vec<Value> = reg
        .volumes()
        .iter()
        .filter(|v| want.map_or(true, |n| n == v.volume.name()))
        .map(|v| {
            let geo = v.volume.geometry();
            let legs = v.volume.leg_states();
            json!({
                "name": v.volume.name(),
                "aliases": [],
                "product_name": "nvmirror mirror",
                "block_size": geo.lba_size,
                "num_blocks": geo.num_blocks,
                "uuid": v.volume.identity().map(|id| uuid_text(&id)),
                "claimed": false,
                "zoned": false,
                "supported_io_types": {
                    "read": true, "write": true, "flush": true, "unmap": false,
                    "write_zeroes": false, "reset": false, "nvme_admin": false, "nvme_io": false,
                },
                "driver_specific": {
                    "nvmirror": {
                        "primary": v.volume.primary(),
                        "legs": legs.iter().enumerate().map(|(i, l)| json!({
                            "index": i, "state": l.state.as_str(),
                            "uri": v.uris().get(i).cloned().unwrap_or_default(),
                        })).collect::<Vec<_>>(),
                    }
                },
            })
        })
        .collect();
    if let (Some(n), true) = (want, list.is_empty()) {
        // SPDK's answer to an unknown bdev name.
        return Err(RpcError {
            code: -19,
            message: format!("No such device: bdev '{n}'"),
        });
    }
    Ok(Value::Array(list))
}

fn subsystems(reg: &Registry, p: &Value) -> Result<Value, RpcError> {
    let Some(target) = reg.nvme_tcp.upgrade() else {
        return Ok(json!([]));
    };
    let listen: Vec<Value> = target
        .local_addrs()
        .iter()
        .map(|a| {
            json!({
                "trtype": "TCP",
                "adrfam": if a.is_ipv4() { "IPv4" } else { "IPv6" },
                "traddr": a.ip().to_string(),
                "trsvcid": a.port().to_string(),
            })
        })
        .collect();
    let mut list = vec![json!({
        "nqn": DISCOVERY_NQN,
        "subtype": "Discovery",
        "listen_addresses": listen,
        "allow_any_host": true,
        "hosts": [],
    })];
    for s in target.subsystems() {
        list.push(json!({
            "nqn": s.nqn,
            "subtype": "NVMe",
            "listen_addresses": listen,
            "allow_any_host": s.allowed_hosts.is_empty(),
            "hosts": s.allowed_hosts.iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
            "serial_number": s.serial,
            "model_number": s.model,
            "max_namespaces": s.namespaces.len(),
            "namespaces": s.namespaces.iter().map(|n| json!({
                "nsid": n.nsid,
                "bdev_name": n.device,
                "name": n.device,
                "nguid": n.nguid.iter().map(|x| format!("{x:02X}")).collect::<String>(),
                "uuid": uuid_text(&n.uuid),
            })).collect::<Vec<_>>(),
        }));
    }
    match p.get("nqn").and_then(Value::as_str) {
        None => Ok(Value::Array(list)),
        Some(nqn) => {
            list.retain(|s| s["nqn"] == nqn);
            if list.is_empty() {
                return Err(RpcError::invalid_params(format!(
                    "Unable to find subsystem with NQN {nqn}"
                )));
            }
            Ok(Value::Array(list))
        }
    }
}

/// Adds the SPDK-shaped methods.
pub fn add_methods(m: &mut Methods, reg: &Arc<Registry>) {
    m.add("spdk_get_version", |_| Ok(version()));
    let r = Arc::clone(reg);
    m.add("bdev_get_bdevs", move |p| bdevs(&r, p));
    let r = Arc::clone(reg);
    m.add("nvmf_get_subsystems", move |p| subsystems(&r, p));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_versions_have_spdk_shapes() {
        let id = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
        ];
        assert_eq!(uuid_text(&id), "12345678-9abc-def0-0001-020304050607");
        let v = version();
        assert!(v["version"].as_str().unwrap().starts_with("nvmirror "));
        assert!(v["fields"]["major"].is_u64());
    }
}
