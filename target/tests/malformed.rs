//! Malformed input: each case gets a C2HTermReq with the right fatal error status (or an
//! NVMe error where the spec says the command fails instead), the connection closes
//! cleanly, and a healthy queue of another controller keeps working throughout.

mod common;

use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{pattern, start, Harness, Host, Received, HOSTNQN, SUBNQN};
use nvmirror_nvme::spec::admin::status::TRANSIENT_TRANSPORT_ERROR;
use nvmirror_nvme::spec::fabrics::CNTLID_DYNAMIC;
use nvmirror_nvme::spec::tcp::{self, flags, DataPdu, Digests, PduType};
use nvmirror_nvme::spec::SubmissionQueueEntry;
use proptest::prelude::*;

const INVALID_HEADER_FIELD: u16 = 1;
const PDU_SEQUENCE_ERROR: u16 = 2;
const HEADER_DIGEST_ERROR: u16 = 3;
const DATA_OUT_OF_RANGE: u16 = 4;
const DATA_LIMIT_EXCEEDED: u16 = 5;
const UNSUPPORTED_PARAMETER: u16 = 6;

/// A healthy I/O queue that must keep working while other connections misbehave.
struct Bystander {
    _admin: Host,
    io: Host,
    round: u8,
}

impl Bystander {
    fn new(addr: SocketAddr) -> Self {
        let (admin, cntlid) = Host::bring_up_admin(addr, false, false, 0);
        let io = Host::bring_up_io(addr, cntlid, 1, false, false);
        Self {
            _admin: admin,
            io,
            round: 0,
        }
    }

    fn check(&mut self) {
        self.round = self.round.wrapping_add(1);
        let data = pattern(4096, self.round);
        assert!(self.io.write(1, 100, &data, 512, true).is_success());
        let (st, back) = self.io.read(1, 100, 8, 512);
        assert!(st.is_success());
        assert_eq!(back, data);
    }
}

fn connected_io(addr: SocketAddr, hdgst: bool, ddgst: bool) -> (Host, Host) {
    let (admin, cntlid) = Host::bring_up_admin(addr, hdgst, ddgst, 0);
    let io = Host::bring_up_io(addr, cntlid, 1, hdgst, ddgst);
    (admin, io)
}

fn fresh(addr: SocketAddr) -> Host {
    Host::connect(addr)
}

fn term(h: &mut Host) -> (u16, u32) {
    h.expect_termination()
        .expect("a C2HTermReq before the close")
}

fn write_sqe(h: &mut Host, slba: u64, nlb: u32) -> SubmissionQueueEntry {
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x01,
        cid: h.cid(),
        nsid: 1,
        ..Default::default()
    };
    sqe.set_lba_range(slba, nlb);
    sqe
}

fn h2c(h: &Host, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) -> Vec<u8> {
    let d = DataPdu {
        ty: PduType::H2CData,
        flags: if last { flags::LAST_PDU } else { 0 },
        cccid,
        ttag,
        datao,
        datal: data.len() as u32,
    };
    let mut out = vec![0u8; tcp::data_pdu_len(data.len(), h.dg)];
    let n = tcp::write_data_pdu(&mut out, &d, data, h.dg);
    out.truncate(n);
    out
}

fn r2t_for(h: &mut Host, sqe: SubmissionQueueEntry, len: usize) -> tcp::R2tHeader {
    h.send_cmd(sqe, &vec![0u8; len], false, 0);
    match h.recv() {
        Received::R2T(r) => r,
        other => panic!("expected R2T, got {other:?}"),
    }
}

#[test]
fn connection_setup_errors() {
    let t = start(|_| {});
    let mut by = Bystander::new(t.addr);

    // Wrong HLEN, PLEN, unknown type, a controller-to-host type, bad PFV, HPDA.
    // (byte, value, expected FES and FEI)
    let cases: [(usize, u8, (u16, u32)); 7] = [
        (2, 64, (INVALID_HEADER_FIELD, 2)),
        (4, 200, (INVALID_HEADER_FIELD, 4)),
        (0, 0x0a, (INVALID_HEADER_FIELD, 0)),
        (0, PduType::R2T as u8, (INVALID_HEADER_FIELD, 0)),
        (8, 1, (UNSUPPORTED_PARAMETER, 8)),
        (10, 3, (UNSUPPORTED_PARAMETER, 10)),
        (11, 0x10, (INVALID_HEADER_FIELD, 11)),
    ];
    for (k, (at, val, want)) in cases.into_iter().enumerate() {
        let mut h = fresh(t.addr);
        let mut b = tcp::icreq_bytes(0, 0, 0);
        b[at] = val;
        h.send(&b);
        assert_eq!(term(&mut h), want, "case {k}");
        by.check();
    }

    // A command before ICReq, and a second ICReq.
    let mut h = fresh(t.addr);
    let sqe = write_sqe(&mut h, 0, 1);
    h.send_cmd(sqe, &[0u8; 512], true, 0);
    assert_eq!(term(&mut h).0, PDU_SEQUENCE_ERROR);
    let mut h = fresh(t.addr);
    h.icreq(false, false);
    h.send(&tcp::icreq_bytes(0, 0, 0));
    assert_eq!(term(&mut h).0, PDU_SEQUENCE_ERROR);
    by.check();

    // The host terminates: the target closes without answering.
    let mut h = fresh(t.addr);
    h.icreq(false, false);
    let mut b = [0u8; 64];
    let n = tcp::write_term_req(&mut b, PduType::H2CTermReq, 1, 0, &[0u8; 8]);
    h.send(&b[..n]);
    assert_eq!(h.expect_termination(), None);

    // A truncated PDU followed by the close.
    let mut h = fresh(t.addr);
    h.icreq(false, false);
    h.send(&tcp::icreq_bytes(0, 0, 0)[..40]);
    h.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(h.expect_termination(), None);
    by.check();
}

#[test]
fn capsule_and_digest_errors() {
    let t = start(|_| {});
    let mut by = Bystander::new(t.addr);

    // PDO inside the header.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 1);
    let mut out = vec![0u8; 1024];
    let n = tcp::write_capsule_cmd(&mut out, &sqe, &[1u8; 512], Digests::default());
    out[3] = 16;
    h.send(&out[..n]);
    assert_eq!(term(&mut h), (INVALID_HEADER_FIELD, 3));
    by.check();

    // In-capsule data beyond ICCSZ (8 KiB).
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 24);
    h.send_cmd(sqe, &[0u8; 12288], true, 0);
    assert_eq!(term(&mut h).0, DATA_LIMIT_EXCEEDED);
    by.check();

    // A corrupted header digest.
    let (_a, mut h) = connected_io(t.addr, true, false);
    let sqe = write_sqe(&mut h, 0, 1);
    let dg = h.dg;
    let mut out = vec![0u8; 1024];
    let n = tcp::write_capsule_cmd(&mut out, &sqe, &[1u8; 512], dg);
    out[72] ^= 0xff;
    h.send(&out[..n]);
    assert_eq!(term(&mut h).0, HEADER_DIGEST_ERROR);
    by.check();

    // A header digest flag although none was negotiated.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 1);
    let mut out = vec![0u8; 1024];
    let n = tcp::write_capsule_cmd(&mut out, &sqe, &[], Digests::default());
    out[1] |= flags::HDGSTF;
    h.send(&out[..n]);
    assert_eq!(term(&mut h), (INVALID_HEADER_FIELD, 1));
    by.check();

    // A corrupted data digest fails only that command (transient transport error).
    let (_a, mut h) = connected_io(t.addr, true, true);
    let sqe = write_sqe(&mut h, 0, 1);
    let dg = h.dg;
    let mut out = vec![0u8; 1024];
    let n = tcp::write_capsule_cmd(&mut out, &sqe, &[1u8; 512], dg);
    out[n - 1] ^= 0xff;
    h.send(&out[..n]);
    assert_eq!(h.finish(sqe.cid, &[]).0.status(), TRANSIENT_TRANSPORT_ERROR);
    // The same through an R2T.
    let sqe = write_sqe(&mut h, 0, 2);
    let r = r2t_for(&mut h, sqe, 1024);
    let mut pdu = h2c(&h, sqe.cid, r.ttag, 0, &[5u8; 1024], true);
    let last = pdu.len() - 1;
    pdu[last] ^= 1;
    h.send(&pdu);
    assert_eq!(h.finish(sqe.cid, &[]).0.status(), TRANSIENT_TRANSPORT_ERROR);
    assert!(
        h.write(1, 0, &[3u8; 512], 512, true).is_success(),
        "the queue goes on"
    );
    by.check();
}

#[test]
fn data_transfer_errors() {
    let t = start(|c| c.maxh2cdata = 8192);
    let mut by = Bystander::new(t.addr);

    // H2CData without any R2T.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let pdu = h2c(&h, 1, 0, 0, &[0u8; 512], true);
    h.send(&pdu);
    assert_eq!(term(&mut h).0, PDU_SEQUENCE_ERROR);
    by.check();

    // H2CData with a transfer tag that names no slot.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let pdu = h2c(&h, 1, 999, 0, &[0u8; 512], true);
    h.send(&pdu);
    assert_eq!(term(&mut h), (INVALID_HEADER_FIELD, 10));
    by.check();

    // H2CData for another command ID.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 8);
    let r = r2t_for(&mut h, sqe, 4096);
    h.send(&h2c(&h, sqe.cid ^ 1, r.ttag, 0, &[0u8; 4096], true));
    assert_eq!(term(&mut h), (INVALID_HEADER_FIELD, 8));
    by.check();

    // H2CData outside the requested range.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 8);
    let r = r2t_for(&mut h, sqe, 4096);
    h.send(&h2c(&h, sqe.cid, r.ttag, 2048, &[0u8; 4096], true));
    assert_eq!(term(&mut h).0, DATA_OUT_OF_RANGE);
    by.check();

    // H2CData longer than MAXH2CDATA.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 32);
    let r = r2t_for(&mut h, sqe, 16384);
    h.send(&h2c(&h, sqe.cid, r.ttag, 0, &[0u8; 16384], true));
    assert_eq!(term(&mut h).0, DATA_LIMIT_EXCEEDED);
    by.check();

    // LAST_PDU before all requested data arrived.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 16);
    let r = r2t_for(&mut h, sqe, 8192);
    h.send(&h2c(&h, sqe.cid, r.ttag, 0, &[0u8; 4096], true));
    assert_eq!(term(&mut h).0, DATA_OUT_OF_RANGE);
    by.check();

    // A second H2CData after the command got all its data.
    let (_a, mut h) = connected_io(t.addr, false, false);
    let sqe = write_sqe(&mut h, 0, 8);
    let r = r2t_for(&mut h, sqe, 4096);
    h.send(&h2c(&h, sqe.cid, r.ttag, 0, &[0u8; 4096], true));
    h.send(&h2c(&h, sqe.cid, r.ttag, 0, &[0u8; 4096], true));
    // The first PDU's command may or may not complete before the termination.
    loop {
        match h.recv() {
            Received::Resp(c) => assert!(c.status().is_success()),
            Received::Term { fes, .. } => {
                assert_eq!(fes, PDU_SEQUENCE_ERROR);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    by.check();
    // A bad connect never reaches the controller table.
    let mut h = fresh(t.addr);
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, 5);
    assert_eq!(c.status().sc(), 0x82);
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(
        c.status().is_success(),
        "a rejected Connect leaves the queue connectable"
    );
}

/// Every reactor keeps iterating (none died on a panic).
fn reactors_alive(t: &Harness) -> bool {
    let h = t.pool.as_ref().unwrap().handle();
    let before: Vec<u64> = (0..h.count())
        .map(|i| h.stats(i).unwrap().iterations.load(Ordering::Relaxed))
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    (0..h.count()).all(|i| h.stats(i).unwrap().iterations.load(Ordering::Relaxed) > before[i])
}

fn feed(addr: SocketAddr, prefix_icreq: bool, connect: bool, bytes: &[u8]) {
    let mut h = fresh(addr);
    if prefix_icreq {
        h.icreq(false, false);
    }
    if connect {
        let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
        assert!(c.status().is_success());
    }
    h.send_lossy(bytes);
    let _ = h.sock.shutdown(Shutdown::Write);
    assert!(
        h.wait_closed(Duration::from_secs(5)),
        "the target closes the connection"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn arbitrary_bytes_never_hurt_the_target(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        stage in 0u8..3,
    ) {
        let t = SHARED.with(|s| s.addr);
        feed(t, stage >= 1, stage >= 2, &bytes);
    }

    #[test]
    fn mutated_commands_never_hurt_the_target(pos in 0usize..600, val in any::<u8>(), hd in any::<bool>()) {
        let addr = SHARED.with(|s| s.addr);
        let mut h = fresh(addr);
        h.icreq(hd, false);
        let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
        prop_assert!(c.status().is_success());
        let sqe = write_sqe(&mut h, 0, 1);
        let mut out = vec![0u8; 1024];
        let n = tcp::write_capsule_cmd(&mut out, &sqe, &[9u8; 512], h.dg);
        out.truncate(n);
        out[pos % n] = val;
        h.send_lossy(&out);
        let _ = h.sock.shutdown(Shutdown::Write);
        prop_assert!(h.wait_closed(Duration::from_secs(5)));
    }
}

thread_local! {
    static SHARED: Harness = start(|_| {});
}

#[test]
fn garbage_on_many_connections_leaves_reactors_and_bystanders_alive() {
    let t = start(|_| {});
    let mut by = Bystander::new(t.addr);
    let mut rng = 0x1234_5678u64;
    for round in 0..40 {
        let len = (round * 37) % 700;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        feed(t.addr, round % 2 == 0, round % 4 == 0, &bytes);
    }
    assert!(reactors_alive(&t));
    by.check();
}
