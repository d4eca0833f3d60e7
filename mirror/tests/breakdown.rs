//! The per-stage latency breakdown: off records nothing; on, the stages are in order, the
//! intervals add up, and a delayed mirror leg is the one every mirrored write waits for.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_mirror::breakdown::{Interval, PathKind};
use nvmirror_mirror::{Breakdown, BreakdownConfig, Volume, VolumeConfig};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};

const DEPTH: u32 = 8;

fn legs(uris: &[&str]) -> Vec<Arc<dyn BlockDevice>> {
    uris.iter().map(|u| open_leg(u).unwrap()).collect()
}

/// Runs `count` 4 KiB commands of `op` at queue depth `DEPTH` through a fresh queue pair of
/// `vol`, then closes it.
fn drive(vol: &Volume, op: IoOp, count: u32) {
    let mut qp = vol.open_volume_qpair(DEPTH).unwrap();
    let mut pool = DmaPool::new(DEPTH, 4096);
    let bufs: Vec<_> = std::iter::from_fn(|| pool.get()).collect();
    let mut cpl = [Completion::default(); DEPTH as usize];
    let (mut sent, mut done) = (0u32, 0u32);
    let mut free: Vec<u64> = (0..u64::from(DEPTH)).collect();
    while done < count {
        while sent < count {
            let Some(slot) = free.pop() else { break };
            let slba = u64::from(sent % 256) * 8;
            let cmd = IoCommand::with_buf(op, slba, 8, bufs[slot as usize].io_buf(), slot);
            // SAFETY: the buffer stays in `bufs` until the pool is emptied after every
            // command has completed.
            unsafe { qp.submit(cmd) }.unwrap();
            sent += 1;
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success(), "{}", c.status);
            free.push(c.tag);
        }
        done += n as u32;
    }
    drop(qp);
    for b in bufs {
        pool.put(b);
    }
}

fn on(vol: &Volume) {
    vol.set_breakdown(Some(BreakdownConfig::default()));
}

#[test]
fn off_records_nothing() {
    let vol = Volume::new(
        "v",
        legs(&["mem://4MiB", "mem://4MiB"]),
        VolumeConfig::default(),
    )
    .unwrap();
    drive(&vol, IoOp::Write, 200);
    assert!(vol.take_breakdown().is_none());
    let mut qp = vol.open_volume_qpair(4).unwrap();
    assert!(qp.take_breakdown().is_none());
    // Turned off again after being on: queue pairs opened afterwards record nothing.
    on(&vol);
    vol.set_breakdown(None);
    drive(&vol, IoOp::Write, 50);
    assert!(vol.take_breakdown().is_none());
}

/// Checks what every recorded breakdown must satisfy: every stage of every command recorded,
/// nothing out of order, and each interval within the whole path.
fn check_consistent(b: &Breakdown, kind: PathKind, legs: &[usize], commands: u64) {
    assert_eq!(b.out_of_order(), 0);
    assert_eq!(b.abandoned(), 0);
    let total = b.summary(kind, Interval::Total);
    assert_eq!(total.count, commands, "{kind:?}");
    let mut chain = vec![
        Interval::ToSubmit,
        Interval::LastLegToJoin,
        Interval::JoinToAck,
    ];
    chain.extend(legs.iter().map(|&l| Interval::Leg(l)));
    for i in chain {
        let s = b.summary(kind, i);
        assert_eq!(s.count, commands, "{kind:?} {i:?}");
        assert!(
            s.p50 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max,
            "{i:?}: {s:?}"
        );
        // 1 % histogram resolution on each side.
        assert!(
            s.max as f64 <= total.max as f64 * 1.02 + 1.0,
            "{i:?} max {} > whole path max {}",
            s.max,
            total.max
        );
    }
    // The stages of one command tile its path: the medians of the pieces along the slowest
    // leg cannot exceed the whole (within resolution and the join-to-ack batching).
    let slowest = legs
        .iter()
        .map(|&l| b.summary(kind, Interval::Leg(l)).p50)
        .max()
        .unwrap();
    assert!(slowest as f64 <= total.p50 as f64 * 1.02 + 1.0);
}

#[test]
fn a_delayed_mirror_is_last_in_nearly_every_write_by_about_its_delay() {
    let delay = Duration::from_micros(300);
    let vol = Volume::new(
        "v",
        legs(&["mem://4MiB", "mem://4MiB?latency=300us"]),
        VolumeConfig::default(),
    )
    .unwrap();
    on(&vol);
    drive(&vol, IoOp::Write, 400);
    let b = vol
        .take_breakdown()
        .expect("the closed queue pair handed its breakdown over");
    assert!(
        vol.take_breakdown().is_none(),
        "taking it empties the volume's"
    );
    check_consistent(&b, PathKind::Write, &[0, 1], 400);
    assert!(!b.has_bitmap_stage());
    assert_eq!(
        b.summary(PathKind::Write, Interval::ReceivedToBitmap).count,
        0
    );
    assert_eq!(b.summary(PathKind::Read, Interval::Total).count, 0);

    let last = b.last_legs();
    let slow = last.iter().find(|l| l.leg == 1).expect("leg 1 was last");
    assert!(slow.share >= 0.98, "{last:?}");
    assert_eq!(last.iter().map(|l| l.count).sum::<u64>(), 400);
    // The gap is the added latency, give or take the polls around it.
    let gap = slow.gap.p50 as f64;
    let d = delay.as_nanos() as f64;
    assert!(
        gap >= d * 0.8 && gap <= d * 2.0,
        "gap p50 {gap} ns for a {d} ns delay"
    );
    let leg1 = b.summary(PathKind::Write, Interval::Leg(1)).p50 as f64;
    assert!(
        leg1 >= d * 0.98,
        "leg 1's service time {leg1} ns < its delay {d} ns"
    );
    let leg0 = b.summary(PathKind::Write, Interval::Leg(0)).p50 as f64;
    assert!(leg0 < d / 2.0, "leg 0 {leg0} ns");
}

#[test]
fn reads_go_through_one_leg_and_a_bitmap_adds_its_stage() {
    let vol = Volume::format(
        "v",
        legs(&["mem://8MiB", "mem://8MiB"]),
        VolumeConfig::default(),
        true,
    )
    .unwrap();
    on(&vol);
    drive(&vol, IoOp::Write, 100);
    drive(&vol, IoOp::Read, 100);
    let b = vol.take_breakdown().unwrap();
    check_consistent(&b, PathKind::Write, &[0, 1], 100);
    check_consistent(&b, PathKind::Read, &[0], 100);
    assert!(b.has_bitmap_stage());
    assert_eq!(
        b.summary(PathKind::Write, Interval::ReceivedToBitmap).count,
        100
    );
    // Reads go to the primary only, and take no bitmap stage.
    assert_eq!(b.summary(PathKind::Read, Interval::Leg(1)).count, 0);
    assert_eq!(
        b.summary(PathKind::Read, Interval::ReceivedToBitmap).count,
        0
    );
    assert_eq!(b.last_legs().iter().map(|l| l.count).sum::<u64>(), 100);
}

#[test]
fn warmup_commands_are_not_recorded_and_a_queue_pair_can_be_drained_directly() {
    let vol = Volume::new(
        "v",
        legs(&["mem://4MiB", "mem://4MiB"]),
        VolumeConfig::default(),
    )
    .unwrap();
    vol.set_breakdown(Some(BreakdownConfig {
        warmup: Duration::from_secs(3600),
    }));
    drive(&vol, IoOp::Write, 100);
    let b = vol.take_breakdown().unwrap();
    assert!(b.is_empty());

    let mut qp = vol.open_volume_qpair(DEPTH).unwrap();
    qp.set_breakdown(Some(BreakdownConfig::default()));
    let mut pool = DmaPool::new(1, 4096);
    let buf = pool.get().unwrap();
    for i in 0..10 {
        // SAFETY: `buf` outlives the command, reaped below.
        unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, i * 8, 8, buf.io_buf(), i)) }.unwrap();
        let mut cpl = [Completion::default(); 1];
        while qp.poll(&mut cpl) == 0 {}
    }
    let b = qp.take_breakdown().unwrap();
    assert_eq!(b.summary(PathKind::Write, Interval::Total).count, 10);
    assert!(
        qp.take_breakdown().unwrap().is_empty(),
        "taking starts over"
    );
    drop(qp);
    pool.put(buf);
}
