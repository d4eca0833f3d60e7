//! Regions of writes that failed or timed out on every in-sync leg (`docs/mirror.md`, ack
//! rule).
//!
//! Such a write got an error, but NVMe does not promise that a failed write left the medium
//! unchanged, and an abandoned one may still be applied by its leg: the in-sync legs may now
//! differ there. The ack rule records the regions in the volume's diverged set; the clearer
//! keeps their bitmap bits set (so an unclean restart copies them as well), and
//! [`Volume::reconcile_failed_writes`] makes the legs agree again by copying them from the
//! primary.

use crate::legs::LegState;
use crate::metadata::ControlIo;
use crate::volume::{Volume, VolumeShared};
use crate::{Error, Result};

impl Volume {
    /// Regions a write failed or timed out on every in-sync leg, not reconciled yet,
    /// ascending.
    pub fn unreconciled_regions(&self) -> Vec<u64> {
        self.shared().diverged.regions()
    }

    /// Copies every unreconciled region from the primary to the other in-sync legs, each
    /// under the overlap guard (host writes to it wait meanwhile), and forgets it; the
    /// bitmap bit is then cleared by the clearer as usual, after its flush. Synchronous
    /// (control plane). Refused with [`Error::LegBusy`] while an in-sync leg still holds
    /// abandoned commands: one could land after the copy. Returns the number of regions
    /// copied.
    pub fn reconcile_failed_writes(&self) -> Result<u64> {
        let shared = self.shared();
        let snap = shared.states.snapshot();
        let in_sync: Vec<usize> = (0..snap.leg_count())
            .filter(|&i| snap.state(i) == LegState::InSync && shared.leg(i).is_some())
            .collect();
        for &leg in &in_sync {
            self.refuse_if_busy(leg)?;
        }
        let from = snap.primary();
        let to: Vec<usize> = in_sync.iter().copied().filter(|&t| t != from).collect();
        let per_region = 1u64 << shared.region_shift;
        let mut own = ControlIo::new(shared.cfg.io_timeout);
        let mut copied = 0;
        for r in shared.diverged.regions() {
            let slba = r * per_region;
            let nlb = per_region.min(shared.geo.num_blocks - slba) as u32;
            // Forgotten under the guard: a write failing on every leg after the copy marks the
            // region again, and that mark is not cleared here.
            shared
                .copy_under_guard(&mut own, slba, nlb, from, &to, || shared.diverged.clear(r))
                .map_err(|(leg, reason)| Error::Metadata {
                    volume: shared.name.clone(),
                    leg,
                    name: shared.leg_name(leg).to_string(),
                    reason: format!("reconciling region {r}: {reason}"),
                })?;
            copied += 1;
        }
        if copied > 0 {
            tracing::info!(volume = %shared.name, from, regions = copied, "failed writes reconciled");
        }
        Ok(copied)
    }
}

impl VolumeShared {
    /// Copies blocks `[slba, slba + nlb)` of the exported namespace from leg `from` to every
    /// leg in `to`, holding the overlap guard over them (host writes there wait meanwhile),
    /// and runs `done` before the guard is released when every copy succeeded. Control plane;
    /// `own` serves volumes without metadata. The error names the leg that failed.
    pub(crate) fn copy_under_guard(
        &self,
        own: &mut ControlIo,
        slba: u64,
        nlb: u32,
        from: usize,
        to: &[usize],
        done: impl FnOnce(),
    ) -> std::result::Result<(), (usize, String)> {
        let span = self.guard.span(slba, nlb);
        while !self.guard.try_lock(span) {
            std::thread::yield_now();
        }
        // The control-plane lock only after the guard: a reactor holding guard entries may
        // need it to record a fault, and must not wait on us.
        let res = {
            let mut meta_io = self.meta.as_ref().map(|m| m.lock_io());
            let io = meta_io.as_deref_mut().unwrap_or(own);
            let lba_size = u64::from(self.geo.lba_size);
            let (offset, len) = ((self.data_lba + slba) * lba_size, u64::from(nlb) * lba_size);
            match self.leg(from) {
                None => Err((from, "no such leg".to_string())),
                Some(src) => to.iter().try_for_each(|&t| match self.leg(t) {
                    None => Err((t, "no such leg".to_string())),
                    Some(dst) => io
                        .copy((from, &*src.dev), (t, &*dst.dev), offset, len)
                        .map_err(|e| (t, e)),
                }),
            }
        };
        if res.is_ok() {
            done();
        }
        self.guard.unlock(span);
        res
    }
}
