//! The volume: legs, their shared state, and the control methods. The I/O path is in
//! [`crate::qpair`].

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, OnceLock};

use nvmirror_nvme::{BlockDevice, Geometry, IoCommand, IoOp, QueuePair, Status};

use crate::bitmap::WriteIntentBitmap;
use crate::breakdown::{Breakdown, BreakdownConfig};
use crate::config::VolumeConfig;
use crate::guard::OverlapGuard;
use crate::legs::{LegInfo, LegRole, LegState, LegStates, Refusal, MAX_LEGS};
use crate::metadata::PersistentMeta;
use crate::missed::MissedRegions;
use crate::qpair::VolumeQueuePair;
use crate::recorder::AckStatus;
use crate::resync::JobRegistry;
use crate::stats::{CoreStats, VolumeStats};
use crate::{Error, Result};

/// What every core shares about one leg.
#[derive(Debug)]
pub(crate) struct LegShared {
    pub(crate) dev: Arc<dyn BlockDevice>,
    /// Regions written while this leg did not get the write.
    pub(crate) missed: MissedRegions,
    /// Leg commands some core abandoned (timed out) and has not reaped yet. Until they are
    /// reaped the back end may still act on them — write the medium, read or fill their
    /// buffers — so a resync of this leg does not start while this is above zero.
    pub(crate) abandoned: AtomicU32,
    /// Read errors queued for repair so far (`read_repair`).
    pub(crate) read_errors: AtomicU32,
}

/// What every core shares about a volume.
#[derive(Debug)]
pub(crate) struct VolumeShared {
    pub(crate) name: String,
    /// The exported namespace: the smallest leg.
    pub(crate) geo: Geometry,
    pub(crate) cfg: VolumeConfig,
    /// Leg slots; slot `i` is filled before the state word publishes a leg count above `i`,
    /// and never changes afterwards (a removed leg retires its slot).
    pub(crate) legs: [OnceLock<Arc<LegShared>>; MAX_LEGS],
    /// Regions of writes that failed or timed out on every in-sync leg: the legs may differ
    /// there (NVMe does not promise a failed write left the medium unchanged). Kept marked in
    /// the bitmap until [`Volume::reconcile_failed_writes`] copies them from the primary.
    pub(crate) diverged: MissedRegions,
    /// Ranges a read failed on, waiting to be rewritten from a good leg (`read_repair`):
    /// pushed by reactors, popped by the control plane only.
    pub(crate) repairs: nvmirror_poller::Ring<crate::read_repair::Repair>,
    /// Ranges repaired so far.
    pub(crate) repaired: std::sync::atomic::AtomicU64,
    /// Held while `repairs` is drained: the ring has a single consumer.
    pub(crate) repairing: Mutex<()>,
    pub(crate) states: LegStates,
    pub(crate) guard: OverlapGuard,
    /// Persistent volumes: the write-intent bitmap.
    pub(crate) bitmap: Option<WriteIntentBitmap>,
    /// Persistent volumes: superblock state and control-plane I/O.
    pub(crate) meta: Option<PersistentMeta>,
    /// First block of the exported namespace on every leg (0 without metadata).
    pub(crate) data_lba: u64,
    /// log2 of the logical blocks per missed region.
    pub(crate) region_shift: u32,
    /// The statistics block of every queue pair opened so far.
    pub(crate) cores: Mutex<Vec<Arc<CoreStats>>>,
    /// The resync and verify jobs started on this volume (control plane only).
    pub(crate) jobs: JobRegistry,
    /// Fenced out by a newer primary (`fencing.rs`): every host command fails.
    pub(crate) fence: crate::fencing::FenceState,
    /// How each leg is fenced, by leg index (control plane only).
    pub(crate) leg_fences: Mutex<Vec<crate::fencing::LegFence>>,
    /// Latency breakdown for queue pairs opened from now on (`None`: off).
    breakdown_cfg: Mutex<Option<BreakdownConfig>>,
    /// What queue pairs recorded and handed over (on drop), merged.
    breakdowns: Mutex<Option<Breakdown>>,
}

impl VolumeShared {
    /// Tells each leg's device whether the leg is whole ([`BlockDevice::catch_up`]): an
    /// in-sync leg is, any other awaits a resync. Done once the legs' states are known.
    pub(crate) fn tell_catch_up(&self) {
        let snap = self.states.snapshot();
        for (i, leg) in self
            .legs
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.get()?)))
        {
            if snap.state(i) != LegState::Removed {
                leg.dev.catch_up(snap.state(i) != LegState::InSync);
            }
        }
    }

    /// Persistent volumes: waits (control plane only) until the metadata thread has written
    /// the current member states to the in-sync legs' superblocks. When no in-sync leg took
    /// them, the error names a leg whose superblock failed and `change` (what the superblock
    /// fails to say).
    pub(crate) fn record_states(&self, change: impl FnOnce() -> String) -> Result<()> {
        let Some(rec) = self.recorder() else {
            return Ok(());
        };
        let events = self.states.snapshot().events();
        // A round faults every failing leg in turn, each after at most one I/O timeout.
        let limit = self.cfg.io_timeout * (2 * MAX_LEGS as u32 + 2);
        let status = rec.wait(events, limit);
        if status == AckStatus::Backed {
            return Ok(());
        }
        let failed = rec.last_failed();
        let at = if failed == 0 {
            self.states.snapshot().primary()
        } else {
            failed.trailing_zeros() as usize
        };
        let why = if status == AckStatus::Pending {
            "the metadata thread did not record it in time"
        } else {
            "but this superblock does not say so"
        };
        Err(Error::Metadata {
            volume: self.name.clone(),
            leg: at,
            name: self.leg_name(at).to_string(),
            reason: format!("{}, {why}", change()),
        })
    }

    /// The shared data of leg `leg`, if its slot is filled.
    #[inline]
    pub(crate) fn leg(&self, leg: usize) -> Option<&LegShared> {
        self.legs.get(leg).and_then(|s| s.get()).map(|l| &**l)
    }

    /// Name of leg `leg` (for logs).
    pub(crate) fn leg_name(&self, leg: usize) -> &str {
        self.leg(leg).map_or("?", |l| l.dev.name())
    }

    /// Names of every filled leg slot, in leg order.
    pub(crate) fn leg_names(&self) -> Vec<&str> {
        self.legs
            .iter()
            .map_while(|s| s.get())
            .map(|l| l.dev.name())
            .collect()
    }

    /// Records that `cmd` did not reach `leg`: its blocks, or for a flush every region.
    #[inline]
    pub(crate) fn mark_missed(&self, leg: usize, cmd: &IoCommand) {
        let Some(leg) = self.leg(leg) else {
            return;
        };
        let missed = &leg.missed;
        match cmd.op {
            IoOp::Flush => missed.mark_all(),
            _ => missed.mark(cmd.slba, cmd.nlb),
        }
    }

    /// Faults `leg` after an I/O failure; when it is the primary, `successor` (or the lowest
    /// in-sync leg) is promoted. False when refused because `leg` is the last in-sync leg.
    ///
    /// Never blocks: on a persistent volume the metadata thread is woken to record the change,
    /// and every write acknowledged from now on waits (held on its core, `qpair/ack.rs`) until
    /// the survivors' superblocks name the leg stale.
    #[cold]
    pub(crate) fn fault_on_io(
        &self,
        leg: usize,
        successor: Option<usize>,
        status: Status,
        what: &str,
    ) -> bool {
        let name = self.leg_name(leg);
        match self.states.take_out(leg, LegState::Faulted, successor) {
            Ok(Some(t)) => {
                tracing::warn!(
                    volume = %self.name, leg, name, from = %t.from, %status,
                    "leg faulted: {what} failed"
                );
                if let Some(rec) = self.recorder() {
                    rec.wake();
                }
                if let Some(p) = t.promoted {
                    tracing::warn!(
                        volume = %self.name, old = leg, new = p,
                        name = self.leg_name(p), "primary promoted"
                    );
                }
                true
            }
            Ok(None) | Err(Refusal::AlreadyDetached | Refusal::WrongState(_)) => true,
            Err(Refusal::LastInSync | Refusal::NoFreeSlot | Refusal::Primary) => {
                tracing::error!(
                    volume = %self.name, leg, name, %status,
                    "{what} failed on the last in-sync leg; it stays in sync"
                );
                false
            }
        }
    }

    /// The breakdown setting a new queue pair starts with (read once, when it opens).
    pub(crate) fn breakdown_config(&self) -> Option<BreakdownConfig> {
        *self.breakdown_cfg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges a queue pair's breakdown into the volume's (queue pair teardown only).
    pub(crate) fn add_breakdown(&self, b: Breakdown) {
        let mut all = self.breakdowns.lock().unwrap_or_else(|e| e.into_inner());
        match all.as_mut() {
            Some(all) => all.merge(&b),
            None => *all = Some(b),
        }
    }

    pub(crate) fn register_core(&self, stats: Arc<CoreStats>) {
        self.cores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats);
    }

    /// A queue pair closes: its counters move into the retired block (the list's first).
    pub(crate) fn retire_core(&self, stats: &Arc<CoreStats>) {
        let mut cores = self.cores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cores.iter().skip(1).position(|c| Arc::ptr_eq(c, stats)) {
            let gone = cores.swap_remove(i + 1);
            cores[0].absorb(&gone);
        }
    }
}

/// A mirrored namespace over 1 to [`MAX_LEGS`] legs (one leg: an unmirrored volume a mirror can join later). It is itself a [`BlockDevice`]: open one
/// [`VolumeQueuePair`] per core and drive it like a single device.
#[derive(Debug)]
pub struct Volume {
    shared: Arc<VolumeShared>,
}

impl Volume {
    /// A volume over `legs` (the first is the primary). All legs need the same logical block
    /// size; the volume exports the smallest leg's capacity.
    pub fn new(name: &str, legs: Vec<Arc<dyn BlockDevice>>, cfg: VolumeConfig) -> Result<Self> {
        let (lba_size, num_blocks) = Self::check_legs(name, &legs, &cfg)?;
        let vol = Self::assemble(
            name,
            legs,
            cfg,
            Geometry {
                lba_size,
                num_blocks,
            },
            None,
        );
        vol.shared.tell_catch_up();
        Ok(vol)
    }

    /// Validates legs and configuration; returns the block size and the smallest leg's
    /// block count.
    pub(crate) fn check_legs(
        name: &str,
        legs: &[Arc<dyn BlockDevice>],
        cfg: &VolumeConfig,
    ) -> Result<(u32, u64)> {
        if !(1..=MAX_LEGS).contains(&legs.len()) {
            return Err(Error::LegCount {
                volume: name.to_string(),
                count: legs.len(),
                max: MAX_LEGS,
            });
        }
        for (second, leg) in legs.iter().enumerate() {
            let data = Arc::as_ptr(leg) as *const ();
            if let Some(first) = legs[..second]
                .iter()
                .position(|l| Arc::as_ptr(l) as *const () == data)
            {
                return Err(Error::DuplicateLeg {
                    volume: name.to_string(),
                    name: leg.name().to_string(),
                    first,
                    second,
                });
            }
        }
        let lba_size = legs[0].geometry().lba_size;
        for (i, leg) in legs.iter().enumerate() {
            let g = leg.geometry();
            if g.lba_size != lba_size {
                return Err(Error::LbaSizeMismatch {
                    volume: name.to_string(),
                    leg: i,
                    name: leg.name().to_string(),
                    lba_size: g.lba_size,
                    expected: lba_size,
                });
            }
        }
        cfg.validate(name, lba_size)?;
        let num_blocks = legs
            .iter()
            .map(|l| l.geometry().num_blocks)
            .min()
            .unwrap_or(0);
        if num_blocks == 0 {
            return Err(Error::Config {
                volume: name.to_string(),
                reason: "a leg has no blocks".into(),
            });
        }
        Ok((lba_size, num_blocks))
    }

    /// Builds the volume over validated legs; `persistent` carries the bitmap and metadata
    /// of a persistent volume.
    pub(crate) fn assemble(
        name: &str,
        legs: Vec<Arc<dyn BlockDevice>>,
        cfg: VolumeConfig,
        geo: Geometry,
        persistent: Option<(WriteIntentBitmap, PersistentMeta)>,
    ) -> Self {
        let Geometry {
            lba_size,
            num_blocks,
        } = geo;
        let shift = |bytes: u64| (bytes / u64::from(lba_size)).trailing_zeros();
        let region_shift = shift(cfg.region_size);
        let count = legs.len();
        let slots: [OnceLock<Arc<LegShared>>; MAX_LEGS] = Default::default();
        for (slot, dev) in slots.iter().zip(legs) {
            let _ = slot.set(Arc::new(LegShared {
                dev,
                missed: MissedRegions::new(num_blocks, region_shift),
                abandoned: AtomicU32::new(0),
                read_errors: AtomicU32::new(0),
            }));
        }
        let data_lba = persistent.as_ref().map_or(0, |(b, _)| b.layout.data_lba());
        let (bitmap, meta) = match persistent {
            Some((b, m)) => (Some(b), Some(m)),
            None => (None, None),
        };
        let shared = VolumeShared {
            name: name.to_string(),
            geo,
            bitmap,
            meta,
            data_lba,
            states: LegStates::new(count),
            guard: OverlapGuard::new(shift(cfg.overlap_granule)),
            cfg,
            legs: slots,
            diverged: MissedRegions::new(num_blocks, region_shift),
            repairs: nvmirror_poller::Ring::new(crate::read_repair::QUEUE),
            repaired: std::sync::atomic::AtomicU64::new(0),
            repairing: Mutex::new(()),
            region_shift,
            cores: Mutex::new(vec![Arc::new(CoreStats::new())]),
            jobs: JobRegistry::default(),
            breakdown_cfg: Mutex::new(None),
            breakdowns: Mutex::new(None),
            fence: Default::default(),
            leg_fences: Mutex::new(Vec::new()),
        };
        tracing::info!(
            volume = name,
            legs = ?shared.leg_names(),
            blocks = num_blocks,
            lba_size,
            "volume created"
        );
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The volume's configuration.
    pub fn config(&self) -> &VolumeConfig {
        &self.shared.cfg
    }

    /// Number of legs, whatever their state (removed legs included: their index stays taken).
    pub fn leg_count(&self) -> usize {
        self.shared.states.snapshot().leg_count()
    }

    /// The device behind leg `leg`.
    pub fn leg_device(&self, leg: usize) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::clone(&self.leg(leg)?.dev))
    }

    /// Name, role and state of every leg, in leg order.
    pub fn leg_states(&self) -> Vec<LegInfo> {
        let snap = self.shared.states.snapshot();
        self.shared
            .legs
            .iter()
            .take(snap.leg_count())
            .filter_map(|s| s.get())
            .enumerate()
            .map(|(i, leg)| LegInfo {
                name: leg.dev.name().to_string(),
                role: if i == snap.primary() {
                    LegRole::Primary
                } else {
                    LegRole::Mirror
                },
                state: snap.state(i),
            })
            .collect()
    }

    /// Index of the primary leg.
    pub fn primary(&self) -> usize {
        self.shared.states.snapshot().primary()
    }

    /// Number of leg state transitions since the volume was created.
    pub fn events(&self) -> u32 {
        self.shared.states.snapshot().events()
    }

    /// Takes leg `leg` out of sync by hand (a drill, or an operator who distrusts it). Writes
    /// from now on mark its missed regions. Refused for the last in-sync leg.
    pub fn fault_leg(&self, leg: usize) -> Result<()> {
        self.take_out(leg, LegState::Faulted)
    }

    /// Removes leg `leg` from I/O for good (until a resync re-attaches it). Refused for the
    /// last in-sync leg.
    pub fn detach_leg(&self, leg: usize) -> Result<()> {
        self.take_out(leg, LegState::Detached)
    }

    /// Refuses with [`Error::LegBusy`] while `leg` holds timed-out commands its device has
    /// not answered: one could still land after a copy of its region and undo it.
    pub(crate) fn refuse_if_busy(&self, leg: usize) -> Result<()> {
        // Data-path commands and control-plane ones (superblocks, bitmap pages) alike.
        let control = self
            .shared
            .meta
            .as_ref()
            .map_or(0, |m| m.timeouts.unreaped(leg));
        let abandoned = self
            .leg(leg)?
            .abandoned
            .load(std::sync::atomic::Ordering::Acquire)
            + control;
        if abandoned > 0 {
            return Err(Error::LegBusy {
                volume: self.shared.name.clone(),
                leg,
                abandoned,
            });
        }
        // A remote leg whose connection died may still have commands running on the remote
        // until the remote gives the old association up (the device's fence).
        if let Some(link) = self.leg(leg)?.dev.link() {
            if !link.fence_remaining.is_zero() {
                return Err(Error::LegFenced {
                    volume: self.shared.name.clone(),
                    leg,
                    commands: link.fenced_commands,
                    remaining_ms: link.fence_remaining.as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    fn take_out(&self, leg: usize, to: LegState) -> Result<()> {
        let name = self.leg(leg)?.dev.name();
        let volume = &self.shared.name;
        match self.shared.states.take_out(leg, to, None) {
            Ok(Some(t)) => {
                tracing::warn!(volume = %volume, leg, name, from = %t.from, to = %to, "leg state changed by request");
                let recorded = self.shared.record_states(|| format!("leg {leg} is {to}"));
                if let Some(p) = t.promoted {
                    tracing::warn!(volume = %volume, old = leg, new = p, "primary promoted");
                }
                recorded
            }
            Ok(None) => Ok(()),
            Err(Refusal::AlreadyDetached) => Err(Error::AlreadyDetached {
                volume: volume.clone(),
                leg,
            }),
            Err(r) => Err(self.refused(leg, r)),
        }
    }

    /// The error for a refused state change of `leg`.
    pub(crate) fn refused(&self, leg: usize, r: Refusal) -> Error {
        let volume = self.shared.name.clone();
        match r {
            Refusal::LastInSync => Error::LastInSyncLeg { volume, leg },
            Refusal::AlreadyDetached => Error::AlreadyDetached { volume, leg },
            Refusal::Primary => Error::LegIsPrimary { volume, leg },
            Refusal::NoFreeSlot => Error::LegCount {
                volume,
                count: MAX_LEGS + 1,
                max: MAX_LEGS,
            },
            Refusal::WrongState(state) => Error::LegState { volume, leg, state },
        }
    }

    /// Bytes per missed region.
    pub fn region_size(&self) -> u64 {
        self.shared.cfg.region_size
    }

    /// The regions (indices of `region_size`-byte regions) that leg `leg` missed, ascending.
    pub fn missed_regions(&self, leg: usize) -> Result<Vec<u64>> {
        Ok(self.leg(leg)?.missed.regions())
    }

    /// How many regions leg `leg` missed.
    pub fn missed_region_count(&self, leg: usize) -> Result<u64> {
        Ok(self.leg(leg)?.missed.count())
    }

    /// Whether leg `leg` missed region `region`.
    pub fn region_missed(&self, leg: usize, region: u64) -> Result<bool> {
        Ok(self.leg(leg)?.missed.contains(region))
    }

    /// Statistics summed over every queue pair opened on the volume.
    pub fn stats(&self) -> VolumeStats {
        // Summed under the lock: a queue pair retiring meanwhile is counted exactly once.
        let names = self.shared.leg_names();
        let cores = self.shared.cores.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = VolumeStats::collect(&names, &cores);
        drop(cores);
        // The control plane's commands (superblocks, bitmap pages, flushes) time out too.
        if let Some(meta) = &self.shared.meta {
            for (leg, s) in stats.legs.iter_mut().enumerate() {
                s.timeouts += meta.timeouts.total(leg);
            }
        }
        stats
    }

    /// Turns the per-stage latency breakdown on (or off, with `None`) for the queue pairs
    /// opened from now on; queue pairs already open keep their setting
    /// ([`VolumeQueuePair::set_breakdown`] changes one). See [`crate::breakdown`].
    pub fn set_breakdown(&self, cfg: Option<BreakdownConfig>) {
        *self
            .shared
            .breakdown_cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// The breakdown recorded by every queue pair closed (or that called
    /// [`VolumeQueuePair::set_breakdown`]) since the last call, merged; `None` when none
    /// handed anything over. Queue pairs still open keep theirs until they close.
    pub fn take_breakdown(&self) -> Option<Breakdown> {
        self.shared
            .breakdowns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Overlap-guard entries held right now, by every core (diagnostics: zero when idle).
    pub fn overlap_locks_held(&self) -> usize {
        self.shared.guard.held()
    }

    /// Opens a queue pair for the calling core (the concrete type; [`BlockDevice::open_qpair`]
    /// boxes the same thing).
    pub fn open_volume_qpair(&self, depth: u32) -> Result<VolumeQueuePair> {
        VolumeQueuePair::open(Arc::clone(&self.shared), depth)
    }

    pub(crate) fn leg(&self, leg: usize) -> Result<&LegShared> {
        self.shared
            .leg(leg)
            .filter(|_| leg < self.shared.states.snapshot().leg_count())
            .ok_or_else(|| Error::NoSuchLeg {
                volume: self.shared.name.clone(),
                leg,
            })
    }

    /// The state shared by every core (the resync and verify jobs work on it).
    pub(crate) fn shared(&self) -> &Arc<VolumeShared> {
        &self.shared
    }
}

impl BlockDevice for Volume {
    fn geometry(&self) -> Geometry {
        self.shared.geo
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        match self.open_volume_qpair(depth) {
            Ok(qp) => Ok(Box::new(qp)),
            Err(e) => Err(nvmirror_nvme::Error::QueuePair(e.to_string())),
        }
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    fn identity(&self) -> Option<[u8; 16]> {
        self.shared.meta.as_ref().map(|m| m.volume_uuid.0)
    }
}
