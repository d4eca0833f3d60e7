//! Teardown (review I6): a host queue pair closed with a write still in flight — the write
//! reached one leg, the other leg's copy was fenced — must not let a clean shutdown call the
//! legs identical. The write's regions stay marked, the clean shutdown reconciles them, and
//! the legs agree after a restart.

use std::sync::Arc;

use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp};

const LBA: usize = 512;

fn legs() -> (Vec<Arc<MemDevice>>, Vec<Arc<FaultyDevice>>) {
    let mems: Vec<Arc<MemDevice>> = (0..2)
        .map(|i| {
            Arc::new(
                MemDevice::new(8 << 20, LBA as u32, LatencyModel::None)
                    .unwrap()
                    .with_name(format!("mem://leg{i}")),
            )
        })
        .collect();
    let faults = mems
        .iter()
        .map(|m| Arc::new(FaultyDevice::wrap(Arc::clone(m) as Arc<dyn BlockDevice>)))
        .collect();
    (mems, faults)
}

fn devs(f: &[Arc<FaultyDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    f.iter()
        .map(|d| Arc::clone(d) as Arc<dyn BlockDevice>)
        .collect()
}

#[test]
fn a_write_cut_off_at_teardown_is_reconciled_before_the_clean_flag() {
    let (mems, faults) = legs();
    let vol = Volume::format("v", devs(&faults), VolumeConfig::default(), false).unwrap();
    let data_lba = vol.metadata_layout().unwrap().data_lba();
    {
        let mut qp = vol.open_qpair(4).unwrap();
        let mut c = [Completion::default(); 1];
        // A first write marks the region (its bitmap page is durable), so the next one needs
        // no metadata write.
        let mut first = vec![0x11u8; 64 * LBA];
        let cmd = IoCommand::with_buf(IoOp::Write, 100, 64, IoBuf::from_slice(&mut first), 0);
        // SAFETY: `first` outlives its command, which is waited for.
        unsafe { qp.submit(cmd) }.unwrap();
        while qp.poll(&mut c) == 0 {}
        assert!(c[0].status.is_success());
        // Leg 1 holds writes (and never applies them: its held commands are dropped with
        // its queue pair); leg 0 applies the write at once.
        faults[1].injector().arm(Fault::Hang {
            ops: OpFilter::Writes,
        });
        let mut data = vec![0xabu8; 64 * LBA];
        let cmd = IoCommand::with_buf(IoOp::Write, 100, 64, IoBuf::from_slice(&mut data), 1);
        // SAFETY: `data` outlives the queue pair, which fences the command when dropped.
        unsafe { qp.submit(cmd) }.unwrap();
        for _ in 0..1000 {
            assert_eq!(
                qp.poll(&mut c),
                0,
                "the write cannot complete on the hung leg"
            );
        }
        drop(qp);
        drop(data);
    }
    faults[1].injector().clear_all();
    vol.clear_idle_regions(std::time::Instant::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    vol.shutdown_clean().unwrap();

    let v = Volume::open_persistent("v", devs(&faults), VolumeConfig::default()).unwrap();
    drop(v);
    let (a, b) = (read_all(&*mems[0]).unwrap(), read_all(&*mems[1]).unwrap());
    let at =
        |d: &[u8]| d[(data_lba as usize + 100) * LBA..(data_lba as usize + 164) * LBA].to_vec();
    assert!(
        at(&a) == at(&b),
        "the legs differ where the cut-off write was"
    );
}
