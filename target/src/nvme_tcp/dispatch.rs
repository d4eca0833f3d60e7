//! What a connection does with each PDU it receives: ICReq, command capsules (in-capsule
//! data or an R2T), H2CData, termination requests; and how a command whose data is all
//! here is dispatched to the fabrics, admin or I/O handlers.

use std::time::Instant;

use nvmirror_nvme::spec::admin::status::{SGL_OFFSET_INVALID, TRANSIENT_TRANSPORT_ERROR};
use nvmirror_nvme::spec::fabrics::FABRICS_OPCODE;
use nvmirror_nvme::spec::tcp::{
    self, digest_bits, flags, DataHeader, Digests, Fes, IcReq, Pdu, PduError,
};
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

use super::connection::{Connection, Phase};
use super::request::{data_location, DataLocation, RequestState};

impl Connection {
    pub(super) fn handle_pdu(&mut self, pdu: Pdu<'_>, now: Instant) -> Result<(), PduError> {
        match pdu {
            Pdu::IcReq(r) => self.on_icreq(&r),
            Pdu::TermReq { header, .. } => {
                tracing::warn!(peer = %self.peer, fes = header.fes, "host terminated the connection");
                self.close(now, "H2CTermReq");
                Ok(())
            }
            Pdu::CapsuleCmd {
                header,
                data,
                ddgst_ok,
                ..
            } => self.on_capsule(header.sqe, data, ddgst_ok, now),
            Pdu::H2CData {
                header,
                data,
                ddgst_ok,
            } => self.on_h2c_data(&header, data, ddgst_ok, now),
            _ => Err(PduError::new(
                Fes::InvalidHeaderField,
                0,
                "unexpected PDU type",
            )),
        }
    }

    fn on_icreq(&mut self, r: &IcReq) -> Result<(), PduError> {
        if self.phase != Phase::AwaitIcReq {
            return Err(PduError::new(Fes::PduSequenceError, 0, "second ICReq"));
        }
        if r.hpda != 0 {
            return Err(PduError::new(
                Fes::UnsupportedParameter,
                IcReq::OFF_HPDA,
                "host PDU data alignment other than 0",
            ));
        }
        let want_h = r.digest & digest_bits::HDGST_ENABLE != 0;
        let want_d = r.digest & digest_bits::DDGST_ENABLE != 0;
        let resp = tcp::icresp_bytes(0, r.digest, self.shared.cfg.maxh2cdata);
        let out = self
            .tx_space(resp.len())
            .ok_or_else(|| PduError::new(Fes::PduSequenceError, 0, "no room for ICResp"))?;
        out[..resp.len()].copy_from_slice(&resp);
        self.tx_end += resp.len();
        self.dg = Digests {
            hdgst: want_h,
            ddgst: want_d,
        };
        self.lim.hdgst = want_h;
        self.lim.ddgst = want_d;
        self.phase = Phase::AwaitConnect;
        Ok(())
    }

    fn on_capsule(
        &mut self,
        sqe: SubmissionQueueEntry,
        data: &[u8],
        ddgst_ok: bool,
        now: Instant,
    ) -> Result<(), PduError> {
        match self.phase {
            Phase::AwaitIcReq => {
                return Err(PduError::new(
                    Fes::PduSequenceError,
                    0,
                    "command before ICReq",
                ))
            }
            Phase::Closing { .. } => return Ok(()),
            _ => {}
        }
        self.queue.sq_head = (self.queue.sq_head + 1) % self.queue.size.max(1);
        let Some(i) = self.slots.alloc() else {
            return Err(PduError::new(
                Fes::PduSequenceError,
                0,
                "more commands outstanding than the queue holds",
            ));
        };
        let fctype = (sqe.opcode == FABRICS_OPCODE).then_some(sqe.nsid as u8);
        let is_connect = fctype == Some(0x01);
        let is_auth_send = fctype == Some(0x05);
        let slot = &mut self.slots.slots[usize::from(i)];
        slot.start(sqe);
        if !ddgst_ok {
            slot.fail(TRANSIENT_TRANSPORT_ERROR);
            self.complete(i);
            return Ok(());
        }
        if self.phase == Phase::AwaitConnect && !is_connect {
            slot.fail(Status::COMMAND_SEQUENCE_ERROR);
            self.complete(i);
            return Ok(());
        }
        let h2c = sqe.opcode & 3 == 1 || is_connect || is_auth_send;
        let loc = match data_location(&sqe) {
            Ok(l) => l,
            Err(st) => {
                slot.fail(st);
                self.complete(i);
                return Ok(());
            }
        };
        let cap = slot.buf.len();
        match loc {
            DataLocation::InCapsule { offset, len } => {
                let (off, len) = (offset as usize, len as usize);
                let st = if !h2c {
                    Some(Status::INVALID_FIELD)
                } else if off > data.len() {
                    Some(SGL_OFFSET_INVALID)
                } else if len > data.len() - off || len > cap {
                    Some(Status::DATA_SGL_LENGTH_INVALID)
                } else {
                    None
                };
                if let Some(st) = st {
                    slot.fail(st);
                    self.complete(i);
                    return Ok(());
                }
                slot.buf.as_mut_slice()[..len].copy_from_slice(&data[off..off + len]);
                slot.xfer_len = len as u32;
                slot.received = len as u32;
                self.execute(i, now);
            }
            DataLocation::Transport { len } if h2c => {
                slot.xfer_len = len;
                match self.expected_h2c(i) {
                    Err(st) => {
                        self.slots.slots[usize::from(i)].fail(st);
                        self.complete(i);
                    }
                    Ok(want) => {
                        let slot = &mut self.slots.slots[usize::from(i)];
                        slot.xfer_len = want;
                        slot.state = RequestState::AwaitingH2CData;
                        let n = tcp::r2t_len(self.dg);
                        let dg = self.dg;
                        let out = self.tx_space(n).expect("TX_RESERVE keeps room for an R2T");
                        tcp::write_r2t(out, sqe.cid, i, 0, want, dg);
                        self.tx_end += n;
                    }
                }
            }
            DataLocation::Transport { len } => {
                slot.xfer_len = len.min(cap as u32);
                self.execute(i, now);
            }
            DataLocation::None => self.execute(i, now),
        }
        Ok(())
    }

    /// The H2C length a transport-data command needs, validated before any R2T goes out.
    fn expected_h2c(&self, i: u16) -> Result<u32, Status> {
        let slot = &self.slots.slots[usize::from(i)];
        let want = match self.phase {
            Phase::Io if slot.sqe.opcode != FABRICS_OPCODE => super::io::expected_h2c(self, slot)?,
            _ if slot.sqe.opcode == FABRICS_OPCODE && (slot.sqe.nsid as u8) == 0x05 => {
                // Authentication Send: TL bytes, bounded before the R2T asks for them.
                let tl = slot.sqe.cdw11;
                if tl == 0 || tl > super::auth::MAX_SEND_LEN {
                    return Err(Status::INVALID_FIELD.with_dnr());
                }
                tl
            }
            _ if slot.sqe.opcode == FABRICS_OPCODE => 1024,
            _ => slot.xfer_len,
        };
        if want > slot.xfer_len {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        if want as usize > slot.buf.len() || want == 0 {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        Ok(want)
    }

    fn on_h2c_data(
        &mut self,
        h: &DataHeader,
        data: &[u8],
        ddgst_ok: bool,
        now: Instant,
    ) -> Result<(), PduError> {
        let Some(slot) = self.slots.get_mut(h.ttag) else {
            return Err(PduError::new(
                Fes::InvalidHeaderField,
                DataHeader::OFF_TTAG,
                "H2CData with an unknown transfer tag",
            ));
        };
        if slot.state != RequestState::AwaitingH2CData {
            return Err(PduError::new(
                Fes::PduSequenceError,
                0,
                "H2CData without an R2T",
            ));
        }
        if slot.sqe.cid != h.cccid {
            return Err(PduError::new(
                Fes::InvalidHeaderField,
                DataHeader::OFF_CCCID,
                "H2CData for another command",
            ));
        }
        let end = u64::from(h.datao) + u64::from(h.datal);
        if h.datao != slot.received || end > u64::from(slot.xfer_len) {
            return Err(PduError::new(
                Fes::DataTransferOutOfRange,
                DataHeader::OFF_DATAO,
                "H2CData outside the requested range",
            ));
        }
        let off = h.datao as usize;
        slot.buf.as_mut_slice()[off..off + data.len()].copy_from_slice(data);
        slot.received += h.datal;
        if !ddgst_ok {
            slot.fail(TRANSIENT_TRANSPORT_ERROR);
        }
        if slot.received == slot.xfer_len {
            slot.state = RequestState::Executing;
            if slot.status.is_success() {
                self.execute(h.ttag, now);
            } else {
                self.complete(h.ttag);
            }
        } else if h.ch.flags & flags::LAST_PDU != 0 {
            return Err(PduError::new(
                Fes::DataTransferOutOfRange,
                DataHeader::OFF_DATAL,
                "last H2CData PDU before the requested length",
            ));
        }
        Ok(())
    }

    /// Runs a command whose host data is all here.
    fn execute(&mut self, i: u16, now: Instant) {
        let sqe = self.slots.slots[usize::from(i)].sqe;
        if sqe.opcode == FABRICS_OPCODE {
            super::fabrics::execute(self, i, now);
            self.complete(i);
            self.swap_slot_table();
            return;
        }
        if !self.authenticated() {
            self.slots.slots[usize::from(i)]
                .fail(nvmirror_nvme::spec::fabrics::status::AUTHENTICATION_REQUIRED);
            self.complete(i);
            return;
        }
        match self.phase {
            Phase::Admin => {
                if super::admin::execute(self, i, now) {
                    self.complete(i);
                }
            }
            Phase::Io => super::io::start(self, i),
            _ => {
                self.slots.slots[usize::from(i)].fail(Status::COMMAND_SEQUENCE_ERROR);
                self.complete(i);
            }
        }
    }

    pub(super) fn swap_slot_table(&mut self) {
        if self.next_slots.is_some() && self.slots.in_use() == 0 {
            self.slots = self.next_slots.take().expect("checked");
        }
    }
}
