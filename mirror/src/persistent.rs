//! Persistent volumes: format, start-up, recovery, clearing and clean shutdown
//! (`docs/bitmap.md`). Everything here is control plane and synchronous.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use nvmirror_nvme::{BlockDevice, Geometry};

use crate::bitmap::{MetadataLayout, WriteIntentBitmap, BITMAP_PAGE};
use crate::config::VolumeConfig;
use crate::legs::{LegState, LegStates, MAX_LEGS};
use crate::metadata::{ControlIo, PersistentMeta};
use crate::superblock::{MemberState, Superblock, Uuid, REGION_SIZE_RANGE};
use crate::volume::{Volume, VolumeShared};
use crate::{Error, Result};

/// The least time one start-up metadata command may take (the volume's `io_timeout` when
/// longer).
const STARTUP_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a leg's first 4 KiB hold.
pub(crate) enum Found {
    Blank,
    Superblock(Box<Superblock>),
}

pub(crate) fn read_head(
    io: &mut ControlIo,
    name: &str,
    leg: usize,
    dev: &dyn BlockDevice,
) -> Result<(Found, Vec<u8>)> {
    let head = io
        .read_bytes(leg, dev, 0, BITMAP_PAGE as usize)
        .map_err(|reason| Error::Metadata {
            volume: name.to_string(),
            leg,
            name: dev.name().to_string(),
            reason: format!("cannot read the superblock: {reason}"),
        })?;
    if head.iter().all(|&b| b == 0) {
        return Ok((Found::Blank, head));
    }
    match Superblock::decode(&head) {
        Ok(sb) => Ok((Found::Superblock(Box::new(sb)), head)),
        Err(e) => Err(Error::Metadata {
            volume: name.to_string(),
            leg,
            name: dev.name().to_string(),
            reason: e.to_string(),
        }),
    }
}

impl Volume {
    /// Formats `legs` for a persistent volume — superblock, zeroed bitmap, data from
    /// `data_offset` on — and opens it. A leg must be blank (its first 4 KiB zero) unless
    /// `force` is given; a leg whose superblock names another volume is refused even then.
    pub fn format(
        name: &str,
        legs: Vec<Arc<dyn BlockDevice>>,
        cfg: VolumeConfig,
        force: bool,
    ) -> Result<Self> {
        let (lba_size, blocks) = Self::check_legs(name, &legs, &cfg)?;
        let layout = persistent_layout(name, &cfg, lba_size, blocks)?;
        let mut io = ControlIo::new(cfg.io_timeout.max(STARTUP_IO_TIMEOUT));
        for (i, dev) in legs.iter().enumerate() {
            let (found, head) = match read_head(&mut io, name, i, &**dev) {
                Ok(f) => f,
                Err(Error::Metadata { reason, .. }) if force => {
                    tracing::warn!(volume = name, leg = i, %reason, "overwriting a leg by force");
                    continue;
                }
                Err(Error::Metadata { reason, .. }) => {
                    return Err(Error::LegNotBlank {
                        volume: name.to_string(),
                        leg: i,
                        name: dev.name().to_string(),
                        found: reason,
                    })
                }
                Err(e) => return Err(e),
            };
            match found {
                Found::Blank => {}
                Found::Superblock(sb) if sb.volume_name != name => {
                    return Err(Error::ForeignLeg {
                        volume: name.to_string(),
                        leg: i,
                        name: dev.name().to_string(),
                        reason: format!(
                            "it belongs to volume '{}' ({})",
                            sb.volume_name, sb.volume_uuid
                        ),
                    })
                }
                Found::Superblock(sb) if !force => {
                    return Err(Error::LegNotBlank {
                        volume: name.to_string(),
                        leg: i,
                        name: dev.name().to_string(),
                        found: format!("a superblock of this volume ({})", sb.volume_uuid),
                    })
                }
                Found::Superblock(_) => drop(head),
            }
        }
        let mut leg_uuids = [Uuid::default(); MAX_LEGS];
        for u in leg_uuids.iter_mut().take(legs.len()) {
            *u = Uuid::new_random();
        }
        let meta = PersistentMeta::new(Uuid::new_random(), leg_uuids, layout, 1, 0, cfg.io_timeout);
        let snap = LegStates::new(legs.len()).snapshot();
        let zeros = vec![0u8; layout.bitmap_len as usize];
        for (i, dev) in legs.iter().enumerate() {
            let sb = meta.superblock(name, legs.len(), i, snap, 1, true);
            io.write_bytes(i, &**dev, layout.bitmap_offset, &zeros)
                .and_then(|()| io.write_page(i, &**dev, 0, &sb.encode()))
                .map_err(|reason| Error::Metadata {
                    volume: name.to_string(),
                    leg: i,
                    name: dev.name().to_string(),
                    reason: format!("format: {reason}"),
                })?;
        }
        tracing::info!(volume = name, uuid = %meta.volume_uuid, ?layout, "volume formatted");
        drop(io);
        Self::open_persistent(name, legs, cfg)
    }

    /// Opens a formatted persistent volume: reads and validates every leg's superblock (a
    /// corrupt or foreign one is an error naming the leg), takes the leg with the highest
    /// event counter as the freshest, and loads the union of the in-sync legs' bitmaps.
    ///
    /// - After an unclean stop, the marked regions are copied from the freshest leg to the
    ///   other in-sync legs before this returns, so the legs agree on every block.
    /// - A leg named stale by the freshest, or with an older event counter, comes up
    ///   `Faulted` with the marked regions as its regions to resync
    ///   ([`regions_to_resync`](Self::regions_to_resync)); a blank leg gets every region.
    ///
    /// Then the union bitmap and superblocks with a bumped event counter and the clean flag
    /// cleared are written to every in-sync leg: nothing written from now on can be mistaken
    /// for a clean stop.
    pub fn open_persistent(
        name: &str,
        legs: Vec<Arc<dyn BlockDevice>>,
        mut cfg: VolumeConfig,
    ) -> Result<Self> {
        let (lba_size, _) = Self::check_legs(name, &legs, &cfg)?;
        // Start-up I/O is the control plane's and nobody waits on it but the start itself:
        // a leg slow to answer (a busy machine, a device still settling after a crash) is
        // given longer than a host command before the start gives up on it.
        let startup_timeout = cfg.io_timeout.max(STARTUP_IO_TIMEOUT);
        let mut io = ControlIo::new(startup_timeout);
        let mut sbs = Vec::with_capacity(legs.len());
        // A remote leg whose site is down comes up faulted with the marked regions to
        // resync, as a leg that missed the last events does (its identity is checked by its
        // device's geometry when it connects).
        let mut unreachable = vec![false; legs.len()];
        for (i, dev) in legs.iter().enumerate() {
            sbs.push(match read_head(&mut io, name, i, &**dev) {
                Ok((Found::Blank, _)) => None,
                Ok((Found::Superblock(sb), _)) => Some(sb),
                Err(e) if dev.link().is_some_and(|l| !l.connected) => {
                    tracing::warn!(volume = name, leg = i, error = %e, "remote leg unreachable; it comes up faulted");
                    unreachable[i] = true;
                    None
                }
                Err(e) => return Err(e),
            });
        }
        // A remote leg at a newer epoch than every local leg was promoted elsewhere: it
        // has no say in which of this node's legs is freshest (its superblock names this
        // node's legs stale), so a fenced start keeps its own view of its own legs.
        let local_top = sbs
            .iter()
            .enumerate()
            .filter(|(i, _)| legs[*i].link().is_none())
            .filter_map(|(_, sb)| sb.as_ref().map(|s| s.epoch))
            .max();
        let electable: Vec<Option<Box<Superblock>>> = sbs
            .iter()
            .enumerate()
            .map(|(i, sb)| {
                sb.clone().filter(|s| {
                    legs[i].link().is_none() || local_top.map_or(true, |top| s.epoch <= top)
                })
            })
            .collect();
        let Some(fresh) = elect_freshest(&electable) else {
            return Err(Error::Metadata {
                volume: name.to_string(),
                leg: 0,
                name: legs[0].name().to_string(),
                reason: "no leg has a superblock; format the volume first".into(),
            });
        };
        let f = sbs[fresh]
            .clone()
            .expect("the freshest leg has a superblock");
        let names: Vec<String> = legs.iter().map(|l| l.name().to_string()).collect();
        let foreign = |leg: usize, reason: String| Error::ForeignLeg {
            volume: name.to_string(),
            leg,
            name: names[leg].clone(),
            reason,
        };
        if f.leg_count as usize != legs.len() {
            return Err(foreign(
                fresh,
                format!("its volume has {} legs, {} given", f.leg_count, legs.len()),
            ));
        }
        // A slot the operator removed is not read again: its device may be gone or serve
        // another volume by now, and the caller may give a placeholder for it.
        let removed: Vec<bool> = (0..legs.len())
            .map(|i| i != fresh && f.member_states[i] == MemberState::Removed)
            .collect();
        for (i, sb) in sbs.iter_mut().enumerate() {
            if removed[i] {
                *sb = None;
            }
        }
        for (i, sb) in sbs.iter().enumerate() {
            let Some(sb) = sb else { continue };
            sb.check_volume(f.volume_uuid)
                .map_err(|e| foreign(i, e.to_string()))?;
            if sb.leg_index as usize != i || sb.leg_uuid != f.leg_uuids[i] {
                return Err(foreign(
                    i,
                    format!("it is leg {} ({}) of the volume", sb.leg_index, sb.leg_uuid),
                ));
            }
        }
        let meta_err = |leg: usize, reason: String| Error::Metadata {
            volume: name.to_string(),
            leg,
            name: names[leg].clone(),
            reason,
        };
        let layout = MetadataLayout {
            lba_size: f.lba_size,
            region_size: f.region_size,
            regions: (f.data_blocks * u64::from(f.lba_size)).div_ceil(f.region_size),
            bitmap_offset: f.bitmap_offset,
            bitmap_len: f.bitmap_len,
            data_offset: f.data_offset,
            data_blocks: f.data_blocks,
        };
        if f.lba_size != lba_size || layout.bitmap_len < layout.pages() * BITMAP_PAGE {
            return Err(meta_err(fresh, format!("inconsistent layout {layout:?}")));
        }
        let need = f.data_offset + f.data_blocks * u64::from(f.lba_size);
        for (i, dev) in legs.iter().enumerate() {
            if !removed[i] && dev.geometry().bytes() < need {
                return Err(meta_err(
                    i,
                    format!("{} bytes, the volume needs {need}", dev.geometry().bytes()),
                ));
            }
        }
        cfg.region_size = f.region_size;
        cfg.validate(name, lba_size)?;
        // Who is in sync: the freshest leg's view, and every leg that saw its last event.
        let mut stale: Vec<bool> = (0..legs.len())
            .map(|i| match &sbs[i] {
                None => !removed[i],
                Some(sb) => {
                    i != fresh
                        && (f.member_states[i] != MemberState::InSync
                            || sb.event_counter < f.event_counter)
                }
            })
            .collect();
        let mut union = vec![0u8; layout.bitmap_len as usize];
        let mut clean = true;
        for (i, dev) in legs.iter().enumerate() {
            if stale[i] || removed[i] {
                continue;
            }
            clean &= sbs[i].as_ref().is_some_and(|s| s.clean);
            let area = io
                .read_bytes(i, &**dev, layout.bitmap_offset, layout.bitmap_len as usize)
                .map_err(|r| meta_err(i, format!("cannot read the bitmap: {r}")))?;
            for (u, b) in union.iter_mut().zip(area) {
                *u |= b;
            }
        }
        let bitmap = WriteIntentBitmap::new(layout);
        bitmap.load(&union);
        // The epoch this node serves under is its own (local) legs' newest: a remote leg
        // with a newer one was promoted elsewhere, and this node must not write again
        // (docs/promotion.md). A volume of remote legs only takes the freshest leg's.
        let local_epochs = || {
            sbs.iter()
                .enumerate()
                .filter(|(i, _)| legs[*i].link().is_none())
                .filter_map(|(_, sb)| sb.as_ref().map(|s| s.epoch))
        };
        let epoch = local_epochs().max().unwrap_or(f.epoch);
        let newer = sbs.iter().enumerate().find_map(|(i, sb)| {
            sb.as_ref()
                .filter(|s| s.epoch > epoch && legs[i].link().is_some())
                .map(|s| (i, s.epoch))
        });
        let meta = PersistentMeta::new(
            f.volume_uuid,
            f.leg_uuids,
            layout,
            f.event_counter,
            epoch,
            cfg.io_timeout,
        );
        let geo = Geometry {
            lba_size,
            num_blocks: f.data_blocks,
        };
        let vol = Self::assemble(name, legs, cfg, geo, Some((bitmap, meta)));
        if let Some((leg, e)) = newer {
            let why = format!(
                "leg {leg} ({}) was promoted elsewhere: its superblock is at epoch {e}, this node's legs at {epoch}",
                names[leg]
            );
            tracing::error!(volume = name, "fenced: {why}");
            vol.fence_out(why);
        }
        let shared = Arc::clone(vol.shared());
        let bm = shared.bitmap.as_ref().expect("persistent");
        let meta = shared.meta.as_ref().expect("persistent");
        let marked = bm.marked_regions();
        meta.lock_io().set_timeout(startup_timeout);
        meta.lock_sb_io().set_timeout(startup_timeout);
        if !clean {
            // Writes in flight at the stop may have reached some legs only: make the in-sync
            // legs agree on every marked region, taking the freshest leg's copy. A leg that
            // cannot take the copy comes up stale instead (faulted, its marked regions to
            // resync): the freshest leg holds every acknowledged write.
            let mut io = meta.lock_io();
            let targets: Vec<usize> = (0..stale.len())
                .filter(|&i| i != fresh && !stale[i] && !removed[i])
                .collect();
            for i in targets {
                for &r in &marked {
                    let (off, len) = region_bytes(&layout, r);
                    if let Err(e) = io.copy(
                        (fresh, &*shared.leg(fresh).expect("a leg in use").dev),
                        (i, &*shared.leg(i).expect("a leg in use").dev),
                        off,
                        len,
                    ) {
                        tracing::warn!(volume = name, leg = i, region = r, error = %e, "cannot reconcile a marked region; the leg comes up stale");
                        stale[i] = true;
                        break;
                    }
                }
            }
            tracing::warn!(
                volume = name,
                regions = marked.len(),
                "unclean stop: marked regions made identical"
            );
        }
        for i in (0..removed.len()).filter(|&i| removed[i]) {
            // The slot starts in sync (and slot 0 as primary) in the assembled volume: take it
            // out first, handing the primary to the freshest leg, so a placeholder device is
            // never read, written or copied from.
            shared
                .states
                .take_out(i, LegState::Faulted, Some(fresh))
                .and_then(|_| shared.states.remove(i))
                .map_err(|r| meta_err(i, format!("cannot retire the removed slot: {r:?}")))?;
            tracing::info!(volume = name, leg = i, "leg slot removed by the operator");
        }
        if newer.is_some() {
            // Fenced at start: the legs of the newer epoch belong to the new primary. They
            // are taken out, so this start writes neither bitmap nor superblock there.
            for (i, sb) in sbs.iter().enumerate() {
                if sb.as_ref().is_some_and(|s| s.epoch > epoch) && shared.leg(i).is_some() {
                    stale[i] = true;
                }
            }
        }
        for (i, &is_stale) in stale.iter().enumerate() {
            if !is_stale {
                continue;
            }
            // A leg the operator detached stays detached; any other stale leg is faulted
            // (and resynced by whoever runs the volume).
            let detached =
                (sbs[i].is_some() || unreachable[i]) && f.member_states[i] == MemberState::Detached;
            let to = if detached {
                LegState::Detached
            } else {
                LegState::Faulted
            };
            let _ = shared.states.take_out(i, to, Some(fresh));
            let missed = &shared.leg(i).expect("a leg in use").missed;
            if sbs[i].is_none() && !unreachable[i] {
                missed.mark_all();
            } else {
                marked.iter().for_each(|&r| missed.mark_region(r));
            }
            tracing::warn!(
                volume = name,
                leg = i,
                regions = missed.count(),
                state = %to,
                "stale leg: out of I/O until its regions are resynced"
            );
        }
        // Every in-sync leg gets the union bitmap, then the new superblocks.
        {
            let mut io = meta.lock_io();
            let snap = shared.states.snapshot();
            for (i, leg) in shared
                .legs
                .iter()
                .enumerate()
                .filter_map(|(i, l)| Some((i, l.get()?)))
            {
                if snap.state(i) == LegState::InSync {
                    io.write_bytes(i, &*leg.dev, layout.bitmap_offset, &union)
                        .map_err(|e| meta_err(i, format!("writing the bitmap: {e}")))?;
                }
            }
        }
        let failed = meta.write_superblocks_now(&shared, false, true);
        meta.lock_io().set_timeout(shared.cfg.io_timeout);
        meta.lock_sb_io().set_timeout(shared.cfg.io_timeout);
        if failed != 0 {
            let leg = failed.trailing_zeros() as usize;
            return Err(meta_err(leg, "cannot write the superblock".into()));
        }
        crate::recorder::spawn(&shared)
            .map_err(|e| meta_err(fresh, format!("cannot start the metadata thread: {e}")))?;
        tracing::info!(
            volume = name,
            fresh,
            clean,
            marked = marked.len(),
            "persistent volume opened"
        );
        vol.shared().tell_catch_up();
        Ok(vol)
    }

    /// The regions leg `leg` must get from an in-sync leg before it is in sync again.
    pub fn regions_to_resync(&self, leg: usize) -> Result<Vec<u64>> {
        self.missed_regions(leg)
    }

    /// Clears the marked regions that are idle (nothing written for
    /// [`BitmapConfig::idle_delay`](crate::BitmapConfig::idle_delay), nothing in flight, not
    /// missed by an out-of-sync leg) — and, over
    /// [`BitmapConfig::max_marked_regions`](crate::BitmapConfig::max_marked_regions), the oldest
    /// others — and writes the pages that changed. A timer calls this; pages whose writer lock
    /// is busy are left for the next call. Returns the number of regions cleared.
    pub fn clear_idle_regions(&self, now: Instant) -> Result<u64> {
        let shared = self.shared();
        let meta = self.persistent()?;
        let bm = shared.bitmap.as_ref().expect("persistent");
        let keep = |r: u64| {
            let snap = shared.states.snapshot();
            // A region a write failed on everywhere stays marked until it is reconciled.
            shared.diverged.contains(r)
                || (0..snap.leg_count()).any(|i| {
                    !matches!(snap.state(i), LegState::InSync | LegState::Removed)
                        && shared.leg(i).is_some_and(|l| l.missed.contains(r))
                })
        };
        let candidates = {
            let mut clock = bm.clock.lock().unwrap_or_else(|e| e.into_inner());
            let b = &shared.cfg.bitmap;
            bm.clear_candidates(&mut clock, now, b.idle_delay, b.max_marked_regions, &keep)
        };
        let mut by_page: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for r in candidates {
            by_page
                .entry((r / crate::bitmap::REGIONS_PER_PAGE) as u32)
                .or_default()
                .push(r);
        }
        let mut cleared = 0;
        let mut buf = vec![0u8; BITMAP_PAGE as usize];
        for (page, regions) in by_page {
            if !bm.try_lock(page) {
                continue;
            }
            let n = regions.iter().filter(|&&r| bm.try_clear(r, &keep)).count() as u64;
            if n > 0 {
                bm.cleared(page);
                let gen = bm.snapshot(page, &mut buf);
                let snap = shared.states.snapshot();
                let mut io = meta.lock_io();
                let in_sync: Vec<_> = shared
                    .legs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, l)| Some((i, l.get()?)))
                    .filter(|&(i, _)| snap.state(i) == LegState::InSync)
                    .collect();
                // The writes the cleared bits covered are done: make them durable on every
                // in-sync leg before the cleared page can be (md's PREFLUSH), so a power loss
                // never leaves a clear bit over data that is only in one leg's cache.
                let mut ok = true;
                for &(i, leg) in &in_sync {
                    if let Err(e) = io.flush(i, &*leg.dev) {
                        tracing::warn!(volume = %shared.name, leg = i, error = %e, "flush before a bitmap clear failed; page left set on disk");
                        ok = false;
                    }
                }
                let flushed = ok;
                for &(i, leg) in in_sync.iter().filter(|_| flushed) {
                    let at = meta.layout.bitmap_offset + u64::from(page) * BITMAP_PAGE;
                    if let Err(e) = io.write_page(i, &*leg.dev, at, &buf) {
                        tracing::warn!(volume = %shared.name, leg = i, error = %e, "cleared bitmap page not written");
                        ok = false;
                    }
                }
                if ok {
                    bm.written(page, gen, &buf);
                }
                cleared += n;
            }
            bm.unlock(page);
        }
        Ok(cleared)
    }

    /// Stops a persistent volume cleanly: flushes every in-sync leg and sets the clean flag
    /// in their superblocks, so the next start needs no resync. Every queue pair must be
    /// closed (dropped) first.
    pub fn shutdown_clean(self) -> Result<()> {
        let shared = Arc::clone(self.shared());
        let meta = self.persistent()?;
        // The metadata thread holds the volume while it works; from here on this thread
        // writes the superblocks.
        meta.recorder.pause();
        if Arc::strong_count(&shared) > 2 {
            meta.recorder.resume();
            return Err(Error::Busy {
                volume: shared.name.clone(),
                reason: "queue pairs are still open".into(),
            });
        }
        if let Some(why) = shared.fence.reason() {
            // Another node holds the remote legs now: nothing is written to them, and the
            // local legs keep their bitmap, the record of what this node wrote alone (a
            // rejoin folds it into the new primary's resync). The next start is fenced again.
            tracing::warn!(volume = %shared.name, "fenced ({why}): stopped as it is, not marked clean");
            return Ok(());
        }
        // Writes that failed on every leg, or were cut off in flight at teardown, may have
        // left the in-sync legs different: make them agree before calling them clean.
        if !shared.diverged.regions().is_empty() {
            let n = self.reconcile_failed_writes()?;
            tracing::info!(volume = %shared.name, regions = n, "reconciled before the clean shutdown");
        }
        let snap = shared.states.snapshot();
        {
            let mut io = meta.lock_io();
            for (i, leg) in shared
                .legs
                .iter()
                .enumerate()
                .filter_map(|(i, l)| Some((i, l.get()?)))
            {
                if snap.state(i) == LegState::InSync {
                    io.flush(i, &*leg.dev).map_err(|reason| Error::Metadata {
                        volume: shared.name.clone(),
                        leg: i,
                        name: leg.dev.name().to_string(),
                        reason: format!("flush: {reason}"),
                    })?;
                }
            }
        }
        // A bumped counter: a leg that missed this write (out of sync now, recorded or not)
        // cannot tie with the legs that got it.
        let failed = meta.write_superblocks_now(&shared, true, true);
        if failed != 0 {
            let leg = failed.trailing_zeros() as usize;
            return Err(Error::Metadata {
                volume: shared.name.clone(),
                leg,
                name: shared
                    .leg(leg)
                    .expect("a leg in use")
                    .dev
                    .name()
                    .to_string(),
                reason: "cannot write the clean superblock".into(),
            });
        }
        tracing::info!(volume = %shared.name, "clean shutdown");
        Ok(())
    }

    /// The regions marked in the write-intent bitmap (persistent volumes), ascending.
    pub fn marked_regions(&self) -> Result<Vec<u64>> {
        self.persistent()?;
        Ok(self
            .shared()
            .bitmap
            .as_ref()
            .map(WriteIntentBitmap::marked_regions)
            .unwrap_or_default())
    }

    /// How many regions are marked (persistent volumes; 0 otherwise).
    pub fn marked_region_count(&self) -> u64 {
        self.shared()
            .bitmap
            .as_ref()
            .map_or(0, WriteIntentBitmap::marked_count)
    }

    /// Whether region `region` is marked (persistent volumes; false otherwise).
    pub fn region_marked(&self, region: u64) -> bool {
        self.shared()
            .bitmap
            .as_ref()
            .is_some_and(|b| b.is_marked(region))
    }

    /// The metadata layout of a persistent volume.
    pub fn metadata_layout(&self) -> Option<MetadataLayout> {
        self.shared().meta.as_ref().map(|m| m.layout)
    }

    /// The event counter last written to the superblocks (persistent volumes).
    pub fn event_counter(&self) -> Option<u64> {
        self.shared()
            .meta
            .as_ref()
            .map(|m| m.events.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn persistent(&self) -> Result<&PersistentMeta> {
        self.shared()
            .meta
            .as_ref()
            .ok_or_else(|| Error::NotPersistent {
                volume: self.shared().name.clone(),
            })
    }
}

/// Byte offset on a leg and length of region `r`'s data.
fn region_bytes(layout: &MetadataLayout, r: u64) -> (u64, u64) {
    let start = r * layout.region_size;
    let end = (start + layout.region_size).min(layout.data_blocks * u64::from(layout.lba_size));
    (layout.data_offset + start, end - start)
}

/// The layout of a new persistent volume, with its configuration checked.
fn persistent_layout(
    name: &str,
    cfg: &VolumeConfig,
    lba_size: u32,
    blocks: u64,
) -> Result<MetadataLayout> {
    let err = |reason: String| Error::Config {
        volume: name.to_string(),
        reason,
    };
    let (lo, hi) = REGION_SIZE_RANGE;
    if !(lo..=hi).contains(&cfg.region_size) {
        return Err(err(format!(
            "region_size = {} must be 64 KiB..=64 MiB for a persistent volume",
            cfg.region_size
        )));
    }
    if name.len() > 64 {
        return Err(err("a persistent volume's name is at most 64 bytes".into()));
    }
    MetadataLayout::compute(blocks * u64::from(lba_size), lba_size, cfg.region_size)
        .ok_or_else(|| err("the legs are too small for the metadata".into()))
}

impl VolumeShared {
    /// Writes a snapshot of the whole write-intent bitmap to leg `leg` and flushes it, before
    /// the leg is brought back in sync (the resync engine's last step on a persistent
    /// volume), on the metadata thread (`io` is its `sb_io`). Bits set after the snapshot are
    /// on the other in-sync legs, whose union is what a start-up reads.
    pub(crate) fn write_whole_bitmap_with(
        &self,
        io: &mut ControlIo,
        leg: usize,
    ) -> std::result::Result<(), String> {
        let (Some(meta), Some(bm)) = (self.meta.as_ref(), self.bitmap.as_ref()) else {
            return Ok(());
        };
        let dev = Arc::clone(&self.leg(leg).ok_or_else(|| format!("no leg {leg}"))?.dev);
        let layout = meta.layout;
        let mut page = vec![0u8; BITMAP_PAGE as usize];
        for p in 0..bm.pages() as u32 {
            bm.snapshot(p, &mut page);
            io.write_page(
                leg,
                &*dev,
                layout.bitmap_offset + u64::from(p) * BITMAP_PAGE,
                &page,
            )
            .map_err(|e| format!("writing bitmap page {p}: {e}"))?;
        }
        io.flush(leg, &*dev).map_err(|e| format!("flush: {e}"))?;
        Ok(())
    }

    /// Asks the metadata thread for the whole bitmap on leg `leg` (see
    /// [`write_whole_bitmap_with`](Self::write_whole_bitmap_with)); `None` on a volume without
    /// metadata, else the ticket to poll with
    /// [`whole_bitmap_written`](Self::whole_bitmap_written). Never blocks.
    pub(crate) fn request_whole_bitmap(&self, leg: usize) -> Option<u64> {
        Some(self.recorder()?.request_whole_bitmap(leg))
    }

    /// `Some(true)` once the whole-bitmap write `ticket` is durable on leg `leg`,
    /// `Some(false)` when it failed, `None` while it runs.
    pub(crate) fn whole_bitmap_written(&self, leg: usize, ticket: u64) -> Option<bool> {
        self.recorder()
            .map_or(Some(true), |r| r.whole_bitmap_done(leg, ticket))
    }

    /// Asks the metadata thread to record the legs' states in the superblocks (persistent
    /// volumes only). Never blocks; a write acknowledged after a state change waits for it.
    pub(crate) fn persist_leg_states(&self) {
        if let Some(rec) = self.recorder() {
            rec.wake();
        }
    }
}

/// The leg whose superblock is the freshest: the highest event counter. Legs tie only when
/// they took the same round; among them a leg that a tied superblock names out of sync is
/// never taken (its own superblock may predate what it missed), then the lowest index.
pub(crate) fn elect_freshest(sbs: &[Option<Box<Superblock>>]) -> Option<usize> {
    let top = sbs.iter().flatten().map(|s| s.event_counter).max()?;
    let tied: Vec<usize> = (0..sbs.len())
        .filter(|&i| sbs[i].as_ref().is_some_and(|s| s.event_counter == top))
        .collect();
    let named_out = |leg: usize| {
        tied.iter().any(|&j| {
            let sb = sbs[j].as_ref().expect("tied legs have superblocks");
            leg < MAX_LEGS && sb.member_states[leg] != MemberState::InSync
        })
    };
    tied.iter()
        .copied()
        .find(|&i| !named_out(i))
        .or_else(|| tied.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legs::LegStates;

    fn superblocks(events: [u64; 3], faulted: &[usize]) -> Vec<Option<Box<Superblock>>> {
        let layout = MetadataLayout::compute(64 << 20, 512, 1 << 20).unwrap();
        let meta = PersistentMeta::new(
            Uuid::new_random(),
            [Uuid::new_random(); MAX_LEGS],
            layout,
            1,
            0,
            std::time::Duration::from_secs(1),
        );
        let states = LegStates::new(3);
        for &f in faulted {
            states.take_out(f, LegState::Faulted, None).unwrap();
        }
        (0..3)
            .map(|i| {
                let sb = meta.superblock("v", 3, i, states.snapshot(), events[i], false);
                Some(Box::new(sb))
            })
            .collect()
    }

    #[test]
    fn the_highest_event_counter_is_the_freshest() {
        assert_eq!(elect_freshest(&superblocks([4, 6, 5], &[])), Some(1));
    }

    #[test]
    fn a_tie_never_elects_a_leg_a_tied_superblock_names_stale() {
        // Legs 0 and 2 hold counter 7, and leg 2's superblock says leg 0 is faulted: leg 0
        // wrote its own before it missed anything, so leg 2 is the freshest.
        let mut sbs = superblocks([7, 3, 7], &[0]);
        let mut own = superblocks([7, 3, 7], &[]);
        sbs[0] = own[0].take();
        assert_eq!(elect_freshest(&sbs), Some(2));
        // With nobody named out, the lowest index wins the tie.
        assert_eq!(elect_freshest(&superblocks([7, 3, 7], &[])), Some(0));
        assert_eq!(elect_freshest(&[None, None]), None);
    }
}
