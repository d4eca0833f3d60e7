//! The namespace identity a host sees through `nvmirror serve`: NGUID and UUID come from the
//! volume's UUID, so a restart keeps them and a re-created volume under the same NQN does not.

mod common;
mod serve_rig;

use common::Host;
use nvmirror_nvme::spec::admin::cns;
use nvmirror_nvme::spec::fabrics::{property, CNTLID_DYNAMIC};
use serve_rig::{file_leg, Server, NQN};

/// (NGUID, UUID from the namespace identification descriptors) of namespace 1.
fn identity(srv: &Server) -> ([u8; 16], Vec<u8>) {
    let mut h = Host::connect(srv.nvme_tcp.parse().expect("NVMe/TCP address"));
    h.icreq(false, false);
    let c = h.fabrics_connect(0, 31, 0, NQN, common::HOSTNQN, CNTLID_DYNAMIC);
    assert!(c.status().is_success(), "admin connect: {}", c.status());
    assert!(h.prop_set(property::CC, 0x46_0001).is_success());
    let (st, ns) = h.identify(cns::NAMESPACE, 1);
    assert!(st.is_success(), "identify namespace: {st}");
    let nguid: [u8; 16] = ns[104..120].try_into().unwrap();
    let (st, descs) = h.identify(cns::NS_ID_DESCRIPTORS, 1);
    assert!(st.is_success(), "identify descriptors: {st}");
    // Descriptor list: NIDT, NIDL, 2 reserved, then NIDL bytes; UUID is type 3.
    let mut uuid = Vec::new();
    let mut at = 0;
    while at + 4 <= descs.len() && descs[at] != 0 {
        let (t, l) = (descs[at], descs[at + 1] as usize);
        if t == 3 {
            uuid = descs[at + 4..at + 4 + l].to_vec();
        }
        at += 4 + l;
    }
    (nguid, uuid)
}

#[test]
fn nguid_follows_the_volume_not_the_nqn() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    let legs = [
        file_leg(&first, "primary", "64MiB"),
        file_leg(&first, "mirror", "64MiB"),
    ];
    let srv = Server::with_legs(&first, &legs, &[]);
    let (nguid, uuid) = identity(&srv);
    assert_ne!(nguid, [0; 16]);
    assert_eq!(uuid.len(), 16, "a UUID descriptor is reported");
    srv.stop();

    // The same volume after a restart: the same identity.
    let srv = Server::with_legs(&first, &legs, &[]);
    assert_eq!(
        identity(&srv),
        (nguid, uuid.clone()),
        "identity kept across a restart"
    );
    srv.stop();

    // A volume re-created from blank legs under the same NQN is another disk to the host.
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let legs = [
        file_leg(&second, "primary", "64MiB"),
        file_leg(&second, "mirror", "64MiB"),
    ];
    let srv = Server::with_legs(&second, &legs, &[]);
    let (nguid2, uuid2) = identity(&srv);
    assert_ne!(nguid2, nguid, "a new volume must not reuse the old NGUID");
    assert_ne!(uuid2, uuid, "a new volume must not reuse the old UUID");
    srv.stop();
}
