//! nvmirror's device layer: NVMe wire types ([`spec`]), the per-core [`QueuePair`]
//! abstraction, DMA buffers ([`dma`]) and the back ends ([`backend`]), opened from leg URIs
//! ([`uri`]).
//!
//! ```
//! use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp, dma::DmaPool};
//!
//! let dev = open_leg("mem://1MiB").unwrap();
//! let mut qp = dev.open_qpair(32).unwrap();
//! let mut pool = DmaPool::new(1, 4096);
//! let mut buf = pool.get().unwrap();
//! buf.as_mut_slice().fill(0xab);
//! // SAFETY: `buf` is not touched until the completion is reaped below.
//! unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 8, 8, buf.io_buf(), 1)) }.unwrap();
//! let mut cpl = [Completion::default(); 4];
//! let n = qp.poll(&mut cpl);
//! assert_eq!(n, 1);
//! assert!(cpl[0].status.is_success());
//! pool.put(buf);
//! ```

pub mod backend;
pub mod dhchap;
pub mod dma;
mod error;
pub mod fence;
pub mod link;
pub mod mmap;
pub mod queue;
pub mod replication;
pub mod reservations;
pub mod spec;
pub mod uri;
pub mod uuid;

pub use error::{Error, Result};
pub use fence::{Fence, FenceSignal};
pub use link::LinkStatus;
pub use queue::{read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
pub use replication::{CycleStatus, ReplicationStatus};
pub use reservations::Reservations;
pub use spec::{Geometry, Status};
pub use uri::{open_leg, LegUri};
pub use uuid::Uuid;
