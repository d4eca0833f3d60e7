//! Shared by the NBD tests: reactors and an NBD server on a free loopback port.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::BlockDevice;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::nbd::{NbdConfig, NbdServer};

/// Reactors that nap when idle, so parallel tests do not spin every core.
pub fn reactors(n: usize) -> ReactorPool {
    let idle = IdlePolicy::SpinThenSleep {
        spin: Duration::from_micros(200),
        sleep: Duration::from_micros(100),
    };
    ReactorPool::start(ReactorConfig::unpinned(n).with_idle(idle)).unwrap()
}

/// An NBD server on 127.0.0.1 (a free port) exporting `exports` by name.
pub fn serve(pool: &ReactorPool, exports: &[(&str, &Arc<dyn BlockDevice>)]) -> NbdServer {
    let cfg = NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        exports: exports
            .iter()
            .map(|(n, d)| (n.to_string(), Arc::clone(d)))
            .collect(),
    };
    NbdServer::start(cfg, &pool.handle()).unwrap()
}
