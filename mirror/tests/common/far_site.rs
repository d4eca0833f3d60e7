//! What a far site with a staging area would recover after a disaster: its image and its
//! staging area as they stand at one instant, with a committed cycle rolled forward.

use std::sync::Arc;
use std::time::Duration;

use nvmirror_mirror::recover_cycle;
use nvmirror_nvme::backend::{Fault, FaultyDevice, OpFilter};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, read_all, BlockDevice, Completion, IoCommand, IoOp};

const BS: usize = 4096;

/// A fresh mem device of 4 KiB blocks holding `bytes`.
pub fn mem_copy(bytes: &[u8]) -> Arc<dyn BlockDevice> {
    let dev = open_leg(&format!("mem://{}?lba=4096", bytes.len())).unwrap();
    let mut qp = dev.open_qpair(1).unwrap();
    let mut buf = DmaPool::new(1, 64 * BS).get().unwrap();
    let mut c = [Completion::default(); 1];
    for (i, chunk) in bytes.chunks(64 * BS).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        buf.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
        let nlb = (chunk.len() / BS) as u32;
        let cmd = IoCommand::with_buf(IoOp::Write, (i * 64) as u64, nlb, buf.io_buf(), 0);
        // SAFETY: `buf` outlives the command, whose completion is waited for here.
        unsafe { qp.submit(cmd) }.unwrap();
        while qp.poll(&mut c) == 0 {
            std::hint::spin_loop();
        }
        assert!(c[0].status.is_success(), "{}", c[0].status);
    }
    dev
}

/// Copies of `image` and `staging` taken once the writes of both are held (the two devices as
/// they stood when the second hold began: a write sent after its device's hold has not
/// happened, as in a crash at that instant), rolled forward as `nvmirror cycle-recover`
/// would; the image, and whether a cycle was rolled forward.
pub fn crash_image(image: &FaultyDevice, staging: &FaultyDevice) -> (Vec<u8>, bool) {
    let hs = staging.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let hi = image.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let stg = read_all(&**staging.inner()).unwrap();
    let img = read_all(&**image.inner()).unwrap();
    image.injector().clear(hi);
    staging.injector().clear(hs);
    let (img, stg) = (mem_copy(&img), mem_copy(&stg));
    let rolled = match recover_cycle(Arc::clone(&img), stg, Duration::from_secs(5)) {
        Ok(rec) => rec.rolled_forward,
        // Not one cycle committed yet.
        Err(e) if e.contains("blank") => false,
        Err(e) => panic!("far-site recovery failed: {e}"),
    };
    (read_all(&*img).unwrap(), rolled)
}
