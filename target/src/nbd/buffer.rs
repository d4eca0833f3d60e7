//! A fixed byte queue for a connection's receive and send sides: data lives in
//! `buf[head..tail]`, new bytes go after `tail`, consumed bytes advance `head`. Allocated once
//! per connection.

#[derive(Debug)]
pub(crate) struct ByteQueue {
    buf: Box<[u8]>,
    head: usize,
    tail: usize,
}

impl ByteQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0u8; capacity].into_boxed_slice(),
            head: 0,
            tail: 0,
        }
    }

    /// The queued bytes.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }

    pub(crate) fn len(&self) -> usize {
        self.tail - self.head
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Drops the first `n` queued bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.head += n.min(self.len());
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Bytes that can still be added (after compaction).
    pub(crate) fn room(&self) -> usize {
        self.buf.len() - self.len()
    }

    /// Free space after the data, moving the data to the front first when less than half
    /// the buffer is free behind it. Fill it, then call [`commit`](Self::commit).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.head > 0 && self.buf.len() - self.tail < self.buf.len() / 2 {
            self.compact();
        }
        &mut self.buf[self.tail..]
    }

    /// Marks `n` bytes of [`spare`](Self::spare) as data.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.tail + n <= self.buf.len());
        self.tail = (self.tail + n).min(self.buf.len());
    }

    /// Appends `bytes`, which must fit in [`room`](Self::room).
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.room());
        if self.buf.len() - self.tail < bytes.len() {
            self.compact();
        }
        let n = bytes.len().min(self.buf.len() - self.tail);
        self.buf[self.tail..self.tail + n].copy_from_slice(&bytes[..n]);
        self.tail += n;
    }

    /// Appends `bytes`, growing the buffer if they do not fit (negotiation only: not for the
    /// I/O path).
    pub(crate) fn put_growing(&mut self, bytes: &[u8]) {
        if bytes.len() > self.room() {
            let mut bigger = vec![0u8; self.len() + bytes.len()].into_boxed_slice();
            bigger[..self.len()].copy_from_slice(self.data());
            self.tail = self.len();
            self.head = 0;
            self.buf = bigger;
        }
        self.put(bytes);
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.head..self.tail, 0);
        self.tail -= self.head;
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_with_compaction_and_growth() {
        let mut q = ByteQueue::new(8);
        q.put(b"abcdef");
        q.consume(4);
        assert_eq!(q.data(), b"ef");
        assert_eq!(q.room(), 6);
        q.put(b"ghijk");
        assert_eq!(q.data(), b"efghijk");
        let s = q.spare();
        assert_eq!(s.len(), 1);
        s[0] = b'l';
        q.commit(1);
        assert_eq!(q.data(), b"efghijkl");
        q.put_growing(b"mn");
        assert_eq!(q.data(), b"efghijklmn");
        q.consume(10);
        assert!(q.is_empty());
        assert_eq!(q.spare().len(), 10);
    }
}
