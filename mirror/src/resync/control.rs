//! The control methods of a [`Volume`] for resync and verify: attach, add and remove legs,
//! start jobs, and pause, resume, cancel and pace them.
//!
//! The jobs are handed back to the caller to drive (a reactor poller, or
//! [`ResyncJob::run`]); the volume keeps each job's control block so its status and
//! controls are reachable from the control plane.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard};

use nvmirror_nvme::BlockDevice;

use super::{
    JobShared, JobState, MissedRegionSource, RegionSource, ResyncConfig, ResyncJob, ResyncStatus,
    VerifyJob, VerifyStatus,
};
use crate::legs::{LegState, MAX_LEGS};
use crate::missed::MissedRegions;
use crate::volume::LegShared;
use crate::{Error, Result, Volume};

fn lock(m: &Mutex<Option<Arc<JobShared>>>) -> MutexGuard<'_, Option<Arc<JobShared>>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Volume {
    /// Brings a Faulted or Detached leg back: it enters Resyncing (receiving every write from
    /// now on) and the returned job copies the regions it missed. Drive the job to finish.
    pub fn attach_leg(&self, leg: usize) -> Result<ResyncJob> {
        self.attach_leg_with(leg, ResyncConfig::default())
    }

    /// [`attach_leg`](Self::attach_leg) with a job configuration.
    /// A leg written under an older epoch (an old primary rejoining after a promotion)
    /// first gets the regions of its own bitmap added to those it missed
    /// ([`absorb_older_epoch_bitmap`](Self::absorb_older_epoch_bitmap)).
    pub fn attach_leg_with(&self, leg: usize, cfg: ResyncConfig) -> Result<ResyncJob> {
        // A leg still holding a timed-out command is refused before anything reads it.
        self.refuse_if_busy(leg)?;
        self.absorb_older_epoch_bitmap(leg)?;
        let source = MissedRegionSource::new(self.leg_arc(leg)?);
        self.attach_leg_from(leg, Box::new(source), cfg)
    }

    /// [`attach_leg_with`](Self::attach_leg_with) with the set of regions to copy given by
    /// `regions` instead of the leg's missed-region set.
    pub fn attach_leg_from(
        &self,
        leg: usize,
        regions: Box<dyn RegionSource>,
        cfg: ResyncConfig,
    ) -> Result<ResyncJob> {
        cfg.validate(self.name())?;
        let vol = self.shared();
        let mut slot = lock(&vol.jobs.resync);
        if slot.as_ref().is_some_and(|j| !j.is_finished()) {
            return Err(Error::JobRunning {
                volume: vol.name.clone(),
                what: "resync",
            });
        }
        let snap = vol.states.snapshot();
        let state = snap.state(leg);
        if leg >= snap.leg_count() || !matches!(state, LegState::Faulted | LegState::Detached) {
            return Err(self.refused(leg, crate::legs::Refusal::WrongState(state)));
        }
        // A command the leg never answered could still land on it after the copy of its
        // region and undo it: the leg comes back only once every such command is reaped
        // (answered late, failed by the back end, or fenced by closing its queue pair).
        self.refuse_if_busy(leg)?;
        let job_shared = Arc::new(JobShared::new(leg, false, cfg.max_rate, cfg.adaptive));
        // Open the job's queue pairs before the leg changes state: a leg that cannot be
        // opened stays as it is.
        let job = ResyncJob::new(
            Arc::clone(vol),
            Arc::clone(&job_shared),
            leg,
            snap.primary(),
            regions,
            cfg,
        )
        .map_err(|reason| Error::Config {
            volume: vol.name.clone(),
            reason,
        })?;
        let from = vol
            .states
            .begin_resync(leg)
            .map_err(|r| self.refused(leg, r))?;
        tracing::info!(volume = %vol.name, leg, name = vol.leg_name(leg), %from, "leg resyncing");
        *slot = Some(job_shared);
        Ok(job)
    }

    /// Appends a new leg (a mirror) in state Resyncing; the returned job copies every region
    /// to it. A one-leg volume becomes a mirror this way.
    pub fn add_leg(&self, device: Arc<dyn BlockDevice>) -> Result<ResyncJob> {
        self.add_leg_with(device, ResyncConfig::default())
    }

    /// [`add_leg`](Self::add_leg) with a job configuration.
    pub fn add_leg_with(
        &self,
        device: Arc<dyn BlockDevice>,
        cfg: ResyncConfig,
    ) -> Result<ResyncJob> {
        cfg.validate(self.name())?;
        let vol = self.shared();
        let mut slot = lock(&vol.jobs.resync);
        let dev_name = device.name().to_string();
        let err = |reason: String| Error::AddLeg {
            volume: vol.name.clone(),
            name: dev_name.clone(),
            reason,
        };
        if slot.as_ref().is_some_and(|j| !j.is_finished()) {
            return Err(Error::JobRunning {
                volume: vol.name.clone(),
                what: "resync",
            });
        }
        let snap = vol.states.snapshot();
        let index = snap.leg_count();
        if index >= MAX_LEGS {
            return Err(err(format!("the volume has used all {MAX_LEGS} leg slots")));
        }
        let g = device.geometry();
        if g.lba_size != vol.geo.lba_size {
            return Err(err(format!(
                "{}-byte blocks, the volume has {}-byte blocks",
                g.lba_size, vol.geo.lba_size
            )));
        }
        // The leg holds the metadata area too, in front of the exported blocks.
        let need = vol.data_lba + vol.geo.num_blocks;
        if g.num_blocks < need {
            return Err(err(format!(
                "{} blocks, the volume needs {need}",
                g.num_blocks
            )));
        }
        // Only the volume writes a leg (invariant 6): a device that carries another volume's
        // superblock, or data that is not ours, is refused rather than overwritten.
        if let Some(meta) = vol.meta.as_ref() {
            let mut io = meta.lock_io();
            match crate::persistent::read_head(&mut io, &vol.name, index, &*device) {
                Ok((crate::persistent::Found::Blank, _)) => {}
                Ok((crate::persistent::Found::Superblock(sb), _)) => {
                    if sb.volume_uuid != meta.volume_uuid {
                        return Err(err(format!(
                            "it is leg {} of volume '{}' ({}); remove it there first",
                            sb.leg_index, sb.volume_name, sb.volume_uuid
                        )));
                    }
                }
                Err(e) => {
                    return Err(err(format!(
                        "its first 4 KiB hold data that is not an nvmirror superblock ({e}); \
                         zero them to use this device as a leg"
                    )))
                }
            }
        }
        let data = Arc::as_ptr(&device) as *const ();
        if let Some(first) = (0..index).find(|&i| {
            vol.leg(i)
                .is_some_and(|l| Arc::as_ptr(&l.dev) as *const () == data)
        }) {
            return Err(err(format!("it is already leg {first}")));
        }
        // Every region is missing on a new leg; cancelling its resync keeps what is left.
        let missed = MissedRegions::new(vol.geo.num_blocks, vol.region_shift);
        missed.mark_all();
        let leg_shared = Arc::new(LegShared {
            dev: device,
            missed,
            abandoned: AtomicU32::new(0),
            read_errors: AtomicU32::new(0),
        });
        if vol.legs[index].set(Arc::clone(&leg_shared)).is_err() {
            return Err(err(format!("leg slot {index} is taken")));
        }
        let job_shared = Arc::new(JobShared::new(index, false, cfg.max_rate, cfg.adaptive));
        let job = ResyncJob::new(
            Arc::clone(vol),
            Arc::clone(&job_shared),
            index,
            snap.primary(),
            Box::new(MissedRegionSource::new(leg_shared)),
            cfg,
        )
        .map_err(err)?;
        // The slot is filled and the job's queue pairs are open: publish the leg. Nothing else
        // changes the leg count (this runs under the resync lock), so the CAS cannot be refused
        // for a full table here.
        vol.states
            .add_resyncing(index)
            .map_err(|r| self.refused(index, r))?;
        tracing::info!(volume = %vol.name, leg = index, name = vol.leg_name(index), "leg added; resyncing");
        // The in-sync legs' superblocks name the new member (stale until its copy is done),
        // so a restart brings it back and rebuilds it.
        // The metadata thread writes them; the copy runs meanwhile.
        vol.persist_leg_states();
        *slot = Some(job_shared);
        Ok(job)
    }

    /// Retires leg `leg` for good: it receives nothing more and its index is not reused. The
    /// primary cannot be removed (so neither can the last in-sync leg), nor a leg whose resync
    /// is running (cancel it first).
    pub fn remove_leg(&self, leg: usize) -> Result<()> {
        self.leg(leg)?;
        let vol = self.shared();
        let slot = lock(&vol.jobs.resync);
        if slot
            .as_ref()
            .is_some_and(|j| j.leg == leg && !j.is_finished())
        {
            return Err(Error::JobRunning {
                volume: vol.name.clone(),
                what: "resync of this leg",
            });
        }
        let from = vol.states.remove(leg).map_err(|r| self.refused(leg, r))?;
        tracing::warn!(volume = %vol.name, leg, name = vol.leg_name(leg), %from, "leg removed");
        vol.record_states(|| format!("leg {leg} is removed"))
    }

    /// Progress of the last resync started on the volume.
    pub fn resync_status(&self) -> Result<ResyncStatus> {
        Ok(self.resync_job()?.resync_status())
    }

    /// Stops starting new windows (those in flight finish); the leg stays Resyncing.
    pub fn resync_pause(&self) -> Result<()> {
        self.resync_job()?.set_paused(true);
        Ok(())
    }

    pub fn resync_resume(&self) -> Result<()> {
        self.resync_job()?.set_paused(false);
        Ok(())
    }

    /// Ends the resync: windows in flight finish, then the leg is Faulted with every region
    /// not yet copied still marked, so attaching it again continues from there.
    pub fn resync_cancel(&self) -> Result<()> {
        self.resync_job()?.request_cancel();
        Ok(())
    }

    /// Sets the bandwidth cap (bytes per second, 0: none) and whether the pace adapts to host
    /// latency.
    pub fn resync_set_rate(&self, max_rate: u64, adaptive: bool) -> Result<()> {
        self.resync_job()?.set_rate(max_rate, adaptive);
        Ok(())
    }

    /// Starts a scrub of the in-sync legs; with `repair`, a region that differs is rewritten
    /// from the primary.
    pub fn verify_start(&self, repair: bool) -> Result<VerifyJob> {
        self.verify_start_with(repair, ResyncConfig::default())
    }

    /// [`verify_start`](Self::verify_start) with a job configuration.
    pub fn verify_start_with(&self, repair: bool, cfg: ResyncConfig) -> Result<VerifyJob> {
        cfg.validate(self.name())?;
        let vol = self.shared();
        let mut slot = lock(&vol.jobs.verify);
        if slot.as_ref().is_some_and(|j| !j.is_finished()) {
            return Err(Error::JobRunning {
                volume: vol.name.clone(),
                what: "verify",
            });
        }
        // Writes that failed on every in-sync leg are resolved first (copied from the
        // primary and forgotten): a repair never reports the legs clean over one of them.
        if repair && !vol.diverged.regions().is_empty() {
            let n = self.reconcile_failed_writes()?;
            tracing::info!(volume = %vol.name, regions = n, "reconciled before the verify");
        }
        let shared = Arc::new(JobShared::new(0, repair, cfg.max_rate, cfg.adaptive));
        let job = VerifyJob::new(Arc::clone(vol), Arc::clone(&shared), &cfg).map_err(|reason| {
            Error::Config {
                volume: vol.name.clone(),
                reason,
            }
        })?;
        *slot = Some(shared);
        Ok(job)
    }

    /// Result so far of the last verify started on the volume.
    pub fn verify_status(&self) -> Result<VerifyStatus> {
        Ok(self
            .job(&self.shared().jobs.verify, "verify")?
            .verify_status())
    }

    /// Ends the verify after the regions in flight.
    pub fn verify_cancel(&self) -> Result<()> {
        self.job(&self.shared().jobs.verify, "verify")?
            .request_cancel();
        Ok(())
    }

    fn resync_job(&self) -> Result<Arc<JobShared>> {
        self.job(&self.shared().jobs.resync, "resync")
    }

    fn job(&self, m: &Mutex<Option<Arc<JobShared>>>, what: &'static str) -> Result<Arc<JobShared>> {
        lock(m).clone().ok_or_else(|| Error::NoJob {
            volume: self.name().to_string(),
            what,
        })
    }

    fn leg_arc(&self, leg: usize) -> Result<Arc<LegShared>> {
        self.leg(leg)?;
        self.shared().legs[leg]
            .get()
            .cloned()
            .ok_or_else(|| Error::NoSuchLeg {
                volume: self.name().to_string(),
                leg,
            })
    }
}

impl JobState {
    /// The lower-case name used in logs and the control plane.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}
