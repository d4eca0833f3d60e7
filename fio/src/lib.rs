//! The Rust half of nvmirror's fio external ioengine. `engine/nvmirror.c`, compiled against
//! fio's own headers by `fio/build.sh`, is the C half: it moves `io_u` fields across the small C
//! ABI in [`ffi`] and nothing else. Here the legs named by fio's `--leg=` options are opened
//! and joined into a mirrored volume in-process, exactly as `nvmirror-bench --leg` does
//! ([`nvmirror_bench::open_target`]); every fio thread gets its own queue pair on it.
//!
//! ```text
//! fio --thread --ioengine=external:build/fio/libnvmirror_fio.so \
//!     --leg=mem://1GiB --leg=mem://1GiB --rw=randwrite --bs=4k --iodepth=32 --name=t
//! ```

mod device;
pub mod ffi;
mod queue;

pub use device::Device;
pub use queue::{Op, Queue, SubmitError};
