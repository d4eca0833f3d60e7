//! The mirror engine: a [`Volume`] writes every block to a primary and up to three mirror
//! legs in parallel and acknowledges the host only when every in-sync leg has it.
//!
//! A volume is a [`BlockDevice`](nvmirror_nvme::BlockDevice): each core opens its own
//! [`VolumeQueuePair`] and drives it exactly like a single device's queue pair.
//!
//! ```
//! use std::sync::Arc;
//! use nvmirror_mirror::{LegState, Volume, VolumeConfig};
//! use nvmirror_nvme::{dma::DmaPool, open_leg, BlockDevice, Completion, IoCommand, IoOp};
//!
//! let legs = vec![open_leg("mem://1MiB").unwrap(), open_leg("mem://1MiB").unwrap()];
//! let vol = Volume::new("vol0", legs, VolumeConfig::default()).unwrap();
//! let mut qp = vol.open_qpair(32).unwrap();
//! let mut pool = DmaPool::new(1, 4096);
//! let mut buf = pool.get().unwrap();
//! buf.as_mut_slice().fill(0x5a);
//! // SAFETY: `buf` is left alone until the completion is reaped below.
//! unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 0, 8, buf.io_buf(), 1)) }.unwrap();
//! let mut cpl = [Completion::default(); 1];
//! while qp.poll(&mut cpl) == 0 {}
//! assert!(cpl[0].status.is_success());
//! assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
//! // Both legs hold the block.
//! for leg in 0..2 {
//!     let data = nvmirror_nvme::read_all(&*vol.leg_device(leg).unwrap()).unwrap();
//!     assert!(data[..4096].iter().all(|&b| b == 0x5a));
//! }
//! pool.put(buf);
//! ```
//!
//! A *persistent* volume ([`Volume::format`], [`Volume::open_persistent`]) also keeps a
//! superblock and a write-intent bitmap on every leg, so that after a crash or a leg failure
//! only the regions marked in it are copied.
//!
//! A leg that missed writes comes back with [`Volume::attach_leg`], and a new leg joins with
//! [`Volume::add_leg`]: each returns a [`ResyncJob`] to drive (on a reactor, or
//! [`ResyncJob::run`]) that rebuilds the leg online; [`Volume::verify_start`] scrubs the
//! in-sync legs against each other ([`resync`]).
//!
//! The design, with its caveats, is in `docs/mirror.md`, `docs/bitmap.md` and
//! `docs/resync.md`.

pub mod bitmap;
pub mod breakdown;
mod config;
mod error;
pub mod fencing;
#[doc(hidden)]
pub mod fuzzing;
mod guard;
pub mod join;
pub mod journal;
mod legs;
mod metadata;
mod missed;
mod persistent;
pub mod promotion;
mod qpair;
mod read_policy;
mod read_repair;
mod reconcile;
mod recorder;
pub mod resync;
mod stats;
pub mod superblock;
mod sync;
mod table;
mod volume;
mod wait;

pub use breakdown::{Breakdown, BreakdownConfig};
pub use config::{BitmapConfig, ReadPolicy, VolumeConfig};
pub use error::{Error, Result};
pub use guard::GUARD_ENTRIES;
pub use journal::{
    recover_cycle, CycleConfig, CycleRecovery, FarApplier, JournalConfig, JournaledLeg,
};
pub use legs::{LegInfo, LegRole, LegState, MAX_LEGS};
pub use qpair::{VolumeQueuePair, MAX_QUEUE_DEPTH};
pub use read_repair::READ_ERROR_BUDGET;
pub use resync::{
    JobState, RegionSource, ResyncConfig, ResyncJob, ResyncStatus, VerifyJob, VerifyStatus,
};
pub use stats::{LatencyHistogram, LatencySummary, LegStats, VolumeStats};
pub use volume::Volume;

#[doc(hidden)]
pub use bitmap::WriteGateBench;
#[doc(hidden)]
pub use table::JoinTableBench;
