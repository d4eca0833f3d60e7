//! A host that disconnects while a file leg is hung in the kernel does not freeze its reactor
//! (docs/mirror.md, "Abandoned commands"): the leg's queue pair is closed without waiting, its
//! commands go to a reaper, and the other hosts on the same reactor keep being served. The leg
//! stays busy (attaching it is refused) until the kernel has returned the hung write.
//!
//! The hang is real: the file leg lives on an ext4 loop mount that the test freezes with
//! `fsfreeze`, so an O_DIRECT write to it blocks in the kernel and cannot be cancelled. That
//! needs root and `mkfs.ext4`/`mount`/`fsfreeze`; without them the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp, QueuePair, Status};

mod serve_rig;
use serve_rig::{Server, NQN};

fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An ext4 file system on a loop device, mounted at `mnt`; thawed and unmounted on drop.
struct FrozenFs {
    mnt: PathBuf,
}

impl FrozenFs {
    fn mount(dir: &Path) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).ok()?;
        std::fs::File::create(&img).ok()?.set_len(96 << 20).ok()?;
        let (img_s, mnt_s) = (img.to_str()?, mnt.to_str()?);
        if !sh("mkfs.ext4", &["-q", "-F", img_s]) || !sh("mount", &["-o", "loop", img_s, mnt_s]) {
            return None;
        }
        Some(Self { mnt })
    }

    fn freeze(&self, on: bool) {
        let flag = if on { "-f" } else { "-u" };
        assert!(sh("fsfreeze", &[flag, self.mnt.to_str().unwrap()]));
    }
}

/// Thaws the file system when dropped: declared after the server, so a failing test thaws
/// before it reaps a server whose threads the freeze holds.
struct Thaw<'a>(&'a FrozenFs);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        sh("fsfreeze", &["-u", self.0.mnt.to_str().unwrap()]);
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        let mnt = self.mnt.to_str().unwrap();
        sh("fsfreeze", &["-u", mnt]);
        sh("umount", &["-l", mnt]);
    }
}

/// One command on `qp`, waited for `limit` at most.
fn io(qp: &mut dyn QueuePair, cmd: IoCommand, limit: Duration) -> Option<Status> {
    // SAFETY: every buffer handed in outlives the queue pair it goes to.
    unsafe { qp.submit(cmd) }.ok()?;
    let deadline = Instant::now() + limit;
    let mut cpl = [Completion::default(); 4];
    while Instant::now() < deadline {
        let n = qp.poll(&mut cpl);
        if let Some(c) = cpl[..n].iter().find(|c| c.tag == cmd.tag) {
            return Some(c.status);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

#[test]
fn a_host_disconnecting_from_a_hung_file_leg_does_not_freeze_the_reactor() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let Some(fs) = FrozenFs::mount(d) else {
        eprintln!("skipped: needs root, mkfs.ext4, a loop device and fsfreeze");
        return;
    };
    let leg = format!("file://{}/leg.img?create=32MiB", fs.mnt.display());
    let cfg = d.join("nvmirror.toml");
    std::fs::write(
        &cfg,
        format!(
            "[reactors]\ncores = [0]\n\n[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n\
             [rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nio_timeout = \"300ms\"\nbitmap = false\n\
             legs = [\"mem://32MiB\", \"{leg}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n"
        ),
    )
    .unwrap();
    let args = vec![
        "--config".into(),
        cfg.display().to_string(),
        "--data-dir".into(),
        d.join("data").display().to_string(),
    ];
    let server = Server::spawn(&args, &[]).unwrap();
    let _thaw = Thaw(&fs);
    server.wait_in_sync();
    let uri = format!("nvme-tcp://{}/{NQN}", server.nvme_tcp);
    let mut pool = DmaPool::new(4, 4096);
    let (mut a, mut b) = (pool.get().unwrap(), pool.get().unwrap());
    a.as_mut_slice().fill(0xa1);
    b.as_mut_slice().fill(0xb2);

    // Host B stays connected throughout, on the same (only) reactor as host A.
    let dev_b = open_leg(&uri).unwrap();
    let mut host_b = dev_b.open_qpair(4).unwrap();
    let w = IoCommand::with_buf(IoOp::Write, 64, 8, b.io_buf(), 1);
    assert_eq!(
        io(&mut *host_b, w, Duration::from_secs(5)),
        Some(Status::SUCCESS)
    );

    // Host A's write hangs on the file leg; after the I/O timeout the leg is faulted out and
    // the host is answered from the memory leg. Then host A goes away.
    fs.freeze(true);
    {
        let dev_a = open_leg(&uri).unwrap();
        let mut host_a = dev_a.open_qpair(4).unwrap();
        let w = IoCommand::with_buf(IoOp::Write, 0, 8, a.io_buf(), 1);
        assert!(
            io(&mut *host_a, w, Duration::from_secs(10)).is_some(),
            "the I/O timeout answers host A"
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    // The reactor that dropped host A's queue pairs still serves host B.
    for tag in 2..10 {
        let cmd = IoCommand::with_buf(IoOp::Read, 64, 8, b.io_buf(), tag);
        assert_eq!(
            io(&mut *host_b, cmd, Duration::from_secs(5)),
            Some(Status::SUCCESS),
            "host B not served after host A disconnected from a hung leg"
        );
    }
    assert!(b.as_slice().iter().all(|&x| x == 0xb2));

    // The hung write is still in the kernel: the leg stays busy.
    let (ok, text) = server.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    assert!(!ok, "leg attached while its write may still land: {text}");
    assert!(text.contains("not answered"), "{text}");

    // Thawed, the kernel returns the write to the reaper, and the leg may come back.
    fs.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = server.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "leg 1 still refused: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.wait_in_sync();
    drop(host_b);
    server.stop();
}
