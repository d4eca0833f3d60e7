//! The passthrough command against the kernel's struct layout, open-time refusals, and, where
//! `NVMIRROR_NG_DEVICE` names a generic char device (`/dev/ng0n1` in the QEMU guest of
//! `scripts/interop/qemu-nvme.sh --test ng`), the conformance suite on the real namespace.
//! That device's data is overwritten.

use std::mem::offset_of;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::cmd::*;
use super::qpair::status_for_result;
use super::*;
use crate::backend::conformance::{check_against_model, io, model_op, run};
use crate::dma::DmaPool;
use crate::queue::{IoCommand, IoOp};
use crate::spec::admin::lba_format;
use crate::spec::{Status, SubmissionQueueEntry};

#[test]
fn uring_cmd_matches_the_kernel_layout() {
    // include/uapi/linux/nvme_ioctl.h, struct nvme_uring_cmd.
    assert_eq!(std::mem::size_of::<NvmeUringCmd>(), 72);
    for (off, want) in [
        (offset_of!(NvmeUringCmd, opcode), 0),
        (offset_of!(NvmeUringCmd, flags), 1),
        (offset_of!(NvmeUringCmd, rsvd1), 2),
        (offset_of!(NvmeUringCmd, nsid), 4),
        (offset_of!(NvmeUringCmd, cdw2), 8),
        (offset_of!(NvmeUringCmd, cdw3), 12),
        (offset_of!(NvmeUringCmd, metadata), 16),
        (offset_of!(NvmeUringCmd, addr), 24),
        (offset_of!(NvmeUringCmd, metadata_len), 32),
        (offset_of!(NvmeUringCmd, data_len), 36),
        (offset_of!(NvmeUringCmd, cdw10), 40),
        (offset_of!(NvmeUringCmd, cdw11), 44),
        (offset_of!(NvmeUringCmd, cdw12), 48),
        (offset_of!(NvmeUringCmd, cdw13), 52),
        (offset_of!(NvmeUringCmd, cdw14), 56),
        (offset_of!(NvmeUringCmd, cdw15), 60),
        (offset_of!(NvmeUringCmd, timeout_ms), 64),
        (offset_of!(NvmeUringCmd, rsvd2), 68),
    ] {
        assert_eq!(off, want);
    }
    assert_eq!(std::mem::size_of::<NvmePassthruCmd>(), 72);
    assert_eq!(offset_of!(NvmePassthruCmd, result), 68);
    // The ioctl numbers as the kernel headers expand them.
    assert_eq!(NVME_IOCTL_ID, 0x4e40);
    assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xc048_4e41);
    assert_eq!(NVME_URING_CMD_IO, 0xc048_4e80);
}

#[test]
fn sqe_command_area_is_the_struct_image() {
    let mut sqe = SubmissionQueueEntry {
        opcode: 0x01,
        nsid: 7,
        cid: 0xbeef,
        ..Default::default()
    };
    sqe.set_lba_range(0x1_2345_6789, 8);
    sqe.set_fua(true);
    let cmd = NvmeUringCmd::from_sqe(&sqe, 0x1000_2000_3000, 4096, 1500);
    let b = cmd.to_sqe_cmd();
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(b[0], 0x01, "opcode");
    assert_eq!(b[1], 0, "flags");
    assert_eq!(u32_at(4), 7, "nsid");
    assert_eq!(u64_at(24), 0x1000_2000_3000, "addr");
    assert_eq!(u32_at(36), 4096, "data_len");
    assert_eq!(u32_at(40), 0x2345_6789, "cdw10: SLBA low");
    assert_eq!(u32_at(44), 1, "cdw11: SLBA high");
    assert_eq!(u32_at(48), 7 | (1 << 30), "cdw12: NLB 0's based, FUA");
    assert_eq!(u32_at(64), 1500, "timeout_ms");
    assert!(b[68..].iter().all(|&x| x == 0), "rsvd2 and the SQE tail");
    // The CID is the kernel's: nothing of it travels.
    assert!(!b.windows(2).any(|w| w == [0xef, 0xbe]));
}

#[test]
fn cqe_results_become_statuses() {
    assert_eq!(status_for_result(IoOp::Read, 0), Status::SUCCESS);
    // A controller status passes through: LBA Out of Range with DNR set.
    let raw = Status::LBA_OUT_OF_RANGE.with_dnr().raw();
    assert_eq!(
        status_for_result(IoOp::Write, i32::from(raw)),
        Status::LBA_OUT_OF_RANGE.with_dnr()
    );
    assert_eq!(
        status_for_result(IoOp::Read, -libc::EINTR),
        Status::ABORTED_BY_HOST
    );
    assert_eq!(
        status_for_result(IoOp::Read, -libc::EIO),
        Status::UNRECOVERED_READ_ERROR
    );
    assert_eq!(
        status_for_result(IoOp::Write, -libc::ECANCELED),
        Status::ABORT_REQUESTED
    );
    assert_eq!(
        status_for_result(IoOp::Flush, -libc::ENOMEM),
        Status::INTERNAL_ERROR
    );
}

#[test]
fn namespace_geometry_takes_only_plain_formats() {
    let mut idn = IdentifyNamespace::zeroed();
    idn.nsze = 1000;
    idn.lbaf[0] = lba_format(512);
    idn.lbaf[1] = lba_format(4096);
    idn.lbaf[17] = lba_format(4096);
    assert_eq!(namespace_geometry(&idn).unwrap().lba_size, 512);
    idn.flbas = 1;
    let geo = namespace_geometry(&idn).unwrap();
    assert_eq!((geo.lba_size, geo.num_blocks), (4096, 1000));
    // Format 17: low bits 1, high bits (6:5) 01b.
    idn.flbas = 0x21;
    assert_eq!(namespace_geometry(&idn).unwrap().lba_size, 4096);
    idn.flbas = 2; // An empty format.
    assert!(namespace_geometry(&idn).is_err());
    idn.flbas = 0;
    idn.lbaf[0] = lba_format(512) | 8; // 8 bytes of metadata.
    assert!(namespace_geometry(&idn)
        .unwrap_err()
        .contains("without metadata"));
    idn.lbaf[0] = lba_format(512);
    idn.nsze = 0;
    assert!(namespace_geometry(&idn).unwrap_err().contains("not active"));
}

#[test]
fn open_refuses_what_is_not_a_generic_char_device() {
    let opts = NgOptions::default();
    let err = NgDevice::open(Path::new("/dev/ng-missing0n1"), &opts).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(
        err.to_string().contains("no such NVMe generic char device"),
        "{err}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    let err = NgDevice::open(file.path(), &opts).unwrap_err();
    assert!(err.to_string().contains("not a character device"), "{err}");

    // A char device, but not NVMe: the namespace ID ioctl says so.
    let err = NgDevice::open(Path::new("/dev/null"), &opts).unwrap_err();
    assert!(matches!(err, Error::NvmeNg { .. }), "{err}");
    assert!(err.to_string().contains("not an NVMe namespace"), "{err}");
}

#[test]
fn a_passthrough_ring_can_be_built_or_says_why_not() {
    match qpair::passthrough_ring(8, None) {
        Ok(_) => {}
        Err(e) => assert!(e.to_string().contains("Linux 5.19"), "{e}"),
    }
}

/// The generic char device to run the device tests on, or `None` (skipped, with a message).
fn ng_device() -> Option<NgDevice> {
    let Some(path) = std::env::var_os("NVMIRROR_NG_DEVICE") else {
        eprintln!(
            "NVMIRROR_NG_DEVICE is not set (a /dev/ngXnY whose data may be destroyed); skipped"
        );
        return None;
    };
    Some(NgDevice::open(Path::new(&path), &NgOptions::default()).expect("open NVMIRROR_NG_DEVICE"))
}

#[test]
fn device_round_trips_fua_and_split_transfers() {
    let Some(dev) = ng_device() else { return };
    let lba = dev.geometry().lba_size as usize;
    let mut qp = dev.open_qpair(8).unwrap();
    // Four times the transfer limit: sent as pieces.
    let len = dev.max_transfer() as usize * 4;
    let mut pool = DmaPool::new(2, len);
    let mut w = pool.get().unwrap();
    let r = pool.get().unwrap();
    for (i, b) in w.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let nlb = (len / lba) as u32;
    let t = Duration::from_secs(30);
    let cmd = IoCommand::with_buf(IoOp::Write, 8, nlb, w.io_buf(), 1).with_fua();
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::SUCCESS));
    let cmd = IoCommand::with_buf(IoOp::Read, 8, nlb, r.io_buf(), 2);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::SUCCESS));
    assert!(
        r.as_slice()[..len] == w.as_slice()[..len],
        "read back differs"
    );
    assert_eq!(
        run(&mut *qp, IoCommand::new(IoOp::Flush, 0, 0, 3), t),
        Some(Status::SUCCESS)
    );
    // Write Zeroes over more than one command's 65536 blocks, then read a block from each end.
    let blocks = dev.geometry().num_blocks.min(70_000) as u32;
    let z = IoCommand::new(IoOp::WriteZeroes, 0, blocks, 4);
    assert_eq!(run(&mut *qp, z, t), Some(Status::SUCCESS));
    let mut one = vec![0xffu8; lba];
    assert!(io(&mut *qp, IoOp::Read, 9, &mut one, lba).is_success());
    assert!(one.iter().all(|&b| b == 0));
    // Out of range: refused before the kernel.
    let end = dev.geometry().num_blocks;
    let cmd = IoCommand::with_buf(IoOp::Read, end, 1, r.io_buf(), 5);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::LBA_OUT_OF_RANGE));
    // A second open is refused while the first holds the claim.
    let again = NgDevice::open(dev.path(), &NgOptions::default()).unwrap_err();
    assert!(matches!(again, Error::Busy { .. }), "{again}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn device_matches_a_model(ops in proptest::collection::vec(model_op(2048), 1..30)) {
        let Some(dev) = ng_device() else { return Ok(()) };
        // The model covers the whole namespace: keep it to a small one (QEMU's test disk).
        prop_assume!(dev.geometry().bytes() <= 256 << 20);
        // The model starts out zero: so must the namespace.
        let mut qp = dev.open_qpair(1).unwrap();
        let all = dev.geometry().num_blocks as u32;
        let zero = IoCommand::new(IoOp::WriteZeroes, 0, all, 1);
        prop_assert_eq!(run(&mut *qp, zero, Duration::from_secs(60)), Some(Status::SUCCESS));
        drop(qp);
        check_against_model(&dev, &ops);
    }
}
