//! The control plane's view of what `nvmirror serve` runs: the volumes with their legs' fault
//! injectors, the JSON-RPC methods over them and the Prometheus exposition.

use std::sync::Arc;

use serde_json::{json, Value};

use nvmirror_mirror::{LegRole, Volume};
use nvmirror_nvme::backend::{Fault, FaultInjector, OpFilter};
use nvmirror_nvme::{BlockDevice, Status};
use nvmirror_poller::ReactorHandle;

use crate::metrics::PromWriter;
use crate::rpc::{Methods, RpcError};

/// One served volume.
#[derive(Debug)]
pub struct VolumeEntry {
    pub volume: Arc<Volume>,
    /// Leg URIs as configured, by leg index.
    pub uris: Vec<String>,
    /// Each leg's fault switchboard (every leg is opened behind a `FaultyDevice`).
    pub injectors: Vec<Arc<FaultInjector>>,
}

/// Everything the control plane can see.
#[derive(Debug)]
pub struct Registry {
    pub volumes: Vec<VolumeEntry>,
    pub reactors: ReactorHandle,
}

impl Registry {
    fn volume(&self, params: &Value) -> Result<&VolumeEntry, RpcError> {
        let name = params
            .get("volume")
            .or_else(|| params.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("missing string parameter 'volume'"))?;
        self.volumes
            .iter()
            .find(|v| v.volume.name() == name)
            .ok_or_else(|| RpcError::invalid_params(format!("no volume named '{name}'")))
    }

    fn leg(&self, params: &Value) -> Result<(&VolumeEntry, usize), RpcError> {
        let v = self.volume(params)?;
        let leg = params.get("leg").and_then(Value::as_u64).ok_or_else(|| {
            RpcError::invalid_params("missing integer parameter 'leg' (0 = primary)")
        })? as usize;
        if leg >= v.uris.len() {
            return Err(RpcError::invalid_params(format!(
                "volume '{}' has no leg {leg} (it has {})",
                v.volume.name(),
                v.uris.len()
            )));
        }
        Ok((v, leg))
    }

    /// The `volume_status` document of one volume.
    pub fn volume_status(&self, v: &VolumeEntry) -> Value {
        let geo = v.volume.geometry();
        let stats = v.volume.stats();
        let infos = v.volume.leg_states();
        let legs: Vec<Value> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let s = stats.legs.get(i).cloned().unwrap_or_default();
                json!({
                    "index": i,
                    "uri": v.uris[i],
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
                    "faults_armed": v.injectors[i].armed().len(),
                })
            })
            .collect();
        json!({
            "name": v.volume.name(),
            "capacity_bytes": geo.bytes(),
            "num_blocks": geo.num_blocks,
            "lba_size": geo.lba_size,
            "primary": v.volume.primary(),
            "region_size": v.volume.region_size(),
            "legs": legs,
            "overlap_waits": stats.overlap_waits,
            "resource_waits": stats.resource_waits,
            "read_retries": stats.read_retries,
            "bitmap": Value::Null,
            "resync": Value::Null,
        })
    }

    /// Prometheus text for every volume, leg and reactor.
    pub fn render_metrics(&self) -> String {
        let mut w = PromWriter::new();
        for v in &self.volumes {
            let name = v.volume.name();
            let stats = v.volume.stats();
            let infos = v.volume.leg_states();
            for (i, info) in infos.iter().enumerate() {
                let s = stats.legs.get(i).cloned().unwrap_or_default();
                let idx = i.to_string();
                let l = [
                    ("volume", name),
                    ("leg", idx.as_str()),
                    ("uri", v.uris[i].as_str()),
                ];
                w.counter(
                    "nvmirror_leg_ops_total",
                    "Commands completed by the leg.",
                    &l,
                    s.ops as f64,
                );
                w.counter(
                    "nvmirror_leg_bytes_total",
                    "Bytes moved by the leg.",
                    &l,
                    s.bytes as f64,
                );
                w.counter(
                    "nvmirror_leg_errors_total",
                    "Commands the leg failed.",
                    &l,
                    s.errors as f64,
                );
                w.counter(
                    "nvmirror_leg_timeouts_total",
                    "Commands abandoned after the I/O timeout.",
                    &l,
                    s.timeouts as f64,
                );
                w.counter(
                    "nvmirror_leg_completed_last_total",
                    "Mirrored writes for which this leg completed last (held up the ack).",
                    &l,
                    s.completed_last as f64,
                );
                for (q, d) in [
                    ("0.5", s.latency.p50),
                    ("0.99", s.latency.p99),
                    ("1", s.latency.max),
                ] {
                    let mut lq = l.to_vec();
                    lq.push(("quantile", q));
                    w.gauge(
                        "nvmirror_leg_latency_seconds",
                        "Leg completion latency quantiles.",
                        &lq,
                        d.as_secs_f64(),
                    );
                }
                for state in ["in_sync", "faulted", "resyncing", "detached"] {
                    let mut ls = l.to_vec();
                    ls.push(("state", state));
                    let on = if info.state.as_str() == state {
                        1.0
                    } else {
                        0.0
                    };
                    w.gauge(
                        "nvmirror_leg_state",
                        "1 for the leg's current state.",
                        &ls,
                        on,
                    );
                }
                w.gauge(
                    "nvmirror_leg_missed_regions",
                    "Regions the leg missed while out of sync.",
                    &l,
                    v.volume.missed_region_count(i).unwrap_or(0) as f64,
                );
            }
            let lv = [("volume", name)];
            w.counter(
                "nvmirror_volume_overlap_waits_total",
                "Writes that waited for an overlapping write.",
                &lv,
                stats.overlap_waits as f64,
            );
            w.counter(
                "nvmirror_volume_read_retries_total",
                "Reads retried on another leg.",
                &lv,
                stats.read_retries as f64,
            );
        }
        for r in 0..self.reactors.count() {
            if let Ok(s) = self.reactors.stats(r) {
                let idx = r.to_string();
                let l = [("reactor", idx.as_str())];
                let load = |a: &std::sync::atomic::AtomicU64| {
                    a.load(std::sync::atomic::Ordering::Relaxed) as f64
                };
                w.counter(
                    "nvmirror_reactor_busy_seconds_total",
                    "Time in loop iterations that did work.",
                    &l,
                    load(&s.busy_ns) / 1e9,
                );
                w.counter(
                    "nvmirror_reactor_idle_seconds_total",
                    "Time in loop iterations that found nothing.",
                    &l,
                    load(&s.idle_ns) / 1e9,
                );
                w.gauge(
                    "nvmirror_reactor_busy_ratio",
                    "Busy share since start.",
                    &l,
                    s.busy_ratio(),
                );
            }
        }
        w.finish()
    }
}

fn parse_fault(p: &Value) -> Result<Fault, RpcError> {
    let kind = p.get("fault").and_then(Value::as_str).ok_or_else(|| {
        RpcError::invalid_params(
            "missing 'fault': gone, hang, fail_reads, fail_writes or fail_after",
        )
    })?;
    let u = |k: &str, default: u64| p.get(k).and_then(Value::as_u64).unwrap_or(default);
    let status = Status::from_raw(u("status", 0x4281) as u16);
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

/// The JSON-RPC methods over `reg`.
pub fn methods(reg: Arc<Registry>) -> Methods {
    let mut m = Methods::new();
    let r = Arc::clone(&reg);
    m.add("volume_list", move |_| {
        Ok(Value::Array(
            r.volumes
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
    m.add("volume_status", move |p| Ok(r.volume_status(r.volume(p)?)));
    let r = Arc::clone(&reg);
    m.add("leg_detach", move |p| {
        let (v, leg) = r.leg(p)?;
        v.volume
            .detach_leg(leg)
            .map_err(|e| RpcError::failed(e.to_string()))?;
        Ok(r.volume_status(v))
    });
    let r = Arc::clone(&reg);
    m.add("leg_fault_inject", move |p| {
        let (v, leg) = r.leg(p)?;
        let fault = parse_fault(p)?;
        let id = v.injectors[leg].arm(fault);
        Ok(json!({"id": id, "fault": format!("{fault:?}")}))
    });
    let r = Arc::clone(&reg);
    m.add("leg_fault_clear", move |p| {
        let (v, leg) = r.leg(p)?;
        match p.get("id").and_then(Value::as_u64) {
            Some(id) => Ok(json!({"cleared": v.injectors[leg].clear(id)})),
            None => {
                v.injectors[leg].clear_all();
                Ok(json!({"cleared": true}))
            }
        }
    });
    let r = Arc::clone(&reg);
    m.add("stats", move |_| {
        let vols: Vec<Value> = r.volumes.iter().map(|v| r.volume_status(v)).collect();
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
    let names = {
        let mut n = m.names();
        n.push("rpc_get_methods".into());
        n.sort();
        n
    };
    m.add("rpc_get_methods", move |_| Ok(json!(names)));
    m
}
