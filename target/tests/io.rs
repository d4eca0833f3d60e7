//! I/O over NVMe/TCP: every command, both data paths, digests, several queues.

mod common;

use common::{pattern, start, Host, Received};
use nvmirror_nvme::read_all;
use nvmirror_nvme::spec::tcp::flags;
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

fn io_queue(addr: std::net::SocketAddr, hdgst: bool, ddgst: bool) -> (Host, Host) {
    let (admin, cntlid) = Host::bring_up_admin(addr, hdgst, ddgst, 0);
    let io = Host::bring_up_io(addr, cntlid, 1, hdgst, ddgst);
    (admin, io)
}

#[test]
fn read_write_round_trip_under_every_digest_setting_and_data_path() {
    let t = start(|_| {});
    for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
        let (_admin, mut io) = io_queue(t.addr, h, d);
        for (k, (len, in_capsule)) in [
            (512usize, true),
            (8192, true),
            (4096, false),
            (128 * 1024, false),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(len, k as u8 + u8::from(h) * 2 + u8::from(d));
            let slba = 64 * k as u64;
            assert!(
                io.write(1, slba, &data, 512, in_capsule).is_success(),
                "write {len} in_capsule={in_capsule}"
            );
            let (st, back) = io.read(1, slba, (len / 512) as u32, 512);
            assert!(st.is_success());
            assert_eq!(back, data, "read back {len} bytes (digests {h}/{d})");
        }
        // The namespace really holds the data.
        let all = read_all(&*t.namespaces[0]).unwrap();
        assert_eq!(
            &all[..512],
            &pattern(512, u8::from(h) * 2 + u8::from(d))[..]
        );
    }
}

#[test]
fn r2t_is_answered_in_maxh2cdata_chunks() {
    let t = start(|c| c.maxh2cdata = 4096);
    let (_admin, mut io) = io_queue(t.addr, false, true);
    let data = pattern(64 * 1024, 9);
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x01,
        cid: io.cid(),
        nsid: 2,
        ..Default::default()
    };
    sqe.set_lba_range(3, 16);
    io.send_cmd(sqe, &data, false, 0);
    let r = match io.recv() {
        Received::R2T(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.r2to, r.r2tl), (0, 64 * 1024));
    io.answer_r2t(&r, &data, 4096);
    assert!(io.finish(sqe.cid, &data).0.status().is_success());
    let (st, back) = io.read(2, 3, 16, 4096);
    assert!(st.is_success());
    assert_eq!(back, data);
}

#[test]
fn flush_write_zeroes_and_deallocate() {
    let t = start(|_| {});
    let (_admin, mut io) = io_queue(t.addr, false, false);
    let data = pattern(8 * 4096, 3);
    assert!(io.write(2, 0, &data, 4096, false).is_success());
    let flush = |io: &mut Host, nsid| {
        let sqe = SubmissionQueueEntry {
            opcode: 0x00,
            cid: io.cid(),
            nsid,
            ..Default::default()
        };
        io.run(sqe, &[], true, 0).0.status()
    };
    assert!(flush(&mut io, 2).is_success());
    assert!(
        flush(&mut io, 0xffff_ffff).is_success(),
        "flush of every namespace"
    );
    assert_eq!(flush(&mut io, 7), Status::INVALID_NAMESPACE.with_dnr());
    // Write Zeroes over blocks 1..3.
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x08,
        cid: io.cid(),
        nsid: 2,
        ..Default::default()
    };
    sqe.set_lba_range(1, 2);
    assert!(io.run(sqe, &[], true, 0).0.status().is_success());
    // Deallocate blocks 5 and 7 (two ranges, plus an empty one).
    let mut ranges = Vec::new();
    for (slba, nlb) in [(5u64, 1u32), (7, 1), (0, 0)] {
        ranges.extend_from_slice(&0u32.to_le_bytes());
        ranges.extend_from_slice(&nlb.to_le_bytes());
        ranges.extend_from_slice(&slba.to_le_bytes());
    }
    let sqe = SubmissionQueueEntry {
        opcode: 0x09,
        cid: io.cid(),
        nsid: 2,
        cdw10: 2,
        cdw11: 1 << 2,
        ..Default::default()
    };
    assert!(io.run(sqe, &ranges, true, 0).0.status().is_success());
    let (_, back) = io.read(2, 0, 8, 4096);
    for blk in 0..8 {
        let got = &back[blk * 4096..(blk + 1) * 4096];
        if [1, 2, 5, 7].contains(&blk) {
            assert!(got.iter().all(|&b| b == 0), "block {blk} zeroed");
        } else {
            assert_eq!(got, &data[blk * 4096..(blk + 1) * 4096], "block {blk} kept");
        }
    }
    // A range past the end fails the whole command before anything is deallocated.
    let mut bad = ranges.clone();
    bad[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
    let sqe = SubmissionQueueEntry {
        opcode: 0x09,
        cid: io.cid(),
        nsid: 2,
        cdw10: 1,
        cdw11: 1 << 2,
        ..Default::default()
    };
    assert_eq!(
        io.run(sqe, &bad[..32], false, 0).0.status(),
        Status::LBA_OUT_OF_RANGE
    );
}

#[test]
fn invalid_io_commands_get_nvme_errors_and_the_queue_goes_on() {
    let t = start(|_| {});
    let (_admin, mut io) = io_queue(t.addr, true, true);
    let blocks = (16 << 20) / 512;
    // Out of range, on both data paths (no R2T is sent for a command that cannot run).
    assert_eq!(
        io.write(1, blocks - 1, &[0u8; 1024], 512, true),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        io.write(1, blocks - 1, &[0u8; 1024], 512, false),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(io.read(1, blocks, 1, 512).0, Status::LBA_OUT_OF_RANGE);
    // Larger than MDTS (128 KiB).
    assert_eq!(io.read(1, 0, 257, 512).0, Status::INVALID_FIELD.with_dnr());
    assert_eq!(
        io.write(1, 0, &vec![0u8; 132 * 1024], 512, false),
        Status::INVALID_FIELD.with_dnr()
    );
    // Unknown opcode and namespace.
    let sqe = SubmissionQueueEntry {
        opcode: 0x05,
        cid: io.cid(),
        nsid: 1,
        ..Default::default()
    };
    assert_eq!(
        io.run(sqe, &[], true, 0).0.status(),
        Status::INVALID_OPCODE.with_dnr()
    );
    assert_eq!(
        io.read(3, 0, 1, 512).0,
        Status::INVALID_NAMESPACE.with_dnr()
    );
    // Write whose in-capsule data is shorter than NLB says.
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x01,
        cid: io.cid(),
        nsid: 1,
        ..Default::default()
    };
    sqe.set_lba_range(0, 4);
    assert_eq!(
        io.run(sqe, &[0u8; 512], true, 0).0.status(),
        Status::DATA_SGL_LENGTH_INVALID.with_dnr()
    );
    // Keyed SGL descriptors are not for TCP.
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x02,
        cid: io.cid(),
        nsid: 1,
        flags: 0x40,
        ..Default::default()
    };
    sqe.set_lba_range(0, 1);
    sqe.dptr = [0, 512 | (0x40 << 56)];
    let mut out = vec![0u8; 200];
    let n = nvmirror_nvme::spec::tcp::write_capsule_cmd(&mut out, &sqe, &[], io.dg);
    io.send(&out[..n]);
    assert_eq!(
        io.finish(sqe.cid, &[]).0.status(),
        Status::SGL_DESCRIPTOR_TYPE_INVALID
    );
    // Still healthy.
    assert!(io.write(1, 0, &[7u8; 512], 512, true).is_success());
}

#[test]
fn success_flag_replaces_the_response_when_sq_flow_control_is_off() {
    let t = start(|_| {});
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let cid = io.cid();
    let mut sqe = nvmirror_nvme::spec::fabrics::connect_sqe(cid, 1, 31, 0);
    sqe.cdw11 |= 1 << 18; // CATTR bit 2: disable SQ flow control
    let data = Host::connect_data(common::SUBNQN, common::HOSTNQN, cntlid);
    assert!(io.run(sqe, &data, true, 0).0.status().is_success());
    assert!(io.write(1, 10, &pattern(4096, 1), 512, true).is_success());
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x02,
        cid: io.cid(),
        nsid: 1,
        ..Default::default()
    };
    sqe.set_lba_range(10, 8);
    io.send_cmd(sqe, &[], true, 4096);
    match io.recv() {
        Received::C2H { header, data, .. } => {
            assert_eq!(
                header.ch.flags & (flags::SUCCESS | flags::LAST_PDU),
                flags::SUCCESS | flags::LAST_PDU
            );
            assert_eq!(data, pattern(4096, 1));
        }
        other => panic!("{other:?}"),
    }
    // No response capsule follows: the next PDU belongs to the next command.
    let (st, _) = io.read(1, 10, 1, 512);
    assert!(st.is_success());
}

#[test]
fn pipelined_commands_and_several_queues() {
    let t = start(|_| {});
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let addr = t.addr;
    let workers: Vec<_> = (1..=3u16)
        .map(|qid| {
            std::thread::spawn(move || {
                let mut io = Host::bring_up_io(addr, cntlid, qid, qid == 2, qid == 3);
                // 32 writes in flight at once, then 32 reads.
                let base = u64::from(qid) * 10_000;
                let mut cids = Vec::new();
                for k in 0..32u64 {
                    let mut sqe = SubmissionQueueEntry {
                        opcode: 0x01,
                        cid: io.cid(),
                        nsid: 1,
                        ..Default::default()
                    };
                    sqe.set_lba_range(base + k * 8, 8);
                    io.send_cmd(sqe, &pattern(4096, (qid as u8) ^ k as u8), k % 2 == 0, 0);
                    cids.push((sqe.cid, k));
                }
                let mut done = 0;
                let mut r2ts = 0;
                while done < 32 {
                    match io.recv() {
                        Received::Resp(c) => {
                            assert!(c.status().is_success());
                            assert_eq!(c.sq_id, qid);
                            done += 1;
                        }
                        Received::R2T(r) => {
                            let k = cids.iter().find(|(c, _)| *c == r.cccid).unwrap().1;
                            io.answer_r2t(&r, &pattern(4096, (qid as u8) ^ k as u8), 4096);
                            r2ts += 1;
                        }
                        other => panic!("{other:?}"),
                    }
                }
                assert_eq!(r2ts, 16);
                for k in 0..32u64 {
                    let (st, back) = io.read(1, base + k * 8, 8, 512);
                    assert!(st.is_success());
                    assert_eq!(back, pattern(4096, (qid as u8) ^ k as u8));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn more_commands_than_the_queue_holds_terminates_the_connection() {
    let t = start(|_| {});
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 3, 0, common::SUBNQN, common::HOSTNQN, cntlid);
    assert!(c.status().is_success());
    // Four slots; five writes awaiting R2T data occupy them all and one more.
    for _ in 0..5 {
        let mut sqe = SubmissionQueueEntry {
            opcode: 0x01,
            cid: io.cid(),
            nsid: 1,
            ..Default::default()
        };
        sqe.set_lba_range(0, 1);
        io.send_cmd(sqe, &[0u8; 512], false, 0);
    }
    let term = io.expect_termination();
    assert_eq!(term.map(|t| t.0), Some(2), "PDU sequence error");
}
