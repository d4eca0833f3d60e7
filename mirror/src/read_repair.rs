//! Read-repair (md raid1's read-error correction, DRBD's `on-io-error` policies): a read
//! that fails on one in-sync leg with a media error is served from another in-sync leg, and
//! the failed range is rewritten on the first leg from a good copy, instead of faulting the
//! whole leg for one bad sector.
//!
//! - The reactor that saw the error queues `(leg, range)` on a bounded lock-free ring and
//!   retries the read elsewhere (the host sees a success). The leg stays in sync: its other
//!   blocks are good, and a host write to the bad range rewrites it anyway.
//! - [`Volume::repair_read_errors`] (the control plane: `serve`'s clearer thread runs it every
//!   second) takes each range under the overlap guard (host writes to it wait meanwhile, so
//!   the copy cannot overwrite a newer write), reads it from another in-sync leg and writes it
//!   to the leg that failed. A repair that fails faults the leg with the range marked missed.
//! - Each leg has a budget ([`READ_ERROR_BUDGET`] repairs); past it, or with the ring full,
//!   a read error faults the leg as before: a device that keeps failing reads is dying.
//!
//! Errors that are not media errors (path errors, a device gone, timeouts) still fault the
//! leg at once.

use std::sync::atomic::Ordering;

use nvmirror_nvme::spec::status::StatusCodeType;
use nvmirror_nvme::{IoCommand, Status};

use crate::legs::LegState;
use crate::metadata::ControlIo;
use crate::volume::{Volume, VolumeShared};
use crate::{Error, Result};

/// Read errors repaired per leg before a further one faults it.
pub const READ_ERROR_BUDGET: u32 = 20;

/// Ranges waiting for repair, per volume.
pub(crate) const QUEUE: usize = 64;

/// One range to rewrite.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Repair {
    leg: usize,
    slba: u64,
    nlb: u32,
}

impl VolumeShared {
    /// A read of `cmd` failed on in-sync `leg` with `status`: queues its repair when the error
    /// is a media error and the leg's budget and the queue allow. `false`: fault the leg.
    #[cold]
    pub(crate) fn queue_read_repair(&self, leg: usize, cmd: &IoCommand, status: Status) -> bool {
        if !matches!(status.sct(), StatusCodeType::MediaAndDataIntegrity) {
            return false;
        }
        let Some(l) = self.leg(leg) else {
            return false;
        };
        if l.read_errors.fetch_add(1, Ordering::Relaxed) >= READ_ERROR_BUDGET {
            tracing::warn!(volume = %self.name, leg, "read-error budget spent: faulting the leg");
            return false;
        }
        let r = Repair {
            leg,
            slba: cmd.slba,
            nlb: cmd.nlb,
        };
        if self.repairs.push(r).is_err() {
            return false;
        }
        tracing::warn!(
            volume = %self.name, leg, slba = cmd.slba, nlb = cmd.nlb, %status,
            "read error: served from another leg, range queued for rewrite"
        );
        true
    }
}

impl Volume {
    /// Rewrites every range a read failed on (see the module docs) from another in-sync leg,
    /// each under the overlap guard. Synchronous (control plane). Returns the ranges
    /// repaired; a range that cannot be repaired faults its leg.
    pub fn repair_read_errors(&self) -> Result<u64> {
        let shared = self.shared();
        let _consumer = shared.repairing.lock().unwrap_or_else(|e| e.into_inner());
        let mut own = ControlIo::new(shared.cfg.io_timeout);
        let mut repaired = 0;
        // SAFETY: `repairing` is held: this is the ring's only consumer now.
        while let Some(r) = unsafe { shared.repairs.pop() } {
            let snap = shared.states.snapshot();
            if snap.state(r.leg) != LegState::InSync {
                continue; // Faulted since: its resync rewrites the range.
            }
            let Some(from) =
                (0..snap.leg_count()).find(|&i| i != r.leg && snap.state(i) == LegState::InSync)
            else {
                continue;
            };
            let res = shared.copy_under_guard(&mut own, r.slba, r.nlb, from, &[r.leg], || {
                shared.repaired.fetch_add(1, Ordering::Relaxed);
            });
            match res {
                Ok(()) => {
                    repaired += 1;
                    tracing::info!(volume = %shared.name, leg = r.leg, from, slba = r.slba, nlb = r.nlb, "read error repaired");
                }
                Err((_, reason)) => {
                    tracing::error!(volume = %shared.name, leg = r.leg, slba = r.slba, %reason, "read-repair failed: faulting the leg");
                    let cmd = IoCommand::new(nvmirror_nvme::IoOp::Write, r.slba, r.nlb, 0);
                    shared.mark_missed(r.leg, &cmd);
                    if !shared.fault_on_io(r.leg, None, Status::WRITE_FAULT, "read-repair") {
                        return Err(Error::Metadata {
                            volume: shared.name.clone(),
                            leg: r.leg,
                            name: shared.leg_name(r.leg).to_string(),
                            reason: format!("read-repair: {reason}"),
                        });
                    }
                }
            }
        }
        Ok(repaired)
    }

    /// Ranges repaired by [`repair_read_errors`](Self::repair_read_errors) since the volume
    /// opened.
    pub fn read_repairs(&self) -> u64 {
        self.shared().repaired.load(Ordering::Relaxed)
    }
}
