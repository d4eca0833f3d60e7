//! `async-journal` legs: the far device always holds a crash-consistent prefix of the
//! acknowledged writes, shipping survives a crash of the sender and a lost link, and a
//! journal that hits its bound steps the leg down instead of blocking the host.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cached_disk::CachedDisk;
use nvmirror_mirror::{
    JobState, JournalConfig, JournaledLeg, LegState, ResyncConfig, Volume, VolumeConfig,
};
use nvmirror_nvme::backend::{Fault, FaultyDevice, OpFilter};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
/// Blocks the writers touch (a small area, so writes overlap often).
const AREA: u64 = 256;
const DEPTH: u32 = 16;

/// One host write: its blocks and when (in the writer's event count) it was submitted and
/// acknowledged.
#[derive(Clone, Copy, Debug)]
struct Rec {
    slba: u64,
    nlb: u32,
    sub: u64,
    ack: u64,
}

/// The write id stamped in block `b` of `image` (0: never written).
fn stamp(image: &[u8], b: u64) -> u64 {
    let at = b as usize * BS;
    u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
}

/// Checks that `image` could be left by a crash at some instant: there is a moment `t` such
/// that every write acknowledged before `t` is there (or overwritten by a later write to the
/// same block) and no write submitted after `t` is. Write `i` is `recs[i - 1]`.
fn assert_crash_consistent(image: &[u8], recs: &[Rec], when: &str) {
    let mut t = 0;
    for b in 0..AREA {
        let s = stamp(image, b);
        if s == 0 {
            continue;
        }
        let r = recs
            .get(s as usize - 1)
            .unwrap_or_else(|| panic!("{when}: block {b} holds write {s}, never issued"));
        assert!(
            b >= r.slba && b < r.slba + u64::from(r.nlb),
            "{when}: block {b} holds write {s}, which did not touch it"
        );
        t = t.max(r.sub);
    }
    for (i, r) in recs.iter().enumerate() {
        let id = i as u64 + 1;
        if r.ack >= t {
            continue;
        }
        for b in r.slba..r.slba + u64::from(r.nlb) {
            let s = stamp(image, b);
            assert!(
                s >= id,
                "{when}: write {id} (blocks {}+{}) was acknowledged at event {} before write {} \
                 at block {b}'s neighbour was submitted (event {t}), yet block {b} holds write {s}",
                r.slba,
                r.nlb,
                r.ack,
                recs.iter().position(|x| x.sub == t).map_or(0, |p| p + 1),
            );
        }
    }
}

/// A volume of a local leg and an async-journal far leg.
struct Rig {
    local: Arc<dyn BlockDevice>,
    far: Arc<FaultyDevice>,
    journal: Arc<dyn BlockDevice>,
    /// The far site's staging area, for a leg opened with one.
    staging: Option<Arc<FaultyDevice>>,
    leg: Arc<JournaledLeg>,
    vol: Volume,
}

fn far_mem() -> Arc<FaultyDevice> {
    Arc::new(FaultyDevice::wrap(
        open_leg("mem://4MiB?lba=4096&latency=50us").unwrap(),
    ))
}

fn rig(cfg: JournalConfig) -> Rig {
    rig_on(far_mem(), cfg)
}

fn rig_on(far: Arc<FaultyDevice>, cfg: JournalConfig) -> Rig {
    rig_with(far, None, cfg)
}

/// A rig whose leg has a staging area at the far site (`JournaledLeg::open_staged`).
fn rig_staged(cfg: JournalConfig) -> Rig {
    let staging = Arc::new(FaultyDevice::wrap(
        open_leg("mem://8MiB?lba=4096&latency=50us").unwrap(),
    ));
    rig_with(far_mem(), Some(staging), cfg)
}

fn rig_with(far: Arc<FaultyDevice>, staging: Option<Arc<FaultyDevice>>, cfg: JournalConfig) -> Rig {
    let local = open_leg("mem://4MiB?lba=4096&latency=100us").unwrap();
    // Sparse: room for every write the tests make, however far the far leg lags.
    let journal = open_leg("mem://256MiB?lba=4096").unwrap();
    let far_dev = Arc::clone(&far) as Arc<dyn BlockDevice>;
    let leg = Arc::new(
        match &staging {
            None => JournaledLeg::open(far_dev, Arc::clone(&journal), cfg),
            Some(stg) => JournaledLeg::open_staged(
                far_dev,
                Arc::clone(&journal),
                Arc::clone(stg) as Arc<dyn BlockDevice>,
                false,
                cfg,
            ),
        }
        .unwrap(),
    );
    let vol = Volume::new(
        "jv",
        vec![Arc::clone(&local), Arc::clone(&leg) as Arc<dyn BlockDevice>],
        VolumeConfig::default(),
    )
    .unwrap();
    Rig {
        local,
        far,
        journal,
        staging,
        leg,
        vol,
    }
}

/// Drives `writes` stamped writes at queue depth `DEPTH` through `qp`, calling `sample`
/// every `every` acknowledgements with the records so far.
#[allow(clippy::too_many_arguments)]
fn write_stamped(
    qp: &mut dyn QueuePair,
    recs: &mut Vec<Rec>,
    clock: &mut u64,
    writes: usize,
    seed: u64,
    mut sample: impl FnMut(&[Rec]),
    every: usize,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut pool = DmaPool::new(DEPTH, 8 * BS);
    let mut bufs: Vec<_> = (0..DEPTH).map(|_| pool.get().unwrap()).collect();
    let mut free: Vec<usize> = (0..DEPTH as usize).collect();
    let (mut issued, mut acked) = (0, 0);
    let mut cpl = [Completion::default(); DEPTH as usize];
    while acked < writes {
        while issued < writes {
            let Some(slot) = free.pop() else { break };
            let nlb = rng.gen_range(1..=8u32);
            let slba = rng.gen_range(0..=AREA - u64::from(nlb));
            let id = recs.len() as u64 + 1;
            for blk in bufs[slot].as_mut_slice()[..nlb as usize * BS].chunks_mut(BS) {
                blk.fill(id as u8);
                blk[..8].copy_from_slice(&id.to_le_bytes());
            }
            *clock += 1;
            recs.push(Rec {
                slba,
                nlb,
                sub: *clock,
                ack: u64::MAX,
            });
            let tag = (slot as u64) << 32 | (id - 1);
            let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, bufs[slot].io_buf(), tag);
            // SAFETY: the slot's buffer is written again only after its completion is reaped.
            unsafe { qp.submit(cmd) }.unwrap();
            issued += 1;
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success(), "host write failed: {}", c.status);
            *clock += 1;
            recs[(c.tag & 0xffff_ffff) as usize].ack = *clock;
            free.push((c.tag >> 32) as usize);
            acked += 1;
            if acked % every == 0 {
                sample(recs);
            }
        }
    }
    drop(bufs);
}

/// Host writes the staging area of `rig_staged` can hold during a catch-up, beside the copy
/// of the whole area: at most 8 blocks each, with the copy's 256 under its 2048.
const CATCH_UP_WRITES: usize = 192;

/// Drives stamped writes (at most [`CATCH_UP_WRITES`], `batch` at a time, from `seed` on)
/// while `job` runs, calling `sample` every `every` acknowledgements, and every few
/// milliseconds once the budget is spent; the job's end.
#[allow(clippy::too_many_arguments)]
fn writes_through_catch_up(
    job: std::thread::JoinHandle<nvmirror_mirror::ResyncStatus>,
    qp: &mut dyn QueuePair,
    recs: &mut Vec<Rec>,
    clock: &mut u64,
    (batch, every): (usize, usize),
    mut seed: u64,
    mut sample: impl FnMut(&[Rec]),
) -> nvmirror_mirror::ResyncStatus {
    let mut written = 0;
    while !job.is_finished() {
        if written < CATCH_UP_WRITES {
            write_stamped(qp, recs, clock, batch, seed, &mut sample, every);
            written += batch;
            seed += 1;
        } else {
            sample(recs);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    job.join().unwrap()
}

/// Reads the far device's image while its writes are held (the moment a crash would
/// freeze), then lets them go on.
fn sample_far(far: &FaultyDevice) -> Vec<u8> {
    let id = far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let image = read_all(&**far.inner()).unwrap();
    far.injector().clear(id);
    image
}

#[test]
fn the_far_leg_always_holds_a_crash_consistent_prefix_and_ends_identical() {
    let r = rig(JournalConfig::default());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    let mut samples = 0;
    let mut behind = 0;
    let far = Arc::clone(&r.far);
    write_stamped(
        &mut *qp,
        &mut recs,
        &mut clock,
        4000,
        1,
        |recs| {
            let image = sample_far(&far);
            assert_crash_consistent(&image, recs, "sample");
            samples += 1;
            let acked = recs.iter().filter(|r| r.ack != u64::MAX).count();
            let visible = (0..AREA).map(|b| stamp(&image, b)).max().unwrap_or(0);
            if (visible as usize) < acked {
                behind += 1;
            }
        },
        97,
    );
    assert!(samples >= 40);
    // The far leg lags (50 µs per segment, and its writes are held while sampling) and the samples saw it behind at least once: the
    // checker looked at images that were not simply the latest.
    assert!(behind > 0, "the far leg never lagged in {samples} samples");
    let st = r.leg.replication().unwrap();
    assert_eq!(st.mode, "async-journal");
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st2 = r.leg.replication().unwrap();
    assert_eq!(st2.lag_writes, 0);
    assert_eq!(st2.lag_bytes, 0);
    assert_eq!(st2.rpo_seconds, 0.0);
    assert!(st2.consistent_seq >= 4000, "{st2:?}");
    assert!(
        st2.journal_bytes >= st2.host_bytes,
        "journal bytes {} for {} host bytes",
        st2.journal_bytes,
        st2.host_bytes
    );
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap(),
        "after the journal drained the legs are identical"
    );
    assert!(r
        .vol
        .leg_states()
        .iter()
        .all(|l| l.state == LegState::InSync));
}

#[test]
fn a_staged_leg_ships_its_backlog_in_batches_and_every_far_crash_leaves_a_prefix() {
    let r = rig_staged(JournalConfig::default());
    let staging = Arc::clone(r.staging.as_ref().unwrap());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    let (mut samples, mut rolled) = (0, 0);
    let far = Arc::clone(&r.far);
    write_stamped(
        &mut *qp,
        &mut recs,
        &mut clock,
        4000,
        21,
        |recs| {
            // A batch is applied to the image through the staging area: what the far site
            // recovers at any instant is a crash state of the host's writes.
            let (image, forward) = common::far_site::crash_image(&far, &staging);
            assert_crash_consistent(&image, recs, &format!("far crash {samples}"));
            samples += 1;
            rolled += usize::from(forward);
        },
        97,
    );
    assert!(samples >= 40);
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st = r.leg.replication().unwrap();
    assert_eq!(st.mode, "async-journal");
    assert!(st.consistent && st.lag_writes == 0, "{st:?}");
    // The samples hold the far writes for a while: the journal backs up behind them and
    // ships as batches.
    let batches = st.cycle.as_ref().map_or(0, |c| c.cycle);
    assert!(batches > 0, "no backlog was shipped as a batch: {st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap(),
        "after the journal drained the legs are identical"
    );
    eprintln!("{samples} far crashes, {rolled} rolled forward, {batches} batches");
}

#[test]
fn a_staged_leg_keeps_its_far_image_a_prefix_through_a_catch_up() {
    let r = rig_staged(JournalConfig::default());
    let staging = Arc::clone(r.staging.as_ref().unwrap());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    write_stamped(&mut *qp, &mut recs, &mut clock, 300, 31, |_| {}, 1000);
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    r.vol.detach_leg(1).unwrap();
    write_stamped(&mut *qp, &mut recs, &mut clock, 300, 32, |_| {}, 1000);
    // A slow copy, and host writes all through it.
    let slow = ResyncConfig {
        windows: 1,
        max_rate: 1 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let job = r.vol.attach_leg_with(1, slow).unwrap().run();
    let (far, leg, vol) = (Arc::clone(&r.far), Arc::clone(&r.leg), &r.vol);
    let mut samples = 0;
    let end = writes_through_catch_up(job, &mut *qp, &mut recs, &mut clock, (64, 16), 33, |recs| {
        let st = leg.replication().unwrap();
        let (image, _) = common::far_site::crash_image(&far, &staging);
        if vol.leg_states()[1].state != LegState::InSync {
            // The copy goes to the staging area: the image stays at its last prefix,
            // and says so.
            assert!(st.consistent, "{st:?}");
            assert_eq!(st.state, "catching-up", "{st:?}");
            samples += 1;
        }
        assert_crash_consistent(&image, recs, &format!("catch-up sample {samples}"));
    });
    assert_eq!(
        end.state,
        JobState::Done,
        "{end:?} {:?}",
        r.leg.replication()
    );
    assert!(samples > 0, "the copy ended before a sample");
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st = r.leg.replication().unwrap();
    assert!(st.consistent && st.state == "replicating", "{st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
}

#[test]
fn a_staged_leg_stepped_down_by_a_stalled_far_site_catches_up_with_every_crash_image_a_prefix() {
    // Room for a few of the resync's copy commands (a region each) and the host's writes.
    let r = rig_staged(JournalConfig {
        max_bytes: Some(4 << 20),
        ..JournalConfig::default()
    });
    let staging = Arc::clone(r.staging.as_ref().unwrap());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    write_stamped(&mut *qp, &mut recs, &mut clock, 100, 51, |_| {}, 1000);
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    // The far site stalls: the journal fills past its bound and the leg steps down; the
    // host carries on.
    let stall = [&r.far, &staging].map(|d| {
        d.injector().arm(Fault::Hang {
            ops: OpFilter::Writes,
        })
    });
    write_stamped(&mut *qp, &mut recs, &mut clock, 600, 52, |_| {}, 1000);
    let st = r.leg.replication().unwrap();
    assert_eq!(st.state, "stepped-down", "{st:?}");
    assert_eq!(r.vol.leg_states()[1].state, LegState::Faulted);
    // The far site is back: the journal drains, then a resync brings the leg back, its
    // catch-up staged while the host writes on.
    for (d, id) in [&r.far, &staging].into_iter().zip(stall) {
        d.injector().clear(id);
    }
    common::wait_for("the journal drained", || {
        r.leg.replication().unwrap().lag_writes == 0
    });
    let slow = ResyncConfig {
        windows: 1,
        max_rate: 1 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let job = r.vol.attach_leg_with(1, slow).unwrap().run();
    let (far, vol) = (Arc::clone(&r.far), &r.vol);
    let mut samples = 0;
    let end = writes_through_catch_up(job, &mut *qp, &mut recs, &mut clock, (32, 8), 53, |recs| {
        let (image, _) = common::far_site::crash_image(&far, &staging);
        assert_crash_consistent(&image, recs, &format!("catch-up sample {samples}"));
        if vol.leg_states()[1].state != LegState::InSync {
            samples += 1;
        }
    });
    assert_eq!(
        end.state,
        JobState::Done,
        "{end:?} {:?}",
        r.leg.replication()
    );
    assert!(samples > 0, "the copy ended before a sample");
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st = r.leg.replication().unwrap();
    assert!(st.consistent && st.state == "replicating", "{st:?}");
    assert_eq!(st.step_downs, 1, "{st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
}

#[test]
fn a_power_cut_at_the_far_device_keeps_a_prefix_and_loses_nothing_shipped() {
    // The far disk acknowledges writes from a volatile cache; the host sends no barrier.
    let disk = Arc::new(CachedDisk::new("cache://far".into(), 7, BS as u32, 4 << 20).remote());
    let far = Arc::new(FaultyDevice::wrap(Arc::clone(&disk) as Arc<dyn BlockDevice>));
    let r = rig_on(far, JournalConfig::default());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    let mut cuts = 0;
    write_stamped(
        &mut *qp,
        &mut recs,
        &mut clock,
        3000,
        5,
        |recs| {
            // What the medium keeps through the cut is a crash state of the host's writes...
            disk.cut_power();
            let image = disk.durable();
            assert_crash_consistent(&image, recs, &format!("power cut {cuts}"));
            cuts += 1;
            disk.power_on();
        },
        211,
    );
    assert!(cuts >= 10);
    // ...and the journal was freed only of what the medium kept: once it has drained, a last
    // cut leaves every write on the far medium.
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    drop(qp);
    disk.cut_power();
    let image = disk.durable();
    assert_eq!(
        read_all(&*r.local).unwrap(),
        image,
        "the far medium lost writes the journal had freed"
    );
    assert!(r
        .vol
        .leg_states()
        .iter()
        .all(|l| l.state == LegState::InSync));
}

#[test]
fn the_far_image_is_not_called_consistent_while_a_catch_up_is_applied() {
    let r = rig(JournalConfig::default());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    write_stamped(&mut *qp, &mut recs, &mut clock, 200, 11, |_| {}, 1000);
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st = r.leg.replication().unwrap();
    assert!(st.consistent && st.state == "replicating", "{st:?}");
    // Out of the volume, the leg keeps its old prefix: still a consistent point.
    r.vol.detach_leg(1).unwrap();
    write_stamped(&mut *qp, &mut recs, &mut clock, 200, 12, |_| {}, 1000);
    assert!(r.leg.replication().unwrap().consistent);
    // The catch-up copies in region order: from its start the image is no point in time.
    let slow = ResyncConfig {
        windows: 1,
        max_rate: 1 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    };
    let job = r.vol.attach_leg_with(1, slow).unwrap().run();
    let mut samples = 0;
    while !job.is_finished() {
        let st = r.leg.replication().unwrap();
        // Read before the leg's state: still out of sync after it, the copy was not whole.
        if r.vol.leg_states()[1].state != LegState::InSync {
            assert!(!st.consistent, "consistent during the copy: {st:?}");
            assert_eq!(st.state, "catching-up");
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(job.join().unwrap().state, JobState::Done);
    assert!(samples > 0, "the copy ended before a sample");
    // Consistent again once every record of the copy is applied.
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    let st = r.leg.replication().unwrap();
    assert!(st.consistent && st.state == "replicating", "{st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
}

#[test]
fn a_crash_of_the_sender_resumes_shipping_from_the_commit_position() {
    let cfg = JournalConfig::default();
    let r = rig(cfg.clone());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    // The link is down: everything stays in the journal.
    let gone = r.far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    write_stamped(&mut *qp, &mut recs, &mut clock, 1000, 2, |_| {}, 500);
    let t = Instant::now();
    while r.leg.replication().unwrap().state != "retrying" {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?}",
            r.leg.replication()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = r.leg.replication().unwrap();
    assert!(st.lag_writes > 0, "{st:?}");
    assert!(st.rpo_seconds > 0.0, "{st:?}");
    drop(qp);
    let Rig {
        local,
        far,
        journal,
        leg,
        vol,
        ..
    } = r;
    drop(vol);
    // The crash: the writer and shipper stop where they are.
    leg.stop();
    drop(leg);
    far.injector().clear(gone);
    let image = read_all(&**far.inner()).unwrap();
    assert_crash_consistent(&image, &recs, "after the crash");
    // Restart on the same journal: the pending records ship, in order.
    let leg = JournaledLeg::open(
        Arc::clone(&far) as Arc<dyn BlockDevice>,
        Arc::clone(&journal),
        cfg,
    )
    .unwrap();
    let before = leg.replication().unwrap();
    assert!(
        before.lag_writes > 0 || before.consistent_seq == 1000,
        "{before:?}"
    );
    assert!(leg.wait_applied(Duration::from_secs(20)));
    assert_eq!(leg.replication().unwrap().consistent_seq, 1000);
    assert_eq!(
        read_all(&*local).unwrap(),
        read_all(&**far.inner()).unwrap()
    );
}

#[test]
fn a_crash_of_a_staged_sender_in_the_middle_of_a_batch_is_rolled_forward_and_ships_the_rest() {
    let cfg = JournalConfig::default();
    let r = rig_staged(cfg.clone());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    // The image takes no writes: a batch is staged and committed, and its apply hangs.
    let gone = r.far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    write_stamped(&mut *qp, &mut recs, &mut clock, 1000, 41, |_| {}, 500);
    let t = Instant::now();
    loop {
        let st = r.leg.replication().unwrap();
        let committed = st.cycle.as_ref().is_some_and(|c| c.staged_bytes > 0);
        if committed && st.state == "retrying" {
            break;
        }
        // A segment sent straight to the hung image waits out the I/O timeout (5 s) first.
        assert!(t.elapsed() < Duration::from_secs(20), "{st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(qp);
    let Rig {
        local,
        far,
        journal,
        staging,
        leg,
        vol,
    } = r;
    let staging = staging.unwrap();
    drop(vol);
    // The crash: the writer and shipper stop where they are; what the far site would
    // recover now is a crash state.
    leg.stop();
    drop(leg);
    far.injector().clear(gone);
    let (image, rolled) = common::far_site::crash_image(&far, &staging);
    assert!(rolled, "no committed batch to roll forward");
    assert_crash_consistent(&image, &recs, "after the crash");
    // Restart on the same devices: a committed batch is rolled forward, the rest ships.
    let leg = JournaledLeg::open_staged(
        Arc::clone(&far) as Arc<dyn BlockDevice>,
        Arc::clone(&journal),
        Arc::clone(&staging) as Arc<dyn BlockDevice>,
        false,
        cfg,
    )
    .unwrap();
    assert!(leg.wait_applied(Duration::from_secs(20)));
    let st = leg.replication().unwrap();
    assert_eq!(st.consistent_seq, 1000, "{st:?}");
    assert!(st.error.is_none(), "{st:?}");
    assert_eq!(
        read_all(&*local).unwrap(),
        read_all(&**far.inner()).unwrap()
    );
}

#[test]
fn a_lost_link_is_retried_and_every_sample_stays_consistent() {
    let r = rig(JournalConfig::default());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    let far = Arc::clone(&r.far);
    let mut gone = None;
    let mut n = 0;
    write_stamped(
        &mut *qp,
        &mut recs,
        &mut clock,
        4000,
        3,
        |recs| {
            n += 1;
            // Every third sample the link goes away (writes fail) or comes back.
            if n % 3 == 0 {
                match gone.take() {
                    Some(id) => {
                        far.injector().clear(id);
                    }
                    None => gone = Some(far.injector().arm(Fault::Gone)),
                }
            }
            let image = read_all(&**far.inner()).unwrap();
            if gone.is_some() {
                // Nothing lands while the link is gone: the image is stable.
                assert_crash_consistent(&image, recs, "link gone");
            }
        },
        101,
    );
    if let Some(id) = gone {
        r.far.injector().clear(id);
    }
    assert!(r.leg.wait_applied(Duration::from_secs(30)));
    let st = r.leg.replication().unwrap();
    assert_eq!(st.state, "replicating", "{st:?}");
    assert_eq!(st.step_downs, 0, "{st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
}

#[test]
fn a_journal_at_its_bound_steps_the_leg_down_and_the_host_carries_on() {
    let r = rig(JournalConfig {
        max_bytes: Some(256 << 10),
        ..JournalConfig::default()
    });
    let _hang = r.far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    // Every host write succeeds (the local leg has it) although the journal fills.
    write_stamped(&mut *qp, &mut recs, &mut clock, 500, 4, |_| {}, 100);
    let st = r.leg.replication().unwrap();
    assert_eq!(st.state, "stepped-down", "{st:?}");
    assert_eq!(st.step_downs, 1);
    assert!(st.journal_used <= 256 << 10, "{st:?}");
    let states = r.vol.leg_states();
    assert_eq!(states[0].state, LegState::InSync);
    assert_eq!(states[1].state, LegState::Faulted, "{states:?}");
}

#[test]
fn a_read_waits_for_the_writes_completed_before_it() {
    let far = far_mem();
    let journal = open_leg("mem://8MiB?lba=4096").unwrap();
    let leg = JournaledLeg::open(
        Arc::clone(&far) as Arc<dyn BlockDevice>,
        journal,
        JournalConfig::default(),
    )
    .unwrap();
    let hang = far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut qp = leg.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(2, BS);
    let mut w = pool.get().unwrap();
    let rd = pool.get().unwrap();
    w.as_mut_slice().fill(0xab);
    let mut cpl = [Completion::default(); 4];
    // SAFETY: both buffers live until their completions are reaped below.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 7, 1, w.io_buf(), 1)) }.unwrap();
    let t = Instant::now();
    while qp.poll(&mut cpl) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    assert!(
        cpl[0].status.is_success(),
        "journaled while the far side hangs"
    );
    // SAFETY: as above.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Read, 7, 1, rd.io_buf(), 2)) }.unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        qp.poll(&mut cpl),
        0,
        "the read must wait for the write to be applied"
    );
    far.injector().clear(hang);
    let t = Instant::now();
    while qp.poll(&mut cpl) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(cpl[0].tag, 2);
    assert!(cpl[0].status.is_success());
    assert!(rd.as_slice().iter().all(|&b| b == 0xab));
}

#[test]
fn a_journal_on_a_device_with_other_data_is_refused() {
    let far = open_leg("mem://1MiB?lba=4096").unwrap();
    let journal = open_leg("mem://8MiB?lba=4096").unwrap();
    // Some foreign data in its first block.
    let mut qp = journal.open_qpair(1).unwrap();
    let mut pool = DmaPool::new(1, BS);
    let mut b = pool.get().unwrap();
    b.as_mut_slice()[..4].copy_from_slice(b"XFSB");
    // SAFETY: reaped below before the buffer goes.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 0, 1, b.io_buf(), 0)) }.unwrap();
    let mut cpl = [Completion::default()];
    while qp.poll(&mut cpl) == 0 {}
    let err = JournaledLeg::open(far, journal, JournalConfig::default()).unwrap_err();
    assert!(
        err.to_string().contains("neither a journal nor blank"),
        "{err}"
    );
}

#[test]
fn the_checker_catches_an_image_that_is_no_crash_state() {
    // Write 1 (block 0) was acknowledged before write 2 (block 1) was submitted.
    let recs = [
        Rec {
            slba: 0,
            nlb: 1,
            sub: 1,
            ack: 2,
        },
        Rec {
            slba: 1,
            nlb: 1,
            sub: 3,
            ack: 4,
        },
    ];
    let mut image = vec![0u8; AREA as usize * BS];
    image[BS..BS + 8].copy_from_slice(&2u64.to_le_bytes());
    // Block 1 has write 2 but block 0 lacks write 1: no crash leaves that.
    let caught = std::panic::catch_unwind(|| assert_crash_consistent(&image, &recs, "forged"));
    assert!(caught.is_err());
    // With write 1 there as well, it is the state after both.
    image[..8].copy_from_slice(&1u64.to_le_bytes());
    assert_crash_consistent(&image, &recs, "both");
    // Write 1 alone is a crash state too.
    image[BS..BS + 8].fill(0);
    assert_crash_consistent(&image, &recs, "first only");
}

#[test]
fn a_leg_switched_to_sync_drains_its_journal_first_and_back_to_async_journals_again() {
    let r = rig(JournalConfig::default());
    let mut qp = r.vol.open_qpair(DEPTH).unwrap();
    let (mut recs, mut clock) = (Vec::new(), 0);
    let hang = r.far.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    write_stamped(&mut *qp, &mut recs, &mut clock, 300, 5, |_| {}, 100);
    // The journal holds writes the far side has not taken: the switch cannot drain.
    let err = r
        .leg
        .set_mode("sync", Duration::from_millis(100))
        .unwrap_err();
    assert!(err.contains("did not drain"), "{err}");
    assert_eq!(r.leg.replication().unwrap().mode, "async-journal");
    r.far.injector().clear(hang);
    r.leg.set_mode("sync", Duration::from_secs(20)).unwrap();
    let st = r.leg.replication().unwrap();
    assert_eq!((st.mode, st.lag_writes), ("sync", 0), "{st:?}");
    let journaled = st.host_bytes;
    // In sync mode writes go straight to the far device: none enters the journal, and the
    // far image is the local one as soon as the writes are acknowledged.
    write_stamped(&mut *qp, &mut recs, &mut clock, 300, 6, |_| {}, 100);
    assert_eq!(r.leg.replication().unwrap().host_bytes, journaled);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
    // And back: the journal takes the writes again.
    r.leg.set_mode("async-journal", Duration::ZERO).unwrap();
    write_stamped(&mut *qp, &mut recs, &mut clock, 300, 7, |_| {}, 100);
    assert!(r.leg.replication().unwrap().host_bytes > journaled);
    assert!(r.leg.wait_applied(Duration::from_secs(20)));
    drop(qp);
    assert_eq!(
        read_all(&*r.local).unwrap(),
        read_all(&**r.far.inner()).unwrap()
    );
    assert!(r.leg.set_mode("async-cycle", Duration::ZERO).is_err());
}
