use proptest::prelude::*;

use super::*;
use crate::spec::{CompletionQueueEntry, SubmissionQueueEntry};

fn ctrl_limits(hdgst: bool, ddgst: bool) -> PduLimits {
    PduLimits {
        hdgst,
        ddgst,
        max_icdata: 8192,
        maxh2cdata: 32768,
        max_c2hdata: 1 << 20,
    }
}

fn parse_ctrl<'a>(b: &'a [u8], lim: &PduLimits) -> Result<Option<(Pdu<'a>, usize)>, PduError> {
    parse_pdu(b, Role::Controller, lim)
}

#[test]
fn icreq_round_trips_and_needs_all_bytes() {
    let b = icreq_bytes(0, digest_bits::HDGST_ENABLE, 0);
    let lim = PduLimits::default();
    assert_eq!(parse_ctrl(&b[..127], &lim), Ok(None));
    let (pdu, n) = parse_ctrl(&b, &lim).unwrap().unwrap();
    assert_eq!(n, 128);
    match pdu {
        Pdu::IcReq(r) => assert_eq!((r.pfv, r.digest), (0, digest_bits::HDGST_ENABLE)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn capsule_with_data_round_trips_under_every_digest_setting() {
    let mut sqe = SubmissionQueueEntry {
        opcode: 1,
        cid: 77,
        ..Default::default()
    };
    sqe.set_lba_range(5, 1);
    let data = [0x5au8; 512];
    for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
        let dg = Digests { hdgst: h, ddgst: d };
        let mut out = vec![0u8; 1024];
        let n = write_capsule_cmd(&mut out, &sqe, &data, dg);
        assert_eq!(n, capsule_cmd_len(512, dg));
        let (pdu, len) = parse_ctrl(&out[..n], &ctrl_limits(h, d)).unwrap().unwrap();
        assert_eq!(len, n);
        match pdu {
            Pdu::CapsuleCmd {
                header,
                data: got,
                ddgst_ok,
            } => {
                assert_eq!(header.sqe, sqe);
                assert_eq!(got, &data[..]);
                assert!(ddgst_ok);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn host_side_parses_what_the_controller_builds() {
    let dg = Digests {
        hdgst: true,
        ddgst: true,
    };
    let lim = ctrl_limits(true, true);
    let mut out = vec![0u8; 256];
    let cqe = CompletionQueueEntry {
        cid: 3,
        dw0: 9,
        ..Default::default()
    };
    let n = write_capsule_resp(&mut out, &cqe, dg);
    let (pdu, _) = parse_pdu(&out[..n], Role::Host, &lim).unwrap().unwrap();
    assert_eq!(
        pdu,
        Pdu::CapsuleResp(CapsuleRespHeader {
            ch: pdu_ch(&out),
            cqe
        })
    );
    let n = write_r2t(&mut out, 3, 7, 0, 8192, dg);
    match parse_pdu(&out[..n], Role::Host, &lim).unwrap().unwrap().0 {
        Pdu::R2T(r) => assert_eq!((r.cccid, r.ttag, r.r2to, r.r2tl), (3, 7, 0, 8192)),
        other => panic!("{other:?}"),
    }
    let d = DataPdu {
        ty: PduType::C2HData,
        flags: flags::LAST_PDU,
        cccid: 3,
        ttag: 0,
        datao: 0,
        datal: 16,
    };
    let n = write_data_pdu(&mut out, &d, &[1u8; 16], dg);
    match parse_pdu(&out[..n], Role::Host, &lim).unwrap().unwrap().0 {
        Pdu::C2HData {
            header,
            data,
            ddgst_ok,
        } => {
            assert_eq!(header.ch.flags & flags::LAST_PDU, flags::LAST_PDU);
            assert_eq!(data, &[1u8; 16]);
            assert!(ddgst_ok);
        }
        other => panic!("{other:?}"),
    }
    let b = icresp_bytes(0, 3, 65536);
    assert!(matches!(
        parse_pdu(&b, Role::Host, &PduLimits::default()),
        Ok(Some((Pdu::IcResp(_), 128)))
    ));
}

fn pdu_ch(b: &[u8]) -> CommonHeader {
    CommonHeader::from_bytes(b[..8].try_into().unwrap())
}

fn h2c(datal: u32, dg: Digests) -> Vec<u8> {
    let mut out = vec![0u8; data_pdu_len(datal as usize, dg)];
    let d = DataPdu {
        ty: PduType::H2CData,
        flags: flags::LAST_PDU,
        cccid: 1,
        ttag: 2,
        datao: 0,
        datal,
    };
    let n = write_data_pdu(&mut out, &d, &vec![7u8; datal as usize], dg);
    out.truncate(n);
    out
}

fn fes_of(b: &[u8], lim: &PduLimits) -> (Fes, u32) {
    let e = parse_ctrl(b, lim).unwrap_err();
    assert!(e.echo_len <= 128 && e.echo_len <= b.len());
    (e.fes, e.fei)
}

#[test]
fn malformed_headers_name_the_field() {
    let lim = ctrl_limits(false, false);
    // Unknown type, and a controller-to-host type arriving at the controller.
    let mut b = icreq_bytes(0, 0, 0);
    b[0] = 0x08;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 0));
    b[0] = PduType::R2T as u8;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 0));
    // Wrong hlen.
    let mut b = icreq_bytes(0, 0, 0);
    b[2] = 100;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 2));
    // Wrong plen.
    let mut b = icreq_bytes(0, 0, 0);
    b[4] = 200;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 4));
    // Unsupported PFV.
    let mut b = icreq_bytes(0, 0, 0);
    b[8] = 1;
    assert_eq!(fes_of(&b, &lim), (Fes::UnsupportedParameter, 8));
    // Reserved digest bits.
    let b = icreq_bytes(0, 0x80, 0);
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 11));
    // H2CData whose DATAL disagrees with PLEN.
    let mut b = h2c(512, Digests::default());
    b[16] = 0;
    b[17] = 1;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 16));
    // PDO inside the header.
    let mut b = h2c(512, Digests::default());
    b[3] = 8;
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 3));
    // Data digest flag without negotiated data digests.
    let b = h2c(
        512,
        Digests {
            hdgst: false,
            ddgst: true,
        },
    );
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 1));
    // Header digest missing although negotiated.
    let b = h2c(512, Digests::default());
    assert_eq!(
        fes_of(&b, &ctrl_limits(true, false)),
        (Fes::InvalidHeaderField, 1)
    );
}

#[test]
fn digests_are_checked() {
    let dg = Digests {
        hdgst: true,
        ddgst: true,
    };
    let lim = ctrl_limits(true, true);
    let mut b = h2c(64, dg);
    b[9] ^= 1; // a header byte: the header digest fails
    assert_eq!(fes_of(&b, &lim).0, Fes::HeaderDigestError);
    let mut b = h2c(64, dg);
    let last = b.len() - 10;
    b[last] ^= 1; // a data byte: not fatal, flagged
    match parse_ctrl(&b, &lim).unwrap().unwrap().0 {
        Pdu::H2CData { ddgst_ok, .. } => assert!(!ddgst_ok),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lengths_beyond_the_limits_are_rejected_before_the_data_arrives() {
    let lim = ctrl_limits(false, false);
    let b = h2c(32768 + 4, Digests::default());
    // Only the header is here; the verdict must not wait for 32 KiB.
    assert_eq!(fes_of(&b[..24], &lim).0, Fes::DataTransferLimitExceeded);
    let sqe = SubmissionQueueEntry::default();
    let mut out = vec![0u8; 10000];
    let n = write_capsule_cmd(&mut out, &sqe, &[0u8; 8196], Digests::default());
    assert_eq!(fes_of(&out[..80], &lim).0, Fes::DataTransferLimitExceeded);
    assert!(n > 8192);
    // A huge PLEN on a header-only type.
    let mut b = [0u8; 24];
    write_term_req(&mut b, PduType::H2CTermReq, 1, 0, &[]);
    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(fes_of(&b, &lim), (Fes::InvalidHeaderField, 4));
}

#[test]
fn term_req_echoes_at_most_128_bytes() {
    let mut out = [0u8; 200];
    let n = write_term_req(&mut out, PduType::C2HTermReq, 2, 0, &[9u8; 200]);
    assert_eq!(n, 152);
    match parse_pdu(&out[..n], Role::Host, &PduLimits::default())
        .unwrap()
        .unwrap()
        .0
    {
        Pdu::TermReq { header, data } => {
            assert_eq!(header.fes, Fes::PduSequenceError as u16);
            assert_eq!(data.len(), 128);
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_parser(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        h in any::<bool>(),
        d in any::<bool>(),
        host in any::<bool>(),
    ) {
        let role = if host { Role::Host } else { Role::Controller };
        let lim = ctrl_limits(h, d);
        if let Ok(Some((_, n))) = parse_pdu(&bytes, role, &lim) {
            prop_assert!(n <= bytes.len());
        }
        if let Err(e) = parse_pdu(&bytes, role, &lim) {
            prop_assert!(e.echo_len <= bytes.len().min(128));
        }
    }

    #[test]
    fn mutated_valid_pdus_never_panic_the_parser(
        pos in 0usize..600, val in any::<u8>(), h in any::<bool>(), d in any::<bool>()
    ) {
        let dg = Digests { hdgst: h, ddgst: d };
        let sqe = SubmissionQueueEntry { opcode: 1, ..Default::default() };
        let mut out = vec![0u8; 1024];
        let n = write_capsule_cmd(&mut out, &sqe, &[3u8; 500], dg);
        out.truncate(n);
        let i = pos % n;
        out[i] = val;
        let _ = parse_pdu(&out, Role::Controller, &ctrl_limits(h, d));
    }
}
