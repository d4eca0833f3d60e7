//! nvmirror's front ends and control plane: configuration, NVMe/TCP, NBD, the `nvmirror`
//! binary.

pub mod config;
pub mod metrics;
pub mod rpc;
pub mod status;
