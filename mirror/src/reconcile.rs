//! Regions of writes that failed or timed out on every in-sync leg (`docs/mirror.md`, ack
//! rule).
//!
//! Such a write got an error, but NVMe does not promise that a failed write left the medium
//! unchanged, and an abandoned one may still be applied by its leg: the in-sync legs may now
//! differ there. The ack rule records the regions in the volume's diverged set; the clearer
//! keeps their bitmap bits set (so an unclean restart copies them as well), and
//! [`Volume::reconcile_failed_writes`] makes the legs agree again by copying them from the
//! primary.

use std::sync::atomic::Ordering;

use crate::legs::LegState;
use crate::metadata::ControlIo;
use crate::volume::Volume;
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
            let abandoned = self.leg(leg)?.abandoned.load(Ordering::Acquire);
            if abandoned > 0 {
                return Err(Error::LegBusy {
                    volume: shared.name.clone(),
                    leg,
                    abandoned,
                });
            }
        }
        let from = snap.primary();
        let source = std::sync::Arc::clone(&self.leg(from)?.dev);
        let lba_size = u64::from(shared.geo.lba_size);
        let per_region = 1u64 << shared.region_shift;
        let mut own = ControlIo::new(shared.cfg.io_timeout);
        let mut copied = 0;
        for r in shared.diverged.regions() {
            let slba = r * per_region;
            let nlb = per_region.min(shared.geo.num_blocks - slba) as u32;
            let span = shared.guard.span(slba, nlb);
            while !shared.guard.try_lock(span) {
                std::thread::yield_now();
            }
            // The control-plane lock only after the guard: a reactor holding guard entries
            // may need it to record a fault, and must not wait on us.
            let res = {
                let mut meta_io = shared.meta.as_ref().map(|m| m.lock_io());
                let io = meta_io.as_deref_mut().unwrap_or(&mut own);
                let offset = (shared.data_lba + slba) * lba_size;
                let len = u64::from(nlb) * lba_size;
                in_sync
                    .iter()
                    .filter(|&&to| to != from)
                    .try_for_each(|&to| {
                        let dev = &shared.leg(to).expect("checked above").dev;
                        io.copy((from, &*source), (to, &**dev), offset, len)
                            .map_err(|reason| Error::Metadata {
                                volume: shared.name.clone(),
                                leg: to,
                                name: dev.name().to_string(),
                                reason: format!("reconciling region {r}: {reason}"),
                            })
                    })
            };
            if res.is_ok() {
                shared.diverged.clear(r);
                copied += 1;
            }
            shared.guard.unlock(span);
            res?;
        }
        if copied > 0 {
            tracing::info!(volume = %shared.name, from, regions = copied, "failed writes reconciled");
        }
        Ok(copied)
    }
}
