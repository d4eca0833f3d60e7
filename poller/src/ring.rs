//! A bounded lock-free multi-producer, single-consumer ring for cross-core messages.
//!
//! Algorithm: Dmitry Vyukov's bounded MPMC queue (per-slot sequence numbers), used with one
//! consumer, so the consumer side needs no CAS. Producers claim a position with a CAS on
//! `tail`; the slot's sequence says whether it is free (`seq == pos`), full (`seq == pos + 1`)
//! or still being consumed from the previous lap. Producer and consumer indices live on
//! separate cache lines.

use std::mem::MaybeUninit;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Ordering, UnsafeCell};

struct Slot<T> {
    /// `pos` when free for the producer of position `pos`; `pos + 1` once that producer has
    /// written the value; `pos + capacity` once the consumer has taken it.
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// The ring. Any thread may [`push`](Self::push); only the owner may [`pop`](Self::pop).
pub struct Ring<T> {
    slots: Box<[Slot<T>]>,
    mask: usize,
    /// Next position to consume (single consumer).
    head: CachePadded<AtomicUsize>,
    /// Next position to produce (many producers).
    tail: CachePadded<AtomicUsize>,
}

// SAFETY: values move from producer threads to the consumer thread through slots whose
// ownership is handed over by the sequence protocol (Release store / Acquire load), so `T: Send`
// suffices for sharing the ring.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above; the ring owns its values.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.slots.len())
            .finish()
    }
}

impl<T> Ring<T> {
    /// A ring with room for `capacity` values (rounded up to a power of two, at least 2).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(2).next_power_of_two();
        let slots = (0..cap)
            .map(|i| Slot {
                seq: AtomicUsize::new(i),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Self {
            slots,
            mask: cap - 1,
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Appends a value; gives it back if the ring is full.
    pub fn push(&self, value: T) -> Result<(), T> {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[pos & self.mask];
            let seq = slot.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `pos` while `seq == pos` makes this thread
                        // the only one allowed to write the slot until it publishes `pos + 1`.
                        slot.value.with_mut(|p| unsafe { (*p).write(value) });
                        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(current) => pos = current,
                }
            } else if diff < 0 {
                return Err(value);
            } else {
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes the oldest value.
    ///
    /// # Safety
    /// Only one thread may pop from a ring (the single consumer): two concurrent `pop`s would
    /// both read the same slot and take its value twice.
    pub unsafe fn pop(&self) -> Option<T> {
        let pos = self.head.load(Ordering::Relaxed);
        let slot = &self.slots[pos & self.mask];
        let seq = slot.seq.load(Ordering::Acquire);
        if seq != pos.wrapping_add(1) {
            return None;
        }
        // SAFETY: `seq == pos + 1` (Acquire) means the producer finished writing and published
        // the value; only the single consumer reads position `pos`.
        let value = slot.value.with_mut(|p| unsafe { (*p).assume_init_read() });
        slot.seq
            .store(pos.wrapping_add(self.slots.len()), Ordering::Release);
        self.head.store(pos.wrapping_add(1), Ordering::Relaxed);
        Some(value)
    }

    /// Whether the ring looks empty (a racing push may land right after).
    pub fn is_empty(&self) -> bool {
        let pos = self.head.load(Ordering::Relaxed);
        self.slots[pos & self.mask].seq.load(Ordering::Acquire) != pos.wrapping_add(1)
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no other thread can pop.
        while unsafe { self.pop() }.is_some() {}
    }
}

#[cfg(all(test, not(loom)))]
// Every `pop` in these tests runs on one thread per ring (the single consumer).
#[allow(clippy::undocumented_unsafe_blocks)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_and_full() {
        let r = Ring::new(4);
        for i in 0..4 {
            r.push(i).unwrap();
        }
        assert_eq!(r.push(9), Err(9));
        assert_eq!(unsafe { r.pop() }, Some(0));
        r.push(4).unwrap();
        assert_eq!(
            (1..=4)
                .map(|_| unsafe { r.pop() }.unwrap())
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(unsafe { r.pop() }, None);
        assert!(r.is_empty());
    }

    #[test]
    fn drops_unconsumed_values() {
        let v = Arc::new(());
        let r = Ring::new(8);
        r.push(Arc::clone(&v)).unwrap();
        r.push(Arc::clone(&v)).unwrap();
        drop(r);
        assert_eq!(Arc::strong_count(&v), 1);
    }

    #[test]
    fn many_producers_deliver_everything_once_in_per_producer_order() {
        let r = Arc::new(Ring::new(64));
        let producers: Vec<_> = (0..3u64)
            .map(|p| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let mut v = (p << 32) | i;
                        while let Err(back) = r.push(v) {
                            v = back;
                            std::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u64; 3];
        let mut got = 0;
        while got < 60_000 {
            if let Some(v) = unsafe { r.pop() } {
                let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                assert_eq!(i, next[p], "producer {p} out of order");
                next[p] += 1;
                got += 1;
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(unsafe { r.pop() }, None);
    }
}
