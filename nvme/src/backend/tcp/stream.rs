//! The send and receive buffers of a non-blocking I/O queue socket: PDUs are encoded into
//! the send buffer and go out with one `send`; one `recv` fills the free tail of the receive
//! buffer, which always has room for the largest PDU the controller may send.
//!
//! A large payload (in-capsule write data) is not copied into the send buffer: the buffer
//! records where in the stream it goes, and `send` gathers it from the caller's memory
//! (`writev`). The caller keeps that memory valid until [`TxBuf::sent_total`] has passed it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

/// Payloads at least this long are sent from the caller's memory instead of copied.
pub(super) const GATHER_MIN: usize = 2048;
/// Pieces one `send` gathers at most.
const MAX_IOV: usize = 64;

/// A payload sent from the caller's memory: it goes right before `buf[at]`.
#[derive(Debug)]
struct External {
    at: usize,
    ptr: *const u8,
    len: usize,
}

/// Bytes waiting to be sent: `buf[start..end]`, with the external payloads spliced in.
#[derive(Debug)]
pub(super) struct TxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// In stream order; `at` is within `start..=end`.
    ext: VecDeque<External>,
    /// Bytes of `ext.front()` already sent.
    ext_sent: usize,
    /// Bytes handed to the socket since the queue was set up.
    sent_total: u64,
    /// Bytes queued since the queue was set up (sent or not).
    queued_total: u64,
}

// SAFETY: the external pointers refer to memory of commands the queue pair owns until they
// complete (the submit contract); a queue pair moves between threads with them.
unsafe impl Send for TxBuf {}

impl TxBuf {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: vec![0; cap],
            start: 0,
            end: 0,
            ext: VecDeque::with_capacity(MAX_IOV),
            ext_sent: 0,
            sent_total: 0,
            queued_total: 0,
        }
    }

    /// `n` bytes of room at the end, compacting first if that makes room.
    #[inline]
    pub fn space(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.buf.len() - self.end < n && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            for e in &mut self.ext {
                e.at -= self.start;
            }
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
        self.queued_total += n as u64;
    }

    /// Room for one more external payload.
    #[inline]
    pub fn can_gather(&self) -> bool {
        self.ext.len() < MAX_IOV / 2
    }

    /// Queues `len` bytes at `ptr` after everything committed so far, sent from there.
    ///
    /// # Safety
    /// `ptr` is valid for `len` bytes of reads, unmodified, until [`sent_total`](Self::sent_total)
    /// reaches the value [`queued_total`](Self::queued_total) has after this call, or until
    /// [`clear`](Self::clear).
    #[inline]
    pub unsafe fn gather(&mut self, ptr: *const u8, len: usize) {
        debug_assert!(self.can_gather());
        self.ext.push_back(External {
            at: self.end,
            ptr,
            len,
        });
        self.queued_total += len as u64;
    }

    /// Bytes handed to the socket so far, in stream order.
    #[inline]
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// Stream position after everything queued so far.
    #[inline]
    pub fn queued_total(&self) -> u64 {
        self.queued_total
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end && self.ext.is_empty()
    }

    /// One `send` of everything queued; `Ok(false)` when the socket had no room.
    #[inline]
    pub fn send(&mut self, sock: &mut TcpStream) -> io::Result<bool> {
        if self.is_empty() {
            return Ok(false);
        }
        let res = if self.ext.is_empty() {
            sock.write(&self.buf[self.start..self.end])
        } else {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = self.gather_iov(&mut iov);
            sock.write_vectored(&iov[..n])
        };
        match res {
            Ok(n) => {
                self.consume(n);
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

    /// The queued bytes as slices in stream order, at most `iov.len()`; how many.
    fn gather_iov<'a>(&'a self, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        let mut k = 0;
        let mut pos = self.start;
        for (j, e) in self.ext.iter().enumerate() {
            if k + 2 > MAX_IOV {
                return k;
            }
            if e.at > pos {
                iov[k] = IoSlice::new(&self.buf[pos..e.at]);
                k += 1;
            }
            let skip = if j == 0 { self.ext_sent } else { 0 };
            // SAFETY: `gather`'s contract keeps the payload valid until it is sent, and
            // `skip < len` (a payload is popped once all of it is sent).
            let data = unsafe { std::slice::from_raw_parts(e.ptr.add(skip), e.len - skip) };
            iov[k] = IoSlice::new(data);
            k += 1;
            pos = e.at;
        }
        if pos < self.end && k < MAX_IOV {
            iov[k] = IoSlice::new(&self.buf[pos..self.end]);
            k += 1;
        }
        k
    }

    /// Drops the first `n` bytes of the stream: they were sent.
    fn consume(&mut self, mut n: usize) {
        self.sent_total += n as u64;
        while n > 0 {
            let own = self.ext.front().map_or(self.end, |e| e.at) - self.start;
            let take = own.min(n);
            self.start += take;
            n -= take;
            if n == 0 {
                break;
            }
            let Some(e) = self.ext.front() else {
                break;
            };
            let take = (e.len - self.ext_sent).min(n);
            self.ext_sent += take;
            n -= take;
            if self.ext_sent == e.len {
                self.ext.pop_front();
                self.ext_sent = 0;
            }
        }
        if self.start == self.end && self.ext.is_empty() {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Forgets everything queued (the connection is gone): no external payload is read again.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.ext.clear();
        self.ext_sent = 0;
        self.sent_total = self.queued_total;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a partial `send` of `n` bytes would have put on the wire.
    fn take(tx: &TxBuf, n: usize) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let k = tx.gather_iov(&mut iov);
        iov[..k]
            .iter()
            .flat_map(|s| s.iter().copied())
            .take(n)
            .collect()
    }

    proptest! {
        /// Whatever mix of copied and gathered pieces is queued and however the socket cuts
        /// the sends, the bytes leave in queue order, each once, and `sent_total` counts them.
        #[test]
        fn gathered_and_copied_bytes_leave_in_order(
            steps in prop::collection::vec((0usize..3, 1usize..5000, 0usize..6000), 1..60),
        ) {
            let payloads: Vec<Vec<u8>> = (0..steps.len())
                .map(|i| (0..5000).map(|j| (i * 31 + j * 7) as u8).collect())
                .collect();
            let mut tx = TxBuf::new(16 * 1024);
            let (mut expect, mut wire) = (Vec::new(), Vec::new());
            for (i, &(kind, len, cut)) in steps.iter().enumerate() {
                let data = &payloads[i][..len];
                if kind == 0 && tx.can_gather() {
                    // SAFETY: `payloads` outlives `tx`'s use of it and is not modified.
                    unsafe { tx.gather(data.as_ptr(), len) };
                    expect.extend_from_slice(data);
                } else if let Some(out) = tx.space(len.min(4000)) {
                    let n = len.min(4000);
                    out[..n].copy_from_slice(&data[..n]);
                    tx.commit(n);
                    expect.extend_from_slice(&data[..n]);
                }
                let got = take(&tx, cut);
                tx.consume(got.len());
                wire.extend(got);
                prop_assert_eq!(tx.sent_total(), wire.len() as u64);
            }
            while !tx.is_empty() {
                let got = take(&tx, usize::MAX);
                prop_assert!(!got.is_empty());
                tx.consume(got.len());
                wire.extend(got);
            }
            prop_assert_eq!(tx.queued_total(), expect.len() as u64);
            prop_assert_eq!(tx.sent_total(), tx.queued_total());
            prop_assert_eq!(wire, expect);
        }
    }
}
