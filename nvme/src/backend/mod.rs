//! Block back ends: each implements [`BlockDevice`](crate::BlockDevice).

#[cfg(test)]
pub(crate) mod conformance;
pub mod fault;
pub mod mem;
pub mod nbd;
pub mod ng;
pub mod null;
pub mod pcie;
pub mod tcp;
pub mod uring;

pub use fault::{Fault, FaultInjector, FaultyDevice, OpFilter};
pub use mem::{LatencyModel, MemDevice, MemOptions};
pub use nbd::{NbdDevice, NbdOptions, NbdQueuePair};
pub use ng::{NgDevice, NgOptions, NgQueuePair};
pub use null::NullDevice;
pub use pcie::{PcieDevice, PcieOptions};
pub use tcp::{NvmeTcpDevice, NvmeTcpOptions, TcpQueuePair};
pub use uring::{UringDevice, UringOptions};
