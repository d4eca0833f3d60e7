//! A minimal NVMe/TCP load generator over raw PDUs: one I/O queue, a fixed queue depth of
//! random 4 KiB (or `--bs`) writes or reads, for a few seconds; prints IOPS. Without
//! `--addr` it starts its own target on one reactor over a `mem://` namespace.
//!
//! ```text
//! cargo run --release -p nvmirror-target --example tcp_load -- [--rw randwrite|randread]
//!     [--qd 32] [--bs 4096] [--secs 5] [--addr 127.0.0.1:4420 --nqn NQN]
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nvmirror_nvme::spec::fabrics::{
    connect_sqe, property, property_set_sqe, sgl_in_capsule, sgl_transport, ConnectData,
    CNTLID_DYNAMIC,
};
use nvmirror_nvme::spec::tcp::{self, parse_pdu, Digests, Pdu, PduLimits, Role};
use nvmirror_nvme::spec::wire::put_nul_padded;
use nvmirror_nvme::spec::SubmissionQueueEntry;
use nvmirror_poller::{ReactorConfig, ReactorPool};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:nvmirror-tcp-load";

struct Queue {
    sock: TcpStream,
    rx: Vec<u8>,
    len: usize,
    lim: PduLimits,
}

impl Queue {
    fn open(addr: SocketAddr) -> Self {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).unwrap();
        let mut q = Self {
            sock,
            rx: vec![0; 4 << 20],
            len: 0,
            lim: PduLimits {
                max_c2hdata: 1 << 20,
                ..PduLimits::default()
            },
        };
        q.sock.write_all(&tcp::icreq_bytes(0, 0, 0)).unwrap();
        q.next(|_| {});
        q
    }

    /// Reads until at least one PDU is complete; calls `f` for each one. Returns how many.
    fn next(&mut self, mut f: impl FnMut(&Pdu<'_>)) -> usize {
        loop {
            let mut off = 0;
            let mut n = 0;
            while let Ok(Some((pdu, l))) = parse_pdu(&self.rx[off..self.len], Role::Host, &self.lim)
            {
                f(&pdu);
                off += l;
                n += 1;
            }
            self.rx.copy_within(off..self.len, 0);
            self.len -= off;
            if n > 0 {
                return n;
            }
            let r = self.sock.read(&mut self.rx[self.len..]).expect("recv");
            assert!(r > 0, "target closed the connection");
            self.len += r;
        }
    }

    fn run(&mut self, sqe: SubmissionQueueEntry, data: &[u8]) -> u32 {
        let mut out = vec![0u8; tcp::capsule_cmd_len(data.len(), Digests::default())];
        let n = tcp::write_capsule_cmd(&mut out, &sqe, data, Digests::default());
        self.sock.write_all(&out[..n]).unwrap();
        let mut dw0 = 0;
        let mut status = 0;
        self.next(|p| {
            if let Pdu::CapsuleResp(r) = p {
                dw0 = r.cqe.dw0;
                status = r.cqe.status >> 1;
            }
        });
        assert_eq!(status, 0, "command {:#x} failed", sqe.opcode);
        dw0
    }

    fn connect(&mut self, qid: u16, nqn: &str, cntlid: u16) -> u16 {
        let mut d = ConnectData::zeroed();
        d.cntlid = cntlid;
        put_nul_padded(&mut d.subnqn, nqn);
        put_nul_padded(&mut d.hostnqn, HOSTNQN);
        let mut data = vec![0u8; 1024];
        d.write_to(&mut data);
        let mut sqe = connect_sqe(1, qid, 127, 0);
        sgl_in_capsule(&mut sqe, 1024);
        self.run(sqe, &data) as u16
    }
}

fn main() {
    let mut rw = "randwrite".to_string();
    let (mut qd, mut bs, mut secs) = (32usize, 4096usize, 5u64);
    let mut addr: Option<SocketAddr> = None;
    let mut nqn = "nqn.2024-01.io.nvmirror:load".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().expect("every option takes a value");
        match a.as_str() {
            "--rw" => rw = v,
            "--qd" => qd = v.parse().unwrap(),
            "--bs" => bs = v.parse().unwrap(),
            "--secs" => secs = v.parse().unwrap(),
            "--addr" => addr = Some(v.parse().unwrap()),
            "--nqn" => nqn = v,
            _ => panic!("unknown option {a}"),
        }
    }
    let write = rw == "randwrite";
    let mut _own = None;
    let addr = addr.unwrap_or_else(|| {
        let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
        let ns = nvmirror_nvme::open_leg("mem://1GiB").unwrap();
        let cfg = TargetConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            subsystems: vec![SubsystemConfig::new(nqn.clone(), vec![ns])],
            ..TargetConfig::default()
        };
        let t = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
        let a = t.local_addr();
        _own = Some((pool, t));
        a
    });
    let mut admin = Queue::open(addr);
    let cntlid = admin.connect(0, &nqn, CNTLID_DYNAMIC);
    admin.run(property_set_sqe(2, property::CC, 4, 0x46_0001), &[]);
    let mut io = Queue::open(addr);
    io.connect(1, &nqn, cntlid);

    let blocks_per_io = (bs / 512) as u32;
    let span = (1u64 << 30) / bs as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let payload = vec![0xa5u8; bs];
    let mut tx = Vec::with_capacity(qd * (bs + 128));
    let push = |tx: &mut Vec<u8>, cid: u16, rng: &mut u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let mut sqe = SubmissionQueueEntry {
            opcode: if write { 0x01 } else { 0x02 },
            cid,
            nsid: 1,
            ..Default::default()
        };
        sqe.set_lba_range((*rng % span) * u64::from(blocks_per_io), blocks_per_io);
        let data: &[u8] = if write { &payload } else { &[] };
        if write {
            sgl_in_capsule(&mut sqe, bs as u32);
        } else {
            sgl_transport(&mut sqe, bs as u32);
        }
        let start = tx.len();
        tx.resize(
            start + tcp::capsule_cmd_len(data.len(), Digests::default()),
            0,
        );
        tcp::write_capsule_cmd(&mut tx[start..], &sqe, data, Digests::default());
    };
    for cid in 0..qd as u16 {
        push(&mut tx, cid, &mut rng);
    }
    io.sock.write_all(&tx).unwrap();
    tx.clear();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut done = 0u64;
    while Instant::now() < end {
        let mut cids = [0u16; 1024];
        let mut k = 0;
        io.next(|p| {
            if let Pdu::CapsuleResp(r) = p {
                assert_eq!(r.cqe.status >> 1, 0, "I/O failed");
                if k < cids.len() {
                    cids[k] = r.cqe.cid;
                    k += 1;
                }
            }
        });
        done += k as u64;
        for &cid in &cids[..k] {
            push(&mut tx, cid, &mut rng);
        }
        io.sock.write_all(&tx).unwrap();
        tx.clear();
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "{rw} bs={bs} qd={qd}: {:.0} IOPS, {:.1} MiB/s over {el:.1} s",
        done as f64 / el,
        done as f64 * bs as f64 / el / (1 << 20) as f64
    );
}
