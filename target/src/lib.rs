//! nvmirror's front ends and control plane: configuration, JSON-RPC, metrics, status, and the
//! NVMe/TCP target ([`nvme_tcp`]) and the NBD export ([`nbd`]), which export any
//! [`BlockDevice`](nvmirror_nvme::BlockDevice) as a namespace of an NVMe-oF subsystem.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nvmirror_nvme::open_leg;
//! use nvmirror_poller::{ReactorConfig, ReactorPool};
//! use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};
//!
//! let pool = ReactorPool::start(ReactorConfig::unpinned(2)).unwrap();
//! let ns = open_leg("mem://1GiB").unwrap();
//! let cfg = TargetConfig {
//!     subsystems: vec![SubsystemConfig::new("nqn.2024-01.io.nvmirror:vol0", vec![ns])],
//!     ..TargetConfig::default()
//! };
//! let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
//! println!("listening on {}", target.local_addr());
//! ```

mod ana_rpc;
#[cfg(feature = "cluster")]
mod cluster;
pub mod config;
pub mod control;
mod drain;
mod durable;
mod error;
pub mod failstop;
#[doc(hidden)]
pub mod fuzzing;
pub mod leg_dirs;
pub mod live_config;
pub mod members;
pub mod metrics;
mod mode_rpc;
pub mod nbd;
pub mod nvme_tcp;
pub mod nvme_tcp_config;
mod objects_rpc;
pub mod pair;
pub mod promote;
pub mod rpc;
pub mod rpc_docs;
pub mod serve;
pub mod spdk_rpc;
pub mod status;
pub mod volume_metrics;

/// The git commit the binary was built from ("unknown" without git).
pub const GIT_COMMIT: &str = env!("NVMIRROR_GIT_COMMIT");
pub mod watch;

pub use error::{Error, Result};
pub use nvme_tcp::{NvmeTcpTarget, SubsystemConfig, TargetConfig};
