//! The entry point of the `superblock_decode` fuzz target (see `docs/fuzzing.md`): arbitrary
//! bytes as a leg's superblock and bitmap area, decoded and then opened as a persistent
//! volume. Must never panic. Not part of the API.

use std::sync::Arc;

use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp};

use crate::superblock::{Superblock, HEADER_LEN};
use crate::{Volume, VolumeConfig};

/// Bytes of each leg the image is opened from.
const LEG_BYTES: u64 = 4 << 20;

/// Writes `data` (a whole number of blocks) at the start of `dev`.
fn write_head(dev: &dyn BlockDevice, data: &mut [u8]) {
    let shift = dev.geometry().lba_shift();
    let mut qp = dev.open_qpair(1).expect("a RAM queue pair");
    let nlb = (data.len() >> shift) as u32;
    let buf = IoBuf::from_slice(data);
    // SAFETY: `data` outlives the command, which is reaped below before returning.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 0, nlb, buf, 0)) }
        .expect("an idle queue pair takes a command");
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {}
    assert!(c[0].status.is_success(), "RAM write: {:?}", c[0].status);
}

/// Decodes `data[1..]` as a superblock and opens a persistent volume whose leg holds it
/// (bitmap area included). Bit 0 of `data[0]` rewrites the header checksum first, so the
/// fields behind it are reached.
pub fn superblock_and_bitmap(data: &[u8]) {
    let Some((&sel, image)) = data.split_first() else {
        return;
    };
    let mut image = image[..image.len().min(LEG_BYTES as usize)].to_vec();
    if sel & 1 != 0 && image.len() >= HEADER_LEN {
        let crc = crc32c::crc32c(&image[..HEADER_LEN - 4]);
        image[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    let decoded = Superblock::decode(&image);
    if let Ok(sb) = &decoded {
        assert_eq!(
            Superblock::decode(&sb.encode()).as_ref(),
            Ok(sb),
            "round trip"
        );
    }
    let (legs, lba_size, index, name) = match &decoded {
        Ok(sb) => (
            usize::from(sb.leg_count),
            sb.lba_size,
            usize::from(sb.leg_index),
            sb.volume_name.clone(),
        ),
        Err(_) => (1, 512, 0, "fuzz".to_string()),
    };
    let devs: Vec<Arc<dyn BlockDevice>> = (0..legs)
        .map(|_| {
            Arc::new(MemDevice::new(LEG_BYTES, lba_size, LatencyModel::None).expect("RAM leg"))
                as Arc<dyn BlockDevice>
        })
        .collect();
    image.resize(image.len().next_multiple_of(lba_size as usize), 0);
    if !image.is_empty() {
        write_head(&*devs[index], &mut image);
    }
    if let Ok(vol) = Volume::open_persistent(&name, devs, VolumeConfig::default()) {
        let layout = vol
            .metadata_layout()
            .expect("a persistent volume has a layout");
        let marked = vol
            .marked_regions()
            .expect("a persistent volume has a bitmap");
        assert!(
            marked.iter().all(|&r| r < layout.regions),
            "marked past the end"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_point_runs() {
        superblock_and_bitmap(&[]);
        superblock_and_bitmap(&[1; 300]);
        superblock_and_bitmap(b"\x00NVMIRROR");
    }

    /// A superblock whose data area ends past 2^64 bytes: the leg-size check overflowed
    /// (a panic with overflow checks; without them the sum wrapped, the check passed and the
    /// start-up tried to allocate the 32 GiB bitmap the header claims).
    #[test]
    fn fuzz_regression_data_area_past_u64_max() {
        use crate::superblock::{MemberState, Role, Uuid};
        let leg = Uuid::new_random();
        let mut leg_uuids = [Uuid::default(); crate::MAX_LEGS];
        leg_uuids[0] = leg;
        let mut member_states = [MemberState::Unused; crate::MAX_LEGS];
        member_states[0] = MemberState::InSync;
        let sb = Superblock {
            volume_uuid: Uuid::new_random(),
            leg_uuid: leg,
            role: Role::Primary,
            leg_index: 0,
            leg_count: 1,
            clean: true,
            lba_size: 512,
            event_counter: 1,
            region_size: 64 << 20,
            bitmap_offset: 4096,
            bitmap_len: 1 << 35,
            data_offset: 1 << 36,
            data_blocks: u64::MAX / 512,
            leg_uuids,
            volume_name: "vol0".into(),
            member_states,
            epoch: 0,
        };
        let mut input = vec![0];
        input.extend_from_slice(&sb.encode());
        superblock_and_bitmap(&input);
        assert!(Superblock::decode(&input[1..]).is_err());
    }
}
