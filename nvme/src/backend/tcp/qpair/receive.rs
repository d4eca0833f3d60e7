//! The receive side of a [`TcpQueuePair`]: every PDU the controller sends is checked
//! against the command it names before anything is copied or completed; a violation is
//! answered with an H2CTermReq and kills the queue.

use super::TcpQueuePair;
use crate::backend::tcp::control::term_req_reason;
use crate::backend::tcp::slot::{Direction, SlotState};
use crate::spec::tcp::{
    self, flags, parse_pdu, CommonHeader, DataHeader, Fes, Pdu, PduType, R2tHeader, Role,
    TERM_REQ_MAX_PLEN,
};
use crate::spec::{CompletionQueueEntry, Status};

/// Byte offset of the command ID in a response capsule (its CQE starts at 8).
const RESP_OFF_CID: u32 = 8 + 12;

/// A protocol violation by the controller: answered with an H2CTermReq.
#[derive(Clone, Copy, Debug)]
struct Violation {
    fes: Fes,
    fei: u32,
    reason: &'static str,
}

fn violation(fes: Fes, fei: u32, reason: &'static str) -> Violation {
    Violation { fes, fei, reason }
}

impl TcpQueuePair {
    /// Answers a protocol violation with an H2CTermReq (echoing `offending`) and dies.
    fn terminate(&mut self, v: Violation, offending: &[u8]) {
        if let Some(out) = self.tx.space(TERM_REQ_MAX_PLEN) {
            let n = tcp::write_term_req(out, PduType::H2CTermReq, v.fes as u16, v.fei, offending);
            self.tx.commit(n);
            let _ = self.tx.send(&mut self.sock);
        }
        self.die(format!(
            "protocol violation by the target: {} ({:?}, field offset {})",
            v.reason, v.fes, v.fei
        ));
    }

    /// Parses and handles every complete PDU in the receive buffer.
    pub(super) fn process_rx(&mut self) {
        let buf = std::mem::take(&mut self.rx.buf);
        while self.dead.is_none() {
            let avail = &buf[self.rx.start..self.rx.end];
            match parse_pdu(avail, Role::Host, &self.lim) {
                Ok(None) => break,
                Ok(Some((pdu, len))) => {
                    if let Err(v) = self.on_pdu(pdu) {
                        let hlen = usize::from(avail[2]).min(len);
                        self.terminate(v, &avail[..hlen]);
                        break;
                    }
                    if self.dead.is_some() {
                        break;
                    }
                    self.rx.start += len;
                }
                Err(e) => {
                    let echo = &avail[..e.echo_len.min(avail.len())];
                    self.terminate(violation(e.fes, e.fei, e.reason), echo);
                    break;
                }
            }
        }
        self.rx.buf = buf;
    }

    #[inline]
    fn on_pdu(&mut self, pdu: Pdu<'_>) -> std::result::Result<(), Violation> {
        match pdu {
            Pdu::CapsuleResp(r) => self.on_response(&r.cqe),
            Pdu::C2HData {
                header,
                data,
                ddgst_ok,
            } => self.on_c2h_data(&header, data, ddgst_ok),
            Pdu::R2T(r) => self.on_r2t(&r),
            Pdu::TermReq { header, .. } => {
                self.die(term_req_reason(header.fes, header.fei));
                Ok(())
            }
            _ => Err(violation(
                Fes::PduSequenceError,
                CommonHeader::OFF_TYPE,
                "PDU type not expected on an I/O queue",
            )),
        }
    }

    #[inline]
    fn on_response(&mut self, cqe: &CompletionQueueEntry) -> std::result::Result<(), Violation> {
        let i = cqe.cid;
        let sent = self.tx.sent_total();
        let Some(slot) = self
            .table
            .get_mut(i)
            .filter(|s| matches!(s.state, SlotState::Sent | SlotState::H2C))
        else {
            return Err(violation(
                Fes::InvalidHeaderField,
                RESP_OFF_CID,
                "response for a command that is not outstanding",
            ));
        };
        if slot.tx_until > sent {
            // Its capsule is not all on the wire yet (its data may still be sent from the
            // caller's buffer): no controller can have seen it.
            return Err(violation(
                Fes::InvalidHeaderField,
                RESP_OFF_CID,
                "response for a command whose capsule was not sent yet",
            ));
        }
        let mut status = cqe.status();
        if status.is_success() {
            if !slot.status.is_success() {
                status = slot.status;
            } else if slot.dir == Direction::ControllerToHost && slot.c2h_received != slot.len {
                status = Status::DATA_TRANSFER_ERROR;
            }
        }
        self.piece_done(i, status);
        Ok(())
    }

    #[inline]
    fn on_c2h_data(
        &mut self,
        h: &DataHeader,
        data: &[u8],
        ddgst_ok: bool,
    ) -> std::result::Result<(), Violation> {
        let i = h.cccid;
        let Some(slot) = self
            .table
            .get_mut(i)
            .filter(|s| s.state == SlotState::Sent && s.dir == Direction::ControllerToHost)
        else {
            return Err(violation(
                Fes::InvalidHeaderField,
                DataHeader::OFF_CCCID,
                "C2HData for a command that is not an outstanding read",
            ));
        };
        let end = u64::from(h.datao) + data.len() as u64;
        if h.datao != slot.c2h_received || end > u64::from(slot.len) {
            return Err(violation(
                Fes::DataTransferOutOfRange,
                DataHeader::OFF_DATAO,
                "C2HData outside the command's transfer",
            ));
        }
        // SAFETY: the read is outstanding, so the submit contract gives us its buffer, which
        // holds at least `slot.len` bytes (checked at submit) and `datao + datal <= len`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                slot.buf.as_ptr().add(h.datao as usize),
                data.len(),
            );
        }
        slot.c2h_received = end as u32;
        if !ddgst_ok && slot.status.is_success() {
            slot.status = Status::DATA_TRANSFER_ERROR;
        }
        if h.ch.flags & flags::SUCCESS != 0 {
            if h.ch.flags & flags::LAST_PDU == 0 {
                return Err(violation(
                    Fes::InvalidHeaderField,
                    CommonHeader::OFF_FLAGS,
                    "C2HData SUCCESS flag without LAST_PDU",
                ));
            }
            let status = if slot.c2h_received != slot.len {
                Status::DATA_TRANSFER_ERROR
            } else {
                slot.status
            };
            self.piece_done(i, status);
        }
        Ok(())
    }

    #[inline]
    fn on_r2t(&mut self, r: &R2tHeader) -> std::result::Result<(), Violation> {
        let i = r.cccid;
        let Some(slot) = self.table.get_mut(i).filter(|s| {
            s.state == SlotState::Sent && s.dir == Direction::HostToController && !s.in_capsule
        }) else {
            return Err(violation(
                Fes::PduSequenceError,
                DataHeader::OFF_CCCID,
                "R2T for a command that has no data waiting",
            ));
        };
        let end = u64::from(r.r2to) + u64::from(r.r2tl);
        if r.r2to < slot.r2t_next || end > u64::from(slot.len) {
            return Err(violation(
                Fes::DataTransferOutOfRange,
                DataHeader::OFF_DATAO,
                "R2T outside the command's data",
            ));
        }
        slot.ttag = r.ttag;
        slot.h2c_off = r.r2to;
        slot.h2c_end = end as u32;
        slot.r2t_next = end as u32;
        slot.state = SlotState::H2C;
        let gen = slot.gen;
        self.h2c.push_back((i, gen));
        Ok(())
    }
}
