//! The control path of one NVMe/TCP connection: a blocking socket that runs one command at a
//! time. Admin bring-up, keep-alive and every I/O queue's ICReq/Connect go through it; an
//! I/O queue's socket then moves to the non-blocking [`TcpQueuePair`](super::TcpQueuePair).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::spec::fabrics::{sgl_in_capsule, sgl_transport};
use crate::spec::tcp::{
    self, digest_bits, flags, parse_pdu, DataPdu, Digests, Fes, Pdu, PduLimits, PduType, Role,
    MIN_MAXH2CDATA,
};
use crate::spec::{CompletionQueueEntry, SubmissionQueueEntry};
use crate::{Error, Result};

/// How long opening the TCP connection may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one control command may wait for its response.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// In-capsule data every controller accepts for admin and fabrics commands (NVMe/TCP §3.3.2).
pub(super) const CONTROL_IN_CAPSULE: usize = 8192;
/// Largest C2HData payload a control command receives (Identify pages are 4 KiB).
const CONTROL_MAX_C2H: u32 = 64 * 1024;

/// Who a connection talks to, for error messages.
#[derive(Clone, Debug)]
pub(super) struct Peer {
    /// `HOST:PORT/SUBNQN`.
    pub label: String,
    pub addr: SocketAddr,
}

impl Peer {
    /// Resolves `host_port`; the first address that accepts a connection is kept by
    /// [`ControlConn::open`].
    pub fn resolve(host_port: &str, subnqn: &str) -> Result<Vec<Self>> {
        let label = format!("{host_port}/{subnqn}");
        let addrs: Vec<SocketAddr> = host_port
            .to_socket_addrs()
            .map_err(|e| Error::NvmeTcp {
                target: label.clone(),
                step: "resolve the address".into(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::NvmeTcp {
                target: label,
                step: "resolve the address".into(),
                reason: "no address found".into(),
            });
        }
        Ok(addrs
            .into_iter()
            .map(|addr| Self {
                label: label.clone(),
                addr,
            })
            .collect())
    }

    /// An error of `step`.
    pub fn err(&self, step: &str, reason: impl Into<String>) -> Error {
        Error::NvmeTcp {
            target: self.label.clone(),
            step: step.to_string(),
            reason: reason.into(),
        }
    }
}

/// A connection after ICReq/ICResp, driving commands one at a time.
#[derive(Debug)]
pub(super) struct ControlConn {
    pub peer: Peer,
    pub sock: TcpStream,
    pub dg: Digests,
    /// MAXH2CDATA from the ICResp.
    pub maxh2cdata: u32,
    lim: PduLimits,
    rx: Vec<u8>,
    next_cid: u16,
}

impl ControlConn {
    /// Opens a TCP connection to the first of `peers` that answers and exchanges
    /// ICReq/ICResp asking for the given digests. `what` names the queue in errors.
    pub fn open(peers: &[Peer], hdgst: bool, ddgst: bool, what: &str) -> Result<Self> {
        let mut last = None;
        let mut found = None;
        for p in peers {
            match TcpStream::connect_timeout(&p.addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    found = Some((p.clone(), s));
                    break;
                }
                Err(e) => last = Some((p, e)),
            }
        }
        let (peer, sock) = match (found, last) {
            (Some(f), _) => f,
            (None, Some((p, e))) => {
                return Err(p.err(&format!("{what} TCP connect to {}", p.addr), e.to_string()))
            }
            (None, None) => unreachable!("resolve returns at least one address"),
        };
        let setup = |r: std::io::Result<()>| {
            r.map_err(|e| peer.err(&format!("{what} socket setup"), e.to_string()))
        };
        setup(sock.set_nodelay(true))?;
        setup(sock.set_read_timeout(Some(COMMAND_TIMEOUT)))?;
        setup(sock.set_write_timeout(Some(COMMAND_TIMEOUT)))?;
        let mut conn = Self {
            peer,
            sock,
            dg: Digests::default(),
            maxh2cdata: MIN_MAXH2CDATA,
            lim: PduLimits {
                max_c2hdata: CONTROL_MAX_C2H,
                ..PduLimits::default()
            },
            rx: Vec::with_capacity(16 * 1024),
            next_cid: 0,
        };
        conn.initialize(hdgst, ddgst, what)?;
        Ok(conn)
    }

    /// ICReq/ICResp (NVMe/TCP §3.6.2.2–3): no host data alignment, one R2T at a time.
    fn initialize(&mut self, hdgst: bool, ddgst: bool, what: &str) -> Result<()> {
        let step = format!("{what} ICReq/ICResp");
        let want = if hdgst { digest_bits::HDGST_ENABLE } else { 0 }
            | if ddgst { digest_bits::DDGST_ENABLE } else { 0 };
        self.send_all(&tcp::icreq_bytes(0, want, 0), &step)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let resp = loop {
            match parse_pdu(&self.rx, Role::Host, &self.lim) {
                Ok(Some((Pdu::IcResp(r), n))) => {
                    self.rx.drain(..n);
                    break r;
                }
                Ok(Some((Pdu::TermReq { header, .. }, _))) => {
                    return Err(self
                        .peer
                        .err(&step, term_req_reason(header.fes, header.fei)))
                }
                Ok(Some((other, _))) => {
                    return Err(self
                        .peer
                        .err(&step, format!("expected ICResp, got {}", pdu_name(&other))))
                }
                Ok(None) => self.fill(&step, deadline)?,
                Err(e) => return Err(self.peer.err(&step, format!("malformed ICResp: {e}"))),
            }
        };
        if resp.digest != want {
            let name = |d: u8| match d {
                0 => "none",
                digest_bits::HDGST_ENABLE => "header",
                digest_bits::DDGST_ENABLE => "data",
                _ => "header and data",
            };
            return Err(self.peer.err(
                &step,
                format!(
                    "asked for {} digests, the target enabled {}",
                    name(want),
                    name(resp.digest)
                ),
            ));
        }
        self.dg = Digests { hdgst, ddgst };
        self.lim.hdgst = hdgst;
        self.lim.ddgst = ddgst;
        self.maxh2cdata = resp.maxh2cdata;
        Ok(())
    }

    fn send_all(&mut self, b: &[u8], step: &str) -> Result<()> {
        self.sock
            .write_all(b)
            .map_err(|e| self.peer.err(step, format!("send failed: {e}")))
    }

    /// Reads more bytes into the receive buffer, or fails at `deadline`.
    fn fill(&mut self, step: &str, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.peer.err(step, "no response in time"));
        }
        let _ = self.sock.set_read_timeout(Some(left));
        let mut buf = [0u8; 16 * 1024];
        match self.sock.read(&mut buf) {
            Ok(0) => Err(self.peer.err(step, "the target closed the connection")),
            Ok(n) => {
                self.rx.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.peer.err(step, "no response in time"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(self.peer.err(step, format!("recv failed: {e}"))),
        }
    }

    /// Runs one command: `data_out` goes in-capsule (it must fit [`CONTROL_IN_CAPSULE`]) or
    /// on R2T; up to `data_in` bytes of C2HData come back. Returns the completion (whatever
    /// its status) and the data; errors only for transport failures.
    pub fn command(
        &mut self,
        step: &str,
        mut sqe: SubmissionQueueEntry,
        data_out: &[u8],
        data_in: usize,
        timeout: Duration,
    ) -> Result<(CompletionQueueEntry, Vec<u8>)> {
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.cid = self.next_cid;
        let in_capsule = !data_out.is_empty() && data_out.len() <= CONTROL_IN_CAPSULE;
        if in_capsule {
            sgl_in_capsule(&mut sqe, data_out.len() as u32);
        } else {
            sgl_transport(&mut sqe, data_out.len().max(data_in) as u32);
        }
        let payload = if in_capsule { data_out } else { &[][..] };
        let mut pdu = vec![0u8; tcp::capsule_cmd_len(payload.len(), self.dg)];
        let n = tcp::write_capsule_cmd(&mut pdu, &sqe, payload, self.dg);
        self.send_all(&pdu[..n], step)?;
        let deadline = Instant::now() + timeout;
        let mut got = vec![0u8; data_in];
        let mut received = 0usize;
        loop {
            let lim = self.lim;
            let parsed = match parse_pdu(&self.rx, Role::Host, &lim) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    self.fill(step, deadline)?;
                    continue;
                }
                Err(e) => {
                    let mut term = [0u8; tcp::TERM_REQ_MAX_PLEN];
                    let echo = &self.rx[..e.echo_len.min(self.rx.len())];
                    let n = tcp::write_term_req(
                        &mut term,
                        PduType::H2CTermReq,
                        e.fes as u16,
                        e.fei,
                        echo,
                    );
                    let _ = self.sock.write_all(&term[..n]);
                    return Err(self
                        .peer
                        .err(step, format!("malformed PDU from the target: {e}")));
                }
            };
            let (pdu, len) = parsed;
            let mut answer = None;
            let mut done = None;
            match pdu {
                Pdu::CapsuleResp(r) if r.cqe.cid == sqe.cid => done = Some(r.cqe),
                Pdu::CapsuleResp(_) => {} // not ours (an earlier command that timed out)
                Pdu::C2HData {
                    header,
                    data,
                    ddgst_ok,
                } if header.cccid == sqe.cid => {
                    let off = header.datao as usize;
                    if off != received || off + data.len() > got.len() {
                        return Err(self.peer.err(step, "C2HData outside the requested range"));
                    }
                    if !ddgst_ok {
                        return Err(self.peer.err(step, "C2HData data digest mismatch"));
                    }
                    got[off..off + data.len()].copy_from_slice(data);
                    received += data.len();
                    if header.ch.flags & flags::SUCCESS != 0 {
                        done = Some(CompletionQueueEntry {
                            cid: sqe.cid,
                            ..Default::default()
                        });
                    }
                }
                Pdu::R2T(r) if r.cccid == sqe.cid && !in_capsule => {
                    let end = u64::from(r.r2to) + u64::from(r.r2tl);
                    if end > data_out.len() as u64 {
                        return Err(self.peer.err(step, "R2T beyond the command's data"));
                    }
                    answer = Some(r);
                }
                Pdu::TermReq { header, .. } => {
                    return Err(self.peer.err(step, term_req_reason(header.fes, header.fei)))
                }
                other => {
                    return Err(self.peer.err(
                        step,
                        format!("unexpected {} from the target", pdu_name(&other)),
                    ))
                }
            }
            self.rx.drain(..len);
            if let Some(r) = answer {
                self.answer_r2t(step, r.cccid, r.ttag, r.r2to, r.r2tl, data_out)?;
            }
            if let Some(cqe) = done {
                got.truncate(received);
                return Ok((cqe, got));
            }
        }
    }

    fn answer_r2t(
        &mut self,
        step: &str,
        cccid: u16,
        ttag: u16,
        r2to: u32,
        r2tl: u32,
        data: &[u8],
    ) -> Result<()> {
        let mut off = r2to as usize;
        let end = off + r2tl as usize;
        let chunk = self.maxh2cdata as usize;
        while off < end {
            let n = chunk.min(end - off);
            let d = DataPdu {
                ty: PduType::H2CData,
                flags: if off + n == end { flags::LAST_PDU } else { 0 },
                cccid,
                ttag,
                datao: off as u32,
                datal: n as u32,
            };
            let mut pdu = vec![0u8; tcp::data_pdu_len(n, self.dg)];
            let len = tcp::write_data_pdu(&mut pdu, &d, &data[off..off + n], self.dg);
            self.send_all(&pdu[..len], step)?;
            off += n;
        }
        Ok(())
    }

    /// The socket, digests and any bytes already received, for the I/O path.
    pub fn into_parts(self) -> (TcpStream, Digests, u32, Vec<u8>) {
        (self.sock, self.dg, self.maxh2cdata, self.rx)
    }
}

/// Names a PDU type for messages.
pub(super) fn pdu_name(p: &Pdu<'_>) -> &'static str {
    match p {
        Pdu::IcReq(_) => "ICReq",
        Pdu::IcResp(_) => "ICResp",
        Pdu::TermReq { .. } => "TermReq",
        Pdu::CapsuleCmd { .. } => "CapsuleCmd",
        Pdu::CapsuleResp(_) => "CapsuleResp",
        Pdu::H2CData { .. } => "H2CData",
        Pdu::C2HData { .. } => "C2HData",
        Pdu::R2T(_) => "R2T",
    }
}

/// Describes a controller's termination request.
pub(super) fn term_req_reason(fes: u16, fei: [u8; 4]) -> String {
    let fei = u32::from_le_bytes(fei);
    match Fes::from_u16(fes) {
        Some(f) => format!(
            "the target terminated the connection: {f:?} (FES {fes:#x}, field offset {fei})"
        ),
        None => format!("the target terminated the connection: FES {fes:#x}"),
    }
}
