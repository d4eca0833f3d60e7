//! The Reservation Notification log of one controller (log page 0x80): notices queued for
//! the host, read one per Get Log Page, oldest first, and the per-namespace masks set with
//! Set Features Reservation Notification Mask (0x82).

use std::collections::{HashMap, VecDeque};

use nvmirror_nvme::spec::reservation::{NotificationType, ReservationNotificationLog};

/// Notices a controller keeps before it drops new ones (Number of Available Log Pages is a
/// byte). A dropped notice still advances the count, so the host sees the gap.
const CAPACITY: usize = 255;

/// NSID meaning every namespace.
const NSID_ALL: u32 = 0xffff_ffff;

/// One controller's notices and masks.
#[derive(Debug, Default)]
pub(crate) struct NotificationLog {
    /// Log Page Count of the last notice queued (0: none yet; skips 0 when it wraps).
    count: u64,
    pending: VecDeque<(u64, u32, NotificationType)>,
    /// Mask set for every namespace (NSID 0xFFFFFFFF), and per-namespace ones over it.
    mask_all: u32,
    masks: HashMap<u32, u32>,
}

impl NotificationLog {
    /// The mask in force for `nsid`.
    pub fn mask(&self, nsid: u32) -> u32 {
        if nsid == NSID_ALL {
            return self.mask_all;
        }
        self.masks.get(&nsid).copied().unwrap_or(self.mask_all)
    }

    /// Sets the mask of `nsid`, or of every namespace for 0xFFFFFFFF.
    pub fn set_mask(&mut self, nsid: u32, mask: u32) {
        if nsid == NSID_ALL {
            self.mask_all = mask;
            self.masks.clear();
        } else {
            self.masks.insert(nsid, mask);
        }
    }

    /// Queues a notice unless its type is masked for `nsid`; true when queued.
    pub fn push(&mut self, nsid: u32, kind: NotificationType) -> bool {
        if self.mask(nsid) & kind.mask_bit() != 0 {
            return false;
        }
        self.count = self.count.wrapping_add(1).max(1);
        if self.pending.len() >= CAPACITY {
            return false;
        }
        self.pending.push_back((self.count, nsid, kind));
        true
    }

    /// The oldest notice as a log page (removed), or the empty page.
    pub fn pop(&mut self) -> ReservationNotificationLog {
        let mut page = ReservationNotificationLog::zeroed();
        if let Some((count, nsid, kind)) = self.pending.pop_front() {
            page.count = count;
            page.lptype = kind as u8;
            page.nalp = self.pending.len().min(CAPACITY) as u8;
            page.nsid = nsid;
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_come_out_oldest_first_and_masks_hold_them_back() {
        let mut log = NotificationLog::default();
        assert_eq!(log.pop(), ReservationNotificationLog::zeroed());
        assert!(log.push(1, NotificationType::ReservationReleased));
        assert!(log.push(2, NotificationType::RegistrationPreempted));
        let p = log.pop();
        assert_eq!((p.count, p.lptype, p.nalp, p.nsid), (1, 2, 1, 1));
        log.set_mask(1, NotificationType::ReservationPreempted.mask_bit());
        assert!(!log.push(1, NotificationType::ReservationPreempted));
        assert!(log.push(3, NotificationType::ReservationPreempted));
        log.set_mask(NSID_ALL, 0b1110);
        assert!(!log.push(3, NotificationType::ReservationPreempted));
        assert_eq!(
            log.mask(1),
            0b1110,
            "a mask for all namespaces replaces per-namespace ones"
        );
        let p = log.pop();
        assert_eq!((p.count, p.lptype, p.nsid), (2, 1, 2));
        let p = log.pop();
        assert_eq!((p.count, p.lptype, p.nalp), (3, 3, 0));
        assert_eq!(log.pop(), ReservationNotificationLog::zeroed());
        log.set_mask(NSID_ALL, 0);
        for _ in 0..CAPACITY + 10 {
            log.push(1, NotificationType::ReservationReleased);
        }
        assert_eq!(log.pop().nalp as usize, CAPACITY - 1);
    }
}
