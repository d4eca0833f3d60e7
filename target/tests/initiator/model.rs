//! Random command sequences through the initiator compared with a plain in-memory model:
//! every status and every byte read must agree, and so must the final image.

use std::sync::Arc;

use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, IoCommand, IoOp, QueuePair, Status};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::harness::{run, start_with};

#[derive(Clone, Debug)]
enum ModelOp {
    Write { slba: u64, nlb: u32, seed: u8 },
    Read { slba: u64, nlb: u32 },
    Zero { slba: u64, nlb: u32 },
    Trim { slba: u64, nlb: u32 },
    Flush,
}

fn model_op(blocks: u64) -> impl Strategy<Value = ModelOp> {
    // Up to 40 KiB: both the in-capsule (≤ 8 KiB) and the R2T paths; a few past the end.
    let range = (0..blocks + 4, 1u32..80);
    prop_oneof![
        3 => (range.clone(), any::<u8>())
            .prop_map(|((slba, nlb), seed)| ModelOp::Write { slba, nlb, seed }),
        3 => range.clone().prop_map(|(slba, nlb)| ModelOp::Read { slba, nlb }),
        1 => range.clone().prop_map(|(slba, nlb)| ModelOp::Zero { slba, nlb }),
        1 => range.prop_map(|(slba, nlb)| ModelOp::Trim { slba, nlb }),
        1 => Just(ModelOp::Flush),
    ]
}

fn check(dev: &dyn BlockDevice, qp: &mut dyn QueuePair, ops: &[ModelOp]) {
    let geo = dev.geometry();
    let lba = geo.lba_size as usize;
    let mut model = read_all(dev).unwrap();
    for op in ops {
        let (slba, nlb) = match *op {
            ModelOp::Write { slba, nlb, .. }
            | ModelOp::Read { slba, nlb }
            | ModelOp::Zero { slba, nlb }
            | ModelOp::Trim { slba, nlb } => (slba, nlb),
            ModelOp::Flush => (0, 0),
        };
        let in_range = slba + u64::from(nlb) <= geo.num_blocks;
        let want = if in_range || matches!(op, ModelOp::Flush) {
            Status::SUCCESS
        } else {
            Status::LBA_OUT_OF_RANGE
        };
        let span = slba as usize * lba..(slba as usize + nlb as usize) * lba;
        let got = match *op {
            ModelOp::Write { seed, .. } => {
                let mut data: Vec<u8> = (0..nlb as usize * lba)
                    .map(|i| seed.wrapping_add((i / 7) as u8))
                    .collect();
                let buf = IoBuf::from_slice(&mut data);
                let st = run(qp, IoCommand::with_buf(IoOp::Write, slba, nlb, buf, 1));
                if in_range {
                    model[span].copy_from_slice(&data);
                }
                st
            }
            ModelOp::Read { .. } => {
                let mut data = vec![0xeeu8; nlb as usize * lba];
                let buf = IoBuf::from_slice(&mut data);
                let st = run(qp, IoCommand::with_buf(IoOp::Read, slba, nlb, buf, 2));
                if in_range {
                    assert!(data == model[span], "{op:?} read back wrong data");
                }
                st
            }
            ModelOp::Zero { .. } | ModelOp::Trim { .. } => {
                let kind = if matches!(op, ModelOp::Zero { .. }) {
                    IoOp::WriteZeroes
                } else {
                    IoOp::Deallocate
                };
                let st = run(qp, IoCommand::new(kind, slba, nlb, 3));
                if in_range {
                    model[span].fill(0);
                }
                st
            }
            ModelOp::Flush => run(qp, IoCommand::new(IoOp::Flush, 0, 0, 4)),
        };
        assert_eq!(got, want, "{op:?}");
    }
    assert!(
        read_all(dev).unwrap() == model,
        "final image read over NVMe/TCP differs from the model"
    );
}

#[test]
fn random_command_sequences_match_a_model() {
    let backing: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(256 * 1024, 512, LatencyModel::None).unwrap());
    let t = start_with(vec![Arc::clone(&backing)], |_| {});
    for query in ["", "hdgst=1&ddgst=1"] {
        let dev = t.connect(query).unwrap();
        let blocks = dev.geometry().num_blocks;
        let qp = std::cell::RefCell::new(dev.open_qpair(4).unwrap());
        let mut runner = TestRunner::new(Config {
            cases: 24,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&vec(model_op(blocks), 1..40), |ops| {
                check(&dev, &mut **qp.borrow_mut(), &ops);
                Ok(())
            })
            .unwrap();
        // The image seen over the network is the target's namespace itself.
        assert!(read_all(&dev).unwrap() == read_all(&*backing).unwrap());
    }
}
