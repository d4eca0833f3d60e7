//! Bring-up, every command on both data paths, digests, queue limits, several queues.

use std::time::{Duration, Instant};

use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{open_leg, BlockDevice, IoCommand, IoOp, Status, SubmitError};

use super::harness::{backing, pattern, read, reap, run, start, write, SUBNQN};

#[test]
fn connect_reports_the_controller_and_the_namespace_geometry() {
    let t = start(|_| {});
    let ns1 = t.connect("").unwrap();
    assert_eq!(ns1.geometry().lba_size, 512);
    assert_eq!(ns1.geometry().num_blocks, (16 << 20) / 512);
    let c = ns1.controller();
    assert_ne!(c.cntlid, 0);
    assert_eq!(c.version, 0x10300);
    assert_eq!(c.in_capsule, 8192, "IOCCSZ minus the SQE");
    assert_eq!(c.max_transfer, 128 * 1024, "MDTS 5 of 4 KiB pages");
    assert_eq!(c.io_queues, 16);
    assert_eq!(c.max_queue_entries, 128);
    assert_eq!(c.model, "nvmirror");
    assert!(ns1
        .host_nqn()
        .starts_with("nqn.2014-08.org.nvmexpress:uuid:"));

    // Through the leg URI parser and opener, namespace 2 with explicit options.
    let ns2 = open_leg(&t.uri("nsid=2&queue_size=16&kato=2s")).unwrap();
    assert_eq!(ns2.geometry().lba_size, 4096);
    assert_eq!(ns2.geometry().num_blocks, (4 << 20) / 4096);
    assert!(ns2.name().contains(SUBNQN));
    assert_eq!(t.controllers(), 2);

    // A queue pair keeps its controller; the last one gone takes it down.
    let qp = ns1.open_qpair(8).unwrap();
    drop(ns1);
    drop(ns2);
    wait_for(|| t.controllers() <= 1, "ns2's controller goes away");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        t.controllers(),
        1,
        "ns1's controller is held by its queue pair"
    );
    drop(qp);
    wait_for(
        || t.controllers() == 0,
        "the controller goes with its last queue pair",
    );
}

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn write_read_verify_from_512_bytes_to_1_mib_on_both_data_paths() {
    // MDTS 8 (1 MiB); H2CData in 16 KiB pieces so large writes take several PDUs per R2T.
    let t = start(|c| {
        c.mdts = 8;
        c.maxh2cdata = 16 * 1024;
    });
    let dev = t.connect("").unwrap();
    assert_eq!(dev.controller().max_transfer, 1 << 20);
    let mut qp = dev.open_qpair(8).unwrap();
    let mut slba = 0u64;
    for (k, len) in [
        512usize,
        4096,
        8192,       // the largest in-capsule write
        8192 + 512, // the smallest one on R2T
        64 * 1024,
        128 * 1024 + 512,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        let mut data = pattern(len, k as u8 * 7 + 1);
        assert!(
            write(&mut *qp, slba, &mut data, 512).is_success(),
            "write {len}"
        );
        let (st, back) = read(&mut *qp, slba, len, 512);
        assert!(st.is_success(), "read {len}: {st}");
        assert!(back == data, "read back {len} bytes");
        assert!(
            backing(&*t.namespaces[0], slba as usize * 512, len) == data,
            "the target's namespace holds the {len} bytes"
        );
        slba += (len / 512) as u64 + 3;
    }
}

#[test]
fn every_digest_setting_moves_data_intact() {
    let t = start(|c| c.maxh2cdata = 4096);
    for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
        let dev = t
            .connect(&format!(
                "nsid=2&hdgst={}&ddgst={}",
                u8::from(h),
                u8::from(d)
            ))
            .unwrap();
        let mut qp = dev.open_qpair(4).unwrap();
        let seed = u8::from(h) * 2 + u8::from(d);
        for (slba, len) in [(0u64, 4096usize), (4, 64 * 1024)] {
            let mut data = pattern(len, seed ^ slba as u8);
            assert!(
                write(&mut *qp, slba, &mut data, 4096).is_success(),
                "write {len} digests {h}/{d}"
            );
            let (st, back) = read(&mut *qp, slba, len, 4096);
            assert!(st.is_success());
            assert!(back == data, "read back {len} with digests {h}/{d}");
        }
    }
}

#[test]
fn flush_write_zeroes_and_deallocate() {
    let t = start(|_| {});
    let dev = t.connect("nsid=2").unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut data = pattern(8 * 4096, 3);
    assert!(write(&mut *qp, 0, &mut data, 4096).is_success());
    assert!(run(&mut *qp, IoCommand::new(IoOp::Flush, 0, 0, 1)).is_success());
    assert!(run(&mut *qp, IoCommand::new(IoOp::WriteZeroes, 1, 2, 2)).is_success());
    assert!(run(&mut *qp, IoCommand::new(IoOp::Deallocate, 5, 1, 3)).is_success());
    assert!(run(&mut *qp, IoCommand::new(IoOp::Deallocate, 7, 1, 4)).is_success());
    let (st, back) = read(&mut *qp, 0, 8 * 4096, 4096);
    assert!(st.is_success());
    for blk in 0..8 {
        let got = &back[blk * 4096..(blk + 1) * 4096];
        if [1, 2, 5, 7].contains(&blk) {
            assert!(got.iter().all(|&b| b == 0), "block {blk} reads zeroes");
        } else {
            assert_eq!(got, &data[blk * 4096..(blk + 1) * 4096], "block {blk} kept");
        }
    }
    let last = dev.geometry().num_blocks;
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::WriteZeroes, last - 1, 2, 5)),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::Deallocate, last, 1, 6)),
        Status::LBA_OUT_OF_RANGE
    );
}

#[test]
fn out_of_range_status_comes_from_the_target_and_the_queue_goes_on() {
    let t = start(|_| {});
    let dev = t.connect("").unwrap();
    let blocks = dev.geometry().num_blocks;
    let mut qp = dev.open_qpair(4).unwrap();
    // In-capsule and R2T writes, and a read, each one block past the end.
    let mut small = vec![1u8; 1024];
    assert_eq!(
        write(&mut *qp, blocks - 1, &mut small, 512),
        Status::LBA_OUT_OF_RANGE
    );
    let mut big = vec![2u8; 16 * 1024];
    assert_eq!(
        write(&mut *qp, blocks - 31, &mut big, 512),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(read(&mut *qp, blocks, 512, 512).0, Status::LBA_OUT_OF_RANGE);
    assert_eq!(
        read(&mut *qp, u64::MAX, 512, 512).0,
        Status::LBA_OUT_OF_RANGE
    );
    let mut ok = pattern(512, 5);
    assert!(write(&mut *qp, blocks - 1, &mut ok, 512).is_success());
    assert_eq!(read(&mut *qp, blocks - 1, 512, 512).1, ok);
}

#[test]
fn transfers_beyond_mdts_are_split_and_malformed_commands_refused() {
    let t = start(|c| c.maxh2cdata = 32 * 1024);
    let dev = t.connect("").unwrap();
    let blocks = dev.geometry().num_blocks;
    assert_eq!(dev.controller().max_transfer, 128 * 1024);
    // One queue slot: the pieces of a 1 MiB + 512 B command go out one after another.
    let mut qp = dev.open_qpair(1).unwrap();
    let mut big = pattern((1 << 20) + 512, 3);
    assert!(write(&mut *qp, 100, &mut big, 512).is_success());
    assert!(backing(&*t.namespaces[0], 100 * 512, big.len()) == big);
    let (st, back) = read(&mut *qp, 100, big.len(), 512);
    assert!(st.is_success());
    assert!(back == big, "split read");
    // A piece past the end fails the whole command with the target's status.
    assert_eq!(
        read(&mut *qp, blocks - 300, 600 * 512, 512).0,
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(qp.outstanding(), 0);
    // What cannot be put on the wire completes at once.
    let mut short = vec![0u8; 512];
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 2, IoBuf::from_slice(&mut short), 1);
    assert_eq!(run(&mut *qp, cmd), Status::DATA_SGL_LENGTH_INVALID);
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::WriteZeroes, 0, 0, 2)),
        Status::INVALID_FIELD
    );
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::Deallocate, 0, 65537, 3)),
        Status::INVALID_FIELD
    );
    // The whole namespace reads back through `read_all`'s 1 MiB commands.
    let all = nvmirror_nvme::read_all(&dev).unwrap();
    assert!(all[100 * 512..100 * 512 + big.len()] == big[..]);
}

#[test]
fn a_full_queue_says_so_and_recovers() {
    let t = start(|_| {});
    let dev = t.connect("queue_size=8").unwrap();
    let qp = dev.open_qpair(64).unwrap();
    assert_eq!(qp.depth(), 8, "queue_size caps the depth");
    drop(qp);
    let mut qp = dev.open_qpair(4).unwrap();
    assert_eq!(qp.depth(), 4);
    let mut bufs: Vec<Vec<u8>> = (0..5).map(|k| pattern(4096, k)).collect();
    for (k, b) in bufs.iter_mut().enumerate().take(4) {
        let cmd = IoCommand::with_buf(IoOp::Write, k as u64 * 8, 8, IoBuf::from_slice(b), k as u64);
        // SAFETY: `bufs` outlives the commands, reaped below.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    let extra = IoCommand::with_buf(IoOp::Write, 32, 8, IoBuf::from_slice(&mut bufs[4]), 4);
    // SAFETY: as above.
    assert_eq!(unsafe { qp.submit(extra) }, Err(SubmitError::QueueFull));
    assert_eq!(qp.outstanding(), 4);
    let mut tags: Vec<u64> = reap(&mut *qp, 4)
        .iter()
        .map(|c| {
            assert!(c.status.is_success());
            c.tag
        })
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3]);
    assert!(run(&mut *qp, extra).is_success());
    for k in 0..5u64 {
        assert_eq!(read(&mut *qp, k * 8, 4096, 512).1, pattern(4096, k as u8));
    }
}

#[test]
fn queue_pairs_on_several_threads_pipeline_their_io() {
    let t = start(|_| {});
    let dev = t.connect("").unwrap();
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let dev = &dev;
            s.spawn(move || {
                let mut qp = dev.open_qpair(16).unwrap();
                let base = w * 4096;
                // 64 writes, 16 in flight, half of them 16 KiB (R2T), then read all back.
                let lens: Vec<usize> = (0..64)
                    .map(|k| if k % 2 == 0 { 4096 } else { 16384 })
                    .collect();
                let mut bufs: Vec<Vec<u8>> = (0..64)
                    .map(|k| pattern(lens[k], (w as u8) << 6 | k as u8))
                    .collect();
                let slba = |k: usize| base + k as u64 * 32;
                let mut next = 0;
                let mut done = 0;
                while done < 64 {
                    while next < 64 && qp.outstanding() < qp.depth() {
                        let nlb = (lens[next] / 512) as u32;
                        let buf = IoBuf::from_slice(&mut bufs[next]);
                        let cmd =
                            IoCommand::with_buf(IoOp::Write, slba(next), nlb, buf, next as u64);
                        // SAFETY: `bufs` outlives the commands, all reaped in this loop.
                        unsafe { qp.submit(cmd) }.unwrap();
                        next += 1;
                    }
                    for c in reap(&mut *qp, 1) {
                        assert!(c.status.is_success(), "write {}: {}", c.tag, c.status);
                        done += 1;
                    }
                }
                for (k, b) in bufs.iter().enumerate() {
                    let (st, back) = read(&mut *qp, slba(k), lens[k], 512);
                    assert!(st.is_success());
                    assert!(&back == b, "thread {w} write {k}");
                }
            });
        }
    });
}

#[test]
fn keep_alive_holds_an_idle_controller() {
    let t = start(|_| {});
    let dev = t.connect("kato=1s").unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    // Idle for several keep-alive timeouts: without Keep Alive the target tears the
    // controller down after 1 s and this queue dies.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(t.controllers(), 1);
    assert!(dev.lost_reason().is_none());
    let mut data = pattern(512, 1);
    assert!(write(&mut *qp, 0, &mut data, 512).is_success());
}
