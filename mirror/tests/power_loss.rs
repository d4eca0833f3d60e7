//! Power loss with volatile write caches on the legs (docs/bitmap.md, "Ordering on the
//! legs").
//!
//! Each leg is a [`CachedDisk`] (`common/cached_disk.rs`).
//! A persistent volume on two such legs takes stamped writes the way a file system issues them
//! (some with FUA, some followed by a Flush, bitmap clears in between), power is cut on every
//! leg at a random point, and the volume is reopened with crash recovery. Then every write
//! acknowledged with FUA, or acknowledged before a Flush that completed, must be there (its
//! stamp or a newer one for that block), and the legs must be byte-identical.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cached_disk::{CachedDisk, Rng};
use nvmirror_mirror::{BitmapConfig, Volume, VolumeConfig};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp};

const LBA: u32 = 512;
const LEG_BYTES: u64 = 2 << 20;
const REGION: u64 = 64 << 10;
/// Blocks of the exported namespace the workload writes (8 regions).
const SPAN: u64 = 8 * REGION / LBA as u64;
const CUTS: u64 = 100;

/// Block `lba` of write number `seq`: the LBA and the sequence number, then a fill byte.
fn stamp(lba: u64, seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..].fill(seq as u8);
}

fn read_stamp(block: &[u8]) -> (u64, u64) {
    let lba = u64::from_le_bytes(block[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(block[8..16].try_into().unwrap());
    (lba, seq)
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        bitmap: BitmapConfig {
            predict_max: 0,
            ..BitmapConfig::default()
        },
        ..VolumeConfig::default()
    }
}

/// A host command in flight: what the model learns when it completes.
struct InFlight {
    cmd: IoCommand,
    seq: u64,
    /// Kept alive until the completion is reaped.
    _buf: Vec<u8>,
}

/// One life of a volume: format, a workload cut short by a power failure, recovery, checks.
fn one_cut(seed: u64) {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let disks: Vec<Arc<CachedDisk>> = (0..2)
        .map(|i| {
            Arc::new(CachedDisk::new(
                format!("cache://leg{i}"),
                seed * 8 + i,
                LBA,
                LEG_BYTES,
            ))
        })
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = disks
        .iter()
        .map(|d| Arc::clone(d) as Arc<dyn BlockDevice>)
        .collect();
    let vol = Volume::format("pl", devs.clone(), cfg(), false).unwrap();
    let mut qp = vol.open_qpair(32).unwrap();

    // The oldest write each block must still show after the cut (0: none).
    let mut required = vec![0u64; SPAN as usize];
    // Writes acknowledged without FUA since the last completed flush.
    let mut unflushed: Vec<(u64, u32, u64)> = Vec::new();
    let mut seq = 0u64;
    let steps = 20 + rng.below(60);
    let cut_step = rng.below(steps);
    let mut tag = 0u64;
    'life: for step in 0..steps {
        let roll = rng.below(100);
        if roll < 10 {
            vol.clear_idle_regions(Instant::now() + Duration::from_secs(3600))
                .unwrap();
        }
        let mut inflight: BTreeMap<u64, InFlight> = BTreeMap::new();
        if roll < 25 {
            tag += 1;
            let cmd = IoCommand::new(IoOp::Flush, 0, 0, tag);
            // SAFETY: no buffer.
            unsafe { qp.submit(cmd) }.unwrap();
            inflight.insert(
                tag,
                InFlight {
                    cmd,
                    seq: 0,
                    _buf: Vec::new(),
                },
            );
        } else {
            for _ in 0..1 + rng.below(4) {
                seq += 1;
                tag += 1;
                let nlb = 1 + rng.below(8) as u32;
                let slba = rng.below(SPAN - u64::from(nlb));
                let mut buf = vec![0u8; (nlb * LBA) as usize];
                for (i, b) in buf.chunks_mut(LBA as usize).enumerate() {
                    stamp(slba + i as u64, seq, b);
                }
                let mut cmd =
                    IoCommand::with_buf(IoOp::Write, slba, nlb, IoBuf::from_slice(&mut buf), tag);
                if rng.chance(30) {
                    cmd = cmd.with_fua();
                }
                // SAFETY: `buf` moves into `inflight` (its heap memory stays put) and lives
                // until the completion is reaped or the queue pair is gone.
                unsafe { qp.submit(cmd) }.unwrap();
                inflight.insert(
                    tag,
                    InFlight {
                        cmd,
                        seq,
                        _buf: buf,
                    },
                );
            }
        }
        let cut_after = (step == cut_step).then(|| rng.below(6));
        let mut polls = 0;
        let mut cpl = [Completion::default(); 32];
        while !inflight.is_empty() {
            if cut_after == Some(polls) {
                break;
            }
            polls += 1;
            let n = qp.poll(&mut cpl);
            for c in &cpl[..n] {
                let f = inflight.remove(&c.tag).expect("a command of ours");
                assert!(
                    c.status.is_success(),
                    "seed {seed}: {:?} failed: {}",
                    f.cmd,
                    c.status
                );
                match f.cmd.op {
                    IoOp::Flush => {
                        for (slba, nlb, s) in unflushed.drain(..) {
                            for b in slba..slba + u64::from(nlb) {
                                let r = &mut required[b as usize];
                                *r = (*r).max(s);
                            }
                        }
                    }
                    _ if f.cmd.fua => {
                        for b in f.cmd.slba..f.cmd.slba + u64::from(f.cmd.nlb) {
                            let r = &mut required[b as usize];
                            *r = (*r).max(f.seq);
                        }
                    }
                    _ => unflushed.push((f.cmd.slba, f.cmd.nlb, f.seq)),
                }
            }
            assert!(polls < 10_000, "seed {seed}: commands never completed");
        }
        if cut_after.is_some() {
            for d in &disks {
                d.cut_power();
            }
            break 'life;
        }
    }
    for d in &disks {
        d.cut_power();
    }
    drop(qp);
    drop(vol);
    for d in &disks {
        d.power_on();
    }

    let vol = Volume::open_persistent("pl", devs, cfg())
        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
    let layout = vol.metadata_layout().unwrap();
    let data = layout.data_offset as usize
        ..(layout.data_offset + layout.data_blocks * u64::from(LBA)) as usize;
    let legs: Vec<Vec<u8>> = disks.iter().map(|d| read_all(&**d).unwrap()).collect();
    for (b, &want) in required.iter().enumerate() {
        let at = data.start + b * LBA as usize;
        for (leg, image) in legs.iter().enumerate() {
            let (lba, got) = read_stamp(&image[at..at + LBA as usize]);
            if want > 0 {
                assert!(
                    lba == b as u64 && got >= want,
                    "seed {seed}: leg {leg} block {b} holds write {got} (LBA {lba}); write {want} was durable"
                );
            }
        }
    }
    assert!(
        legs[0][data.clone()] == legs[1][data.clone()],
        "seed {seed}: the legs differ after recovery"
    );
}

#[test]
fn acknowledged_durable_writes_survive_power_cuts_and_legs_agree() {
    for seed in 1..=CUTS {
        one_cut(seed);
    }
}
