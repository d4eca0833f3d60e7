//! Hung legs (invariant 7): a leg command older than the I/O timeout is abandoned, and the
//! command goes on under the ack rule as if that leg had failed with "aborted by host".
//!
//! The clock is looked at only every [`CLOCK_EVERY`] busy polls (reusing the reading taken for
//! that poll's completions), or on a poll that reaped nothing, and
//! the outstanding slots are scanned at most every [`SCAN_INTERVAL`]. A completion that
//! arrives later for an abandoned leg command finds its slot's leg word taken (or a newer
//! generation) and is dropped.
//!
//! Abandoning a leg command asks its back end to cancel it ([`QueuePair::cancel`]), but a
//! back end may not be able to (block I/O already at the device, a remote leg). Until the
//! command's completion is reaped — Command Abort Requested when the cancel took, its real
//! result otherwise — or its queue pair's close [`Fence`] is done, it may still write the
//! medium, read a write's buffer or fill a read's buffer, although the host has its
//! completion. Every abandoned command is counted in the leg's shared `abandoned` until then,
//! and the leg's resync does not start before that count is zero, so a late write can never
//! land on a region the resync has already copied. The host command's buffer stays lent until
//! then (`lending`), so a late read or write never touches memory the front end has handed to
//! another command.
//!
//! [`QueuePair::cancel`]: nvmirror_nvme::QueuePair::cancel
//! [`Fence`]: nvmirror_nvme::Fence

use std::time::{Duration, Instant};

use nvmirror_nvme::Status;

use super::VolumeQueuePair;
use crate::join::{leg_tag, LegOutcome};
use crate::stats::bump;

/// Polls between clock reads while busy.
pub(super) const CLOCK_EVERY: u32 = 64;
/// Shortest time between two scans.
pub(super) const SCAN_INTERVAL: Duration = Duration::from_micros(100);

/// When to look for hung leg commands.
#[derive(Debug)]
pub(super) struct TimeoutClock {
    timeout: Duration,
    polls: u32,
    last_scan: Instant,
}

impl TimeoutClock {
    pub(super) fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            polls: 0,
            last_scan: now,
        }
    }
}

impl VolumeQueuePair {
    /// Scans for hung leg commands when it is time to. `reaped_at` is the clock reading of
    /// this poll's completions; `None` means the poll was idle.
    #[inline]
    pub(super) fn check_timeouts(&mut self, reaped_at: Option<Instant>) {
        if self.table.in_use() == 0 {
            return;
        }
        self.clock.polls += 1;
        if reaped_at.is_some() && self.clock.polls < CLOCK_EVERY {
            return;
        }
        self.clock.polls = 0;
        let now = reaped_at.unwrap_or_else(Instant::now);
        if now.saturating_duration_since(self.clock.last_scan) < SCAN_INTERVAL {
            return;
        }
        self.clock.last_scan = now;
        self.abandon_expired(now);
    }

    #[cold]
    fn abandon_expired(&mut self, now: Instant) {
        let timeout = self.clock.timeout;
        for slot in 0..self.table.capacity() as u32 {
            let meta = *self.table.meta(slot);
            if !meta.in_use || now.saturating_duration_since(meta.started) < timeout {
                continue;
            }
            for leg in 0..self.leg_count {
                if meta.legs & (1 << leg) == 0
                    || !self.table.slot(slot).is_pending(meta.generation, leg)
                {
                    continue;
                }
                bump(&self.stats.legs[leg].timeouts, 1);
                tracing::warn!(
                    volume = %self.vol.name, leg, name = self.vol.leg_name(leg),
                    op = ?meta.cmd.op, slba = meta.cmd.slba, timeout = ?timeout,
                    "leg command timed out; abandoning it"
                );
                if meta.unsent & (1 << leg) == 0 {
                    // Handed to the back end, which may still act on it: ask it to stop. The
                    // command stays abandoned until its completion (aborted or late) is reaped.
                    self.note_abandoned(leg);
                    self.table.meta_mut(slot).abandoned |= 1 << leg;
                    self.cancel_leg_command(leg, leg_tag(slot, meta.generation));
                }
                self.table.meta_mut(slot).unsent &= !(1 << leg);
                let outcome = self.table.slot_mut(slot).complete_owned(
                    meta.generation,
                    leg,
                    Status::ABORTED_BY_HOST,
                );
                if let LegOutcome::Last(result) = outcome {
                    self.finish(slot, result, None);
                    break;
                }
            }
        }
    }
}
