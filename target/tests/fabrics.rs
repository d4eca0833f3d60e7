//! Connection setup, fabrics and admin commands, against a raw-PDU host.

mod common;

use std::time::Duration;

use common::{start, Host, HOSTNQN, SUBNQN};
use nvmirror_nvme::spec::admin::{cns, feature, log_page, DiscoveryLogEntry, IDENTIFY_LEN};
use nvmirror_nvme::spec::fabrics::{
    property, status as fstatus, ConnectParam, CNTLID_DYNAMIC, DISCOVERY_NQN,
};
use nvmirror_nvme::spec::wire::nul_padded_str;
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

#[test]
fn linux_style_bring_up_and_identify() {
    let t = start(|_| {});
    let (mut h, cntlid) = Host::bring_up_admin(t.addr, false, false, 5000);
    assert!((1..0xfff0).contains(&cntlid));
    let (st, id) = h.identify(cns::CONTROLLER, 0);
    assert!(st.is_success());
    assert_eq!(id.len(), IDENTIFY_LEN);
    assert_eq!(nul_padded_str(&id[768..1024]), Some(SUBNQN));
    assert_eq!(
        u32::from_le_bytes(id[516..520].try_into().unwrap()),
        2,
        "NN"
    );
    let ioccsz = u32::from_le_bytes(id[1792..1796].try_into().unwrap());
    assert_eq!(ioccsz, (64 + 8192) / 16);
    assert_ne!(u16::from_le_bytes([id[320], id[321]]), 0, "KAS");
    assert_ne!(u16::from_le_bytes([id[514], id[515]]), 0, "MAXCMD");
    assert_eq!(id[77], 5, "MDTS");
    // Active namespace list and each namespace.
    let (st, list) = h.identify(cns::ACTIVE_NAMESPACES, 0);
    assert!(st.is_success());
    assert_eq!(&list[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let (_, list) = h.identify(cns::ACTIVE_NAMESPACES, 1);
    assert_eq!(&list[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
    let (st, ns) = h.identify(cns::NAMESPACE, 1);
    assert!(st.is_success());
    assert_eq!(
        u64::from_le_bytes(ns[0..8].try_into().unwrap()),
        (16 << 20) / 512
    );
    assert_eq!(ns[128 + 2], 9, "LBADS of 512-byte blocks");
    let (_, ns2) = h.identify(cns::NAMESPACE, 2);
    assert_eq!(ns2[128 + 2], 12);
    assert_eq!(
        h.identify(cns::NAMESPACE, 3).0,
        Status::INVALID_NAMESPACE.with_dnr()
    );
    // Namespace identification descriptors: NGUID, UUID, CSI.
    let (st, d) = h.identify(cns::NS_ID_DESCRIPTORS, 1);
    assert!(st.is_success());
    assert_eq!((d[0], d[1]), (2, 16));
    assert_eq!((d[20], d[21]), (3, 16));
    assert_eq!((d[40], d[41], d[44]), (4, 1, 0));
    assert_eq!(&d[4..20], &ns[104..120], "NGUID matches Identify Namespace");
    assert_eq!(h.identify(0x55, 0).0, Status::INVALID_FIELD.with_dnr());
}

#[test]
fn features_keep_alive_aer_abort_and_logs() {
    let t = start(|c| c.max_io_queues = 4);
    let (mut h, _) = Host::bring_up_admin(t.addr, true, true, 0);
    let (c, _) = h.admin(
        0x09,
        0,
        u32::from(feature::NUMBER_OF_QUEUES),
        0x0010_0010,
        0,
    );
    assert!(c.status().is_success());
    assert_eq!(c.dw0, 0x0003_0003, "capped at max_io_queues");
    let (c, _) = h.admin(0x0a, 0, u32::from(feature::NUMBER_OF_QUEUES), 0, 0);
    assert_eq!(c.dw0, 0x0003_0003);
    let (c, _) = h.admin(0x09, 0, u32::from(feature::KEEP_ALIVE_TIMER), 120_000, 0);
    assert!(c.status().is_success());
    assert_eq!(
        h.admin(0x0a, 0, u32::from(feature::KEEP_ALIVE_TIMER), 0, 0)
            .0
            .dw0,
        120_000
    );
    assert!(h
        .admin(0x09, 0, u32::from(feature::ASYNC_EVENT_CONFIG), 0x100, 0)
        .0
        .status()
        .is_success());
    assert_eq!(
        h.admin(0x0a, 0, u32::from(feature::ASYNC_EVENT_CONFIG), 0, 0)
            .0
            .dw0,
        0x100
    );
    assert!(h
        .admin(0x09, 0, u32::from(feature::VOLATILE_WRITE_CACHE), 0, 0)
        .0
        .status()
        .is_success());
    assert_eq!(
        h.admin(0x0a, 0, u32::from(feature::VOLATILE_WRITE_CACHE), 0, 0)
            .0
            .dw0,
        0
    );
    assert_eq!(
        h.admin(0x09, 0, 0x7f, 0, 0).0.status(),
        Status::INVALID_FIELD.with_dnr()
    );
    // Saving is not supported.
    assert_eq!(
        h.admin(
            0x09,
            0,
            (1 << 31) | u32::from(feature::KEEP_ALIVE_TIMER),
            1000,
            0
        )
        .0
        .status()
        .sc(),
        0x0d
    );
    assert!(
        h.admin(0x18, 0, 0, 0, 0).0.status().is_success(),
        "keep alive"
    );
    // Abort never aborts.
    let (c, _) = h.admin(0x08, 0, 0x0001_0000, 0, 0);
    assert!(c.status().is_success());
    assert_eq!(c.dw0 & 1, 1);
    // Async event requests are held: the next command completes first.
    let aer = nvmirror_nvme::spec::SubmissionQueueEntry {
        opcode: 0x0c,
        cid: 900,
        ..Default::default()
    };
    h.send_cmd(aer, &[], true, 0);
    let (c, _) = h.admin(0x18, 0, 0, 0, 0);
    assert!(
        c.status().is_success(),
        "a later command completes while the AER is held"
    );
    // Log pages: error, SMART, firmware, changed namespaces; discovery is not served here.
    for (lid, len) in [
        (log_page::ERROR, 64u32),
        (log_page::SMART, 512),
        (log_page::FIRMWARE_SLOT, 512),
        (log_page::CHANGED_NAMESPACES, 4096),
    ] {
        let numd = len / 4 - 1;
        let (c, d) = h.admin(0x02, 0xffff_ffff, u32::from(lid) | (numd << 16), 0, len);
        assert!(c.status().is_success(), "log page {lid:#x}: {}", c.status());
        assert_eq!(d.len(), len as usize);
        if lid == log_page::SMART {
            assert_eq!(u16::from_le_bytes([d[1], d[2]]), 298);
        }
    }
    let (c, _) = h.admin(
        0x02,
        0,
        u32::from(log_page::DISCOVERY) | (255 << 16),
        0,
        1024,
    );
    assert_eq!(c.status().sc(), 0x09, "invalid log page");
    assert_eq!(h.admin(0x80, 0, 0, 0, 0).0.status(), Status::INVALID_OPCODE);
}

#[test]
fn commands_before_enable_are_sequence_errors() {
    let t = start(|_| {});
    let mut h = Host::connect(t.addr);
    h.icreq(false, false);
    // Before Connect: only Connect.
    let (c, _) = h.admin(0x06, 0, 1, 0, 4096);
    assert_eq!(c.status(), Status::COMMAND_SEQUENCE_ERROR);
    let c = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success());
    let (st, _) = h.identify(cns::CONTROLLER, 0);
    assert_eq!(
        st,
        Status::COMMAND_SEQUENCE_ERROR,
        "admin command before CC.EN"
    );
    // An I/O queue cannot attach to a disabled controller.
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 31, 0, SUBNQN, HOSTNQN, c.dw0 as u16);
    assert_eq!(c.status(), Status::COMMAND_SEQUENCE_ERROR);
    // A second Connect on a connected queue.
    let c2 = h.fabrics_connect(0, 31, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert_eq!(c2.status(), Status::COMMAND_SEQUENCE_ERROR);
    // Shutdown notification completes at once.
    assert!(h.prop_set(property::CC, 0x46_0001).is_success());
    assert!(h.prop_set(property::CC, 0x46_4001).is_success());
    assert_eq!(h.prop_get(property::CSTS, 4) & 0xc, 0x8, "SHST complete");
    // Unknown property.
    let cid = h.cid();
    let (c, _) = h.run(
        nvmirror_nvme::spec::fabrics::property_get_sqe(cid, 0x40, 4),
        &[],
        true,
        0,
    );
    assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
}

#[test]
fn connect_rejections_carry_the_parameter_location() {
    let t = start(|c| c.subsystems[0].allowed_hosts = vec![HOSTNQN.to_string()]);
    let reject = |sub: &str, host: &str, qid: u16, sqsize: u16, cntlid: u16| {
        let mut h = Host::connect(t.addr);
        h.icreq(false, false);
        h.fabrics_connect(qid, sqsize, 0, sub, host, cntlid)
    };
    let c = reject(
        SUBNQN,
        "nqn.2014-08.org.nvmexpress:uuid:intruder",
        0,
        31,
        CNTLID_DYNAMIC,
    );
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_HOST.with_dnr());
    assert_eq!(c.dw0, ConnectParam::HOSTNQN.dw0());
    let c = reject(
        "nqn.2024-01.io.nvmirror:nope",
        HOSTNQN,
        0,
        31,
        CNTLID_DYNAMIC,
    );
    assert_eq!(c.status(), fstatus::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(c.dw0, ConnectParam::SUBNQN.dw0());
    let c = reject(SUBNQN, HOSTNQN, 0, 31, 7);
    assert_eq!(c.dw0, ConnectParam::CNTLID.dw0());
    let c = reject(SUBNQN, HOSTNQN, 0, 4096, CNTLID_DYNAMIC);
    assert_eq!((c.status().sc(), c.dw0), (0x82, ConnectParam::SQSIZE.dw0()));
    let c = reject(SUBNQN, HOSTNQN, 1, 31, 0x1234);
    assert_eq!((c.status().sc(), c.dw0), (0x82, ConnectParam::CNTLID.dw0()));
    // The allowed host gets in; its I/O queues are checked against the controller.
    let (_admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let c = reject(SUBNQN, HOSTNQN, 9, 31, cntlid);
    assert_eq!(
        (c.status().sc(), c.dw0),
        (0x82, ConnectParam::QID.dw0()),
        "beyond the granted queues"
    );
    let _q1 = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    let c = reject(SUBNQN, HOSTNQN, 1, 31, cntlid);
    assert_eq!(c.dw0, ConnectParam::QID.dw0(), "queue 1 twice");
    let c = reject(
        SUBNQN,
        "nqn.2014-08.org.nvmexpress:uuid:intruder",
        2,
        31,
        cntlid,
    );
    assert_eq!(c.status().sc(), 0x84);
}

#[test]
fn discovery_lists_the_subsystems_the_host_may_see() {
    let t = start(|c| {
        let ns = common::mem_namespaces();
        let mut hidden =
            nvmirror_target::SubsystemConfig::new("nqn.2024-01.io.nvmirror:hidden", ns);
        hidden.allowed_hosts = vec!["nqn.someone-else".into()];
        c.subsystems.push(hidden);
    });
    let mut h = Host::connect(t.addr);
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 31, 0, DISCOVERY_NQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success());
    assert!(h.prop_set(property::CC, 0x46_0001).is_success());
    let (st, id) = h.identify(cns::CONTROLLER, 0);
    assert!(st.is_success());
    assert_eq!(id[111], 2, "discovery controller type");
    // Header first (as nvme-cli does), then the whole page.
    let (c, hdr) = h.admin(0x02, 0, 0x70 | (3 << 16), 0, 16);
    assert!(c.status().is_success());
    let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    assert_eq!(numrec, 1, "the hidden subsystem is not listed");
    let len = 1024 * (1 + numrec as u32);
    let (c, page) = h.admin(0x02, 0, 0x70 | ((len / 4 - 1) << 16), 0, len);
    assert!(c.status().is_success());
    let e = DiscoveryLogEntry::read_from(&page[1024..]);
    assert_eq!((e.trtype, e.adrfam, e.subtype), (3, 1, 2));
    assert_eq!(e.asqsz, 256, "ASQSZ: the admin queue limit");
    assert_eq!(nul_padded_str(&e.subnqn), Some(SUBNQN));
    assert_eq!(nul_padded_str(&e.traddr), Some("127.0.0.1"));
    assert_eq!(
        nul_padded_str(&e.trsvcid),
        Some(t.addr.port().to_string().as_str())
    );
    // No I/O queues on a discovery controller.
    let mut io = Host::connect(t.addr);
    io.icreq(false, false);
    let c = io.fabrics_connect(1, 31, 0, DISCOVERY_NQN, HOSTNQN, c.dw0 as u16);
    assert_eq!(c.status().sc(), 0x82);
}

#[test]
fn keep_alive_expiry_tears_down_the_controller_and_its_queues() {
    let t = start(|_| {});
    let (mut admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 300);
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    // Keep-alives hold it up past several timeouts.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(admin.admin(0x18, 0, 0, 0, 0).0.status().is_success());
    }
    assert!(io.write(1, 0, &[1u8; 512], 512, true).is_success());
    // Silence: both queues close and the controller is gone.
    assert!(
        admin.wait_closed(Duration::from_secs(3)),
        "admin queue closed"
    );
    assert!(io.wait_closed(Duration::from_secs(3)), "I/O queue closed");
    let target = t.target.as_ref().unwrap();
    for _ in 0..100 {
        if target.controller_count() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(target.controller_count(), 0);
    let mut late = Host::connect(t.addr);
    late.icreq(false, false);
    let c = late.fabrics_connect(2, 31, 0, SUBNQN, HOSTNQN, cntlid);
    assert_eq!(
        c.dw0,
        ConnectParam::CNTLID.dw0(),
        "the controller ID is gone"
    );
}

#[test]
fn disconnect_and_reset_close_queues() {
    let t = start(|_| {});
    let (mut admin, cntlid) = Host::bring_up_admin(t.addr, false, false, 0);
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    let cid = io.cid();
    let (c, _) = io.run(
        nvmirror_nvme::spec::fabrics::fabrics_sqe(
            nvmirror_nvme::spec::fabrics::FabricsCommandType::Disconnect,
            cid,
        ),
        &[],
        true,
        0,
    );
    assert!(c.status().is_success());
    assert!(io.wait_closed(Duration::from_secs(3)));
    // The queue ID is free again.
    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    // Controller reset (CC.EN 1 -> 0) closes the I/O queues.
    assert!(admin.prop_set(property::CC, 0x46_0000).is_success());
    assert_eq!(admin.prop_get(property::CSTS, 4) & 1, 0);
    assert!(io.wait_closed(Duration::from_secs(3)));
}

/// SPDK's abort example sizes its admin queue to hold an Abort for every command it keeps in
/// flight (queue depth + 8: 136 entries at its defaults) and aborts every I/O it submits. The
/// admin queue's limit is ASQSZ from the discovery log, not CAP.MQES (which bounds I/O
/// queues): such a queue connects, and its Aborts — best effort (Base §5.1), each completing
/// with DW0 bit 0 set when the command was not aborted — leave every aborted-at command to
/// complete with its own result.
#[test]
fn an_admin_queue_deep_enough_for_an_abort_per_command_connects_and_aborts_are_best_effort() {
    let t = start(|_| {});
    let mut admin = Host::connect(t.addr);
    admin.icreq(false, false);
    let c = admin.fabrics_connect(0, 135, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success(), "admin SQSIZE 135: {}", c.status());
    let cntlid = c.dw0 as u16;
    assert!(admin.prop_set(property::CC, 0x46_0001).is_success());
    let (c, _) = admin.admin(0x09, 0, u32::from(feature::NUMBER_OF_QUEUES), 0, 0);
    assert!(c.status().is_success());
    // CAP.MQES still bounds I/O queues: 135 is above the 128 entries advertised.
    let mut big = Host::connect(t.addr);
    big.icreq(false, false);
    let c = big.fabrics_connect(1, 135, 0, SUBNQN, HOSTNQN, cntlid);
    assert_eq!((c.status().sc(), c.dw0), (0x82, ConnectParam::SQSIZE.dw0()));
    // And ASQSZ bounds admin queues: 256 entries by default.
    let mut over = Host::connect(t.addr);
    over.icreq(false, false);
    let c = over.fabrics_connect(0, 256, 0, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
    assert_eq!((c.status().sc(), c.dw0), (0x82, ConnectParam::SQSIZE.dw0()));

    let mut io = Host::bring_up_io(t.addr, cntlid, 1, false, false);
    let data = common::pattern(64 * 512, 9);
    assert!(io.write(1, 0, &data, 512, false).is_success());
    // 32 reads in flight on the I/O queue, an Abort for each on the admin queue, all sent
    // before any answer is read.
    let cids: Vec<u16> = (0..32)
        .map(|k| {
            let mut sqe = SubmissionQueueEntry {
                opcode: 0x02,
                cid: io.cid(),
                nsid: 1,
                ..Default::default()
            };
            sqe.set_lba_range(2 * k, 2);
            io.send_cmd(sqe, &[], true, 1024);
            sqe.cid
        })
        .collect();
    let aborts: Vec<u16> = cids
        .iter()
        .map(|&cid| {
            let sqe = SubmissionQueueEntry {
                opcode: 0x08,
                cid: admin.cid(),
                cdw10: 1 | (u32::from(cid) << 16),
                ..Default::default()
            };
            admin.send_cmd(sqe, &[], true, 0);
            sqe.cid
        })
        .collect();
    for &a in &aborts {
        let (c, _) = admin.finish(a, &[]);
        assert!(c.status().is_success(), "Abort: {}", c.status());
        assert_eq!(
            c.dw0 & 1,
            1,
            "an I/O command is not aborted: it runs to completion"
        );
    }
    for (k, &cid) in cids.iter().enumerate() {
        let (c, got) = io.finish(cid, &[]);
        assert!(c.status().is_success(), "read {k}: {}", c.status());
        assert_eq!(got, data[k * 1024..(k + 1) * 1024], "read {k}");
    }
}
