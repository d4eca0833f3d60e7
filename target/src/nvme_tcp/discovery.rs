//! The discovery subsystem (`nqn.2014-08.org.nvmexpress.discovery`) and its log page
//! (NVMe-oF §5.3): one entry per subsystem the asking host may connect to and per port
//! (listener) it is reachable through.

use std::net::SocketAddr;

use nvmirror_nvme::spec::admin::{discovery, DiscoveryLogEntry, DiscoveryLogHeader};
use nvmirror_nvme::spec::wire::put_nul_padded;

use super::subsystem::TargetShared;

/// The whole discovery log page for `hostnqn`; `local` is the address the host reached us
/// on (reported when the target listens on a wildcard address).
pub(super) fn log_page(shared: &TargetShared, hostnqn: &str, local: SocketAddr) -> Vec<u8> {
    let subsystems = shared.subsystems();
    let visible: Vec<_> = subsystems.iter().filter(|s| s.allows(hostnqn)).collect();
    // Port IDs stay those of the port index; a removed listener has no record.
    let ports: Vec<(usize, SocketAddr)> = shared
        .ports()
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
        .map(|(i, p)| {
            if p.ip().is_unspecified() {
                (i, SocketAddr::new(local.ip(), p.port()))
            } else {
                (i, p)
            }
        })
        .collect();
    let records: Vec<_> = visible
        .iter()
        .flat_map(|s| ports.iter().map(move |(i, a)| (s, *i, *a)))
        .collect();
    let mut page = vec![0u8; DiscoveryLogHeader::SIZE * (1 + records.len())];
    let mut hdr = DiscoveryLogHeader::zeroed();
    // Moves with every change of subsystems, namespaces or listeners.
    hdr.genctr = shared.generation.load(std::sync::atomic::Ordering::Acquire);
    hdr.numrec = records.len() as u64;
    hdr.write_to(&mut page);
    for (k, (s, port, addr)) in records.into_iter().enumerate() {
        let mut e = DiscoveryLogEntry::zeroed();
        e.trtype = discovery::TRTYPE_TCP;
        e.adrfam = if addr.is_ipv4() {
            discovery::ADRFAM_IPV4
        } else {
            discovery::ADRFAM_IPV6
        };
        e.subtype = discovery::SUBTYPE_NVME;
        e.treq = discovery::TREQ_NOT_REQUIRED | discovery::TREQ_DISABLE_SQFLOW;
        e.portid = port as u16 + 1;
        e.cntlid = nvmirror_nvme::spec::fabrics::CNTLID_DYNAMIC;
        e.asqsz = shared.cfg.effective_max_admin_queue_size();
        put_nul_padded(&mut e.trsvcid, &addr.port().to_string());
        put_nul_padded(&mut e.subnqn, &s.nqn);
        put_nul_padded(&mut e.traddr, &addr.ip().to_string());
        e.write_to(&mut page[DiscoveryLogEntry::SIZE * (k + 1)..]);
    }
    page
}
