//! The send and receive buffers of a non-blocking I/O queue socket: PDUs are encoded into
//! the send buffer and go out with one `send`; one `recv` fills the free tail of the receive
//! buffer, which always has room for the largest PDU the controller may send.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Bytes waiting to be sent: `buf[start..end]`.
#[derive(Debug)]
pub(super) struct TxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl TxBuf {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// `n` bytes of room at the end, compacting first if that makes room.
    #[inline]
    pub fn space(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.buf.len() - self.end < n && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            return None;
        }
        Some(&mut self.buf[self.end..])
    }

    /// Marks `n` bytes written into [`space`](Self::space) as queued.
    #[inline]
    pub fn commit(&mut self, n: usize) {
        self.end += n;
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// One `send` of everything queued; `Ok(false)` when the socket had no room.
    #[inline]
    pub fn send(&mut self, sock: &mut TcpStream) -> io::Result<bool> {
        if self.is_empty() {
            return Ok(false);
        }
        match sock.write(&self.buf[self.start..self.end]) {
            Ok(n) => {
                self.start += n;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                Ok(n > 0)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// Received bytes not yet parsed: `buf[start..end]`.
#[derive(Debug)]
pub(super) struct RxBuf {
    pub buf: Vec<u8>,
    pub start: usize,
    pub end: usize,
    /// Largest PDU the controller may send; the free tail is kept at least this large.
    max_pdu: usize,
}

impl RxBuf {
    /// A buffer for PDUs of up to `max_pdu` bytes, holding `leftover` already received.
    pub fn new(max_pdu: usize, slack: usize, leftover: &[u8]) -> Self {
        let mut buf = vec![0; (max_pdu + slack).max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(leftover);
        Self {
            buf,
            start: 0,
            end: leftover.len(),
            max_pdu,
        }
    }

    /// One `recv` into the free tail. `Ok(0)` when nothing was there; an error for a closed
    /// or failed connection.
    #[inline]
    pub fn recv(&mut self, sock: &mut TcpStream) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.max_pdu && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(0);
        }
        match sock.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the target closed the connection",
            )),
            Ok(n) => {
                self.end += n;
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}
