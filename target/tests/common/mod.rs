//! A small raw-PDU NVMe/TCP host for the target's tests: blocking socket, one command at a
//! time unless a test drives the PDUs itself.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::spec::admin::{cns, feature, IDENTIFY_LEN};
use nvmirror_nvme::spec::fabrics::{
    connect_sqe, property, property_get_sqe, property_set_sqe, sgl_in_capsule, sgl_transport,
    ConnectData, CNTLID_DYNAMIC,
};
use nvmirror_nvme::spec::tcp::{
    self, digest_bits, flags, parse_pdu, DataHeader, DataPdu, Digests, Pdu, PduLimits, PduType,
    R2tHeader, Role,
};
use nvmirror_nvme::spec::wire::put_nul_padded;
use nvmirror_nvme::spec::{CompletionQueueEntry, Status, SubmissionQueueEntry};
use nvmirror_nvme::BlockDevice;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

pub const SUBNQN: &str = "nqn.2024-01.io.nvmirror:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:test-host";

/// A running target with its reactors.
pub struct Harness {
    pub target: Option<NvmeTcpTarget>,
    pub pool: Option<ReactorPool>,
    pub addr: SocketAddr,
    pub namespaces: Vec<Arc<dyn BlockDevice>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        drop(self.target.take());
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
    }
}

/// A 16 MiB 512-byte-block and a 4 MiB 4096-byte-block RAM namespace.
pub fn mem_namespaces() -> Vec<Arc<dyn BlockDevice>> {
    vec![
        Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap()),
        Arc::new(MemDevice::new(4 << 20, 4096, LatencyModel::None).unwrap()),
    ]
}

/// Starts a target on an ephemeral loopback port; `tweak` adjusts the configuration.
pub fn start(tweak: impl FnOnce(&mut TargetConfig)) -> Harness {
    let namespaces = mem_namespaces();
    let mut cfg = TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        subsystems: vec![SubsystemConfig::new(SUBNQN, namespaces.clone())],
        ..TargetConfig::default()
    };
    tweak(&mut cfg);
    let pool = ReactorPool::start(ReactorConfig::unpinned(2).with_idle(
        IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(50),
            sleep: Duration::from_millis(1),
        },
    ))
    .unwrap();
    let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
    Harness {
        addr: target.local_addr(),
        target: Some(target),
        pool: Some(pool),
        namespaces,
    }
}

/// A PDU as the test host received it.
#[derive(Debug)]
pub enum Received {
    IcResp(tcp::IcResp),
    Resp(CompletionQueueEntry),
    C2H {
        header: DataHeader,
        data: Vec<u8>,
        ddgst_ok: bool,
    },
    R2T(R2tHeader),
    Term {
        fes: u16,
        fei: u32,
    },
    /// The target closed the connection.
    Eof,
}

/// The test host's end of one queue.
pub struct Host {
    pub sock: TcpStream,
    pub dg: Digests,
    rx: Vec<u8>,
    next_cid: u16,
}

impl Host {
    pub fn connect(addr: SocketAddr) -> Self {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        Self {
            sock,
            dg: Digests::default(),
            rx: Vec::new(),
            next_cid: 1,
        }
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        self.next_cid
    }

    pub fn send(&mut self, b: &[u8]) {
        self.sock.write_all(b).unwrap();
    }

    /// Sends without failing if the target already closed.
    pub fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.sock.write_all(b);
    }

    fn limits(&self) -> PduLimits {
        PduLimits {
            hdgst: self.dg.hdgst,
            ddgst: self.dg.ddgst,
            max_icdata: 0,
            maxh2cdata: 0,
            max_c2hdata: 1 << 22,
        }
    }

    /// The next PDU from the target (panics on a malformed one or a timeout).
    pub fn recv(&mut self) -> Received {
        loop {
            let lim = self.limits();
            match parse_pdu(&self.rx, Role::Host, &lim) {
                Ok(Some((pdu, n))) => {
                    let r = match pdu {
                        Pdu::IcResp(r) => Received::IcResp(r),
                        Pdu::CapsuleResp(r) => Received::Resp(r.cqe),
                        Pdu::C2HData {
                            header,
                            data,
                            ddgst_ok,
                        } => Received::C2H {
                            header,
                            data: data.to_vec(),
                            ddgst_ok,
                        },
                        Pdu::R2T(r) => Received::R2T(r),
                        Pdu::TermReq { header, .. } => Received::Term {
                            fes: header.fes,
                            fei: u32::from_le_bytes(header.fei),
                        },
                        other => panic!("unexpected PDU {other:?}"),
                    };
                    self.rx.drain(..n);
                    return r;
                }
                Ok(None) => {}
                Err(e) => panic!("target sent a malformed PDU: {e}"),
            }
            let mut buf = [0u8; 65536];
            match self.sock.read(&mut buf) {
                Ok(0) => return Received::Eof,
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Received::Eof,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Reads until a termination request or the close; returns (FES, FEI) if one came.
    pub fn expect_termination(&mut self) -> Option<(u16, u32)> {
        loop {
            match self.recv() {
                Received::Term { fes, fei } => {
                    assert!(self.recv_eof_or_nothing(), "data after TermReq");
                    return Some((fes, fei));
                }
                Received::Eof => return None,
                _ => {}
            }
        }
    }

    fn recv_eof_or_nothing(&mut self) -> bool {
        matches!(self.recv(), Received::Eof)
    }

    pub fn icreq(&mut self, hdgst: bool, ddgst: bool) -> tcp::IcResp {
        let digest = if hdgst { digest_bits::HDGST_ENABLE } else { 0 }
            | if ddgst { digest_bits::DDGST_ENABLE } else { 0 };
        self.send(&tcp::icreq_bytes(0, digest, 0));
        let r = match self.recv() {
            Received::IcResp(r) => r,
            other => panic!("expected ICResp, got {other:?}"),
        };
        assert_eq!(r.digest, digest, "ICResp echoes the digest flags");
        assert_eq!(r.cpda, 0);
        assert!(r.maxh2cdata >= 4096 && r.maxh2cdata % 4 == 0);
        self.dg = Digests { hdgst, ddgst };
        r
    }

    /// Sends a command capsule; `data` goes in-capsule when `in_capsule`, else via R2T.
    pub fn send_cmd(
        &mut self,
        mut sqe: SubmissionQueueEntry,
        data: &[u8],
        in_capsule: bool,
        c2h_len: u32,
    ) {
        if !data.is_empty() && in_capsule {
            sgl_in_capsule(&mut sqe, data.len() as u32);
        } else if !data.is_empty() {
            sgl_transport(&mut sqe, data.len() as u32);
        } else {
            sgl_transport(&mut sqe, c2h_len);
        }
        let payload = if in_capsule { data } else { &[][..] };
        let mut out = vec![0u8; tcp::capsule_cmd_len(payload.len(), self.dg)];
        let n = tcp::write_capsule_cmd(&mut out, &sqe, payload, self.dg);
        self.send(&out[..n]);
    }

    /// Answers an R2T with H2CData PDUs of at most `chunk` bytes.
    pub fn answer_r2t(&mut self, r: &R2tHeader, data: &[u8], chunk: usize) {
        let mut off = r.r2to as usize;
        let end = off + r.r2tl as usize;
        while off < end {
            let n = chunk.min(end - off);
            let d = DataPdu {
                ty: PduType::H2CData,
                flags: if off + n == end { flags::LAST_PDU } else { 0 },
                cccid: r.cccid,
                ttag: r.ttag,
                datao: off as u32,
                datal: n as u32,
            };
            let mut out = vec![0u8; tcp::data_pdu_len(n, self.dg)];
            let len = tcp::write_data_pdu(&mut out, &d, &data[off..off + n], self.dg);
            self.send(&out[..len]);
            off += n;
        }
    }

    /// Runs one command to completion: answers R2Ts, gathers C2H data.
    pub fn run(
        &mut self,
        sqe: SubmissionQueueEntry,
        data: &[u8],
        in_capsule: bool,
        c2h_len: u32,
    ) -> (CompletionQueueEntry, Vec<u8>) {
        self.send_cmd(sqe, data, in_capsule, c2h_len);
        self.finish(sqe.cid, data)
    }

    /// Collects the PDUs of command `cid` until its completion.
    pub fn finish(&mut self, cid: u16, data: &[u8]) -> (CompletionQueueEntry, Vec<u8>) {
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Received::Resp(c) => {
                    assert_eq!(c.cid, cid, "completion for another command");
                    return (c, got);
                }
                Received::C2H {
                    header,
                    data: d,
                    ddgst_ok,
                } => {
                    assert!(ddgst_ok, "C2HData digest");
                    assert_eq!(header.cccid, cid);
                    assert_eq!(header.datao as usize, got.len());
                    got.extend_from_slice(&d);
                    if header.ch.flags & flags::SUCCESS != 0 {
                        return (
                            CompletionQueueEntry {
                                cid,
                                ..Default::default()
                            },
                            got,
                        );
                    }
                }
                Received::R2T(r) => {
                    assert_eq!(r.cccid, cid);
                    self.answer_r2t(&r, data, 65536);
                }
                other => panic!("unexpected {other:?} while waiting for cid {cid}"),
            }
        }
    }

    pub fn connect_data(subnqn: &str, hostnqn: &str, cntlid: u16) -> Vec<u8> {
        Self::connect_data_as(subnqn, hostnqn, [0; 16], cntlid)
    }

    /// Connect data of a host with Host Identifier `hostid`.
    pub fn connect_data_as(subnqn: &str, hostnqn: &str, hostid: [u8; 16], cntlid: u16) -> Vec<u8> {
        let mut d = ConnectData::zeroed();
        d.hostid = hostid;
        d.cntlid = cntlid;
        put_nul_padded(&mut d.subnqn, subnqn);
        put_nul_padded(&mut d.hostnqn, hostnqn);
        let mut b = vec![0u8; 1024];
        d.write_to(&mut b);
        b
    }

    /// Fabrics Connect; returns the completion.
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        kato: u32,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
    ) -> CompletionQueueEntry {
        let cid = self.cid();
        let sqe = connect_sqe(cid, qid, sqsize, kato);
        let data = Self::connect_data(subnqn, hostnqn, cntlid);
        self.run(sqe, &data, true, 0).0
    }

    pub fn prop_get(&mut self, offset: u32, size: u32) -> u64 {
        let cid = self.cid();
        let (c, _) = self.run(property_get_sqe(cid, offset, size), &[], true, 0);
        assert!(
            c.status().is_success(),
            "property get {offset:#x}: {}",
            c.status()
        );
        u64::from(c.dw0) | (u64::from(c.dw1) << 32)
    }

    pub fn prop_set(&mut self, offset: u32, value: u32) -> Status {
        let cid = self.cid();
        self.run(
            property_set_sqe(cid, offset, 4, u64::from(value)),
            &[],
            true,
            0,
        )
        .0
        .status()
    }

    pub fn admin(
        &mut self,
        opcode: u8,
        nsid: u32,
        cdw10: u32,
        cdw11: u32,
        c2h_len: u32,
    ) -> (CompletionQueueEntry, Vec<u8>) {
        let sqe = SubmissionQueueEntry {
            opcode,
            cid: self.cid(),
            nsid,
            cdw10,
            cdw11,
            ..Default::default()
        };
        self.run(sqe, &[], true, c2h_len)
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Status, Vec<u8>) {
        let (c, d) = self.admin(0x06, nsid, u32::from(cns), 0, IDENTIFY_LEN as u32);
        (c.status(), d)
    }

    /// The whole admin bring-up a Linux host does; returns the controller ID.
    pub fn bring_up_admin(addr: SocketAddr, hdgst: bool, ddgst: bool, kato: u32) -> (Self, u16) {
        let mut h = Self::connect(addr);
        h.icreq(hdgst, ddgst);
        let c = h.fabrics_connect(0, 31, kato, SUBNQN, HOSTNQN, CNTLID_DYNAMIC);
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        let cntlid = c.dw0 as u16;
        let cap = h.prop_get(property::CAP, 8);
        assert!(cap & 0xffff >= 31, "MQES");
        assert_eq!(h.prop_get(property::VS, 4), 0x10300);
        assert!(h.prop_set(property::CC, 0x46_0001).is_success());
        assert_eq!(h.prop_get(property::CSTS, 4) & 1, 1, "CSTS.RDY");
        let (st, id) = h.identify(cns::CONTROLLER, 0);
        assert!(st.is_success());
        assert_eq!(
            u16::from_le_bytes([id[78], id[79]]),
            cntlid,
            "Identify CNTLID"
        );
        let (c, _) = h.admin(
            0x09,
            0,
            u32::from(feature::NUMBER_OF_QUEUES),
            0x0003_0003,
            0,
        );
        assert!(c.status().is_success());
        (h, cntlid)
    }

    /// A host `(hostnqn, hostid)` on subsystem `subnqn` at `addr`: its enabled admin queue
    /// (keep-alive off) and one I/O queue; returns both and the controller ID.
    pub fn bring_up_as(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        hostid: [u8; 16],
    ) -> (Self, Self, u16) {
        let mut admin = Self::connect(addr);
        admin.icreq(false, false);
        let cid = admin.cid();
        let data = Self::connect_data_as(subnqn, hostnqn, hostid, CNTLID_DYNAMIC);
        let c = admin.run(connect_sqe(cid, 0, 31, 0), &data, true, 0).0;
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        let cntlid = c.dw0 as u16;
        assert!(admin.prop_set(property::CC, 0x46_0001).is_success());
        let (c, _) = admin.admin(0x09, 0, u32::from(feature::NUMBER_OF_QUEUES), 0, 0);
        assert!(c.status().is_success());
        let mut io = Self::connect(addr);
        io.icreq(false, false);
        let cid = io.cid();
        let data = Self::connect_data_as(subnqn, hostnqn, hostid, cntlid);
        let c = io.run(connect_sqe(cid, 1, 31, 0), &data, true, 0).0;
        assert!(c.status().is_success(), "I/O connect: {}", c.status());
        (admin, io, cntlid)
    }

    /// An I/O queue of controller `cntlid`.
    pub fn bring_up_io(addr: SocketAddr, cntlid: u16, qid: u16, hdgst: bool, ddgst: bool) -> Self {
        let mut h = Self::connect(addr);
        h.icreq(hdgst, ddgst);
        let c = h.fabrics_connect(qid, 63, 0, SUBNQN, HOSTNQN, cntlid);
        assert!(c.status().is_success(), "I/O connect: {}", c.status());
        h
    }

    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        data: &[u8],
        lba: usize,
        in_capsule: bool,
    ) -> Status {
        let mut sqe = SubmissionQueueEntry {
            opcode: 0x01,
            cid: self.cid(),
            nsid,
            ..Default::default()
        };
        sqe.set_lba_range(slba, (data.len() / lba) as u32);
        self.run(sqe, data, in_capsule, 0).0.status()
    }

    pub fn read(&mut self, nsid: u32, slba: u64, nlb: u32, lba: usize) -> (Status, Vec<u8>) {
        let mut sqe = SubmissionQueueEntry {
            opcode: 0x02,
            cid: self.cid(),
            nsid,
            ..Default::default()
        };
        sqe.set_lba_range(slba, nlb);
        let (c, d) = self.run(sqe, &[], true, nlb * lba as u32);
        (c.status(), d)
    }

    /// Waits for the target to close the connection (within `within`).
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let t = Instant::now();
        loop {
            let mut b = [0u8; 4096];
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if t.elapsed() > within {
                return false;
            }
        }
    }
}

/// A deterministic test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
