//! The connection state of a leg that lives behind a network link (`nvme-tcp://`), as the
//! control plane sees it: [`BlockDevice::link`](crate::BlockDevice::link).

use std::time::Duration;

/// A snapshot of a remote device's connection, for status pages and the auto-resync watcher.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The controller association is up: queue pairs can be opened and commands go out.
    pub connected: bool,
    /// Counts successful connections, the first included; a leg whose device reports a
    /// higher generation than when it went out of sync has been reconnected since.
    pub generation: u64,
    /// Why the last connection was lost or the last reconnect failed.
    pub last_error: Option<String>,
    /// Reconnect attempts since the device was opened (failed ones included).
    pub reconnect_attempts: u64,
    /// Round trip of the last Keep Alive (or of the bring-up when none was sent yet).
    pub rtt: Option<Duration>,
    /// Commands that were on the wire when a connection died and that the remote may still
    /// execute; they fence the leg until [`fence_remaining`](Self::fence_remaining) is zero.
    pub fenced_commands: u32,
    /// How long the leg must not be resynchronised yet (the fence of the last loss).
    pub fence_remaining: Duration,
    /// Reconnecting stopped: the controller stayed unreachable for longer than
    /// `ctrl_loss_tmo`.
    pub given_up: bool,
}

impl LinkStatus {
    /// Connected and past the fence of the last loss: a resync may start.
    pub fn ready_for_resync(&self) -> bool {
        self.connected && self.fence_remaining.is_zero()
    }
}
