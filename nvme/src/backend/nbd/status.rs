//! NBD error values in simple replies, as NVMe statuses (the table in `docs/backends.md`).

use crate::queue::IoOp;
use crate::spec::nbd::errno;
use crate::spec::Status;

/// The NVMe status for NBD error `error` (non-zero) on a command doing `op`.
pub(super) fn status_for(error: u32, op: IoOp) -> Status {
    match error {
        errno::EPERM => Status::NAMESPACE_WRITE_PROTECTED,
        errno::EIO if op == IoOp::Read => Status::UNRECOVERED_READ_ERROR,
        errno::EIO => Status::WRITE_FAULT,
        errno::ENOMEM => Status::INTERNAL_ERROR,
        errno::EINVAL | errno::EOVERFLOW => Status::INVALID_FIELD,
        errno::ENOSPC => Status::CAPACITY_EXCEEDED,
        errno::ENOTSUP => Status::INVALID_OPCODE,
        errno::ESHUTDOWN => Status::HOST_PATHING_ERROR,
        _ => Status::DATA_TRANSFER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_statuses() {
        assert_eq!(
            status_for(errno::EIO, IoOp::Read),
            Status::UNRECOVERED_READ_ERROR
        );
        assert_eq!(status_for(errno::EIO, IoOp::Write), Status::WRITE_FAULT);
        assert_eq!(status_for(errno::EIO, IoOp::Flush), Status::WRITE_FAULT);
        assert_eq!(
            status_for(errno::ENOSPC, IoOp::Write),
            Status::CAPACITY_EXCEEDED
        );
        assert_eq!(
            status_for(errno::EINVAL, IoOp::Deallocate),
            Status::INVALID_FIELD
        );
        assert_eq!(
            status_for(errno::EOVERFLOW, IoOp::Read),
            Status::INVALID_FIELD
        );
        assert_eq!(
            status_for(errno::EPERM, IoOp::Write),
            Status::NAMESPACE_WRITE_PROTECTED
        );
        assert_eq!(
            status_for(errno::ENOTSUP, IoOp::WriteZeroes),
            Status::INVALID_OPCODE
        );
        assert_eq!(
            status_for(errno::ESHUTDOWN, IoOp::Read),
            Status::HOST_PATHING_ERROR
        );
        assert_eq!(status_for(12345, IoOp::Read), Status::DATA_TRANSFER_ERROR);
        for e in [1, 5, 12, 22, 28, 75, 95, 108, 7] {
            assert!(!status_for(e, IoOp::Write).is_success(), "errno {e}");
        }
    }
}
