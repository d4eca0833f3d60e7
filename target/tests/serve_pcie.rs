//! `pcie://` legs through `nvmirror serve`, as a user runs them: a volume mirrored onto the
//! userspace PCIe driver (on its fake controller) and a RAM leg serves a host over NVMe/TCP,
//! both legs stay in sync, and `leg_add` refuses a bad PCI address naming it.

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{read, write, Server, NQN};

#[test]
fn a_pcie_leg_serves_a_host_and_bad_addresses_are_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let legs = [
        "pcie://fake?size=16MiB&mdts=2".to_string(),
        "mem://16MiB".to_string(),
    ];
    let server = Server::with_legs(dir.path(), &legs, &[]);
    server.wait_in_sync();
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(1, 65536);
    // 64 KiB writes: larger than the fake's MDTS (16 KiB), so the driver splits them.
    for (i, slba) in [0u64, 4096, 20000].into_iter().enumerate() {
        write(&mut *qp, &mut pool, slba, 128, 0x40 + i as u8);
    }
    for (i, slba) in [0u64, 4096, 20000].into_iter().enumerate() {
        let data = read(&mut *qp, &mut pool, slba, 128);
        assert!(data.iter().all(|&b| b == 0x40 + i as u8), "block {slba}");
    }
    let st = server.status();
    let states: Vec<_> = st["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["in_sync", "in_sync"], "{st}");

    for (uri, says) in [
        ("pcie://0000:01:00.9", "0000:01:00.9"),
        ("pcie://0000:ff:1f.7", "does not exist"),
    ] {
        let (ok, text) = server.rpc("leg_add", &format!(r#"{{"volume":"vol0","uri":"{uri}"}}"#));
        assert!(!ok && text.contains(says), "{uri}: {text}");
    }
    server.stop();
}
