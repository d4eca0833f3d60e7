//! Asynchronous events of one controller (Base §5.2 and §5.27.1.8): the Asynchronous Event
//! Configuration the host set, the events waiting for an Asynchronous Event Request, the
//! log pages whose event was delivered and not yet read, and the Changed Namespace List
//! (log 04h).
//!
//! Rules kept here:
//! - a notice the configuration does not enable is not raised (reservation notices have no
//!   configuration bit: the Reservation Notification Mask governs them), but it is
//!   remembered until the host reads its log page: a host that enables the notice before
//!   it has read the page since the change gets the notice then. Linux reads the ANA log
//!   while it sets a controller up and enables notices only once the I/O queues are
//!   connected; an ANA change between the two would otherwise leave that path with a
//!   stale state for good (the host sends it no I/O, so nothing else corrects it);
//! - an event raised while no request is outstanding waits, in a bounded queue, for the
//!   next one;
//! - once an event for a log page was delivered, no event for that page is sent again
//!   until the host reads the page without Retain Asynchronous Event: meanwhile new causes
//!   are coalesced into the page the host is about to read.

use std::collections::VecDeque;

use nvmirror_nvme::spec::admin::log_page;
use nvmirror_nvme::spec::ana::{
    aen, aer_dw0, AER_TYPE_NOTICE, LOG_ANA, NOTICE_ANA_CHANGE, NOTICE_NAMESPACE_ATTRIBUTE,
};
use nvmirror_nvme::spec::reservation::{AER_TYPE_IO_COMMAND_SET, LOG_RESERVATION_NOTIFICATION};

/// Events waiting for a request, at most (one per kind can wait at a time, so this only
/// bounds kinds added later).
const QUEUE_LIMIT: usize = 16;
/// NSIDs the Changed Namespace List holds; more turn it into the single entry FFFFFFFFh.
const CHANGED_NS_LIMIT: usize = 1024;

/// One asynchronous event: what the completion of a request says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AsyncEvent {
    ty: u8,
    info: u8,
    lid: u8,
}

impl AsyncEvent {
    /// Notice: the ANA log page changed.
    pub const ANA_CHANGE: Self = Self {
        ty: AER_TYPE_NOTICE,
        info: NOTICE_ANA_CHANGE,
        lid: LOG_ANA,
    };
    /// Notice: attributes of a namespace changed (Changed Namespace List).
    pub const NAMESPACE_ATTRIBUTE: Self = Self {
        ty: AER_TYPE_NOTICE,
        info: NOTICE_NAMESPACE_ATTRIBUTE,
        lid: log_page::CHANGED_NAMESPACES,
    };
    /// I/O command set specific: Reservation Log Page Available.
    pub const RESERVATION: Self = Self {
        ty: AER_TYPE_IO_COMMAND_SET,
        info: 0,
        lid: LOG_RESERVATION_NOTIFICATION,
    };

    /// The Asynchronous Event Configuration bit that enables this event, if it has one.
    fn config_bit(self) -> Option<u32> {
        match (self.ty, self.info) {
            (AER_TYPE_NOTICE, NOTICE_ANA_CHANGE) => Some(aen::ANA_CHANGE),
            (AER_TYPE_NOTICE, NOTICE_NAMESPACE_ATTRIBUTE) => Some(aen::NAMESPACE_ATTRIBUTE),
            _ => None,
        }
    }

    /// Completion DW0 of the request that reports it.
    pub fn dw0(self) -> u32 {
        aer_dw0(self.ty, self.info, self.lid)
    }
}

/// The notices this controller can send (Identify OAES; the configuration bits it accepts).
pub(crate) const SUPPORTED_NOTICES: u32 = aen::ANA_CHANGE | aen::NAMESPACE_ATTRIBUTE;

/// One controller's asynchronous event state.
#[derive(Debug, Default)]
pub(crate) struct AsyncEvents {
    /// Asynchronous Event Configuration (feature 0Bh) as last set.
    config: u32,
    /// Raised, not yet delivered.
    queue: VecDeque<AsyncEvent>,
    /// Delivered; their log page has not been read since.
    awaiting_read: Vec<u8>,
    /// Refused by the configuration; their log page has not been read since.
    missed: Vec<AsyncEvent>,
    /// Namespaces changed since log 04h was last read, ascending.
    changed_ns: Vec<u32>,
    changed_ns_overflow: bool,
}

impl AsyncEvents {
    pub fn config(&self) -> u32 {
        self.config
    }

    /// Sets the configuration; raises the notices it now enables that were refused since
    /// their page was last read. True when an event now waits for a request.
    pub fn set_config(&mut self, v: u32) -> bool {
        self.config = v;
        let missed = std::mem::take(&mut self.missed);
        let mut raised = false;
        for ev in missed {
            raised |= self.raise(ev);
        }
        raised
    }

    /// Raises `ev`; true when it now waits for a request (false: not enabled, or coalesced
    /// into one that is waiting or whose log page the host has yet to read).
    pub fn raise(&mut self, ev: AsyncEvent) -> bool {
        if ev.config_bit().is_some_and(|b| self.config & b == 0) {
            if !self.missed.contains(&ev) {
                self.missed.push(ev);
            }
            return false;
        }
        if self.queue.contains(&ev) || self.awaiting_read.contains(&ev.lid) {
            return false;
        }
        if self.queue.len() >= QUEUE_LIMIT {
            return false;
        }
        self.queue.push_back(ev);
        true
    }

    /// Records that namespace `nsid` changed and raises the Namespace Attribute notice.
    pub fn namespace_changed(&mut self, nsid: u32) -> bool {
        if let Err(at) = self.changed_ns.binary_search(&nsid) {
            if self.changed_ns.len() >= CHANGED_NS_LIMIT {
                self.changed_ns_overflow = true;
            } else {
                self.changed_ns.insert(at, nsid);
            }
        }
        self.raise(AsyncEvent::NAMESPACE_ATTRIBUTE)
    }

    /// The next event for an outstanding request; its log page is then awaited.
    pub fn take(&mut self) -> Option<AsyncEvent> {
        let ev = self.queue.pop_front()?;
        self.awaiting_read.push(ev.lid);
        Some(ev)
    }

    /// Whether an event waits.
    pub fn is_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The host read log page `lid`; without Retain Asynchronous Event that re-arms its
    /// event (and, for log 04h, empties the Changed Namespace List).
    pub fn log_read(&mut self, lid: u8, retain: bool) {
        // The host has the page's current content: a refused notice for it is moot.
        self.missed.retain(|ev| ev.lid != lid);
        if retain {
            return;
        }
        self.awaiting_read.retain(|&l| l != lid);
        if lid == log_page::CHANGED_NAMESPACES {
            self.changed_ns.clear();
            self.changed_ns_overflow = false;
        }
    }

    /// The Changed Namespace List page (log 04h, 4 KiB: up to 1024 NSIDs, zero-filled).
    pub fn changed_namespaces(&self, out: &mut [u8]) {
        out.fill(0);
        if self.changed_ns_overflow {
            out[..4].copy_from_slice(&u32::MAX.to_le_bytes());
            return;
        }
        for (slot, id) in out.chunks_exact_mut(4).zip(&self.changed_ns) {
            slot.copy_from_slice(&id.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_need_their_configuration_bit() {
        let mut e = AsyncEvents::default();
        assert!(!e.raise(AsyncEvent::ANA_CHANGE));
        assert!(!e.namespace_changed(1));
        assert!(e.raise(AsyncEvent::RESERVATION), "no configuration bit");
        e.log_read(LOG_ANA, false);
        e.log_read(log_page::CHANGED_NAMESPACES, false);
        assert!(
            !e.set_config(SUPPORTED_NOTICES),
            "both pages were read since"
        );
        assert!(e.raise(AsyncEvent::ANA_CHANGE));
        assert_eq!(e.take(), Some(AsyncEvent::RESERVATION));
        assert_eq!(e.take().map(AsyncEvent::dw0), Some(0x000c_0302));
        assert_eq!(e.take(), None);
    }

    #[test]
    fn a_refused_notice_is_raised_when_enabled_unless_its_page_was_read_since() {
        let mut e = AsyncEvents::default();
        assert!(!e.raise(AsyncEvent::ANA_CHANGE));
        assert!(!e.raise(AsyncEvent::ANA_CHANGE), "remembered once");
        assert!(!e.set_config(aen::NAMESPACE_ATTRIBUTE), "another bit");
        assert!(e.set_config(SUPPORTED_NOTICES));
        assert_eq!(e.take(), Some(AsyncEvent::ANA_CHANGE));
        assert_eq!(e.take(), None, "raised once");

        let mut e = AsyncEvents::default();
        assert!(!e.raise(AsyncEvent::ANA_CHANGE));
        assert!(!e.namespace_changed(7));
        e.log_read(LOG_ANA, true);
        assert!(e.set_config(SUPPORTED_NOTICES), "the namespace notice only");
        assert_eq!(e.take(), Some(AsyncEvent::NAMESPACE_ATTRIBUTE));
        assert_eq!(e.take(), None, "the ANA page was read after the change");
        let mut page = [0u8; 4096];
        e.changed_namespaces(&mut page);
        assert_eq!(&page[..8], &[7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_delivered_event_stays_masked_until_its_log_page_is_read() {
        let mut e = AsyncEvents::default();
        e.set_config(aen::ANA_CHANGE);
        assert!(e.raise(AsyncEvent::ANA_CHANGE));
        assert!(!e.raise(AsyncEvent::ANA_CHANGE), "coalesced while queued");
        assert!(e.take().is_some());
        assert!(
            !e.raise(AsyncEvent::ANA_CHANGE),
            "masked until the page is read"
        );
        e.log_read(LOG_ANA, true);
        assert!(
            !e.raise(AsyncEvent::ANA_CHANGE),
            "Retain Asynchronous Event keeps it"
        );
        e.log_read(LOG_ANA, false);
        assert!(e.raise(AsyncEvent::ANA_CHANGE));
        assert!(e.is_pending());
    }

    #[test]
    fn changed_namespace_list_collects_until_read() {
        let mut e = AsyncEvents::default();
        e.set_config(aen::NAMESPACE_ATTRIBUTE);
        assert!(e.namespace_changed(3));
        assert!(!e.namespace_changed(1), "one notice for both");
        let mut page = [0u8; 4096];
        e.changed_namespaces(&mut page);
        assert_eq!(&page[..12], &[1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(e.take(), Some(AsyncEvent::NAMESPACE_ATTRIBUTE));
        e.log_read(log_page::CHANGED_NAMESPACES, false);
        e.changed_namespaces(&mut page);
        assert!(page.iter().all(|&b| b == 0));
        for id in 1..=CHANGED_NS_LIMIT as u32 + 1 {
            e.namespace_changed(id);
        }
        e.changed_namespaces(&mut page);
        assert_eq!(&page[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }
}
