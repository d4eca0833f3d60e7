//! The receive side of an [`NbdQueuePair`]: simple replies parsed incrementally, a header or
//! a read's data split across any number of `recv`s and polls. Header bytes go through a
//! small staging buffer; a read's data goes straight from the socket into the caller's
//! buffer once the staging buffer is drained. Every reply is checked against the command its
//! handle names before anything is copied or completed; a violation kills the connection.

use std::io::{self, Read};

use super::qpair::{NbdQueuePair, Slot, SlotState};
use super::status::status_for;
use crate::queue::IoOp;
use crate::spec::nbd::{SimpleReply, REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::spec::Status;

/// Staging buffer for reply headers (and whatever data arrives with them).
const STAGING: usize = 64 << 10;
/// `recv` calls per poll at most.
const RECV_BUDGET: usize = 8;

/// Where the reply stream stands.
#[derive(Debug)]
pub(super) struct RxState {
    staging: Box<[u8]>,
    /// Unparsed bytes: `staging[start..end]`.
    start: usize,
    end: usize,
    /// The reply header being assembled.
    header: [u8; REPLY_LEN],
    header_got: usize,
    /// A read whose data is arriving: slot and bytes received so far.
    data: Option<(u32, u32)>,
}

impl RxState {
    pub fn new() -> Self {
        Self {
            staging: vec![0; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
            header: [0; REPLY_LEN],
            header_got: 0,
            data: None,
        }
    }

    /// A read's data is still arriving.
    pub fn mid_data(&self) -> bool {
        self.data.is_some()
    }

    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.header_got = 0;
        self.data = None;
    }
}

impl NbdQueuePair {
    /// Receives and handles replies while the socket has bytes; returns whether any arrived.
    #[inline]
    pub(super) fn receive(&mut self) -> bool {
        let mut received = false;
        for _ in 0..RECV_BUDGET {
            self.parse_staged();
            if self.dead.is_some() {
                break;
            }
            if self.awaiting == 0 && self.rx.data.is_none() {
                break;
            }
            let r = match self.rx.data {
                Some((i, got)) => {
                    let slot = &self.slots[i as usize];
                    // SAFETY: the read is outstanding (its slot is Active until this data is
                    // in), so the submit contract gives us its buffer, which holds at least
                    // `len` bytes (checked at submit), and `got < len`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            slot.buf.as_ptr().add(got as usize),
                            (slot.len - got) as usize,
                        )
                    };
                    self.sock
                        .read(dst)
                        .inspect(|&n| self.data_arrived(i, got, n))
                }
                None => {
                    self.rx.start = 0;
                    self.rx.end = 0;
                    self.sock
                        .read(&mut self.rx.staging)
                        .inspect(|&n| self.rx.end = n)
                }
            };
            match r {
                Ok(0) => {
                    self.server_closed = true;
                    self.die("the server closed the connection".into());
                    break;
                }
                Ok(_) => received = true,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    break
                }
                Err(e) => {
                    self.die(format!("recv failed: {e}"));
                    break;
                }
            }
        }
        // What the last `recv` of the budget brought completes in this poll, not the next.
        if self.dead.is_none() {
            self.parse_staged();
        }
        received
    }

    /// `n` more data bytes of the read in slot `i` are in its buffer (`got` were before).
    #[inline]
    fn data_arrived(&mut self, i: u32, got: u32, n: usize) {
        let got = got + n as u32;
        if got == self.slots[i as usize].len {
            self.rx.data = None;
            self.reply_done(i, Status::SUCCESS);
        } else {
            self.rx.data = Some((i, got));
        }
    }

    /// Parses everything in the staging buffer.
    #[inline]
    fn parse_staged(&mut self) {
        while self.rx.start < self.rx.end && self.dead.is_none() {
            let avail = self.rx.end - self.rx.start;
            if let Some((i, got)) = self.rx.data {
                let slot = &self.slots[i as usize];
                let n = avail.min((slot.len - got) as usize);
                // SAFETY: as in `receive`: the read is outstanding, its buffer holds `len`
                // bytes and `got + n <= len`; the staging buffer is ours and does not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.rx.staging.as_ptr().add(self.rx.start),
                        slot.buf.as_ptr().add(got as usize),
                        n,
                    );
                }
                self.rx.start += n;
                self.data_arrived(i, got, n);
            } else {
                let n = avail.min(REPLY_LEN - self.rx.header_got);
                let at = self.rx.header_got;
                self.rx.header[at..at + n]
                    .copy_from_slice(&self.rx.staging[self.rx.start..self.rx.start + n]);
                self.rx.start += n;
                self.rx.header_got += n;
                if self.rx.header_got == REPLY_LEN {
                    self.rx.header_got = 0;
                    self.on_reply(SimpleReply::parse(&self.rx.header));
                }
            }
        }
    }

    /// A whole reply header: checked against the command its handle names.
    #[inline]
    fn on_reply(&mut self, r: SimpleReply) {
        if r.magic != SIMPLE_REPLY_MAGIC {
            let why = if r.magic == STRUCTURED_REPLY_MAGIC {
                "a structured reply, which was not negotiated".to_string()
            } else {
                format!("a reply with bad magic {:#010x}", r.magic)
            };
            self.die(format!("protocol violation by the server: {why}"));
            return;
        }
        let i = r.handle as u32;
        let gen = (r.handle >> 32) as u32;
        let valid = self.slots.get(i as usize).is_some_and(|s| {
            s.state == SlotState::Active && !s.replied && Slot::handle(i, s.gen) == r.handle
        });
        if !valid {
            self.die(format!(
                "protocol violation by the server: reply for handle {:#x} (slot {i}, generation {gen}), which is not outstanding",
                r.handle
            ));
            return;
        }
        self.awaiting -= 1;
        let slot = &self.slots[i as usize];
        if r.error != 0 {
            // A simple reply with an error carries no data, even for a read.
            let status = status_for(r.error, slot.op);
            self.reply_done(i, status);
        } else if slot.op == IoOp::Read && slot.len > 0 {
            self.rx.data = Some((i, 0));
        } else {
            self.reply_done(i, Status::SUCCESS);
        }
    }
}
