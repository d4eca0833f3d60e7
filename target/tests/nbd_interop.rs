//! The NBD server against unmodified clients: `nbdinfo`, `qemu-io`, `qemu-img` and
//! `fio --ioengine=nbd`. Needs those tools (`apt-get install nbdkit libnbd-bin qemu-utils
//! fio`), so it is ignored by default:
//!
//! ```text
//! cargo test --release -p nvmirror-target --test nbd_interop -- --ignored
//! ```

use std::process::Command;
use std::sync::Arc;

use nvmirror_nvme::{open_leg, read_all, BlockDevice};
use nvmirror_poller::{ReactorConfig, ReactorPool};
use nvmirror_target::nbd::{NbdConfig, NbdServer};

/// Runs a tool; fails the test with its output if it is missing or fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (apt-get install nbdkit libnbd-bin qemu-utils fio)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
#[ignore = "needs nbdinfo, qemu-io, qemu-img and fio"]
fn unmodified_clients_work() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(2)).unwrap();
    let dev: Arc<dyn BlockDevice> = open_leg("mem://64MiB").unwrap();
    let spare: Arc<dyn BlockDevice> = open_leg("null://1GiB?lba=4096").unwrap();
    let cfg = NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        exports: vec![("vol0".into(), Arc::clone(&dev)), ("spare".into(), spare)],
    };
    let server = NbdServer::start(cfg, &pool.handle()).unwrap();
    let uri = format!("nbd://{}/vol0", server.local_addr());

    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &uri])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for flag in ["can_flush", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[flag], true, "{flag}");
    }
    assert_eq!(e["is_read_only"], false);
    let list = run(
        "nbdinfo",
        &["--list", &format!("nbd://{}", server.local_addr())],
    );
    assert!(list.contains("vol0") && list.contains("spare"), "{list}");

    // qemu-io: aligned and unaligned I/O (qemu read-modify-writes to our 512-byte blocks),
    // write-zeroes, discard, flush, each checked by pattern.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "write -P 0x11 1000 100",
            "-c",
            "read -P 0x11 1000 100",
            "-c",
            "read -P 0x5a 1100 1000",
            "-c",
            "discard 512k 128k",
            "-c",
            "flush",
            &uri,
        ],
    );
    let image = read_all(&*dev).unwrap();
    assert!(image[..1000].iter().all(|&b| b == 0x5a));
    assert!(image[1000..1100].iter().all(|&b| b == 0x11));
    assert!(image[64 << 10..128 << 10].iter().all(|&b| b == 0));
    assert!(image[512 << 10..640 << 10].iter().all(|&b| b == 0));

    // qemu-img: copy a random image in and compare it back.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    assert!(read_all(&*dev).unwrap()[..8 << 20] == data[..]);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", src, &uri])
        .output()
        .unwrap();
    // The export is larger than the file; qemu-img requires the rest to read as zeroes.
    assert!(
        String::from_utf8_lossy(&cmp.stdout).contains("Images are identical"),
        "{cmp:?}"
    );

    // fio's NBD engine with crc32c verification.
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(server.shutdown());
}
