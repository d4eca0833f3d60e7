//! nvmirror's per-core execution model, after SPDK's `lib/thread`: one reactor thread per
//! configured core, pinned with `core_affinity`. Each loop iteration runs a batch of cross-core
//! messages, every registered [`Poller`], then due timers, and accounts the time as busy or
//! idle. Data is owned by one reactor; other threads send it a message instead of taking a lock.
//!
//! ```
//! use nvmirror_poller::{PollStatus, Poller, ReactorConfig, ReactorContext, ReactorPool};
//!
//! struct Countdown(u32);
//! impl Poller for Countdown {
//!     fn poll(&mut self, _ctx: &mut ReactorContext) -> PollStatus {
//!         if self.0 == 0 { return PollStatus::Done; }
//!         self.0 -= 1;
//!         PollStatus::Busy
//!     }
//! }
//!
//! let pool = ReactorPool::start(ReactorConfig::unpinned(2)).unwrap();
//! let h = pool.handle();
//! h.send_msg(1, |ctx| ctx.register_poller(Box::new(Countdown(10)))).unwrap();
//! assert_eq!(h.call(0, |ctx| ctx.index()).unwrap(), 0);
//! pool.shutdown();
//! ```

mod error;
mod pool;
mod reactor;
pub mod ring;
mod sync;
mod timer;

pub use error::{Error, Result};
pub use pool::{ReactorConfig, ReactorHandle, ReactorPool};
pub use reactor::{IdlePolicy, Message, PollStatus, Poller, ReactorContext, ReactorStats};
pub use ring::Ring;
pub use timer::{TimerAction, TimerFn};
