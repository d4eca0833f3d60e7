//! Command slots: one per queue entry, each owning a data buffer for the queue's lifetime,
//! so no command allocates. A slot walks the states of [`RequestState`] (after SPDK's
//! `TCP_REQUEST_STATE_*`); its index is the R2T transfer tag and the back-end command tag.

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::spec::{Status, SubmissionQueueEntry};

/// Where a command is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestState {
    /// Unused.
    Free,
    /// An R2T was sent; H2CData PDUs fill the buffer up to `xfer_len`.
    AwaitingH2CData,
    /// Back-end commands are (or are about to be) submitted: `sub_next` of `sub_total`
    /// submitted, `sub_done` completed.
    Executing,
    /// Held by the controller until teardown (Asynchronous Event Request).
    Held,
    /// Complete; its response waits for room in the send buffer.
    ResponsePending,
    /// Answered, but a back end below still uses the buffer (a leg command abandoned at the
    /// I/O timeout, `QueuePair::buffer_lent`): not reused until it is given back.
    Lent,
}

/// One command's state and buffer.
#[derive(Debug)]
pub(crate) struct CommandSlot {
    pub state: RequestState,
    pub sqe: SubmissionQueueEntry,
    /// Bytes the host transfers to us (write data, DSM ranges, Connect data).
    pub xfer_len: u32,
    /// H2C bytes received so far.
    pub received: u32,
    /// Bytes to send back with C2HData on success.
    pub c2h_len: u32,
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    /// Back-end sub-commands: total, submitted, completed.
    pub sub_total: u32,
    pub sub_next: u32,
    pub sub_done: u32,
    /// Index of the namespace the command addresses (I/O queues).
    pub ns: usize,
    /// Back-end commands that still use `buf` although their completion was reaped.
    pub lent: u32,
    pub buf: DmaBuf,
}

impl CommandSlot {
    fn new(buf: DmaBuf) -> Self {
        Self {
            state: RequestState::Free,
            sqe: SubmissionQueueEntry::default(),
            xfer_len: 0,
            received: 0,
            c2h_len: 0,
            status: Status::SUCCESS,
            dw0: 0,
            dw1: 0,
            sub_total: 0,
            sub_next: 0,
            sub_done: 0,
            ns: 0,
            lent: 0,
            buf,
        }
    }

    /// Resets the per-command fields for a new command.
    pub fn start(&mut self, sqe: SubmissionQueueEntry) {
        self.state = RequestState::Executing;
        self.sqe = sqe;
        self.xfer_len = 0;
        self.received = 0;
        self.c2h_len = 0;
        self.status = Status::SUCCESS;
        self.dw0 = 0;
        self.dw1 = 0;
        self.sub_total = 0;
        self.sub_next = 0;
        self.sub_done = 0;
        self.ns = 0;
    }

    /// Records a failure; the first one wins.
    pub fn fail(&mut self, status: Status) {
        if self.status.is_success() {
            self.status = status;
        }
    }
}

/// The slots of one queue and their free list.
#[derive(Debug)]
pub(crate) struct SlotTable {
    pub slots: Vec<CommandSlot>,
    free: Vec<u16>,
    /// Sum of the slots' `lent`.
    lent: u32,
    /// Keeps the buffers' memory alive; buffers never go back.
    _pool: DmaPool,
}

impl SlotTable {
    /// `depth` slots with buffers of `buf_size` bytes each.
    pub fn new(depth: u16, buf_size: u32) -> Self {
        Self::try_new(depth, buf_size).expect("memory for a connection's command slots")
    }

    /// Like [`new`](Self::new), but `None` where the memory cannot be allocated: a
    /// Connect that asks for it is refused rather than the process aborted.
    pub fn try_new(depth: u16, buf_size: u32) -> Option<Self> {
        let depth = depth.max(1);
        let mut pool = DmaPool::try_new(u32::from(depth), buf_size as usize)?;
        let mut slots = Vec::new();
        slots.try_reserve_exact(usize::from(depth)).ok()?;
        for _ in 0..depth {
            slots.push(CommandSlot::new(pool.get()?));
        }
        Some(Self {
            slots,
            free: (0..depth).rev().collect(),
            lent: 0,
            _pool: pool,
        })
    }

    /// Takes a free slot.
    #[inline]
    pub fn alloc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns a slot to the free list, or parks it while its buffer is lent.
    #[inline]
    pub fn release(&mut self, i: u16) {
        let slot = &mut self.slots[usize::from(i)];
        if slot.lent > 0 {
            slot.state = RequestState::Lent;
            return;
        }
        slot.state = RequestState::Free;
        self.free.push(i);
    }

    /// A back end keeps slot `i`'s buffer after completing a command on it.
    #[cold]
    pub fn lend(&mut self, i: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(i)) {
            slot.lent += 1;
            self.lent += 1;
        }
    }

    /// A back end gave slot `i`'s buffer back; a slot already answered becomes free.
    #[cold]
    pub fn give_back(&mut self, i: u16) {
        let Some(slot) = self.slots.get_mut(usize::from(i)) else {
            return;
        };
        if slot.lent == 0 {
            return;
        }
        slot.lent -= 1;
        self.lent -= 1;
        if slot.lent == 0 && slot.state == RequestState::Lent {
            slot.state = RequestState::Free;
            self.free.push(i);
        }
    }

    /// No slot is free.
    #[inline]
    pub fn is_exhausted(&self) -> bool {
        self.free.is_empty()
    }

    /// Buffers lent to back ends now.
    #[inline]
    pub fn lent(&self) -> u32 {
        self.lent
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The slot with this transfer tag, if it exists.
    pub fn get_mut(&mut self, i: u16) -> Option<&mut CommandSlot> {
        self.slots.get_mut(usize::from(i))
    }
}

/// Where a command's data comes from or goes to, from its SGL descriptor (Base §4.1.2;
/// NVMe/TCP §3.3.1: in-capsule data block with offset, or transport SGL data block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataLocation {
    /// No data.
    None,
    /// In the capsule, at `offset` into the in-capsule data, `len` bytes.
    InCapsule { offset: u32, len: u32 },
    /// Moved by the transport: R2T/H2CData for writes, C2HData for reads.
    Transport { len: u32 },
}

use nvmirror_nvme::spec::fabrics::{PSDT_SHIFT, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK};

/// Decodes the data pointer of a fabrics SQE.
pub(crate) fn data_location(sqe: &SubmissionQueueEntry) -> Result<DataLocation, Status> {
    let psdt = sqe.flags >> PSDT_SHIFT;
    let len = sqe.dptr[1] as u32;
    let ty = (sqe.dptr[1] >> 56) as u8;
    if psdt == 0 || psdt == 3 {
        // PRPs are meaningless over a fabric; accept a null pointer only.
        if sqe.dptr == [0, 0] {
            return Ok(DataLocation::None);
        }
        return Err(Status::INVALID_FIELD);
    }
    match ty {
        SGL_DATA_BLOCK_OFFSET => {
            let offset = u32::try_from(sqe.dptr[0])
                .map_err(|_| nvmirror_nvme::spec::admin::status::SGL_OFFSET_INVALID)?;
            if len == 0 {
                Ok(DataLocation::None)
            } else {
                Ok(DataLocation::InCapsule { offset, len })
            }
        }
        SGL_TRANSPORT_DATA_BLOCK => {
            if len == 0 {
                Ok(DataLocation::None)
            } else {
                Ok(DataLocation::Transport { len })
            }
        }
        _ => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvme::spec::fabrics::{sgl_in_capsule, sgl_transport};

    #[test]
    fn sgl_descriptors_decode() {
        let mut sqe = SubmissionQueueEntry::default();
        assert_eq!(data_location(&sqe), Ok(DataLocation::None));
        sgl_in_capsule(&mut sqe, 4096);
        assert_eq!(
            data_location(&sqe),
            Ok(DataLocation::InCapsule {
                offset: 0,
                len: 4096
            })
        );
        sgl_transport(&mut sqe, 8192);
        assert_eq!(
            data_location(&sqe),
            Ok(DataLocation::Transport { len: 8192 })
        );
        sqe.dptr[1] = (sqe.dptr[1] & !(0xff << 56)) | (0x40 << 56); // keyed SGL (RDMA)
        assert_eq!(
            data_location(&sqe),
            Err(Status::SGL_DESCRIPTOR_TYPE_INVALID)
        );
    }

    #[test]
    fn slots_recycle() {
        let mut t = SlotTable::new(2, 4096);
        let a = t.alloc().unwrap();
        let b = t.alloc().unwrap();
        assert!(t.alloc().is_none());
        assert_ne!(a, b);
        t.release(a);
        assert_eq!(t.alloc(), Some(a));
        assert_eq!(t.in_use(), 2);
    }
}
