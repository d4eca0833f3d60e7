//! The command slab of one I/O queue: a fixed table of slots whose index is the NVMe command
//! ID, so mapping a completion back to the caller's tag is an array lookup and no command
//! allocates. Each slot walks the states of [`SlotState`].

use crate::dma::IoBuf;
use crate::queue::IoOp;
use crate::spec::opcode::DSM_RANGE_LEN;
use crate::spec::{Status, SubmissionQueueEntry};

/// Where a command is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    /// Unused; on the free list.
    Free,
    /// Accepted, but its capsule is not in the send buffer yet (no room).
    Unsent,
    /// Capsule queued or sent; waiting for R2T, C2HData or the response.
    Sent,
    /// Answering an R2T: H2CData PDUs still to encode for `h2c_off..h2c_end`.
    H2C,
    /// Finished with `status`; waits in the done queue to be reaped.
    Complete,
}

/// Which way the command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    None,
    /// Host to controller: in-capsule or on R2T (writes, Dataset Management).
    HostToController,
    /// Controller to host in C2HData (reads).
    ControllerToHost,
}

/// One caller command. A read or write larger than the controller's MDTS travels as pieces
/// of at most MDTS, one after another under the same command ID; the fields from `sqe` on
/// describe the piece on the wire.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub state: SlotState,
    /// Bumped whenever the slot is freed or starts a new piece, so stale references (queued
    /// R2T work of a command the controller already completed) can be recognised.
    pub gen: u32,
    pub tag: u64,
    pub op: IoOp,
    /// The caller's range and buffer.
    pub slba: u64,
    pub nlb: u32,
    pub host_buf: IoBuf,
    /// Force Unit Access on every piece of a write or write-zeroes.
    pub fua: bool,
    /// Blocks of the caller's range already done by earlier pieces, and in this piece.
    pub done_blocks: u32,
    pub piece_blocks: u32,
    pub sqe: SubmissionQueueEntry,
    pub dir: Direction,
    /// The piece's part of the caller's buffer.
    pub buf: IoBuf,
    /// The slot's own data instead of `buf`: one Dataset Management range.
    pub dsm: Option<[u8; DSM_RANGE_LEN]>,
    /// Transfer length in bytes.
    pub len: u32,
    /// The write data travels in the command capsule.
    pub in_capsule: bool,
    /// Stream position (`TxBuf::queued_total`) after the piece's capsule and data: the
    /// controller cannot answer before it has them.
    pub tx_until: u64,
    /// C2HData bytes received so far (they must arrive in order).
    pub c2h_received: u32,
    /// Lowest offset the next R2T may ask for.
    pub r2t_next: u32,
    /// The R2T being answered: its transfer tag and the range still to send.
    pub ttag: u16,
    pub h2c_off: u32,
    pub h2c_end: u32,
    /// Failure noticed before the response (a data digest error), or the final status.
    pub status: Status,
    /// The caller cancelled the command: no further piece goes out, and it completes with
    /// Command Abort Requested once the piece on the wire is over.
    pub cancelled: bool,
}

impl Slot {
    const FREE: Self = Self {
        state: SlotState::Free,
        gen: 0,
        tag: 0,
        op: IoOp::Flush,
        slba: 0,
        nlb: 0,
        host_buf: IoBuf::EMPTY,
        fua: false,
        done_blocks: 0,
        piece_blocks: 0,
        sqe: SubmissionQueueEntry {
            opcode: 0,
            flags: 0,
            cid: 0,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: [0; 2],
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        },
        dir: Direction::None,
        buf: IoBuf::EMPTY,
        dsm: None,
        len: 0,
        in_capsule: false,
        tx_until: 0,
        c2h_received: 0,
        r2t_next: 0,
        ttag: 0,
        h2c_off: 0,
        h2c_end: 0,
        status: Status::SUCCESS,
        cancelled: false,
    };

    /// `len` bytes at `off` of the data the command sends.
    ///
    /// # Safety
    /// The command must be outstanding (not yet reaped), so its caller's buffer is still
    /// valid and unmodified (the [`QueuePair::submit`](crate::QueuePair::submit) contract),
    /// and `off + len` must not exceed `self.len`.
    #[inline]
    pub unsafe fn h2c_bytes(&self, off: u32, len: u32) -> &[u8] {
        let (off, len) = (off as usize, len as usize);
        if len == 0 {
            // A command without data (Flush) may carry a null buffer.
            return &[];
        }
        match &self.dsm {
            Some(range) => &range[off..off + len],
            // SAFETY: `len <= buf.len()` was checked at submit and `off + len <= self.len`
            // (caller); the submit contract keeps the memory valid and unmodified.
            None => unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(off), len) },
        }
    }
}

/// The slots of one queue and their free list; sized once.
#[derive(Debug)]
pub(super) struct SlotTable {
    pub slots: Box<[Slot]>,
    free: Vec<u16>,
}

impl SlotTable {
    /// `depth` slots, command IDs `0..depth`. `depth` is at most 65536.
    pub fn new(depth: u32) -> Self {
        debug_assert!((1..=65536).contains(&depth));
        Self {
            slots: vec![Slot::FREE; depth as usize].into_boxed_slice(),
            free: (0..depth).rev().map(|i| i as u16).collect(),
        }
    }

    /// Takes a free slot.
    #[inline]
    pub fn alloc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns slot `i` to the free list.
    #[inline]
    pub fn release(&mut self, i: u16) {
        let s = &mut self.slots[usize::from(i)];
        s.state = SlotState::Free;
        s.gen = s.gen.wrapping_add(1);
        s.buf = IoBuf::EMPTY;
        s.host_buf = IoBuf::EMPTY;
        self.free.push(i);
    }

    /// The slot a command ID names, if that ID is in the table.
    #[inline]
    pub fn get_mut(&mut self, cid: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(cid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_recycle_with_a_new_generation() {
        let mut t = SlotTable::new(2);
        let a = t.alloc().unwrap();
        let b = t.alloc().unwrap();
        assert_ne!(a, b);
        assert!(t.alloc().is_none());
        let gen = t.slots[usize::from(a)].gen;
        t.release(a);
        assert_eq!(t.alloc(), Some(a));
        assert_eq!(t.slots[usize::from(a)].gen, gen.wrapping_add(1));
        assert!(t.get_mut(2).is_none());
    }

    #[test]
    fn dsm_data_comes_from_the_slot() {
        let mut s = Slot::FREE;
        let mut range = [0u8; DSM_RANGE_LEN];
        range[4] = 9;
        s.dsm = Some(range);
        s.len = DSM_RANGE_LEN as u32;
        // SAFETY: the data is the slot's own and the range is within `len`.
        let b = unsafe { s.h2c_bytes(4, 4) };
        assert_eq!(b, &[9, 0, 0, 0]);
    }
}
