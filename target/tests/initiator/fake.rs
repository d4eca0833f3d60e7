//! A scripted NVMe/TCP controller for behaviour the real target never shows: it brings the
//! admin queue up like any controller, then hands every I/O command to a test's script,
//! which answers with whatever PDUs it likes — malformed ones included.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvmirror_nvme::spec::admin::{lba_format, IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use nvmirror_nvme::spec::fabrics::{property, ConnectCommand, FABRICS_OPCODE};
use nvmirror_nvme::spec::tcp::{
    self, digest_bits, flags, parse_pdu, DataHeader, DataPdu, Digests, Pdu, PduLimits, PduType,
    Role,
};
use nvmirror_nvme::spec::{CompletionQueueEntry, Status, SubmissionQueueEntry};

/// Blocks in the fake namespace (512-byte blocks).
pub const BLOCKS: u64 = 2048;

/// How the fake controller describes itself.
#[derive(Clone, Copy, Debug)]
pub struct FakeConfig {
    /// IOCCSZ in 16-byte units (4: no in-capsule data).
    pub ioccsz: u32,
    /// Metadata bytes per block of the namespace's LBA format.
    pub metadata: u16,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            ioccsz: 4 + 8192 / 16,
            metadata: 0,
        }
    }
}

/// What a script receives.
#[derive(Debug)]
pub enum Got {
    Cmd(SubmissionQueueEntry, Vec<u8>),
    H2C(DataHeader, Vec<u8>),
    /// The host terminated the connection with this FES.
    Term(u16),
    Eof,
}

/// One connection's end on the fake controller.
pub struct FakeConn {
    sock: TcpStream,
    pub dg: Digests,
    rx: Vec<u8>,
}

impl FakeConn {
    pub fn send(&mut self, b: &[u8]) {
        let _ = self.sock.write_all(b);
    }

    /// Closes the connection both ways (a controller that goes away).
    pub fn hang_up(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    pub fn recv(&mut self) -> Got {
        loop {
            let lim = PduLimits {
                hdgst: self.dg.hdgst,
                ddgst: self.dg.ddgst,
                max_icdata: 1 << 20,
                maxh2cdata: 1 << 20,
                max_c2hdata: 0,
            };
            match parse_pdu(&self.rx, Role::Controller, &lim) {
                Ok(Some((pdu, n))) => {
                    let got = match pdu {
                        Pdu::IcReq(r) => {
                            let dg = Digests {
                                hdgst: r.digest & digest_bits::HDGST_ENABLE != 0,
                                ddgst: r.digest & digest_bits::DDGST_ENABLE != 0,
                            };
                            let resp = tcp::icresp_bytes(0, r.digest, 8192);
                            self.rx.drain(..n);
                            self.send(&resp);
                            self.dg = dg;
                            continue;
                        }
                        Pdu::CapsuleCmd { header, data, .. } => Got::Cmd(header.sqe, data.to_vec()),
                        Pdu::H2CData { header, data, .. } => Got::H2C(header, data.to_vec()),
                        Pdu::TermReq { header, .. } => Got::Term(header.fes),
                        other => panic!("fake controller got {other:?}"),
                    };
                    self.rx.drain(..n);
                    return got;
                }
                Ok(None) => {}
                Err(e) => panic!("fake controller: malformed PDU from the host: {e}"),
            }
            let mut b = [0u8; 65536];
            match self.sock.read(&mut b) {
                Ok(0) | Err(_) => return Got::Eof,
                Ok(n) => self.rx.extend_from_slice(&b[..n]),
            }
        }
    }

    pub fn resp(&mut self, cid: u16, status: Status, dw0: u32) {
        self.resp64(cid, status, u64::from(dw0));
    }

    /// A response carrying a 64-bit value in DW0 and DW1.
    pub fn resp64(&mut self, cid: u16, status: Status, value: u64) {
        let cqe = CompletionQueueEntry {
            dw0: value as u32,
            dw1: (value >> 32) as u32,
            cid,
            status: status.raw() << 1,
            ..Default::default()
        };
        let mut b = vec![0u8; tcp::capsule_resp_len(self.dg)];
        let n = tcp::write_capsule_resp(&mut b, &cqe, self.dg);
        self.send(&b[..n]);
    }

    pub fn c2h(&mut self, cid: u16, datao: u32, data: &[u8], extra_flags: u8) {
        let d = DataPdu {
            ty: PduType::C2HData,
            flags: extra_flags,
            cccid: cid,
            ttag: 0,
            datao,
            datal: data.len() as u32,
        };
        let mut b = vec![0u8; tcp::data_pdu_len(data.len(), self.dg)];
        let n = tcp::write_data_pdu(&mut b, &d, data, self.dg);
        self.send(&b[..n]);
    }

    /// C2HData whose data digest is wrong (needs data digests on).
    pub fn c2h_bad_digest(&mut self, cid: u16, data: &[u8]) {
        let d = DataPdu {
            ty: PduType::C2HData,
            flags: flags::LAST_PDU,
            cccid: cid,
            ttag: 0,
            datao: 0,
            datal: data.len() as u32,
        };
        let mut b = vec![0u8; tcp::data_pdu_len(data.len(), self.dg)];
        let n = tcp::write_data_pdu(&mut b, &d, data, self.dg);
        b[n - 1] ^= 0xff;
        self.send(&b[..n]);
    }

    pub fn r2t(&mut self, cid: u16, ttag: u16, off: u32, len: u32) {
        let mut b = vec![0u8; tcp::r2t_len(self.dg)];
        let n = tcp::write_r2t(&mut b, cid, ttag, off, len, self.dg);
        self.send(&b[..n]);
    }

    pub fn term(&mut self, fes: u16) {
        let mut b = [0u8; tcp::TERM_REQ_MAX_PLEN];
        let n = tcp::write_term_req(&mut b, PduType::C2HTermReq, fes, 0, &[]);
        self.send(&b[..n]);
    }
}

/// Answers one I/O command; runs on the connection's thread.
pub type Script = dyn Fn(&mut FakeConn, SubmissionQueueEntry, Vec<u8>) + Send + Sync;

/// CDW10 of every Abort command the admin queues received, in order.
pub type Aborts = Arc<Mutex<Vec<u32>>>;

/// A running fake controller; `events` reports the termination requests hosts sent.
pub struct Fake {
    pub addr: SocketAddr,
    pub events: mpsc::Receiver<u16>,
}

impl Fake {
    pub fn uri(&self, query: &str) -> String {
        format!(
            "nvme-tcp://{}/nqn.2024-01.io.nvmirror:fake?{query}",
            self.addr
        )
    }
}

/// Starts a fake controller whose I/O queues run `script`.
pub fn start(cfg: FakeConfig, script: Arc<Script>) -> Fake {
    start_with_aborts(cfg, script, Aborts::default())
}

/// As [`start`]; Abort commands are recorded in `aborts` (and answered "aborted": the
/// script completes the command it names).
pub fn start_with_aborts(cfg: FakeConfig, script: Arc<Script>, aborts: Aborts) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { return };
            let script = Arc::clone(&script);
            let tx = tx.clone();
            let aborts = Arc::clone(&aborts);
            std::thread::spawn(move || serve(sock, cfg, &*script, &tx, &aborts));
        }
    });
    Fake { addr, events }
}

fn serve(
    sock: TcpStream,
    cfg: FakeConfig,
    script: &Script,
    events: &mpsc::Sender<u16>,
    aborts: &Aborts,
) {
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut c = FakeConn {
        sock,
        dg: Digests::default(),
        rx: Vec::new(),
    };
    let mut io_queue = false;
    loop {
        let (sqe, data) = match c.recv() {
            Got::Cmd(sqe, data) => (sqe, data),
            Got::Term(fes) => {
                let _ = events.send(fes);
                return;
            }
            Got::Eof => return,
            Got::H2C(..) => panic!("H2CData the script did not ask for"),
        };
        if sqe.opcode == FABRICS_OPCODE {
            let fctype = sqe.nsid as u8;
            let value: u64 = match fctype {
                0x01 => {
                    io_queue = ConnectCommand::from_sqe(&sqe).qid != 0;
                    1
                }
                0x04 => match sqe.cdw11 {
                    property::CAP => 127 | property::CAP_CSS_NVM | (2 << property::CAP_TO_SHIFT),
                    property::VS => u64::from(property::version(1, 4)),
                    property::CSTS => u64::from(property::CSTS_RDY),
                    _ => 0,
                },
                _ => 0,
            };
            c.resp64(sqe.cid, Status::SUCCESS, value);
        } else if io_queue {
            script(&mut c, sqe, data);
        } else if sqe.opcode == 0x08 {
            aborts.lock().unwrap().push(sqe.cdw10);
            c.resp(sqe.cid, Status::SUCCESS, 0);
        } else {
            admin(&mut c, &cfg, &sqe);
        }
    }
}

fn admin(c: &mut FakeConn, cfg: &FakeConfig, sqe: &SubmissionQueueEntry) {
    let mut page = vec![0u8; IDENTIFY_LEN];
    match (sqe.opcode, sqe.cdw10 as u8) {
        (0x06, 0x01) => {
            let mut id = IdentifyController::zeroed();
            id.cntlid = 1;
            id.mdts = 3;
            id.maxcmd = 128;
            id.ioccsz = cfg.ioccsz;
            id.iorcsz = 1;
            id.cntrltype = 1;
            id.write_to(&mut page);
        }
        (0x06, 0x00) => {
            let mut ns = IdentifyNamespace::zeroed();
            ns.nsze = BLOCKS;
            ns.lbaf[0] = lba_format(512) | u32::from(cfg.metadata);
            ns.write_to(&mut page);
        }
        (0x09, _) => return c.resp(sqe.cid, Status::SUCCESS, 3 | (3 << 16)),
        _ => return c.resp(sqe.cid, Status::SUCCESS, 0),
    }
    c.c2h(sqe.cid, 0, &page, flags::LAST_PDU);
    c.resp(sqe.cid, Status::SUCCESS, 0);
}
