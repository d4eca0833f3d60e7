//! Unit tests of the initiator's pure parts; the protocol runs against the real target in
//! `target/tests/initiator.rs`.

use super::controller::{connect_failure, geometry_of};
use super::*;
use crate::spec::admin::{lba_format, IdentifyNamespace};
use crate::spec::fabrics::status as fstatus;

#[test]
fn generated_host_nqn_is_a_uuid_nqn_and_stable() {
    let (nqn, id) = host_identity();
    let uuid = nqn
        .strip_prefix("nqn.2014-08.org.nvmexpress:uuid:")
        .expect("uuid NQN");
    assert_eq!(uuid.len(), 36);
    assert_eq!(uuid.matches('-').count(), 4);
    assert_eq!(&uuid[14..15], "4", "version 4");
    assert_eq!(host_identity().0, *nqn);
    assert_eq!(host_id_for(nqn), *id);
}

#[test]
fn host_id_comes_from_a_uuid_host_nqn() {
    let id = host_id_for("nqn.2014-08.org.nvmexpress:uuid:00112233-4455-6677-8899-aabbccddeeff");
    assert_eq!(id[0], 0x00);
    assert_eq!(id[15], 0xff);
    assert_eq!(id[8], 0x88);
    assert_eq!(host_id_for("nqn.x:no-uuid"), host_identity().1);
    assert_eq!(host_id_for("nqn.x:uuid:zz"), host_identity().1);
}

#[test]
fn connect_failures_are_named() {
    let host = connect_failure(
        fstatus::CONNECT_INVALID_HOST.with_dnr(),
        0x1_0200,
        "nqn.s",
        "nqn.h",
    );
    assert!(
        host.contains("invalid host") && host.contains("nqn.h"),
        "{host}"
    );
    let subsys = connect_failure(
        fstatus::CONNECT_INVALID_PARAMETERS,
        0x1_0100,
        "nqn.s",
        "nqn.h",
    );
    assert!(subsys.contains("subsystem NQN 'nqn.s'"), "{subsys}");
    let qid = connect_failure(fstatus::CONNECT_INVALID_PARAMETERS, 42, "s", "h");
    assert!(qid.contains("queue ID"), "{qid}");
    let other = connect_failure(Status::INTERNAL_ERROR, 0, "s", "h");
    assert!(other.contains("internal error"), "{other}");
}

#[test]
fn namespace_geometry_and_refusals() {
    let mut ns = IdentifyNamespace::zeroed();
    ns.nsze = 1000;
    ns.nlbaf = 1;
    ns.lbaf[0] = lba_format(512);
    ns.lbaf[1] = lba_format(4096);
    ns.flbas = 1;
    assert_eq!(
        geometry_of(&ns),
        Ok(Geometry {
            lba_size: 4096,
            num_blocks: 1000
        })
    );
    ns.lbaf[1] |= 8; // 8 bytes of metadata per block
    assert!(geometry_of(&ns).unwrap_err().contains("metadata"));
    ns.flbas = 0;
    ns.lbaf[0] = 11 << 16; // 2 KiB blocks
    assert!(geometry_of(&ns).unwrap_err().contains("2^11"));
    ns.flbas = 5;
    assert!(geometry_of(&ns).unwrap_err().contains("LBA format 5"));
    ns.nsze = 0;
    assert!(geometry_of(&ns).unwrap_err().contains("not active"));
}

use crate::spec::Status;
