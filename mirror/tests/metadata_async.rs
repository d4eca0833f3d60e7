//! Leg-state changes are recorded in the superblocks by the metadata thread, never on a
//! data-path reactor (docs/bitmap.md, "Superblock protocol"): a hung superblock write stalls
//! no core, a write is acknowledged only once the survivors' superblocks name the faulted leg
//! stale, a survivor that cannot record it fails the write, and a restart elects the leg that
//! holds every acknowledged write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::superblock::{MemberState, Superblock};
use nvmirror_mirror::{LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};

const LBA: u32 = 512;
const REGION: u64 = 64 << 10;
/// Blocks per region.
const BPR: u64 = REGION / LBA as u64;

fn legs(n: usize, tag: &str) -> Vec<Arc<FaultyDevice>> {
    (0..n)
        .map(|i| {
            let mem = MemDevice::new(8 << 20, LBA, LatencyModel::None)
                .unwrap()
                .with_name(format!("mem://{tag}{i}"));
            Arc::new(FaultyDevice::wrap(Arc::new(mem)))
        })
        .collect()
}

fn devs(f: &[Arc<FaultyDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    f.iter()
        .map(|d| Arc::clone(d) as Arc<dyn BlockDevice>)
        .collect()
}

fn cfg(io_timeout: Duration) -> VolumeConfig {
    VolumeConfig {
        region_size: REGION,
        io_timeout,
        ..VolumeConfig::default()
    }
}

/// Leg `leg`'s superblock, read past the fault injector.
fn superblock(f: &FaultyDevice) -> Superblock {
    let data = nvmirror_nvme::read_all(&**f.inner()).unwrap();
    Superblock::decode(&data[..4096]).unwrap()
}

/// The superblock's 4 KiB at LBA 0: writes there fail (or hang) while armed.
fn superblock_range() -> (u64, u64) {
    (0, 4096 / u64::from(LBA))
}

/// A stamp that names the write it came from.
fn stamp(slba: u64, nlb: u32, seed: u8) -> Vec<u8> {
    (0..nlb as usize * LBA as usize)
        .map(|i| (i as u64 ^ slba.wrapping_mul(131)) as u8 ^ seed)
        .collect()
}

/// One host queue on a volume, with the buffers of its commands kept alive.
struct Host {
    qp: Box<dyn QueuePair>,
    keep: Vec<Box<[u8]>>,
    next: u64,
}

impl Host {
    fn new(vol: &Volume) -> Self {
        Self {
            qp: vol.open_qpair(16).unwrap(),
            keep: Vec::new(),
            next: 1,
        }
    }

    fn submit(&mut self, op: IoOp, slba: u64, nlb: u32, data: Vec<u8>) -> u64 {
        let tag = self.next;
        self.next += 1;
        self.keep.push(data.into_boxed_slice());
        let buf = IoBuf::from_slice(self.keep.last_mut().unwrap());
        // SAFETY: the buffer lives in `keep` until the host is dropped.
        unsafe { self.qp.submit(IoCommand::with_buf(op, slba, nlb, buf, tag)) }.unwrap();
        tag
    }

    fn poll(&mut self) -> Vec<Completion> {
        let mut cpl = [Completion::default(); 16];
        let n = self.qp.poll(&mut cpl);
        cpl[..n].to_vec()
    }

    fn wait(&mut self, tag: u64, limit: Duration) -> Status {
        let start = Instant::now();
        loop {
            if let Some(c) = self.poll().into_iter().find(|c| c.tag == tag) {
                return c.status;
            }
            assert!(start.elapsed() < limit, "command {tag} did not complete");
            std::thread::yield_now();
        }
    }

    fn write(&mut self, slba: u64, nlb: u32, seed: u8) -> Status {
        let tag = self.submit(IoOp::Write, slba, nlb, stamp(slba, nlb, seed));
        self.wait(tag, Duration::from_secs(30))
    }

    fn read(&mut self, slba: u64, nlb: u32) -> Vec<u8> {
        let tag = self.submit(IoOp::Read, slba, nlb, vec![0; nlb as usize * LBA as usize]);
        let status = self.wait(tag, Duration::from_secs(30));
        assert!(status.is_success(), "read at {slba}: {status}");
        self.keep.last().unwrap().to_vec()
    }
}

#[test]
fn a_hung_superblock_write_stalls_no_reactor_and_holds_the_ack_until_the_fault_is_durable() {
    let f = legs(3, "hang");
    let timeout = Duration::from_secs(3);
    let vol = Arc::new(Volume::format("hang", devs(&f), cfg(timeout), false).unwrap());
    let data_lba = vol.metadata_layout().unwrap().data_offset / u64::from(LBA);
    let (sb, sb_len) = superblock_range();
    // Leg 1's superblock writes hang (its data blocks keep working); leg 0 fails one write.
    f[1].injector().arm(Fault::HangRange {
        ops: OpFilter::Writes,
        slba: sb,
        nlb: sb_len,
    });
    f[0].injector().arm(Fault::FailRange {
        ops: OpFilter::Writes,
        slba: data_lba + 2 * BPR,
        nlb: 8,
        status: Status::WRITE_FAULT,
    });
    let faulted = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicBool::new(false));
    let other_core_reads = Arc::new(AtomicU64::new(0));
    // Another core: a host reading all along; it counts what completes between the fault and
    // the faulting write's ack. Once leg 0 is out it also writes, which leg 0 misses: that
    // write's ack must find the survivor's superblock naming leg 0 stale.
    let other = {
        let (vol, faulted, acked, reads, survivor) = (
            Arc::clone(&vol),
            Arc::clone(&faulted),
            Arc::clone(&acked),
            Arc::clone(&other_core_reads),
            Arc::clone(&f[2]),
        );
        std::thread::spawn(move || {
            let mut host = Host::new(&vol);
            let mut wrote = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !acked.load(Ordering::Acquire) && Instant::now() < deadline {
                if wrote.is_none() && reads.load(Ordering::Relaxed) >= 20 {
                    let status = host.write(9 * BPR, 8, 0x99);
                    wrote = Some((status, superblock(&survivor).member_states[0]));
                    continue;
                }
                let tag = host.submit(IoOp::Read, 5 * BPR, 8, vec![0; 4096]);
                let during = faulted.load(Ordering::Acquire);
                let status = host.wait(tag, Duration::from_secs(30));
                assert!(status.is_success());
                if during && !acked.load(Ordering::Acquire) {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                host.keep.clear();
            }
            wrote
        })
    };
    // This core: the host whose write faults leg 0, and a second host reading meanwhile.
    let mut writer = Host::new(&vol);
    let mut reader = Host::new(&vol);
    let w = writer.submit(IoOp::Write, 2 * BPR, 8, stamp(2 * BPR, 8, 0x5a));
    let start = Instant::now();
    let mut same_core_reads = 0u64;
    let mut read_tag = None;
    let status = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the write was never answered"
        );
        let done = writer.poll().into_iter().find(|c| c.tag == w);
        if vol.leg_states()[0].state == LegState::Faulted {
            faulted.store(true, Ordering::Release);
        }
        if let Some(c) = done {
            break c.status;
        }
        let tag =
            *read_tag.get_or_insert_with(|| reader.submit(IoOp::Read, 7 * BPR, 8, vec![0; 4096]));
        if let Some(c) = reader.poll().into_iter().find(|c| c.tag == tag) {
            assert!(c.status.is_success());
            if faulted.load(Ordering::Acquire) {
                same_core_reads += 1;
            }
            read_tag = None;
            reader.keep.clear();
        }
    };
    let waited = start.elapsed();
    // What the superblocks said when the write was acknowledged.
    let states: Vec<LegState> = vol.leg_states().iter().map(|l| l.state).collect();
    let survivor = superblock(&f[2]);
    acked.store(true, Ordering::Release);
    let other_write = other.join().unwrap();
    let other_core_reads = other_core_reads.load(Ordering::Relaxed);
    assert!(
        same_core_reads > 0,
        "the faulting core served nothing while the superblock write hung"
    );
    assert!(
        other_core_reads > 0,
        "another core served nothing while the superblock write hung"
    );
    // Leg 1 could not record the fault within its timeout and went out too; leg 2 holds the
    // data and the states, so the write succeeded, and only after they were durable.
    assert!(status.is_success(), "the write got {status}");
    assert!(
        waited >= timeout,
        "acknowledged after {waited:?}, before leg 1's superblock write timed out"
    );
    assert_eq!(
        states,
        [LegState::Faulted, LegState::Faulted, LegState::InSync]
    );
    assert_ne!(survivor.member_states[0], MemberState::InSync);
    assert_ne!(survivor.member_states[1], MemberState::InSync);
    let (other_status, named) = other_write.expect("the other core wrote while leg 0 was out");
    assert!(other_status.is_success(), "{other_status}");
    assert_ne!(
        named,
        MemberState::InSync,
        "another core's write that leg 0 missed was acknowledged before a superblock said so"
    );
    eprintln!(
        "reads during the hang: {same_core_reads} on the faulting core, {other_core_reads} on another; ack after {waited:?}"
    );
    f[1].injector().clear_all();
}

/// Legs 0 and 1; leg 1's superblock cannot be written, then a write faults leg 0.
fn unrecorded_fault(tag: &str) -> (Vec<Arc<FaultyDevice>>, Volume, Host, u64, u64) {
    let f = legs(2, tag);
    let vol = Volume::format(tag, devs(&f), cfg(Duration::from_secs(1)), false).unwrap();
    let data_lba = vol.metadata_layout().unwrap().data_offset / u64::from(LBA);
    let mut host = Host::new(&vol);
    assert!(host.write(BPR, 8, 0x01).is_success());
    let (sb, sb_len) = superblock_range();
    let sb_fault = f[1].injector().arm(Fault::FailRange {
        ops: OpFilter::Writes,
        slba: sb,
        nlb: sb_len,
        status: Status::WRITE_FAULT,
    });
    let data_fault = f[0].injector().arm(Fault::FailRange {
        ops: OpFilter::Writes,
        slba: data_lba,
        nlb: u64::MAX,
        status: Status::WRITE_FAULT,
    });
    (f, vol, host, sb_fault, data_fault)
}

#[test]
fn a_write_is_not_acknowledged_while_no_survivor_records_the_fault() {
    let (f, vol, mut host, sb_fault, _) = unrecorded_fault("unrec");
    let first = host.write(3 * BPR, 8, 0x11);
    assert!(
        !first.is_success(),
        "the write that faulted leg 0 was acknowledged, but leg 1's superblock does not say so"
    );
    assert_eq!(vol.leg_states()[0].state, LegState::Faulted);
    assert_eq!(vol.leg_states()[1].state, LegState::InSync);
    // Leg 0 is out in memory only: whatever it misses from now on is not backed either.
    let second = host.write(4 * BPR, 8, 0x22);
    assert!(
        !second.is_success(),
        "a write leg 0 missed was acknowledged while the superblocks still call it in sync"
    );
    // Reads go on from leg 1.
    assert_eq!(host.read(BPR, 8), stamp(BPR, 8, 0x01));
    // Once leg 1's superblock can be written again, writes are acknowledged.
    f[1].injector().clear(sb_fault);
    let start = Instant::now();
    while !host.write(4 * BPR, 8, 0x33).is_success() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "writes never recovered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sb1 = superblock(&f[1]);
    assert_ne!(sb1.member_states[0], MemberState::InSync);
    assert!(sb1.event_counter > superblock(&f[0]).event_counter);
}

#[test]
fn a_restart_after_an_unrecorded_fault_elects_the_leg_with_the_acknowledged_writes() {
    let (f, vol, mut host, sb_fault, _) = unrecorded_fault("elect");
    let _ = host.write(3 * BPR, 8, 0x11);
    let mut acked = Vec::new();
    // Writes that leg 0 misses: acknowledged only where they are backed.
    for (i, region) in [4u64, 5, 6].into_iter().enumerate() {
        if i == 1 {
            f[1].injector().clear(sb_fault);
        }
        let seed = 0x40 + i as u8;
        let start = Instant::now();
        loop {
            if host.write(region * BPR, 8, seed).is_success() {
                acked.push((region, seed));
                break;
            }
            if i == 0 || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(acked.len() >= 2, "writes never recovered: {acked:?}");
    drop(host);
    drop(vol);
    for d in &f {
        d.injector().clear_all();
    }
    // An unclean stop: the marked regions are made identical from the freshest leg.
    let vol = Volume::open_persistent("elect", devs(&f), cfg(Duration::from_secs(1))).unwrap();
    assert_eq!(vol.primary(), 1, "the restart elected the stale leg");
    assert_eq!(vol.leg_states()[0].state, LegState::Faulted);
    let mut host = Host::new(&vol);
    for &(region, seed) in &acked {
        assert_eq!(
            host.read(region * BPR, 8),
            stamp(region * BPR, 8, seed),
            "acknowledged write to region {region} lost"
        );
    }
    assert_eq!(host.read(BPR, 8), stamp(BPR, 8, 0x01));
}

#[test]
fn a_persistent_resync_ends_with_the_whole_bitmap_and_the_superblocks_on_the_rebuilt_leg() {
    let f = legs(2, "rs");
    let vol = Volume::format("rs", devs(&f), cfg(Duration::from_secs(2)), false).unwrap();
    let mut host = Host::new(&vol);
    assert!(host.write(BPR, 8, 0x01).is_success());
    vol.fault_leg(1).unwrap();
    assert!(host.write(3 * BPR, 8, 0x03).is_success());
    let status = vol.attach_leg(1).unwrap().run().join().unwrap();
    assert_eq!(status.state, nvmirror_mirror::JobState::Done, "{status:?}");
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    // A write after the flip is acknowledged once the superblocks name leg 1 in sync.
    assert!(host.write(5 * BPR, 8, 0x05).is_success());
    let sb = superblock(&f[1]);
    assert_eq!(sb.member_states[1], MemberState::InSync);
    assert_eq!(sb.event_counter, superblock(&f[0]).event_counter);
    // The metadata thread gave the rebuilt leg the whole bitmap: both legs' areas agree.
    let l = vol.metadata_layout().unwrap();
    let area = |d: &FaultyDevice| {
        let data = nvmirror_nvme::read_all(&**d.inner()).unwrap();
        data[l.bitmap_offset as usize..(l.bitmap_offset + l.bitmap_len) as usize].to_vec()
    };
    assert!(area(&f[1]).iter().any(|&b| b != 0));
    assert_eq!(area(&f[0]), area(&f[1]));
    assert_eq!(host.read(3 * BPR, 8), stamp(3 * BPR, 8, 0x03));
}

#[test]
fn a_timed_out_superblock_write_counts_in_the_legs_timeouts_and_holds_back_its_resync() {
    let f = legs(3, "ctlto");
    let vol = Volume::format("ctlto", devs(&f), cfg(Duration::from_millis(300)), false).unwrap();
    let (sb, sb_len) = superblock_range();
    // Leg 1's superblock writes hang, and its back end keeps what it was given once closed.
    f[1].injector().refuse_cancels(true);
    let hang = f[1].injector().arm(Fault::HangRange {
        ops: OpFilter::Writes,
        slba: sb,
        nlb: sb_len,
    });
    let before = vol.stats().legs[1].timeouts;
    // Faulting leg 0 records it on legs 1 and 2: leg 1's write is given up at the timeout.
    vol.fault_leg(0).unwrap();
    let start = Instant::now();
    while vol.stats().legs[1].timeouts == before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the timed-out superblock write was never counted in leg 1's timeouts"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    // The hung write may still land on leg 1: it is busy until its back end lets it go.
    let busy = vol.attach_leg(1).map(|_| ()).unwrap_err();
    assert!(
        matches!(busy, nvmirror_mirror::Error::LegBusy { leg: 1, .. }),
        "{busy}"
    );
    f[1].injector().clear(hang);
    let start = Instant::now();
    let mut job = loop {
        match vol.attach_leg(1) {
            Ok(job) => break job,
            Err(nvmirror_mirror::Error::LegBusy { .. }) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "leg 1 stayed busy"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    job.run_blocking();
    assert_eq!(vol.leg_states()[1].state, LegState::InSync);
}
