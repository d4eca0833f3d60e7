//! A misbehaving or unusual controller (the scripted fake): the initiator checks what it
//! receives, terminates on violations and takes the R2T path when in-capsule data is off.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::backend::NvmeTcpDevice;
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::spec::tcp::flags;
use nvmirror_nvme::spec::{NvmOpcode, Status};
use nvmirror_nvme::{open_leg, IoCommand, IoOp, LegUri, QueuePair};

use super::fake::{self, FakeConfig, Got};
use super::harness::{pattern, read, reap, run, write};

/// Reads answered with the pattern of their starting LBA.
fn serve_reads(c: &mut fake::FakeConn, sqe: nvmirror_nvme::spec::SubmissionQueueEntry) {
    let data = pattern(sqe.nlb() as usize * 512, sqe.slba() as u8);
    c.c2h(sqe.cid, 0, &data, flags::LAST_PDU);
    c.resp(sqe.cid, Status::SUCCESS, 0);
}

#[test]
fn c2h_data_outside_the_command_terminates_the_queue() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| {
            if sqe.slba() == 7 {
                // 512 bytes past the end of a 4 KiB read.
                c.c2h(sqe.cid, 4096, &[0u8; 512], flags::LAST_PDU);
            } else {
                serve_reads(c, sqe);
            }
        }),
    );
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    assert!(read(&mut *qp, 1, 4096, 512).0.is_success());
    let mut buf = vec![0u8; 4096];
    for (k, slba) in [(1u64, 1u64), (2, 7)] {
        let cmd = IoCommand::with_buf(IoOp::Read, slba, 1, IoBuf::from_slice(&mut buf[..512]), k);
        // SAFETY: `buf` outlives the commands, reaped below.
        unsafe { qp.submit(cmd) }.unwrap();
        let _ = reap(&mut *qp, 1);
    }
    let cmd = IoCommand::with_buf(IoOp::Read, 7, 8, IoBuf::from_slice(&mut buf), 3);
    assert_eq!(run(&mut *qp, cmd), Status::HOST_PATHING_ERROR);
    let fes = f.events.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(fes, 0x04, "H2CTermReq: data transfer out of range");
    assert_eq!(read(&mut *qp, 1, 512, 512).0, Status::HOST_PATHING_ERROR);
}

#[test]
fn a_response_for_a_command_not_outstanding_terminates_the_queue() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| c.resp(sqe.cid.wrapping_add(1), Status::SUCCESS, 0)),
    );
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::Flush, 0, 0, 1)),
        Status::HOST_PATHING_ERROR
    );
    let fes = f.events.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(fes, 0x01, "H2CTermReq: invalid header field");
}

#[test]
fn a_data_digest_error_fails_only_its_command() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| {
            if sqe.slba() == 9 {
                c.c2h_bad_digest(sqe.cid, &vec![1u8; sqe.nlb() as usize * 512]);
                c.resp(sqe.cid, Status::SUCCESS, 0);
            } else {
                serve_reads(c, sqe);
            }
        }),
    );
    let dev = open_leg(&f.uri("ddgst=1&hdgst=1")).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    assert_eq!(read(&mut *qp, 9, 1024, 512).0, Status::DATA_TRANSFER_ERROR);
    let (st, data) = read(&mut *qp, 3, 2048, 512);
    assert!(st.is_success(), "the queue lives on");
    assert_eq!(data, pattern(2048, 3));
}

#[test]
fn a_controller_termination_fails_every_outstanding_command() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| {
            if sqe.slba() == 5 {
                c.term(0x02);
            }
        }),
    );
    let LegUri::NvmeTcp { addr, opts } = LegUri::parse(&f.uri("")).unwrap() else {
        unreachable!()
    };
    let dev = NvmeTcpDevice::connect(&addr, &opts).unwrap();
    let mut qp = dev.open_tcp_qpair(8).unwrap();
    let mut bufs = vec![vec![0u8; 512]; 6];
    for (k, b) in bufs.iter_mut().enumerate() {
        let cmd = IoCommand::with_buf(IoOp::Read, k as u64, 1, IoBuf::from_slice(b), k as u64);
        // SAFETY: `bufs` outlives the commands, reaped below.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    let got = reap(&mut qp, 6);
    assert!(
        got.iter().all(|c| c.status == Status::HOST_PATHING_ERROR),
        "{got:?}"
    );
    let why = qp.dead_reason().unwrap();
    assert!(why.contains("PduSequenceError"), "{why}");
}

#[test]
fn without_in_capsule_data_writes_and_deallocate_go_on_r2t() {
    let f = fake::start(
        FakeConfig {
            ioccsz: 4,
            ..FakeConfig::default()
        },
        Arc::new(|c, sqe, data| {
            assert!(data.is_empty(), "no in-capsule data when IOCCSZ is 4");
            let len = if sqe.opcode == NvmOpcode::DatasetManagement as u8 {
                16
            } else {
                sqe.nlb() * 512
            };
            // Ask in two R2Ts, the second in two H2CData PDUs of at most 8 KiB.
            let first = (len / 2).min(4096);
            let mut got = Vec::new();
            for (ttag, off, n) in [(1u16, 0, first), (2, first, len - first)] {
                c.r2t(sqe.cid, ttag, off, n);
                while got.len() < (off + n) as usize {
                    match c.recv() {
                        Got::H2C(h, d) => {
                            assert_eq!(
                                (h.cccid, h.ttag, h.datao as usize),
                                (sqe.cid, ttag, got.len())
                            );
                            let last = got.len() + d.len() == (off + n) as usize;
                            assert_eq!(h.ch.flags & flags::LAST_PDU != 0, last);
                            got.extend_from_slice(&d);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
            let ok = if sqe.opcode == NvmOpcode::DatasetManagement as u8 {
                got[4..8] == 3u32.to_le_bytes() && got[8..16] == 40u64.to_le_bytes()
            } else {
                got == pattern(len as usize, sqe.slba() as u8)
            };
            let st = if ok {
                Status::SUCCESS
            } else {
                Status::DATA_TRANSFER_ERROR
            };
            c.resp(sqe.cid, st, 0);
        }),
    );
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    for (slba, len) in [(1u64, 512usize), (2, 16 * 1024), (3, 32 * 1024)] {
        let mut data = pattern(len, slba as u8);
        assert!(
            write(&mut *qp, slba, &mut data, 512).is_success(),
            "write {len}"
        );
    }
    assert!(run(&mut *qp, IoCommand::new(IoOp::Deallocate, 40, 3, 1)).is_success());
}

#[test]
fn the_success_flag_completes_a_read_without_a_response() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| {
            let data = pattern(sqe.nlb() as usize * 512, 42);
            let half = data.len() / 2;
            c.c2h(sqe.cid, 0, &data[..half], 0);
            c.c2h(
                sqe.cid,
                half as u32,
                &data[half..],
                flags::LAST_PDU | flags::SUCCESS,
            );
        }),
    );
    let dev = open_leg(&f.uri("")).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    let (st, data) = read(&mut *qp, 0, 8192, 512);
    assert!(st.is_success());
    assert_eq!(data, pattern(8192, 42));
}

#[test]
fn namespaces_with_metadata_are_refused() {
    let f = fake::start(
        FakeConfig {
            metadata: 8,
            ..FakeConfig::default()
        },
        Arc::new(|_, _, _| {}),
    );
    let err = open_leg(&f.uri("")).unwrap_err().to_string();
    assert!(
        err.contains("Identify Namespace 1") && err.contains("metadata"),
        "{err}"
    );
}

#[test]
fn the_fake_controllers_mdts_splits_large_reads() {
    let f = fake::start(
        FakeConfig::default(),
        Arc::new(|c, sqe, _| {
            assert!(
                sqe.nlb() <= 64,
                "MDTS 3: 32 KiB at most, got {} blocks",
                sqe.nlb()
            );
            serve_reads(c, sqe);
        }),
    );
    let dev = open_leg(&f.uri("")).unwrap();
    assert_eq!(dev.geometry().num_blocks, fake::BLOCKS);
    let mut qp = dev.open_qpair(2).unwrap();
    let (st, data) = read(&mut *qp, 0, 100 * 1024, 512);
    assert!(st.is_success());
    for (piece, slba) in [(0usize, 0u8), (1, 64), (2, 128), (3, 192)] {
        let start = piece * 32 * 1024;
        let end = (start + 32 * 1024).min(data.len());
        assert_eq!(
            data[start..end],
            pattern(32 * 1024, slba)[..end - start],
            "piece {piece}"
        );
    }
}
