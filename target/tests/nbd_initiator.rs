//! The `nbd://` back end (nvmirror's NBD initiator) against nvmirror's own NBD server, and
//! against `nbdkit memory` when nbdkit is installed.

mod nbd_rig;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd_rig::{reactors, serve};
use nvmirror_nvme::backend::{NbdDevice, NbdOptions};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{
    open_leg, read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status,
};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// One command of a workload: op, LBA, blocks, byte offset of its data in the data area.
#[derive(Clone, Copy, Debug)]
struct Op {
    op: IoOp,
    slba: u64,
    nlb: u32,
    data_off: usize,
}

/// Runs `ops` on `qp` with up to `qp.depth()` in flight; returns each command's status.
/// Every read or write uses `data[data_off..]`, which must not overlap another in-flight op.
fn run(qp: &mut dyn QueuePair, ops: &[Op], data: &mut [u8], lba: usize) -> Vec<Status> {
    let mut status = vec![None; ops.len()];
    let mut next = 0;
    let mut done = 0;
    let mut cpl = vec![Completion::default(); 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < ops.len() {
        assert!(Instant::now() < deadline, "stuck at {done}/{}", ops.len());
        while next < ops.len() && qp.outstanding() < qp.depth() {
            let o = ops[next];
            let cmd = if o.op.has_data() {
                let len = o.nlb as usize * lba;
                let buf = IoBuf::from_slice(&mut data[o.data_off..o.data_off + len]);
                IoCommand::with_buf(o.op, o.slba, o.nlb, buf, next as u64)
            } else {
                IoCommand::new(o.op, o.slba, o.nlb, next as u64)
            };
            // SAFETY: `data` outlives the loop, which reaps every command before returning;
            // in-flight commands use disjoint parts of it (the caller's promise).
            unsafe { qp.submit(cmd) }.unwrap();
            next += 1;
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(status[c.tag as usize].is_none(), "tag {} twice", c.tag);
            status[c.tag as usize] = Some(c.status);
        }
        done += n;
        if n == 0 {
            std::hint::spin_loop();
        }
    }
    status.into_iter().map(Option::unwrap).collect()
}

/// Writes random data with random sizes at `depth`, then reads it all back through the
/// initiator; returns each extent written: byte offset and data.
fn write_and_read_back(
    dev: &dyn BlockDevice,
    depth: u32,
    sizes: &[u32],
    seed: u64,
) -> Vec<(usize, Vec<u8>)> {
    let geo = dev.geometry();
    let lba = geo.lba_size as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut qp = dev.open_qpair(depth).unwrap();
    // Non-overlapping extents, each written once, in random order.
    let mut ops = Vec::new();
    let mut lba_at = 0u64;
    let mut data_at = 0usize;
    for i in 0..(depth as usize * 4).max(16) {
        let nlb = sizes[i % sizes.len()] / geo.lba_size;
        if lba_at + u64::from(nlb) > geo.num_blocks {
            break;
        }
        ops.push(Op {
            op: IoOp::Write,
            slba: lba_at,
            nlb,
            data_off: data_at,
        });
        lba_at += u64::from(nlb) + rng.gen_range(0..4);
        data_at += nlb as usize * lba;
    }
    for i in (1..ops.len()).rev() {
        ops.swap(i, rng.gen_range(0..=i));
    }
    let mut data = vec![0u8; data_at];
    rng.fill_bytes(&mut data);
    let st = run(&mut *qp, &ops, &mut data, lba);
    assert!(st.iter().all(|s| s.is_success()), "writes: {st:?}");
    let mut back = vec![0u8; data_at];
    let reads: Vec<Op> = ops
        .iter()
        .map(|o| Op {
            op: IoOp::Read,
            ..*o
        })
        .collect();
    let st = run(&mut *qp, &reads, &mut back, lba);
    assert!(st.iter().all(|s| s.is_success()), "reads: {st:?}");
    assert!(back == data, "depth {depth}: data read back differs");
    ops.iter()
        .map(|o| {
            let len = o.nlb as usize * lba;
            (
                o.slba as usize * lba,
                data[o.data_off..o.data_off + len].to_vec(),
            )
        })
        .collect()
}

#[test]
fn handshake_reports_the_exports_geometry() {
    let pool = reactors(1);
    let small: Arc<dyn BlockDevice> = open_leg("mem://8MiB").unwrap();
    let big: Arc<dyn BlockDevice> = open_leg("mem://16MiB?lba=4096").unwrap();
    let server = serve(&pool, &[("small", &small), ("big", &big)]);
    let port = server.local_addr().port();
    let uri = format!("nbd://127.0.0.1:{port}/big");
    let dev = open_leg(&uri).unwrap();
    assert_eq!(
        dev.geometry(),
        big.geometry(),
        "4096-byte minimum block size"
    );
    assert_eq!(dev.name(), uri);
    let dev = open_leg(&format!("nbd://127.0.0.1:{port}/small")).unwrap();
    assert_eq!(dev.geometry(), small.geometry());
    // The empty name is the server's default export (the first one).
    let dev = NbdDevice::connect(&format!("127.0.0.1:{port}"), &NbdOptions::new("")).unwrap();
    let info = dev.export_info();
    assert_eq!(info.size, 8 << 20);
    assert!(!info.used_export_name, "the server knows NBD_OPT_GO");
    assert_eq!((info.min_block, info.max_block), (512, 32 << 20));
    drop(dev);
    assert!(server.shutdown());
}

#[test]
fn random_data_reads_back_at_several_sizes_and_depths() {
    let pool = reactors(2);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://64MiB").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let uri = format!("nbd://{}/vol0?connections=4", server.local_addr());
    let dev = open_leg(&uri).unwrap();
    let sizes = [512, 4096, 8192, 65536, 128 << 10, 1 << 20];
    let mut extents = Vec::new();
    for (i, depth) in [1u32, 8, 64, 256].into_iter().enumerate() {
        extents = write_and_read_back(&*dev, depth, &sizes, 7 + i as u64);
    }
    // The last round's data is on the device, seen directly.
    let direct = read_all(&*backing).unwrap();
    assert!(extents.len() >= 16);
    for (at, data) in &extents {
        assert!(direct[*at..at + data.len()] == data[..], "extent at {at}");
    }
    // And through read_all over the initiator.
    let through = read_all(&*dev).unwrap();
    assert!(through == direct);
    drop(dev);
    assert!(server.shutdown());
}

#[test]
fn queue_pairs_on_several_connections_run_at_once() {
    let pool = reactors(2);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://32MiB").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let uri = format!("nbd://{}/vol0?connections=3", server.local_addr());
    let dev = open_leg(&uri).unwrap();
    let qps: Vec<_> = (0..3).map(|_| dev.open_qpair(32).unwrap()).collect();
    let e = dev.open_qpair(32).unwrap_err().to_string();
    assert!(e.contains("connections="), "{e}");
    std::thread::scope(|s| {
        for (t, mut qp) in qps.into_iter().enumerate() {
            s.spawn(move || {
                let mut data = vec![t as u8 + 1; 4 << 20];
                let ops: Vec<Op> = (0..64)
                    .map(|k| Op {
                        op: IoOp::Write,
                        slba: ((t as u64 * 8) << 20) / 512 + k * 128,
                        nlb: 128,
                        data_off: (k as usize) * 65536,
                    })
                    .collect();
                let st = run(&mut *qp, &ops, &mut data, 512);
                assert!(st.iter().all(|s| s.is_success()));
            });
        }
    });
    let image = read_all(&*backing).unwrap();
    for t in 0..3usize {
        let at = t * (8 << 20);
        assert!(image[at..at + (4 << 20)].iter().all(|&b| b == t as u8 + 1));
    }
    assert!(server.shutdown());
}

/// Write, flush, trim and write-zeroes through `dev`; checks what reads back through it.
fn flush_trim_write_zeroes(dev: &dyn BlockDevice) {
    let lba = dev.geometry().lba_size as usize;
    let mut qp = dev.open_qpair(8).unwrap();
    let blocks = (1 << 20) / lba as u32;
    let mut data: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 253) as u8 + 1).collect();
    let w = [Op {
        op: IoOp::Write,
        slba: 0,
        nlb: blocks,
        data_off: 0,
    }];
    assert_eq!(run(&mut *qp, &w, &mut data, lba), [Status::SUCCESS]);
    let q = |op, slba: usize, bytes: usize| Op {
        op,
        slba: (slba / lba) as u64,
        nlb: (bytes / lba) as u32,
        data_off: 0,
    };
    let ops = [
        q(IoOp::Flush, 0, 0),
        q(IoOp::Deallocate, 64 << 10, 64 << 10),
        q(IoOp::WriteZeroes, 256 << 10, 8192),
        q(IoOp::Flush, 0, 0),
    ];
    let st = run(&mut *qp, &ops, &mut [], lba);
    assert!(st.iter().all(|s| s.is_success()), "{st:?}");
    let mut want = data.clone();
    want[64 << 10..128 << 10].fill(0);
    want[256 << 10..(256 << 10) + 8192].fill(0);
    let mut back = vec![0xeeu8; 1 << 20];
    let r = [Op {
        op: IoOp::Read,
        ..w[0]
    }];
    assert_eq!(run(&mut *qp, &r, &mut back, lba), [Status::SUCCESS]);
    assert!(
        back == want,
        "trimmed and zeroed ranges, and only those, read zeroes"
    );
}

#[test]
fn flush_trim_and_write_zeroes_reach_the_device() {
    let pool = reactors(1);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://4MiB").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let dev = open_leg(&format!("nbd://{}/vol0", server.local_addr())).unwrap();
    flush_trim_write_zeroes(&*dev);
    let image = read_all(&*backing).unwrap();
    assert!(image[64 << 10..128 << 10].iter().all(|&b| b == 0));
    assert!(image[(128 << 10)..(129 << 10)].iter().all(|&b| b != 0));
    drop(dev);
    assert!(server.shutdown());
}

#[test]
fn out_of_range_completes_with_lba_out_of_range_without_sending() {
    let pool = reactors(1);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let dev = open_leg(&format!("nbd://{}/vol0", server.local_addr())).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let end = dev.geometry().num_blocks;
    let mut data = vec![0u8; 8192];
    let ops = [
        Op {
            op: IoOp::Read,
            slba: end,
            nlb: 1,
            data_off: 0,
        },
        Op {
            op: IoOp::Write,
            slba: end - 1,
            nlb: 2,
            data_off: 0,
        },
        Op {
            op: IoOp::WriteZeroes,
            slba: u64::MAX,
            nlb: 1,
            data_off: 0,
        },
        Op {
            op: IoOp::Deallocate,
            slba: end - 4,
            nlb: 8,
            data_off: 0,
        },
    ];
    let st = run(&mut *qp, &ops, &mut data, 512);
    // Had they been sent, the server would have answered EINVAL or ENOSPC (Invalid Field
    // or Capacity Exceeded).
    assert!(st.iter().all(|s| *s == Status::LBA_OUT_OF_RANGE), "{st:?}");
    drop(qp);
    assert!(server.shutdown());
}

#[test]
fn a_bad_export_name_is_a_clear_open_error() {
    let pool = reactors(1);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://1MiB").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let e = open_leg(&format!("nbd://{}/nope", server.local_addr()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no export named 'nope'"), "{e}");
    assert!(e.contains("NBD_OPT_GO"), "{e}");
    assert!(server.shutdown());
}

/// A TCP relay between the initiator and the server that a test can cut.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (Arc::clone(&conns), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { return };
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let server = TcpStream::connect(to).unwrap();
                let mut v = c.lock().unwrap();
                v.push(client.try_clone().unwrap());
                v.push(server.try_clone().unwrap());
                for (mut a, mut b) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n @ 1..) = a.read(&mut buf) {
                            if b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, conns, stop }
    }

    /// Drops every relayed connection.
    fn cut(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_dropped_connection_fails_every_outstanding_command() {
    let pool = reactors(1);
    let backing: Arc<dyn BlockDevice> = open_leg("mem://16MiB?latency=300ms").unwrap();
    let server = serve(&pool, &[("vol0", &backing)]);
    let relay = Relay::start(server.local_addr());
    let uri = format!("nbd://{}/vol0", relay.addr);
    let dev = NbdDevice::connect(&relay.addr.to_string(), &NbdOptions::new("vol0"))
        .unwrap()
        .with_name(uri);
    let mut qp = dev.open_nbd_qpair(64).unwrap();
    let mut data = vec![0x11u8; 64 * 4096];
    let mut cpl = [Completion::default(); 64];
    for i in 0..64u64 {
        let buf = IoBuf::from_slice(&mut data[i as usize * 4096..(i as usize + 1) * 4096]);
        let op = if i % 2 == 0 { IoOp::Write } else { IoOp::Read };
        // SAFETY: `data` outlives every command; each uses its own 4 KiB.
        unsafe { qp.submit(IoCommand::with_buf(op, i * 8, 8, buf, i)) }.unwrap();
    }
    // Let the requests reach the server, then cut the line while the device sleeps on them.
    let until = Instant::now() + Duration::from_millis(100);
    while Instant::now() < until {
        assert_eq!(
            qp.poll(&mut cpl),
            0,
            "nothing completes within the device latency"
        );
    }
    relay.cut();
    let mut got: HashMap<u64, Status> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 64 {
        assert!(Instant::now() < deadline, "hung with {} of 64", got.len());
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(got.insert(c.tag, c.status).is_none());
        }
    }
    assert!(
        got.values().all(|s| *s == Status::HOST_PATHING_ERROR),
        "{got:?}"
    );
    assert!(dev.is_gone());
    assert!(
        dev.lost_reason().unwrap().contains("closed"),
        "{:?}",
        dev.lost_reason()
    );
    // Later commands fail at once instead of hanging.
    // SAFETY: no data.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 99)) }.unwrap();
    assert_eq!(qp.poll(&mut cpl), 1);
    assert_eq!(
        cpl[0],
        Completion {
            tag: 99,
            status: Status::HOST_PATHING_ERROR
        }
    );
    drop(qp);
    assert!(server.shutdown());
}

/// `nbdkit memory 64M` on a free loopback port; `None` (with the reason printed) when
/// nbdkit is not installed.
struct Nbdkit(Child, SocketAddr);

impl Nbdkit {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("nbdkit")
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "memory",
                "64M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                println!("skipped: nbdkit is not available ({e}); apt-get install nbdkit");
                return None;
            }
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let me = Self(child, addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nbdkit did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(me)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn works_against_nbdkit_memory() {
    let Some(kit) = Nbdkit::start() else { return };
    let dev = open_leg(&format!("nbd://{}/?connections=4", kit.1)).unwrap();
    assert_eq!(dev.geometry().bytes(), 64 << 20);
    let extents = write_and_read_back(&*dev, 32, &[512, 4096, 65536, 1 << 20], 42);
    // Two connections at once (nbdkit's memory plugin allows multi-conn): what one wrote,
    // the other reads.
    let mut a = dev.open_qpair(8).unwrap();
    let mut b = dev.open_qpair(8).unwrap();
    let (at, data) = &extents[0];
    let lba = dev.geometry().lba_size as usize;
    let op = |op, n: usize| Op {
        op,
        slba: (*at / lba) as u64,
        nlb: (n / lba) as u32,
        data_off: 0,
    };
    let mut buf: Vec<u8> = data.iter().map(|x| !x).collect();
    assert_eq!(
        run(&mut *a, &[op(IoOp::Write, data.len())], &mut buf, lba),
        [Status::SUCCESS]
    );
    assert_eq!(
        run(&mut *a, &[op(IoOp::Flush, 0)], &mut [], lba),
        [Status::SUCCESS]
    );
    let mut back = vec![0u8; data.len()];
    assert_eq!(
        run(&mut *b, &[op(IoOp::Read, data.len())], &mut back, lba),
        [Status::SUCCESS]
    );
    assert!(back == buf);
    drop((a, b));
    flush_trim_write_zeroes(&*dev);
}
