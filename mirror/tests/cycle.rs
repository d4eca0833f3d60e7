//! `async-cycle` legs: the far image moves from one cut to the next atomically through the
//! staging area, whatever the crash point and whoever recovers it (the local site with its
//! journal, or the far site alone), and a block rewritten many times crosses the link once
//! per cycle.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_mirror::{
    recover_cycle, CycleConfig, FarApplier, JobState, JournalConfig, JournaledLeg, LegState,
    ResyncConfig, Volume, VolumeConfig,
};
use nvmirror_nvme::backend::{Fault, FaultyDevice, OpFilter};
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{
    open_leg, read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status,
};
use rand::{Rng, SeedableRng};

mod common;
use common::cached_disk::CachedDisk;
use common::far_site::mem_copy;
use common::wait_for;

const BS: usize = 4096;
/// Blocks the writers touch.
const AREA: u64 = 128;

/// Every host write in order (QD1: write `i` was acknowledged before write `i + 1` was
/// submitted, so the host image after write `k` is the replay of writes `1..=k`).
#[derive(Default)]
struct History {
    writes: Vec<(u64, u32)>,
}

impl History {
    /// The stamp each block of the area holds after writes `1..=k`.
    fn replay(&self, k: u64) -> Vec<u64> {
        let mut img = vec![0; AREA as usize];
        for (i, &(slba, nlb)) in self.writes.iter().take(k as usize).enumerate() {
            for b in slba..slba + u64::from(nlb) {
                img[b as usize] = i as u64 + 1;
            }
        }
        img
    }
}

fn stamp(image: &[u8], b: u64) -> u64 {
    let at = b as usize * BS;
    u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
}

/// Whether `image` is the host image as of some write `k`, block by block: `k` is its newest
/// stamp, since at QD1 the last write of a prefix is never overwritten within it.
fn point_in_time(image: &[u8], h: &History) -> Result<u64, String> {
    let k = (0..AREA).map(|b| stamp(image, b)).max().unwrap_or(0);
    if k as usize > h.writes.len() {
        return Err(format!("write {k} never issued"));
    }
    let want = h.replay(k);
    for b in 0..AREA {
        let at = b as usize * BS;
        let s = stamp(image, b);
        if s != want[b as usize] {
            return Err(format!(
                "block {b} holds write {s}; the host image as of write {k} has write {}",
                want[b as usize]
            ));
        }
        if s != 0 && image[at + 8..at + BS].iter().any(|&x| x != s as u8) {
            return Err(format!("block {b} is torn"));
        }
    }
    Ok(k)
}

fn assert_point_in_time(image: &[u8], h: &History, when: &str) -> u64 {
    point_in_time(image, h).unwrap_or_else(|e| panic!("{when}: {e}"))
}

/// One QD1 command through `qp`.
fn io(qp: &mut dyn QueuePair, cmd: IoCommand) -> Status {
    // SAFETY: the caller's buffer outlives this call, which waits for the completion.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut c = [Completion::default(); 1];
    loop {
        if qp.poll(&mut c) == 1 {
            return c[0].status;
        }
        std::hint::spin_loop();
    }
}

/// Writes the stamped write `h.writes.len() + 1` at `slba`.
fn write(qp: &mut dyn QueuePair, buf: &mut DmaBuf, h: &mut History, slba: u64, nlb: u32) {
    let id = h.writes.len() as u64 + 1;
    for blk in buf.as_mut_slice()[..nlb as usize * BS].chunks_mut(BS) {
        blk.fill(id as u8);
        blk[..8].copy_from_slice(&id.to_le_bytes());
    }
    let st = io(
        qp,
        IoCommand::with_buf(IoOp::Write, slba, nlb, buf.io_buf(), id),
    );
    assert!(st.is_success(), "host write {id}: {st}");
    h.writes.push((slba, nlb));
}

/// The devices of a volume with an async-cycle leg: they outlive a crash of the local site.
struct Devices {
    local: Arc<dyn BlockDevice>,
    far: Arc<FaultyDevice>,
    staging: Arc<FaultyDevice>,
    journal: Arc<dyn BlockDevice>,
    cfg: JournalConfig,
    cycle: CycleConfig,
}

struct Rig {
    d: Devices,
    leg: Arc<JournaledLeg>,
    vol: Volume,
}

fn faulty(uri: &str) -> Arc<FaultyDevice> {
    Arc::new(FaultyDevice::wrap(open_leg(uri).unwrap()))
}

/// Opens the async-cycle leg on `d` (a start, or a restart after a crash).
fn open(d: &Devices) -> JournaledLeg {
    JournaledLeg::open_cycle(
        Arc::clone(&d.far) as Arc<dyn BlockDevice>,
        Arc::clone(&d.journal),
        Arc::clone(&d.staging) as Arc<dyn BlockDevice>,
        d.cycle,
        d.cfg.clone(),
    )
    .unwrap()
}

fn rig(interval: Duration, cfg: JournalConfig) -> Rig {
    rig_with(CycleConfig::every(interval), cfg, VolumeConfig::default())
}

fn rig_with(cycle: CycleConfig, cfg: JournalConfig, vcfg: VolumeConfig) -> Rig {
    rig_staging(cycle, cfg, vcfg, "8MiB")
}

/// A rig whose staging area has `staging` bytes.
fn rig_staging(cycle: CycleConfig, cfg: JournalConfig, vcfg: VolumeConfig, staging: &str) -> Rig {
    let far = faulty("mem://4MiB?lba=4096&latency=20us");
    let staging = faulty(&format!("mem://{staging}?lba=4096&latency=20us"));
    rig_on(cycle, cfg, vcfg, far, staging)
}

/// A rig on these far devices (4 MiB of image, and a staging area).
fn rig_on(
    cycle: CycleConfig,
    cfg: JournalConfig,
    vcfg: VolumeConfig,
    far: Arc<FaultyDevice>,
    staging: Arc<FaultyDevice>,
) -> Rig {
    let d = Devices {
        local: open_leg("mem://4MiB?lba=4096").unwrap(),
        far,
        staging,
        journal: open_leg("mem://64MiB?lba=4096").unwrap(),
        cfg,
        cycle,
    };
    let leg = Arc::new(open(&d));
    let vol = Volume::new(
        "cv",
        vec![
            Arc::clone(&d.local),
            Arc::clone(&leg) as Arc<dyn BlockDevice>,
        ],
        vcfg,
    )
    .unwrap();
    Rig { d, leg, vol }
}

/// Stops the rig's volume and leg where they are (a crash of the local site).
fn crash(r: Rig) -> Devices {
    drop(r.vol);
    r.leg.stop();
    r.d
}

/// What the far site would recover if both its devices stopped now.
fn far_site_crash_image(r: &Devices) -> (Vec<u8>, bool) {
    common::far_site::crash_image(&r.far, &r.staging)
}

#[test]
fn every_crash_of_the_far_site_recovers_an_image_at_a_cut() {
    // Segments of 4 blocks: writes of up to 8 are split, and a cut must not fall inside one.
    let cfg = JournalConfig {
        max_segment_bytes: 4 * BS,
        ..JournalConfig::default()
    };
    let r = rig(Duration::from_millis(5), cfg);
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, 8 * BS).get().unwrap();
    let mut h = History::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(16);
    let (mut samples, mut behind, mut seen) = (0, 0, std::collections::BTreeSet::new());
    let mut rolled_forward = 0;
    for i in 1..=1500 {
        let nlb = rng.gen_range(1..=8u32);
        let slba = rng.gen_range(0..=AREA - u64::from(nlb));
        write(&mut *qp, &mut buf, &mut h, slba, nlb);
        if i % 50 == 0 {
            let (image, rolled) = far_site_crash_image(&r.d);
            rolled_forward += usize::from(rolled);
            let k = assert_point_in_time(&image, &h, &format!("sample after write {i}"));
            samples += 1;
            if (k as usize) < h.writes.len() {
                behind += 1;
            }
            seen.insert(k);
        }
    }
    assert_eq!(samples, 30);
    eprintln!("{samples} samples, {rolled_forward} of a committed cycle rolled forward, {behind} behind the host, {} distinct cuts", seen.len());
    assert!(seen.len() >= 5, "the image moved through only {seen:?}");
    assert!(behind > 0, "the image was never behind the host");
    let cycle = r.leg.cycle_now(Duration::from_secs(20)).unwrap();
    let st = r.leg.replication().unwrap();
    assert_eq!(st.mode, "async-cycle");
    let cs = st.cycle.unwrap();
    assert_eq!(cs.cycle, cycle);
    assert!(cycle >= 5, "{cs:?}");
    assert_eq!(st.lag_writes, 0, "{st:?}");
    drop(qp);
    assert_eq!(
        read_all(&*r.d.local).unwrap(),
        read_all(&**r.d.far.inner()).unwrap()
    );
}

/// What the far site recovers from what its media kept through a power cut, rolled
/// forward; the media power on again.
fn far_site_power_cut_image(disks: &[Arc<CachedDisk>; 2]) -> (Vec<u8>, bool) {
    for d in disks {
        d.cut_power();
    }
    let (image, staging) = (mem_copy(&disks[0].durable()), mem_copy(&disks[1].durable()));
    for d in disks {
        d.power_on();
    }
    let rolled = match recover_cycle(Arc::clone(&image), staging, Duration::from_secs(5)) {
        Ok(rec) => rec.rolled_forward,
        Err(e) if e.contains("blank") => false,
        Err(e) => panic!("far-site recovery failed: {e}"),
    };
    (read_all(&*image).unwrap(), rolled)
}

#[test]
fn a_power_cut_at_the_far_site_recovers_an_image_at_a_cut() {
    // The image and the staging area acknowledge writes from volatile caches.
    let disks = [
        Arc::new(CachedDisk::new("cache://image".into(), 3, BS as u32, 4 << 20).remote()),
        Arc::new(CachedDisk::new("cache://staging".into(), 4, BS as u32, 8 << 20).remote()),
    ];
    let wrap =
        |d: &Arc<CachedDisk>| Arc::new(FaultyDevice::wrap(Arc::clone(d) as Arc<dyn BlockDevice>));
    let cfg = JournalConfig {
        max_segment_bytes: 4 * BS,
        ..JournalConfig::default()
    };
    let r = rig_on(
        CycleConfig::every(Duration::from_millis(5)),
        cfg,
        VolumeConfig::default(),
        wrap(&disks[0]),
        wrap(&disks[1]),
    );
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, 8 * BS).get().unwrap();
    let mut h = History::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(23);
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=1500 {
        let nlb = rng.gen_range(1..=8u32);
        let slba = rng.gen_range(0..=AREA - u64::from(nlb));
        write(&mut *qp, &mut buf, &mut h, slba, nlb);
        if i % 50 == 0 {
            let c = r.leg.replication().unwrap().cycle.unwrap().cycle;
            let (image, _) = far_site_power_cut_image(&disks);
            seen.insert(assert_point_in_time(
                &image,
                &h,
                &format!("power cut after write {i}"),
            ));
            // Shipping goes on past the cut.
            wait_for("a cycle after the power cut", || {
                let st = r.leg.replication().unwrap();
                st.lag_writes == 0 || st.cycle.unwrap().cycle > c
            });
        }
    }
    assert!(seen.len() >= 5, "the image moved through only {seen:?}");
    // The cycles go on after the cuts, and the last one reaches the media whole.
    if let Err(e) = r.leg.cycle_now(Duration::from_secs(20)) {
        panic!("{e}: {:?}", r.leg.replication());
    }
    let (image, _) = far_site_power_cut_image(&disks);
    assert_eq!(
        assert_point_in_time(&image, &h, "the last cycle"),
        h.writes.len() as u64
    );
    assert_eq!(r.vol.leg_states()[1].state, LegState::InSync);
}

#[test]
fn a_block_rewritten_many_times_crosses_the_link_once_per_cycle() {
    let r = rig(Duration::from_secs(3600), JournalConfig::default());
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, BS).get().unwrap();
    let mut h = History::default();
    // Four blocks (3 % of the area), 100 times each, in turns.
    let hot = [3u64, 40, 41, 100];
    for _ in 0..100 {
        for &b in &hot {
            write(&mut *qp, &mut buf, &mut h, b, 1);
        }
    }
    assert_eq!(r.leg.cycle_now(Duration::from_secs(20)).unwrap(), 1);
    let st = r.leg.replication().unwrap();
    let cs = st.cycle.unwrap();
    let distinct = (hot.len() * BS) as u64;
    assert_eq!(cs.cycle_bytes, distinct, "{cs:?}");
    assert_eq!(st.host_bytes, 100 * distinct, "{st:?}");
    let ratio = cs.staged_bytes as f64 / distinct as f64;
    assert!(
        ratio <= 1.05,
        "staged {} bytes for {distinct} distinct: {ratio}",
        cs.staged_bytes
    );
    assert_point_in_time(
        &read_all(&**r.d.far.inner()).unwrap(),
        &h,
        "after the cycle",
    );
    assert_eq!(
        read_all(&*r.d.local).unwrap(),
        read_all(&**r.d.far.inner()).unwrap()
    );
}

#[test]
fn a_crash_before_the_commit_leaves_the_previous_cut_and_the_cycle_ships_again() {
    let cfg = JournalConfig {
        io_timeout: Duration::from_millis(200),
        ..JournalConfig::default()
    };
    let r = rig(Duration::from_secs(3600), cfg);
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, 4 * BS).get().unwrap();
    let mut h = History::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut burst = |qp: &mut dyn QueuePair, h: &mut History| {
        for _ in 0..60 {
            let nlb = rng.gen_range(1..=4u32);
            write(qp, &mut buf, h, rng.gen_range(0..=AREA - 4), nlb);
        }
    };
    burst(&mut *qp, &mut h);
    assert_eq!(r.leg.cycle_now(Duration::from_secs(10)).unwrap(), 1);
    // The far site stops taking staged data: cycle 2 never commits.
    let gone = r.d.staging.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    burst(&mut *qp, &mut h);
    let e = r.leg.cycle_now(Duration::from_millis(500)).unwrap_err();
    assert!(e.contains("did not reach"), "{e}");
    drop(qp);
    let d = crash(r);
    d.staging.injector().clear(gone);
    let image = read_all(&**d.far.inner()).unwrap();
    assert_eq!(assert_point_in_time(&image, &h, "after the crash"), 60);
    // Restart on the same journal and staging area: cycle 2 ships again.
    let leg = open(&d);
    assert_eq!(leg.cycle_now(Duration::from_secs(10)).unwrap(), 2);
    let image = read_all(&**d.far.inner()).unwrap();
    assert_eq!(assert_point_in_time(&image, &h, "after the restart"), 120);
    assert_eq!(read_all(&*d.local).unwrap(), image);
}

#[test]
fn a_crash_in_the_apply_is_rolled_forward_by_either_site() {
    let cfg = JournalConfig {
        io_timeout: Duration::from_millis(200),
        ..JournalConfig::default()
    };
    let r = rig(Duration::from_secs(3600), cfg);
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, BS).get().unwrap();
    let mut h = History::default();
    write(&mut *qp, &mut buf, &mut h, 7, 1);
    assert_eq!(r.leg.cycle_now(Duration::from_secs(10)).unwrap(), 1);
    // Cycle 2: block 0, block 1, block 0 again. The image takes one command (block 1, the
    // first winner in journal order) and fails the rest: block 0 stays as at cycle 1.
    write(&mut *qp, &mut buf, &mut h, 0, 1);
    write(&mut *qp, &mut buf, &mut h, 1, 1);
    write(&mut *qp, &mut buf, &mut h, 0, 1);
    let broken = r.d.far.injector().arm(Fault::FailAfter {
        n: 1,
        status: Status::WRITE_FAULT,
    });
    assert!(r.leg.cycle_now(Duration::from_millis(500)).is_err());
    drop(qp);
    let d = crash(r);
    d.far.injector().clear(broken);
    let torn = read_all(&**d.far.inner()).unwrap();
    assert_eq!(
        (stamp(&torn, 0), stamp(&torn, 1)),
        (0, 3),
        "the apply was cut short"
    );
    assert!(
        point_in_time(&torn, &h).is_err(),
        "the half-applied image is at no cut"
    );

    // The far site alone (the local site is lost): roll forward from the staging area.
    let image = mem_copy(&torn);
    let staged = read_all(&**d.staging.inner()).unwrap();
    // A copy of the staging area on a device of another size is refused, and changes nothing.
    let mut grown = staged.clone();
    grown.resize(2 * staged.len(), 0);
    let e =
        recover_cycle(Arc::clone(&image), mem_copy(&grown), Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("made on a device of"), "{e}");
    assert_eq!(read_all(&*image).unwrap(), torn);
    let staging = mem_copy(&staged);
    let rec = recover_cycle(
        Arc::clone(&image),
        Arc::clone(&staging),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(rec.rolled_forward);
    assert_eq!((rec.cycle, rec.cut_seq), (2, 4));
    let img = read_all(&*image).unwrap();
    assert_eq!(assert_point_in_time(&img, &h, "after cycle-recover"), 4);
    // Recovering again changes nothing.
    let again = recover_cycle(Arc::clone(&image), staging, Duration::from_secs(5)).unwrap();
    assert!(!again.rolled_forward);
    assert_eq!(read_all(&*image).unwrap(), img);

    // The local site restarts: its shipper rolls the cycle forward and moves its journal on.
    let leg = open(&d);
    wait_for("the restarted leg at cycle 2", || {
        let st = leg.replication().unwrap();
        st.cycle.unwrap().cycle == 2 && st.consistent_seq == 4
    });
    assert_eq!(
        read_all(&*d.local).unwrap(),
        read_all(&**d.far.inner()).unwrap()
    );
}

#[test]
fn the_mode_of_a_cycle_leg_is_async_cycle_or_sync() {
    let r = rig(Duration::from_secs(3600), JournalConfig::default());
    let e = r
        .leg
        .set_mode("async-journal", Duration::from_secs(1))
        .unwrap_err();
    assert!(e.contains("sync or async-cycle"), "{e}");
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, BS).get().unwrap();
    let mut h = History::default();
    write(&mut *qp, &mut buf, &mut h, 5, 1);
    // To sync: the open cycle ships at once, however long the period.
    r.leg.set_mode("sync", Duration::from_secs(10)).unwrap();
    assert_eq!(r.leg.replication().unwrap().mode, "sync");
    assert_eq!(r.leg.replication().unwrap().cycle.unwrap().cycle, 1);
    r.leg
        .set_mode("async-cycle", Duration::from_secs(1))
        .unwrap();
    assert_eq!(r.leg.replication().unwrap().mode, "async-cycle");
    // A staging area of another block size is refused.
    let e = JournaledLeg::open_cycle(
        open_leg("mem://4MiB?lba=4096").unwrap(),
        open_leg("mem://8MiB?lba=4096").unwrap(),
        open_leg("mem://8MiB?lba=512").unwrap(),
        CycleConfig::every(Duration::from_secs(1)),
        JournalConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("512-byte blocks"), "{e}");
}

#[test]
fn a_resync_of_the_leg_reaches_the_far_image_in_one_cycle() {
    // Regions of 64 KiB: the area is 8 of them, copied one at a time at 256 KiB/s, so the
    // resync spans many 5 ms cycle periods.
    let vcfg = VolumeConfig {
        region_size: 64 << 10,
        ..VolumeConfig::default()
    };
    let r = rig_with(
        CycleConfig::every(Duration::from_millis(5)),
        JournalConfig::default(),
        vcfg,
    );
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, 4 * BS).get().unwrap();
    let mut h = History::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
    let mut burst = |qp: &mut dyn QueuePair, h: &mut History, n: usize| {
        for _ in 0..n {
            let nlb = rng.gen_range(1..=4u32);
            write(qp, &mut buf, h, rng.gen_range(0..=AREA - 4), nlb);
        }
    };
    burst(&mut *qp, &mut h, 200);
    r.leg.cycle_now(Duration::from_secs(10)).unwrap();
    // The leg misses 200 writes, then is resynced through its journal.
    r.vol.detach_leg(1).unwrap();
    burst(&mut *qp, &mut h, 200);
    let slow = ResyncConfig {
        windows: 1,
        max_rate: 256 << 10,
        adaptive: false,
        ..ResyncConfig::default()
    };
    // A resync cancelled half-way leaves the hold: what it copied is part of a catch-up.
    let first = r.vol.attach_leg_with(1, slow.clone()).unwrap().run();
    wait_for("the first resync copying", || {
        r.vol.resync_status().is_ok_and(|s| s.bytes_copied > 0)
    });
    r.vol.resync_cancel().unwrap();
    assert_eq!(first.join().unwrap().state, JobState::Cancelled);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.leg.replication().unwrap().state, "catching-up");
    let (image, _) = far_site_crash_image(&r.d);
    assert_eq!(assert_point_in_time(&image, &h, "after the cancel"), 200);
    let job = r.vol.attach_leg_with(1, slow).unwrap().run();
    let (mut samples, mut during) = (0, 0);
    while !job.is_finished() {
        // The host writes on during the copy (the resyncing leg gets them too).
        burst(&mut *qp, &mut h, 5);
        let catching_up = r.leg.replication().unwrap().state == "catching-up";
        let (image, _) = far_site_crash_image(&r.d);
        let k = assert_point_in_time(&image, &h, &format!("sample {samples} of the resync"));
        samples += 1;
        if catching_up && !job.is_finished() {
            during += 1;
            assert_eq!(k, 200, "a cut was taken during the resync");
            let e = r.leg.cycle_now(Duration::from_secs(1)).unwrap_err();
            assert!(e.contains("resync"), "{e}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(job.join().unwrap().state, JobState::Done);
    assert!(
        during >= 5,
        "{during} of {samples} samples during the resync"
    );
    assert_eq!(r.vol.leg_states()[1].state, LegState::InSync);
    // The next cycle holds the whole copy and every write since.
    r.leg.cycle_now(Duration::from_secs(10)).unwrap();
    let image = read_all(&**r.d.far.inner()).unwrap();
    assert_eq!(
        assert_point_in_time(&image, &h, "after the resync"),
        h.writes.len() as u64
    );
    drop(qp);
    assert_eq!(read_all(&*r.d.local).unwrap(), image);
}

/// A rig whose journal is bounded at 2 MiB, its leg detached after 200 writes (the cycle
/// on the image is returned) while the host rewrites the area and marks every other region of the 4 MiB
/// volume: the catch-up (about 4 MiB of copy) outgrows the journal.
fn rig_with_a_large_catch_up(
    h: &mut History,
    seed: u64,
    staging: &str,
) -> (Rig, u64, impl FnMut(&Rig, &mut History, usize)) {
    let vcfg = VolumeConfig {
        region_size: 64 << 10,
        ..VolumeConfig::default()
    };
    let cfg = JournalConfig {
        max_bytes: Some(2 << 20),
        ..JournalConfig::default()
    };
    let r = rig_staging(
        CycleConfig::every(Duration::from_millis(5)),
        cfg,
        vcfg,
        staging,
    );
    let mut buf = DmaPool::new(1, 4 * BS).get().unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut burst = move |r: &Rig, h: &mut History, n: usize| {
        let mut qp = r.vol.open_qpair(1).unwrap();
        for _ in 0..n {
            let nlb = rng.gen_range(1..=4u32);
            write(&mut *qp, &mut buf, h, rng.gen_range(0..=AREA - 4), nlb);
        }
    };
    // In steps, so the journal never nears its bound before the catch-up.
    let mut cycle = 0;
    for _ in 0..10 {
        burst(&r, h, 20);
        cycle = r.leg.cycle_now(Duration::from_secs(10)).unwrap();
    }
    assert_eq!(r.leg.replication().unwrap().step_downs, 0);
    r.vol.detach_leg(1).unwrap();
    burst(&r, h, 200);
    // Outside the checked area (the stamps there are not host writes of the history).
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut fill = DmaPool::new(1, BS).get().unwrap();
    fill.as_mut_slice().fill(0xee);
    for region in ((AREA * BS as u64) >> 16)..(4 << 4) {
        let lba = region * 16;
        let st = io(
            &mut *qp,
            IoCommand::with_buf(IoOp::Write, lba, 1, fill.io_buf(), 0),
        );
        assert!(st.is_success());
    }
    (r, cycle, burst)
}

fn catch_up_resync() -> ResyncConfig {
    ResyncConfig {
        windows: 1,
        max_rate: 2 << 20,
        adaptive: false,
        ..ResyncConfig::default()
    }
}

#[test]
fn a_catch_up_larger_than_the_journal_is_staged_in_pieces_and_lands_in_one_cycle() {
    let mut h = History::default();
    let (r, c0, mut burst) = rig_with_a_large_catch_up(&mut h, 31, "16MiB");
    let job = r.vol.attach_leg_with(1, catch_up_resync()).unwrap().run();
    let before = r.leg.replication().unwrap().cycle.unwrap().staged_bytes;
    let (mut samples, mut pieces_seen) = (0, 0);
    while !job.is_finished() {
        burst(&r, &mut h, 5);
        let st = r.leg.replication().unwrap();
        let (image, _) = far_site_crash_image(&r.d);
        let k = assert_point_in_time(&image, &h, &format!("sample {samples} of the catch-up"));
        samples += 1;
        // Held before and after the image was read: the image is the one of the hold.
        let held = r.leg.replication().unwrap().state == "catching-up";
        if st.state == "catching-up" && held {
            assert_eq!(k, 200, "the image moved during the catch-up");
            assert_eq!(st.cycle.unwrap().cycle, c0);
            assert!(
                st.journal_used <= 2 << 20,
                "journal over its bound: {}",
                st.journal_used
            );
            if st.cycle.unwrap().staged_bytes > before {
                pieces_seen += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let end = job.join().unwrap();
    assert_eq!(end.state, JobState::Done, "{:?}", end.error);
    assert!(
        pieces_seen >= 2,
        "{pieces_seen} of {samples} samples saw staged pieces"
    );
    let st = r.leg.replication().unwrap();
    assert_eq!(st.step_downs, 0, "the journal never filled");
    assert_eq!(r.vol.leg_states()[1].state, LegState::InSync);
    // The next cycle holds every piece, the rest of the copy and every write since.
    assert!(r.leg.cycle_now(Duration::from_secs(10)).unwrap() > c0);
    let image = read_all(&**r.d.far.inner()).unwrap();
    assert_eq!(
        assert_point_in_time(&image, &h, "after the catch-up"),
        h.writes.len() as u64
    );
    assert!(read_all(&*r.d.local).unwrap() == image, "the legs differ");
    // And the cycles go on as before.
    burst(&r, &mut h, 20);
    assert!(r.leg.cycle_now(Duration::from_secs(10)).unwrap() > c0 + 1);
    let image = read_all(&**r.d.far.inner()).unwrap();
    assert_eq!(
        assert_point_in_time(&image, &h, "the cycle after"),
        h.writes.len() as u64
    );
}

#[test]
fn a_catch_up_that_outgrows_the_staging_area_faults_the_leg_and_keeps_the_far_image() {
    let mut h = History::default();
    // The catch-up copies the whole 4 MiB volume: its pieces cannot all fit in 3 MiB.
    let (r, c0, mut burst) = rig_with_a_large_catch_up(&mut h, 41, "3MiB");
    let job = r.vol.attach_leg_with(1, catch_up_resync()).unwrap().run();
    while !job.is_finished() {
        burst(&r, &mut h, 5);
        std::thread::sleep(Duration::from_millis(10));
    }
    let end = job.join().unwrap();
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    assert_eq!(r.vol.leg_states()[1].state, LegState::Faulted);
    let st = r.leg.replication().unwrap();
    assert_eq!(st.state, "failed", "{st:?}");
    let why = st.error.unwrap_or_default();
    assert!(why.contains("outgrew the staging area"), "{why}");
    // The far site still holds the cycle before the catch-up, whole.
    assert_eq!(st.cycle.unwrap().cycle, c0);
    let (image, _) = far_site_crash_image(&r.d);
    assert_eq!(assert_point_in_time(&image, &h, "after the overflow"), 200);
    // The host goes on writing to the local leg.
    burst(&r, &mut h, 20);
    assert_eq!(r.vol.leg_states()[0].state, LegState::InSync);
}

#[test]
fn a_crash_in_a_catch_up_staged_in_pieces_leaves_the_previous_cycle_and_holds_on_restart() {
    let mut h = History::default();
    let (r, c0, mut burst) = rig_with_a_large_catch_up(&mut h, 37, "8MiB");
    let staged = |leg: &JournaledLeg| leg.replication().unwrap().cycle.unwrap().staged_bytes;
    let before = staged(&r.leg);
    let job = r.vol.attach_leg_with(1, catch_up_resync()).unwrap().run();
    while staged(&r.leg) < before + (1 << 20) {
        assert!(
            !job.is_finished(),
            "the resync ended before a piece was staged"
        );
        burst(&r, &mut h, 5);
    }
    let d = crash(r);
    let _ = job.join();
    // The far site alone: the pieces are not a cycle, the image stays at cycle `c0`.
    let (image, rolled) = far_site_crash_image(&d);
    assert!(!rolled);
    assert_eq!(assert_point_in_time(&image, &h, "after the crash"), 200);
    // The local site restarts: the journal is free up to the pieces, the leg holds until a
    // resync makes it whole.
    let leg = open(&d);
    wait_for("the restarted leg at cycle c0", || {
        leg.replication().unwrap().cycle.unwrap().cycle == c0
    });
    let st = leg.replication().unwrap();
    assert_eq!(st.state, "catching-up");
    assert!(st.journal_used < 2 << 20, "{}", st.journal_used);
    assert_eq!(
        st.consistent_seq, 200,
        "the consistent point is the image's, not the pieces': {st:?}"
    );
    assert!(st.lag_writes > 0, "{st:?}");
    let e = leg.cycle_now(Duration::from_millis(200)).unwrap_err();
    assert!(e.contains("resync"), "{e}");
    let image = read_all(&**d.far.inner()).unwrap();
    assert_eq!(assert_point_in_time(&image, &h, "after the restart"), 200);
}

#[test]
fn a_far_applier_applies_each_cycle_so_the_link_carries_it_once() {
    let cycle = CycleConfig {
        interval: Duration::from_millis(5),
        far_apply: true,
    };
    let r = rig_with(cycle, JournalConfig::default(), VolumeConfig::default());
    // The far site: applies what is committed to its staging area, next to the image.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let applier = {
        let mut far = FarApplier::new(
            Arc::clone(&r.d.far) as Arc<dyn BlockDevice>,
            Arc::clone(&r.d.staging) as Arc<dyn BlockDevice>,
            Duration::from_secs(5),
        )
        .unwrap();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut applied = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if far.apply().unwrap().is_some_and(|a| a.rolled_forward) {
                    applied += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            applied
        })
    };
    let mut qp = r.vol.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, BS).get().unwrap();
    let mut h = History::default();
    let hot = [3u64, 40, 41, 100];
    for i in 0..400 {
        write(&mut *qp, &mut buf, &mut h, hot[i % hot.len()], 1);
        if i % 40 == 0 {
            let (image, _) = far_site_crash_image(&r.d);
            assert_point_in_time(&image, &h, &format!("sample after write {i}"));
        }
    }
    let last = r.leg.cycle_now(Duration::from_secs(10)).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let applied = applier.join().unwrap();
    let st = r.leg.replication().unwrap();
    let c = st.cycle.unwrap();
    assert!(c.far_apply, "{c:?}");
    assert_eq!(c.image_bytes, 0, "this side wrote the image: {c:?}");
    assert!(
        applied >= 2 && applied as u64 <= last,
        "{applied} applied of {last}"
    );
    assert!(
        c.staged_bytes as f64 <= 1.05 * c.changed_bytes as f64,
        "{c:?}"
    );
    drop(qp);
    assert_eq!(
        read_all(&*r.d.local).unwrap(),
        read_all(&**r.d.far.inner()).unwrap()
    );
}
