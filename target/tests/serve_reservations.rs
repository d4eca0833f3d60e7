//! NVMe reservations through `nvmirror serve`: two hosts with their own Host Identifiers on
//! the volume's namespace register, acquire, meet Reservation Conflict, preempt, get the
//! notification, release and report; a reservation set to persist through power loss
//! survives a restart of the server and one without PTPL does not.

use std::net::SocketAddr;

use nvmirror_nvme::spec::admin::cns;
use nvmirror_nvme::spec::reservation::{
    status::{HOST_ID_INCONSISTENT_FORMAT, RESERVATION_CONFLICT},
    AcquireAction, AcquireCommand, ChangePtpl, NotificationType, RegisterAction, RegisterCommand,
    ReleaseAction, ReleaseCommand, Report, ReportCommand, ReservationType,
};
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

mod common;
mod serve_rig;
use common::{pattern, Host, Received};
use serve_rig::{Server, NQN};

const HOST_A: [u8; 16] = [0xa1; 16];
const HOST_B: [u8; 16] = [0xb2; 16];
const NQN_A: &str = "nqn.2014-08.org.nvmexpress:uuid:a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1";
const NQN_B: &str = "nqn.2014-08.org.nvmexpress:uuid:b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2";

fn addr(server: &Server) -> SocketAddr {
    server.nvme_tcp.parse().unwrap()
}

fn send(io: &mut Host, (mut sqe, data): (SubmissionQueueEntry, Vec<u8>)) -> Status {
    sqe.cid = io.cid();
    io.run(sqe, &data, true, 0).0.status()
}

fn register(
    io: &mut Host,
    action: RegisterAction,
    crkey: u64,
    nrkey: u64,
    cptpl: ChangePtpl,
) -> Status {
    let (sqe, data) = RegisterCommand {
        action,
        iekey: false,
        cptpl,
        crkey,
        nrkey,
    }
    .encode(0, 1);
    send(io, (sqe, data.to_vec()))
}

fn acquire(
    io: &mut Host,
    action: AcquireAction,
    rtype: ReservationType,
    crkey: u64,
    prkey: u64,
) -> Status {
    let (sqe, data) = AcquireCommand {
        action,
        iekey: false,
        rtype,
        crkey,
        prkey,
    }
    .encode(0, 1);
    send(io, (sqe, data.to_vec()))
}

fn release(io: &mut Host, action: ReleaseAction, rtype: ReservationType, crkey: u64) -> Status {
    let (sqe, data) = ReleaseCommand {
        action,
        iekey: false,
        rtype: rtype as u8,
        crkey,
    }
    .encode(0, 1);
    send(io, (sqe, data.to_vec()))
}

fn report(io: &mut Host) -> Report {
    let cid = io.cid();
    let sqe = ReportCommand {
        len: 4096,
        eds: true,
    }
    .encode(cid, 1);
    let (c, data) = io.run(sqe, &[], true, 4096);
    assert!(c.status().is_success(), "report: {}", c.status());
    Report::parse(&data, true).expect("a whole report header")
}

fn is_conflict(st: Status) -> bool {
    st.sct() == RESERVATION_CONFLICT.sct() && st.sc() == RESERVATION_CONFLICT.sc()
}

fn write(io: &mut Host, seed: u8) -> Status {
    io.write(1, 64, &pattern(4096, seed), 512, true)
}

fn read(io: &mut Host) -> Status {
    io.read(1, 64, 8, 512).0
}

#[test]
fn two_hosts_register_acquire_conflict_preempt_release_report() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = Server::start(dir.path());
    let (mut admin_a, mut a, _) = Host::bring_up_as(addr(&server), NQN, NQN_A, HOST_A);
    let (_admin_b, mut b, _) = Host::bring_up_as(addr(&server), NQN, NQN_B, HOST_B);

    // What a host looks at before it uses reservations.
    let (st, id) = admin_a.identify(cns::CONTROLLER, 0);
    assert!(st.is_success());
    assert_ne!(
        u16::from_le_bytes([id[520], id[521]]) & (1 << 5),
        0,
        "ONCS reservations"
    );
    assert_eq!(id[96] & 1, 1, "CTRATT 128-bit host identifier");
    let (st, id) = admin_a.identify(cns::NAMESPACE, 1);
    assert!(st.is_success());
    assert_eq!(id[31], 0xff, "RESCAP: PTPL, all six types, IEKEY");

    // A host keeps an Asynchronous Event Request outstanding, as Linux does.
    let aer_cid = admin_a.cid();
    admin_a.send_cmd(
        SubmissionQueueEntry {
            opcode: 0x0c,
            cid: aer_cid,
            ..Default::default()
        },
        &[],
        true,
        0,
    );

    assert!(register(
        &mut a,
        RegisterAction::Register,
        0,
        0xaaaa,
        ChangePtpl::NoChange
    )
    .is_success());
    assert!(register(
        &mut b,
        RegisterAction::Register,
        0,
        0xbbbb,
        ChangePtpl::NoChange
    )
    .is_success());
    // Registering again with another key is a conflict; a bad action is an invalid field.
    assert!(is_conflict(register(
        &mut b,
        RegisterAction::Register,
        0,
        0x1,
        ChangePtpl::NoChange
    )));
    let (mut sqe, data) = RegisterCommand {
        action: RegisterAction::Register,
        iekey: false,
        cptpl: ChangePtpl::NoChange,
        crkey: 0,
        nrkey: 5,
    }
    .encode(0, 1);
    sqe.cdw10 = 5;
    assert_eq!(
        send(&mut b, (sqe, data.to_vec())),
        Status::INVALID_FIELD.with_dnr()
    );
    // Data shorter than the command's structure, or a namespace that does not exist.
    sqe.cdw10 = 0;
    assert_eq!(
        send(&mut b, (sqe, data[..8].to_vec())),
        Status::DATA_SGL_LENGTH_INVALID.with_dnr()
    );
    sqe.nsid = 9;
    assert_eq!(
        send(&mut b, (sqe, data.to_vec())),
        Status::INVALID_NAMESPACE.with_dnr()
    );
    assert_eq!(report(&mut b).regctl, 2, "refused commands changed nothing");

    assert!(acquire(
        &mut a,
        AcquireAction::Acquire,
        ReservationType::WriteExclusive,
        0xaaaa,
        0
    )
    .is_success());
    // Write Exclusive: the holder writes, the other registrant reads but may not write.
    assert!(write(&mut a, 1).is_success());
    assert!(read(&mut b).is_success());
    let st = write(&mut b, 2);
    assert!(is_conflict(st), "B's write under A's Write Exclusive: {st}");
    assert!(st.dnr());
    // B cannot take a reservation A holds.
    assert!(is_conflict(acquire(
        &mut b,
        AcquireAction::Acquire,
        ReservationType::WriteExclusive,
        0xbbbb,
        0
    )));

    let r = report(&mut b);
    assert_eq!(r.rtype, Some(ReservationType::WriteExclusive));
    assert_eq!(r.gen, 2);
    assert!(!r.ptpl);
    assert_eq!(r.regctl, 2);
    let holder: Vec<_> = r
        .registrants
        .iter()
        .filter(|g| g.holds)
        .map(|g| (g.hostid, g.rkey))
        .collect();
    assert_eq!(holder, vec![(HOST_A, 0xaaaa)]);
    // The 64-bit host identifier form does not fit hosts on a fabric.
    let cid = b.cid();
    let sqe = ReportCommand {
        len: 4096,
        eds: false,
    }
    .encode(cid, 1);
    let st = b.run(sqe, &[], true, 4096).0.status();
    assert_eq!(st, HOST_ID_INCONSISTENT_FORMAT.with_dnr());

    // B fences A: Preempt and Abort with A's key, taking Exclusive Access.
    assert!(acquire(
        &mut b,
        AcquireAction::PreemptAndAbort,
        ReservationType::ExclusiveAccess,
        0xbbbb,
        0xaaaa
    )
    .is_success());
    assert!(is_conflict(write(&mut a, 3)), "A is fenced from writes");
    assert!(is_conflict(read(&mut a)), "and from reads");
    assert!(write(&mut b, 4).is_success());
    // A's controller hears of it: the AER completes for log page 0x80, which says why.
    match admin_a.recv() {
        Received::Resp(c) => {
            assert_eq!(c.cid, aer_cid);
            assert_eq!(c.dw0 & 7, 6, "event type: I/O command specific");
            assert_eq!((c.dw0 >> 16) & 0xff, 0x80, "log page");
        }
        other => panic!("expected the AER to complete, got {other:?}"),
    }
    let (c, page) = admin_a.admin(0x02, 0xffff_ffff, 0x80 | (15 << 16), 0, 64);
    assert!(c.status().is_success());
    assert_eq!(page[8], NotificationType::RegistrationPreempted as u8);
    assert_eq!(
        u32::from_le_bytes([page[12], page[13], page[14], page[15]]),
        1
    );
    assert_ne!(u64::from_le_bytes(page[..8].try_into().unwrap()), 0);
    let (_, page) = admin_a.admin(0x02, 0xffff_ffff, 0x80 | (15 << 16), 0, 64);
    assert_eq!(page[8], 0, "the notice was read once");

    let r = report(&mut a);
    assert_eq!(r.rtype, Some(ReservationType::ExclusiveAccess));
    assert_eq!(r.gen, 3);
    assert_eq!(r.registrants.len(), 1);
    assert_eq!(
        (r.registrants[0].hostid, r.registrants[0].holds),
        (HOST_B, true)
    );

    // Release of another type is refused; the right one frees the namespace.
    assert_eq!(
        release(
            &mut b,
            ReleaseAction::Release,
            ReservationType::WriteExclusive,
            0xbbbb
        ),
        Status::INVALID_FIELD.with_dnr()
    );
    assert!(release(
        &mut b,
        ReleaseAction::Release,
        ReservationType::ExclusiveAccess,
        0xbbbb
    )
    .is_success());
    assert!(
        write(&mut a, 5).is_success(),
        "A writes again once released"
    );
    assert_eq!(report(&mut a).rtype, None);
    // Clear by the last registrant empties everything.
    assert!(release(
        &mut b,
        ReleaseAction::Clear,
        ReservationType::ExclusiveAccess,
        0xbbbb
    )
    .is_success());
    let r = report(&mut a);
    assert_eq!((r.regctl, r.gen), (0, 4));
    server.stop();
}

#[test]
fn a_reservation_persists_through_a_restart_only_with_ptpl() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    // Without PTPL: the reservation lasts as long as the process.
    let server = Server::start(dir.path());
    let (_adm, mut a, _) = Host::bring_up_as(addr(&server), NQN, NQN_A, HOST_A);
    assert!(register(&mut a, RegisterAction::Register, 0, 1, ChangePtpl::NoChange).is_success());
    assert!(acquire(
        &mut a,
        AcquireAction::Acquire,
        ReservationType::ExclusiveAccess,
        1,
        0
    )
    .is_success());
    drop((_adm, a));
    server.stop();
    let server = Server::start(dir.path());
    let (_adm, mut b, _) = Host::bring_up_as(addr(&server), NQN, NQN_B, HOST_B);
    assert!(
        write(&mut b, 1).is_success(),
        "no reservation after a restart without PTPL"
    );
    assert_eq!(report(&mut b).regctl, 0);

    // With PTPL (set by Register's CPTPL): it comes back, and fences B after the restart.
    let (mut adm_a, mut a, _) = Host::bring_up_as(addr(&server), NQN, NQN_A, HOST_A);
    assert!(register(&mut a, RegisterAction::Register, 0, 7, ChangePtpl::Set).is_success());
    assert!(acquire(
        &mut a,
        AcquireAction::Acquire,
        ReservationType::WriteExclusiveRegistrantsOnly,
        7,
        0
    )
    .is_success());
    let (c, _) = adm_a.admin(0x0a, 1, 0x83, 0, 0);
    assert_eq!(c.dw0 & 1, 1, "Get Features Reservation Persistence: PTPL");
    let before = report(&mut a);
    assert!(before.ptpl);
    drop((adm_a, a, _adm, b));
    server.stop();
    let saved = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(".reservations.json")
        });
    assert!(saved, "the state is kept under the data directory");

    let server = Server::start(dir.path());
    let (mut adm_b, mut b, _) = Host::bring_up_as(addr(&server), NQN, NQN_B, HOST_B);
    assert_eq!(
        report(&mut b),
        before,
        "the reservation as it was before the restart"
    );
    assert!(
        is_conflict(write(&mut b, 2)),
        "B, not registered, is still fenced"
    );
    assert!(
        read(&mut b).is_success(),
        "Write Exclusive - Registrants Only lets B read"
    );
    let (_adm_a, mut a, _) = Host::bring_up_as(addr(&server), NQN, NQN_A, HOST_A);
    assert!(write(&mut a, 3).is_success(), "A still holds it");

    // Set Features Reservation Persistence off: the next restart begins empty.
    let (c, _) = adm_b.admin(0x09, 1, 0x83, 0, 0);
    assert!(c.status().is_success(), "{}", c.status());
    drop((adm_b, b, _adm_a, a));
    server.stop();
    let server = Server::start(dir.path());
    let (_adm, mut b, _) = Host::bring_up_as(addr(&server), NQN, NQN_B, HOST_B);
    assert!(write(&mut b, 4).is_success());
    assert_eq!(report(&mut b).regctl, 0);
    server.stop();
}
