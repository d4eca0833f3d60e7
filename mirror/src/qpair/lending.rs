//! Buffer lending: a host command completed while a leg may still use its buffer.
//!
//! A leg command abandoned at the I/O timeout is cancelled where its back end can, but a cancel
//! may miss: until it is reaped (a late or aborted completion) or fenced (its leg queue pair's
//! close fence done), the back end may still fill a read's buffer or read a write's. The host
//! command it belonged to is completed with an error, but its buffer stays *lent*:
//! [`QueuePair::buffer_lent`] says so for that tag and the front end keeps the buffer out of
//! reuse until [`QueuePair::poll_released`] hands the tag back. A read that timed out is therefore not retried on another leg into the same
//! buffer: it fails with a retryable status and the host retries it, on a leg that is in sync.
//!
//! Both lists are sized to the queue depth when the queue pair opens (a join slot lends at
//! most one buffer), so lending allocates nothing.
//!
//! [`QueuePair::buffer_lent`]: nvmirror_nvme::QueuePair::buffer_lent
//! [`QueuePair::poll_released`]: nvmirror_nvme::QueuePair::poll_released

use super::VolumeQueuePair;

/// One lent buffer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lent {
    /// The host command's tag.
    pub(super) tag: u64,
    /// The join slot and generation its leg commands carry.
    pub(super) slot: u32,
    pub(super) generation: u32,
    /// Legs whose abandoned command may still touch the buffer.
    pub(super) legs: u8,
}

impl VolumeQueuePair {
    /// The host command of `slot` completes now while `legs` may still use its buffer.
    #[cold]
    pub(super) fn lend(&mut self, slot: u32, legs: u8) {
        let meta = self.table.meta(slot);
        tracing::debug!(
            volume = %self.vol.name, tag = meta.cmd.tag, legs = format_args!("{legs:#06b}"),
            "buffer lent to an abandoned leg command"
        );
        self.lent.push(Lent {
            tag: meta.cmd.tag,
            slot,
            generation: meta.generation,
            legs,
        });
    }

    /// A late completion of `leg` for `slot`'s `generation`: the buffer it lent may be free.
    #[cold]
    pub(super) fn unlend(&mut self, slot: u32, generation: u32, leg: usize) {
        let done = reaped_leg(
            &mut self.lent,
            |l| l.slot == slot && l.generation == generation,
            |l| &mut l.legs,
            leg,
        );
        if let Some(l) = done {
            self.released.push_back(l.tag);
        }
    }

    pub(super) fn is_lent(&self, tag: u64) -> bool {
        !self.lent.is_empty() && self.lent.iter().any(|l| l.tag == tag)
    }

    pub(super) fn take_released(&mut self, out: &mut [u64]) -> usize {
        let n = out.len().min(self.released.len());
        for (o, t) in out.iter_mut().zip(self.released.drain(..n)) {
            *o = t;
        }
        n
    }
}

/// One entry of `list` waits for the abandoned commands of the legs in its mask: `leg`'s is
/// reaped. Returns the entry, taken out, once no leg is left.
pub(super) fn reaped_leg<T>(
    list: &mut Vec<T>,
    is: impl Fn(&T) -> bool,
    legs: impl Fn(&mut T) -> &mut u8,
    leg: usize,
) -> Option<T> {
    let i = list.iter().position(is)?;
    let mask = legs(&mut list[i]);
    *mask &= !(1 << leg);
    (*mask == 0).then(|| list.swap_remove(i))
}
