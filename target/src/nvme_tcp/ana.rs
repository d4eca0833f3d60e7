//! Asymmetric Namespace Access: the state of each ANA group through each listener (NVM
//! subsystem port) of one subsystem, their change counts, and the ANA log page a controller
//! on a port reads.
//!
//! Every namespace is its own ANA group (ANAGRPID = NSID, as SPDK does by default), so a
//! subsystem of N namespaces has groups 1..=N. A controller belongs to the port its admin
//! queue connected through; the state its I/O sees is `state(port, group)`: one atomic load
//! per command. States change only through the control plane
//! ([`NvmeTcpTarget::set_ana_state`](super::NvmeTcpTarget::set_ana_state)), which then
//! raises an ANA Change notice on every controller of the port.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use nvmirror_nvme::spec::ana::{ana_log_len, write_ana_log, AnaGroup, AnaState};

/// The ANA states of one subsystem: `ports` x `groups` cells.
#[derive(Debug)]
pub(crate) struct AnaTable {
    ports: usize,
    groups: u32,
    /// State byte per (port, group - 1).
    state: Box<[AtomicU8]>,
    /// Change count per (port, group - 1).
    group_chgcnt: Box<[AtomicU64]>,
    /// Change count of the log page per port.
    page_chgcnt: Box<[AtomicU64]>,
}

impl AnaTable {
    /// `defaults[p]` is the state every group starts in through port `p`.
    pub fn new(groups: u32, defaults: &[AnaState]) -> Self {
        let ports = defaults.len().max(1);
        let cells = ports * groups as usize;
        let state = (0..cells)
            .map(|c| {
                let d = defaults
                    .get(c / groups.max(1) as usize)
                    .copied()
                    .unwrap_or(AnaState::Optimized);
                AtomicU8::new(d as u8)
            })
            .collect();
        Self {
            ports,
            groups,
            state,
            group_chgcnt: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            page_chgcnt: (0..ports).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Takes the states and change counts of every (port, group) cell `old` also has (a
    /// subsystem's next generation keeps its groups' states).
    pub fn copy_states(&self, old: &AnaTable) {
        for port in 0..self.ports.min(old.ports) {
            for g in 1..=self.groups.min(old.groups) {
                if let (Some(c), Some(o)) = (self.cell(port, g), old.cell(port, g)) {
                    let v = old.state[o].load(Ordering::Acquire);
                    self.state[c].store(v, Ordering::Release);
                    let n = old.group_chgcnt[o].load(Ordering::Acquire);
                    self.group_chgcnt[c].store(n, Ordering::Release);
                }
            }
            let n = old.page_chgcnt[port].load(Ordering::Acquire);
            // The page changed (groups came or went): a host reading it sees a new count.
            self.page_chgcnt[port].store(n.wrapping_add(1).max(1), Ordering::Release);
        }
    }

    /// Number of groups (ANAGRPMAX and NANAGRPID).
    pub fn groups(&self) -> u32 {
        self.groups
    }

    fn cell(&self, port: usize, group: u32) -> Option<usize> {
        (port < self.ports && (1..=self.groups).contains(&group))
            .then(|| port * self.groups as usize + (group - 1) as usize)
    }

    /// The state of `group` through `port` (Optimized for a group or port that does not
    /// exist: nothing is asymmetric about it).
    #[inline]
    pub fn state(&self, port: usize, group: u32) -> AnaState {
        self.cell(port, group)
            .and_then(|c| AnaState::from_u8(self.state[c].load(Ordering::Acquire)))
            .unwrap_or(AnaState::Optimized)
    }

    /// Sets the state of `group` through `port`; returns whether it changed (and the change
    /// counts moved), `None` when the port or group does not exist.
    pub fn set(&self, port: usize, group: u32, state: AnaState) -> Option<bool> {
        let c = self.cell(port, group)?;
        let old = self.state[c].swap(state as u8, Ordering::AcqRel);
        if old == state as u8 {
            return Some(false);
        }
        bump(&self.group_chgcnt[c]);
        bump(&self.page_chgcnt[port]);
        Some(true)
    }

    /// The ANA log page as seen through `port` (`rgo`: Return Groups Only).
    pub fn log_page(&self, port: usize, rgo: bool) -> Vec<u8> {
        let port = port.min(self.ports - 1);
        let nsids: Vec<u32> = (1..=self.groups).collect();
        let groups: Vec<AnaGroup<'_>> = (1..=self.groups)
            .map(|g| {
                let c = self.cell(port, g).expect("group in range");
                AnaGroup {
                    grpid: g,
                    chgcnt: self.group_chgcnt[c].load(Ordering::Acquire),
                    state: self.state(port, g),
                    nsids: &nsids[(g - 1) as usize..g as usize],
                }
            })
            .collect();
        let mut page = vec![0; ana_log_len(&groups, rgo)];
        write_ana_log(
            &mut page,
            self.page_chgcnt[port].load(Ordering::Acquire),
            &groups,
            rgo,
        );
        page
    }
}

/// Adds one to a change count; it wraps to 1, never to 0.
fn bump(c: &AtomicU64) {
    let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.wrapping_add(1).max(1))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvme::spec::ana::{AnaGroupDescriptor, AnaLogHeader};

    #[test]
    fn states_are_per_port_and_group_and_changes_are_counted() {
        let t = AnaTable::new(2, &[AnaState::Optimized, AnaState::NonOptimized]);
        assert_eq!(t.state(0, 1), AnaState::Optimized);
        assert_eq!(t.state(1, 2), AnaState::NonOptimized);
        assert_eq!(t.set(1, 2, AnaState::NonOptimized), Some(false));
        assert_eq!(t.set(0, 2, AnaState::Inaccessible), Some(true));
        assert_eq!(t.set(2, 1, AnaState::Inaccessible), None);
        assert_eq!(t.set(0, 3, AnaState::Inaccessible), None);
        assert_eq!(t.state(0, 2), AnaState::Inaccessible);
        assert_eq!(
            t.state(1, 2),
            AnaState::NonOptimized,
            "other port untouched"
        );

        let p = t.log_page(0, false);
        let h = AnaLogHeader::read_from(&p);
        assert_eq!((h.chgcnt, h.ngrps), (1, 2));
        let g1 = AnaGroupDescriptor::read_from(&p[16..]);
        assert_eq!((g1.grpid, g1.nnsids, g1.chgcnt, g1.state), (1, 1, 0, 0x01));
        assert_eq!(u32::from_le_bytes(p[48..52].try_into().unwrap()), 1);
        let g2 = AnaGroupDescriptor::read_from(&p[52..]);
        assert_eq!((g2.grpid, g2.nnsids, g2.chgcnt, g2.state), (2, 1, 1, 0x03));
        assert_eq!(u32::from_le_bytes(p[84..88].try_into().unwrap()), 2);
        assert_eq!(p.len(), 88);

        let rgo = t.log_page(0, true);
        assert_eq!(rgo.len(), 16 + 64);
        assert_eq!(AnaGroupDescriptor::read_from(&rgo[48..]).nnsids, 0);
        assert_eq!(AnaLogHeader::read_from(&t.log_page(1, false)).chgcnt, 0);
    }

    #[test]
    fn change_counts_wrap_to_one() {
        let c = AtomicU64::new(u64::MAX);
        bump(&c);
        assert_eq!(c.load(Ordering::Relaxed), 1);
    }
}
