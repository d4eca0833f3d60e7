//! Shared conformance checks every back end's tests run: one command at a time, and random
//! op sequences compared with a plain in-memory model.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::dma::IoBuf;
use crate::queue::read_all;
use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use crate::spec::Status;

/// Submits one command and spins until it completes (or `timeout` passes: `None`).
pub(crate) fn run(qp: &mut dyn QueuePair, cmd: IoCommand, timeout: Duration) -> Option<Status> {
    // SAFETY: every buffer in these tests outlives the call, which reaps the completion.
    unsafe { qp.submit(cmd) }.expect("queue has room");
    let deadline = Instant::now() + timeout;
    let mut cpl = [Completion::default(); 8];
    loop {
        let n = qp.poll(&mut cpl);
        if let Some(c) = cpl[..n].iter().find(|c| c.tag == cmd.tag) {
            return Some(c.status);
        }
        if Instant::now() > deadline {
            return None;
        }
    }
}

pub(crate) fn io(
    qp: &mut dyn QueuePair,
    op: IoOp,
    slba: u64,
    buf: &mut [u8],
    lba: usize,
) -> Status {
    let nlb = (buf.len() / lba) as u32;
    let cmd = IoCommand::with_buf(op, slba, nlb, IoBuf::from_slice(buf), 7);
    run(qp, cmd, Duration::from_secs(5)).expect("completes")
}

#[derive(Clone, Debug)]
pub(crate) enum ModelOp {
    Write { slba: u64, nlb: u32, seed: u8 },
    Read { slba: u64, nlb: u32 },
    Zero { slba: u64, nlb: u32 },
    Trim { slba: u64, nlb: u32 },
}

pub(crate) fn model_op(blocks: u64) -> impl Strategy<Value = ModelOp> {
    let range = (0..blocks + 4, 1u32..300);
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((slba, nlb), seed)| ModelOp::Write {
            slba,
            nlb,
            seed
        }),
        range
            .clone()
            .prop_map(|(slba, nlb)| ModelOp::Read { slba, nlb }),
        range
            .clone()
            .prop_map(|(slba, nlb)| ModelOp::Zero { slba, nlb }),
        range.prop_map(|(slba, nlb)| ModelOp::Trim { slba, nlb }),
    ]
}

/// Runs a random op sequence against a device and a plain Vec model; every status and every
/// read must agree.
pub(crate) fn check_against_model(dev: &dyn BlockDevice, ops: &[ModelOp]) {
    let geo = dev.geometry();
    let lba = geo.lba_size as usize;
    let mut model = vec![0u8; geo.bytes() as usize];
    let mut qp = dev.open_qpair(4).unwrap();
    for op in ops {
        let (slba, nlb) = match *op {
            ModelOp::Write { slba, nlb, .. }
            | ModelOp::Read { slba, nlb }
            | ModelOp::Zero { slba, nlb }
            | ModelOp::Trim { slba, nlb } => (slba, nlb),
        };
        let in_range = slba + u64::from(nlb) <= geo.num_blocks;
        let want = if in_range {
            Status::SUCCESS
        } else {
            Status::LBA_OUT_OF_RANGE
        };
        let span = (slba as usize * lba)..((slba as usize + nlb as usize) * lba);
        match *op {
            ModelOp::Write { seed, .. } => {
                let mut data: Vec<u8> = (0..nlb as usize * lba)
                    .map(|i| seed.wrapping_add(i as u8))
                    .collect();
                assert_eq!(
                    io(&mut *qp, IoOp::Write, slba, &mut data, lba),
                    want,
                    "{op:?}"
                );
                if in_range {
                    model[span].copy_from_slice(&data);
                }
            }
            ModelOp::Read { .. } => {
                let mut data = vec![0xeeu8; nlb as usize * lba];
                assert_eq!(
                    io(&mut *qp, IoOp::Read, slba, &mut data, lba),
                    want,
                    "{op:?}"
                );
                if in_range {
                    assert!(data == model[span], "{op:?} read back wrong data");
                }
            }
            ModelOp::Zero { .. } | ModelOp::Trim { .. } => {
                let kind = if matches!(op, ModelOp::Zero { .. }) {
                    IoOp::WriteZeroes
                } else {
                    IoOp::Deallocate
                };
                let got = run(
                    &mut *qp,
                    IoCommand::new(kind, slba, nlb, 1),
                    Duration::from_secs(1),
                );
                assert_eq!(got, Some(want), "{op:?}");
                if in_range {
                    model[span].fill(0);
                }
            }
        }
    }
    assert!(
        read_all(dev).unwrap() == model,
        "final image differs from the model"
    );
}
