//! Helpers shared by the test crates: a project NVMe/TCP target started in-process.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::BlockDevice;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

pub const SUBNQN: &str = "nqn.2026-11.io.nvmirror:bench-test";

/// A target and its reactors; dropping it stops both.
pub struct RunningTarget {
    target: Option<NvmeTcpTarget>,
    pool: Option<ReactorPool>,
    /// `nvme-tcp://127.0.0.1:PORT/SUBNQN`.
    pub uri: String,
}

impl Drop for RunningTarget {
    fn drop(&mut self) {
        drop(self.target.take());
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
    }
}

/// Starts a target exporting `namespace` as [`SUBNQN`] on a free loopback port, on one
/// unpinned reactor.
pub fn start(namespace: Arc<dyn BlockDevice>) -> RunningTarget {
    let cfg = TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        subsystems: vec![SubsystemConfig::new(SUBNQN, vec![namespace])],
        ..TargetConfig::default()
    };
    let pool = ReactorPool::start(ReactorConfig::unpinned(1).with_idle(
        IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(50),
            sleep: Duration::from_millis(1),
        },
    ))
    .unwrap();
    let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
    let uri = format!("nvme-tcp://{}/{SUBNQN}", target.local_addr());
    RunningTarget {
        target: Some(target),
        pool: Some(pool),
        uri,
    }
}
