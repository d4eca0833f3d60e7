//! Timed pollers: callbacks that run on their reactor every `period`.

use std::time::{Duration, Instant};

use crate::reactor::ReactorContext;

/// What a timer wants after it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAction {
    /// Run again one period later.
    Repeat,
    /// Remove the timer.
    Stop,
}

/// A timer callback.
pub type TimerFn = Box<dyn FnMut(&mut ReactorContext) -> TimerAction + Send>;

pub(crate) struct Timer {
    pub(crate) due: Instant,
    pub(crate) period: Duration,
    pub(crate) f: TimerFn,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("due", &self.due)
            .field("period", &self.period)
            .finish()
    }
}
