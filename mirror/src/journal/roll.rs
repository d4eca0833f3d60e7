//! Rolling a committed cycle forward from the staging area onto the image
//! (`docs/cycles.md`, "Crash rules"): each staged run is read back, its CRC checked, and
//! written to the image. Runs that do not overlap go many at once: a run's buffer is read
//! from the staging area and written to the image while the runs after it are being read,
//! one far round trip for many runs instead of two per run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair, Status, SubmitError};

use super::cycle::Short;
use super::dev_io::DevIo;
use super::recover::{read_blocks, SegBuf};
use super::shipper::DEPTH;
use super::staging::{decode_table, Run, RunOp, StagingHeader};
use crate::wait::Backoff;

/// The bytes of runs in flight at most (their buffers), whatever the number of buffers.
const ROLL_BYTES: usize = 8 << 20;

/// Where a buffer's run is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Being read from the staging area.
    Reading(usize),
    /// Read and checked; its write to the image waits for room in the queue.
    Read(usize),
    /// Being written to the image.
    Writing(usize),
}

/// Rolls the committed cycle of `h` forward onto the image from the staging area alone:
/// reads its run table, then every run (checking its CRC) into `bufs` in turn, writes each
/// to the image, then a Flush. Idempotent: a crash in the middle is finished by running it
/// again.
pub(super) fn roll_forward(
    stg: &mut DevIo,
    image: &mut DevIo,
    h: &StagingHeader,
    bufs: &mut [SegBuf],
    stop: &AtomicBool,
) -> Result<(), Short> {
    let bs = h.lba_size;
    let tb = h.table_blocks();
    let mut table = SegBuf::new((tb as usize * bs as usize).max(bs as usize));
    if tb > 0 {
        read_blocks(stg, h.table_lba, tb as u32, &mut table, 0, bs, stop).map_err(Short::Retry)?;
    }
    let runs = decode_table(table.bytes(), h.runs, h.table_crc).map_err(Short::Damaged)?;
    let mut slots = vec![Slot::Free; bufs.len().min(DEPTH as usize)];
    let mut res = Ok(());
    for wave in waves(&runs) {
        res = roll(stg, image, &runs[wave], bufs, &mut slots, bs, stop);
        if res.is_err() {
            break;
        }
    }
    if res.is_err() {
        // A path error may leave a queue pair dead, and commands still out may touch their
        // buffers: both queue pairs are closed, and each buffer in flight is parked on the
        // fence of the one it went to.
        let (sf, imf) = (stg.give_up(), image.give_up());
        for (b, s) in bufs.iter_mut().zip(&slots) {
            match s {
                Slot::Reading(_) => b.park_on(sf.clone()),
                Slot::Writing(_) => b.park_on(imf.clone()),
                Slot::Free | Slot::Read(_) => {}
            }
        }
    }
    super::cycle::shrink(bufs, |i| {
        slots
            .get(i)
            .map_or(true, |s| matches!(s, Slot::Free | Slot::Read(_)))
    });
    res?;
    let c = image.flush(stop)?;
    if c.status.is_success() {
        Ok(())
    } else {
        Err(Short::Retry(format!("flush refused: {}", c.status)))
    }
}

/// The table cut into waves of runs that do not overlap, in table order: the pieces of a
/// catch-up are appended, not merged, so a block rewritten during it is in several pieces,
/// and the later must land last. Each wave ends before the next starts.
fn waves(runs: &[Run]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut seen = rangemap::RangeSet::new();
    let mut start = 0;
    for (i, r) in runs.iter().enumerate() {
        let blocks = r.lba..r.lba + u64::from(r.nlb.max(1));
        if seen.overlaps(&blocks) {
            out.push(start..i);
            seen.clear();
            start = i;
        }
        seen.insert(blocks);
    }
    if start < runs.len() {
        out.push(start..runs.len());
    }
    out
}

/// Rolls `runs`, none overlapping another, onto the image, many at once.
fn roll(
    stg: &mut DevIo,
    image: &mut DevIo,
    runs: &[Run],
    bufs: &mut [SegBuf],
    slots: &mut [Slot],
    bs: u32,
    stop: &AtomicBool,
) -> Result<(), Short> {
    let timeout = stg.timeout.max(image.timeout);
    let (stg_watch, image_watch) = (stg.watch(), image.watch());
    let sq = stg.qp()?;
    let iq = image.qp()?;
    let mut cpl = [Completion::default(); DEPTH as usize];
    let (mut next, mut done) = (0, 0);
    let mut idle = Backoff::new();
    let mut last = Instant::now();
    while done < runs.len() {
        if stop.load(Ordering::Acquire) {
            return Err(Short::Stopped);
        }
        let mut moved = false;
        // Start the next runs while a buffer is free and the bytes out stay in bounds.
        while next < runs.len() {
            let Some(s) = slots.iter().position(|s| *s == Slot::Free) else {
                break;
            };
            let r = runs[next];
            let n = r.nlb as usize * bs as usize;
            let out: usize = slots
                .iter()
                .zip(bufs.iter())
                .filter(|(s, _)| **s != Slot::Free)
                .map(|(_, b)| b.len())
                .sum();
            if out > 0 && out + n > ROLL_BYTES {
                break;
            }
            let started = match r.op {
                RunOp::Write => {
                    bufs[s].ensure(n);
                    let cmd = IoCommand::with_buf(
                        IoOp::Read,
                        r.staged_lba,
                        r.nlb,
                        bufs[s].io(0, n),
                        s as u64,
                    );
                    submit(sq, cmd).then_some(Slot::Reading(next))
                }
                RunOp::WriteZeroes | RunOp::Deallocate => {
                    let op = if r.op == RunOp::WriteZeroes {
                        IoOp::WriteZeroes
                    } else {
                        IoOp::Deallocate
                    };
                    let cmd = IoCommand::new(op, r.lba, r.nlb, s as u64);
                    submit(iq, cmd).then_some(Slot::Writing(next))
                }
            };
            let Some(state) = started else { break };
            slots[s] = state;
            next += 1;
            moved = true;
        }
        // Runs read: check them, then to the image.
        let n = sq.poll(&mut cpl);
        for c in &cpl[..n] {
            let s = c.tag as usize;
            let Slot::Reading(i) = slots[s] else {
                return Err(Short::Damaged(format!(
                    "a completion with tag {s} no read was sent with"
                )));
            };
            if !c.status.is_success() {
                slots[s] = Slot::Free;
                stg_watch.saw(c.status);
                return Err(refused(
                    "reading the staged run at block",
                    runs[i].staged_lba,
                    c.status,
                ));
            }
            let r = runs[i];
            let len = r.nlb as usize * bs as usize;
            if crc32c::crc32c(&bufs[s].bytes()[..len]) != r.crc {
                slots[s] = Slot::Free;
                return Err(Short::Damaged(format!(
                    "staged run at block {} (image blocks {}+{}) fails its CRC",
                    r.staged_lba, r.lba, r.nlb
                )));
            }
            slots[s] = Slot::Read(i);
            moved = true;
        }
        for s in 0..slots.len() {
            let Slot::Read(i) = slots[s] else { continue };
            let r = runs[i];
            let len = r.nlb as usize * bs as usize;
            let cmd = IoCommand::with_buf(IoOp::Write, r.lba, r.nlb, bufs[s].io(0, len), s as u64);
            if !submit(iq, cmd) {
                break;
            }
            slots[s] = Slot::Writing(i);
        }
        // Runs written.
        let n = iq.poll(&mut cpl);
        for c in &cpl[..n] {
            let s = c.tag as usize;
            let Slot::Writing(i) = slots[s] else {
                return Err(Short::Damaged(format!(
                    "a completion with tag {s} no write was sent with"
                )));
            };
            slots[s] = Slot::Free;
            if !c.status.is_success() {
                image_watch.saw(c.status);
                let r = runs[i];
                return Err(Short::Retry(format!(
                    "the image refused blocks {}+{}: {}",
                    r.lba, r.nlb, c.status
                )));
            }
            done += 1;
            moved = true;
        }
        if moved {
            idle.worked();
            last = Instant::now();
        } else if last.elapsed() > timeout {
            return Err(Short::Retry(format!(
                "rolling the cycle forward: no answer within {timeout:?}"
            )));
        } else {
            idle.wait();
        }
    }
    Ok(())
}

/// Submits `cmd`; false when the queue is full (try again after a poll).
fn submit(qp: &mut dyn QueuePair, cmd: IoCommand) -> bool {
    // SAFETY: `cmd`'s buffer (if any) is one of the roll-forward's buffers, neither touched
    // nor freed while its slot is not free: its completion frees the slot, and a failure
    // parks the buffer on the queue pair's fence (`roll_forward`).
    match unsafe { qp.submit(cmd) } {
        Ok(()) => true,
        Err(SubmitError::QueueFull) => false,
    }
}

fn refused(what: &str, lba: u64, s: Status) -> Short {
    Short::Retry(format!("{what} {lba}: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lba: u64, nlb: u32) -> Run {
        Run {
            lba,
            nlb,
            op: RunOp::Write,
            staged_lba: 0,
            crc: 0,
        }
    }

    #[test]
    fn a_run_overlapping_one_before_it_starts_a_new_wave() {
        let runs = [
            run(0, 4),
            run(4, 4),
            run(2, 1),
            run(10, 1),
            run(1, 2),
            run(4, 1),
        ];
        assert_eq!(waves(&runs), vec![0..2, 2..4, 4..6]);
        assert_eq!(waves(&runs[..2]), vec![0..2]);
        assert!(waves(&[]).is_empty());
    }
}
