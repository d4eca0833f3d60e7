//! Promotion and failback (`docs/promotion.md`): the epoch a promoted node serves under, and
//! the old primary's own write-intent bitmap folded into what its leg gets back.
//!
//! A promotion opens the volume from the surviving site's legs and bumps the epoch by one
//! ([`Volume::bump_epoch`]); the old primary's key (the epoch below) is then preempted. When
//! the old primary's leg rejoins as a mirror, its superblock still carries the older epoch
//! and its bitmap names every region it wrote under it, including writes it acknowledged
//! alone after its remote leg was faulted: those regions are added to the leg's missed set
//! ([`Volume::absorb_older_epoch_bitmap`]), so the resync rewrites the union of what either
//! side wrote since the split from the new primary.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::BlockDevice;

use crate::bitmap::{MetadataLayout, WriteIntentBitmap};
use crate::metadata::ControlIo;
use crate::persistent::{read_head, Found};
use crate::superblock::Superblock;
use crate::{Error, Result, Volume};

/// Reads the superblock at the start of `dev` (`None`: the leg is blank). Control plane.
pub fn read_superblock(dev: &dyn BlockDevice, timeout: Duration) -> Result<Option<Superblock>> {
    let mut io = ControlIo::new(timeout);
    Ok(match read_head(&mut io, dev.name(), 0, dev)?.0 {
        Found::Blank => None,
        Found::Superblock(sb) => Some(*sb),
    })
}

impl Volume {
    /// Promotion: raises the epoch by one and writes it to every in-sync leg's superblock
    /// before returning. The new epoch, or an error when no leg took the superblock.
    pub fn bump_epoch(&self) -> Result<u64> {
        let sh = self.shared();
        let meta = sh.meta.as_ref().ok_or_else(|| Error::Config {
            volume: sh.name.clone(),
            reason: "a volume without metadata has no epoch".into(),
        })?;
        let epoch = meta.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let failed = meta.write_superblocks_now(sh, false, true);
        let snap = sh.states.snapshot();
        let in_sync = (0..snap.leg_count())
            .filter(|&i| snap.state(i) == crate::LegState::InSync)
            .count() as u32;
        if failed.count_ones() >= in_sync {
            let leg = failed.trailing_zeros() as usize;
            return Err(Error::Metadata {
                volume: sh.name.clone(),
                leg,
                name: sh.leg_name(leg).to_string(),
                reason: format!("cannot write the superblock of epoch {epoch}"),
            });
        }
        tracing::warn!(volume = %sh.name, epoch, "promoted: the epoch is raised");
        Ok(epoch)
    }

    /// Failback: when leg `leg` carries a superblock of this volume at an **older** epoch (an
    /// old primary coming back as a mirror), marks every region its own bitmap names in the
    /// leg's missed set, so the resync rewrites them from this side: those are the writes it
    /// made after the split that this side never saw, discarded by the split-brain rule.
    /// Returns how many regions that added (0 for a leg of the current epoch, or blank).
    pub fn absorb_older_epoch_bitmap(&self, leg: usize) -> Result<u64> {
        let sh = Arc::clone(self.shared());
        let (Some(meta), Some(bitmap)) = (sh.meta.as_ref(), sh.bitmap.as_ref()) else {
            return Ok(0);
        };
        let l = self.leg(leg)?;
        let epoch = meta.epoch.load(Ordering::Acquire);
        let meta_err = |reason: String| Error::Metadata {
            volume: sh.name.clone(),
            leg,
            name: l.dev.name().to_string(),
            reason,
        };
        let sb = {
            let mut io = meta.lock_io();
            match read_head(&mut io, &sh.name, leg, &*l.dev)?.0 {
                Found::Blank => return Ok(0),
                Found::Superblock(sb) => sb,
            }
        };
        if sb.volume_uuid != meta.volume_uuid || sb.epoch >= epoch {
            return Ok(0);
        }
        let layout = MetadataLayout {
            lba_size: sb.lba_size,
            region_size: sb.region_size,
            regions: (sb.data_blocks * u64::from(sb.lba_size)).div_ceil(sb.region_size),
            bitmap_offset: sb.bitmap_offset,
            bitmap_len: sb.bitmap_len,
            data_offset: sb.data_offset,
            data_blocks: sb.data_blocks,
        };
        let ours = bitmap.layout;
        if layout != ours {
            return Err(meta_err(format!(
                "its layout {layout:?} is not the volume's {ours:?}"
            )));
        }
        let area = meta
            .lock_io()
            .read_bytes(
                leg,
                &*l.dev,
                layout.bitmap_offset,
                layout.bitmap_len as usize,
            )
            .map_err(|r| meta_err(format!("cannot read its bitmap: {r}")))?;
        let theirs = WriteIntentBitmap::new(layout);
        theirs.load(&area);
        let regions = theirs.marked_regions();
        let added = regions.iter().filter(|&&r| !l.missed.contains(r)).count() as u64;
        for r in regions.iter().copied() {
            l.missed.mark_region(r);
        }
        tracing::warn!(
            volume = %sh.name,
            leg,
            leg_epoch = sb.epoch,
            epoch,
            marked = regions.len(),
            added,
            "an old primary rejoins: the regions its bitmap names are rewritten from this side; \
             writes it made there after the split are discarded"
        );
        Ok(added)
    }
}
