//! DH-HMAC-CHAP through `nvmirror serve`, as a user sets it up: a subsystem that admits one
//! host with a host secret and a controller secret (`[[subsystem.host]]`), and the project's
//! own NVMe/TCP initiator as the host, with its secrets in files named on the leg URI
//! (`dhchap_secret_file=`, `dhchap_ctrl_secret_file=`). The right secret connects and moves
//! data, host-only and bidirectional; no secret, a wrong one, a wrong controller secret and an
//! unlisted host are each refused with an error that says why. Then a second serve mirrors
//! onto the authenticated one as a remote leg.

use std::path::{Path, PathBuf};

use nvmirror_nvme::dhchap::{HashId, Secret};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

mod serve_rig;
use serve_rig::{file_leg, read, write, Server, NQN};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-00000000a0a0";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:b0b0b0b0-0000-4000-8000-00000000b0b0";

fn secret(fill: u8, transform: Option<HashId>, len: usize) -> Secret {
    Secret {
        transform,
        key: (0..len).map(|i| fill ^ i as u8).collect(),
    }
}

/// Writes `s` to `dir/name` (mode 0600, as a secret file should be) and returns the path.
fn secret_file(dir: &Path, name: &str, s: &Secret) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", s.encode())).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A serve of `vol0` on two file legs whose subsystem admits only `HOST`, with `host` as its
/// secret and `ctrl` as the controller's.
fn serve(dir: &Path, host: &Secret, ctrl: &Secret) -> Server {
    Server::with_config(
        dir,
        &format!(
            "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nlegs = [\"{}\", \"{}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n\n\
             [[subsystem.host]]\nnqn = \"{HOST}\"\ndhchap_secret = \"{}\"\n\
             dhchap_ctrl_secret = \"{}\"\n",
            file_leg(dir, "primary", "64MiB"),
            file_leg(dir, "mirror", "64MiB"),
            host.encode(),
            ctrl.encode(),
        ),
    )
}

/// The error text of connecting with `query`, which must fail.
fn refused(addr: &str, query: &str) -> String {
    match open_leg(&format!("nvme-tcp://{addr}/{NQN}?{query}")) {
        Ok(_) => panic!("connect with {query} succeeded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn secrets_decide_who_connects_and_the_host_checks_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let host = secret(0x11, Some(HashId::Sha256), 32);
    let ctrl = secret(0x22, Some(HashId::Sha384), 48);
    let wrong = secret(0x33, None, 32);
    let s = serve(d, &host, &ctrl);
    let addr = s.nvme_tcp.clone();
    let (host_f, ctrl_f, wrong_f) = (
        secret_file(d, "host.key", &host),
        secret_file(d, "ctrl.key", &ctrl),
        secret_file(d, "wrong.key", &wrong),
    );

    let e = refused(&addr, &format!("hostnqn={HOST}"));
    assert!(e.contains("requires in-band authentication"), "{e}");
    let e = refused(
        &addr,
        &format!("hostnqn={HOST}&dhchap_secret_file={}", wrong_f.display()),
    );
    assert!(e.contains("refused authentication"), "{e}");
    assert!(!e.contains(&wrong.encode()), "the secret leaked: {e}");
    let e = refused(
        &addr,
        &format!(
            "hostnqn={OTHER_HOST}&dhchap_secret_file={}",
            host_f.display()
        ),
    );
    assert!(e.contains("does not allow host"), "{e}");
    let e = refused(
        &addr,
        &format!(
            "hostnqn={HOST}&dhchap_secret_file={}&dhchap_ctrl_secret_file={}",
            host_f.display(),
            wrong_f.display()
        ),
    );
    assert!(e.contains("controller's response does not match"), "{e}");

    // Host-only: the admin queue and the I/O queue authenticate, and data moves.
    let dev = open_leg(&format!(
        "nvme-tcp://{addr}/{NQN}?hostnqn={HOST}&dhchap_secret_file={}",
        host_f.display()
    ))
    .unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, 8 * 512);
    write(&mut *qp, &mut pool, 64, 8, 0x5a);
    assert_eq!(read(&mut *qp, &mut pool, 64, 8), vec![0x5a; 8 * 512]);
    drop(qp);
    drop(dev);

    // Bidirectional: the controller proves its secret too.
    let dev = open_leg(&format!(
        "nvme-tcp://{addr}/{NQN}?hostnqn={HOST}&dhchap_secret_file={}&dhchap_ctrl_secret_file={}",
        host_f.display(),
        ctrl_f.display()
    ))
    .unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    assert_eq!(read(&mut *qp, &mut pool, 64, 8), vec![0x5a; 8 * 512]);
    write(&mut *qp, &mut pool, 72, 8, 0xa5);
    assert_eq!(read(&mut *qp, &mut pool, 72, 8), vec![0xa5; 8 * 512]);
}

#[test]
fn a_remote_leg_authenticates_to_its_site_and_mirrors_onto_it() {
    let dir_b = tempfile::tempdir().unwrap();
    let dir_a = tempfile::tempdir().unwrap();
    let host = secret(0x44, Some(HashId::Sha512), 64);
    let ctrl = secret(0x55, None, 32);
    let b = serve(dir_b.path(), &host, &ctrl);
    let host_f = secret_file(dir_a.path(), "host.key", &host);
    let ctrl_f = secret_file(dir_a.path(), "ctrl.key", &ctrl);
    let b_bytes = b.status()["capacity_bytes"].as_u64().unwrap();
    let legs = [
        // The same size as B's namespace.
        file_leg(dir_a.path(), "a", &b_bytes.to_string()),
        format!(
            "nvme-tcp://{}/{NQN}?hostnqn={HOST}&kato=1s&dhchap_secret_file={}&dhchap_ctrl_secret_file={}",
            b.nvme_tcp,
            host_f.display(),
            ctrl_f.display()
        ),
    ];
    let a = Server::with_legs(dir_a.path(), &legs, &[]);
    let st = a.wait_in_sync();
    let shown = st.to_string();
    assert!(!shown.contains(&host.encode()) && !shown.contains(&ctrl.encode()));

    // A write through A is on B's namespace, read back through B's own export.
    let dev_a = open_leg(&format!("nvme-tcp://{}/{NQN}", a.nvme_tcp)).unwrap();
    let mut qa = dev_a.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, 16 * 512);
    write(&mut *qa, &mut pool, 4096, 16, 0xc7);
    let offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    drop(qa);
    drop(dev_a);
    a.stop();
    let dev_b = open_leg(&format!(
        "nvme-tcp://{}/{NQN}?hostnqn={HOST}&dhchap_secret_file={}",
        b.nvme_tcp,
        host_f.display()
    ))
    .unwrap();
    let mut qb = dev_b.open_qpair(4).unwrap();
    // A's volume starts `offset` bytes into B's namespace (A's superblock and bitmap).
    let slba = 4096 + offset / 512;
    assert_eq!(read(&mut *qb, &mut pool, slba, 16), vec![0xc7; 16 * 512]);
}
