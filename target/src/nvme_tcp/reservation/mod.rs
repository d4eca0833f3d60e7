//! NVMe reservations (Base §8.19) in the target: one [`NamespaceReservation`] per exported
//! namespace, shared by every controller and queue on every core.
//!
//! Updates (the four reservation commands, Set Features Reservation Persistence) are rare:
//! they take the namespace's mutex, apply the rules of [`state`] to a copy, make the copy
//! durable when Persist Through Power Loss is on, then publish it and bump an epoch. Checks
//! are per I/O: each I/O queue caches the [`Access`] its host has per namespace with the
//! epoch it was computed at ([`AccessCache`]); an I/O costs one atomic load and a compare,
//! and only a queue that sees a new epoch takes the mutex, once, to refresh its cache.

mod notify;
mod persist;
pub(crate) mod state;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nvmirror_nvme::spec::reservation::{ChangePtpl, Report};
use nvmirror_nvme::spec::Status;

pub(crate) use notify::NotificationLog;
use state::ReservationState;
pub(crate) use state::{Access, Command, HostId, Notice, Outcome};

/// The Access a queue computed for its host, and the epoch it holds for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AccessCache {
    epoch: u64,
    access: Access,
}

impl AccessCache {
    /// Not computed yet: the next check refreshes it.
    pub const STALE: Self = Self {
        epoch: u64::MAX,
        access: Access::ALL,
    };
}

/// Reservation state of one namespace, shared by all its controllers.
#[derive(Debug)]
pub(crate) struct NamespaceReservation {
    /// Bumped (Release) after every published change, under `state`'s lock.
    epoch: AtomicU64,
    state: Mutex<ReservationState>,
    /// Where the state persists while PTPL is set; `None`: PTPL cannot be set.
    store: Option<persist::Store>,
}

impl NamespaceReservation {
    /// The reservation of a namespace; with a `store` path, the state saved there under PTPL
    /// is loaded (a file that does not parse is an error naming it).
    pub fn open(store: Option<PathBuf>, subnqn: &str, nsid: u32) -> Result<Self, String> {
        let store = store.map(|path| persist::Store::new(path, subnqn, nsid));
        let state = match &store {
            Some(s) => s.load()?.unwrap_or_default(),
            None => ReservationState::default(),
        };
        if state.ptpl {
            tracing::info!(
                subsystem = subnqn,
                nsid,
                registrants = state.registrants.len(),
                reserved = state.reservation.is_some(),
                "reservation state restored (persist through power loss)"
            );
        }
        Ok(Self {
            epoch: AtomicU64::new(0),
            state: Mutex::new(state),
            store,
        })
    }

    /// Whether PTPL can be set (the state has somewhere to persist).
    pub fn persistent(&self) -> bool {
        self.store.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReservationState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `host` may do now: from `cache` while the epoch has not moved.
    #[inline]
    pub fn check(&self, cache: &mut AccessCache, host: &HostId) -> Access {
        if self.epoch.load(Ordering::Acquire) != cache.epoch {
            let st = self.lock();
            cache.epoch = self.epoch.load(Ordering::Relaxed);
            cache.access = st.access(host);
        }
        cache.access
    }

    /// Runs a reservation command from `host`: the state changes (and persists, under PTPL)
    /// only when the command succeeds.
    pub fn execute(&self, host: &HostId, cmd: &Command) -> Outcome {
        if let Command::Register(r) = cmd {
            if r.cptpl == ChangePtpl::Set && self.store.is_none() {
                return refused(Status::INVALID_FIELD.with_dnr());
            }
        }
        let mut st = self.lock();
        let mut next = st.clone();
        let out = next.apply(host, cmd);
        if !out.status.is_success() {
            return out;
        }
        if let Err(e) = self.commit(&mut st, next) {
            tracing::error!("reservation state not saved: {e}");
            return refused(Status::INTERNAL_ERROR);
        }
        out
    }

    /// Sets or clears PTPL (Set Features Reservation Persistence).
    pub fn set_ptpl(&self, on: bool) -> Result<(), Status> {
        if on && self.store.is_none() {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        let mut st = self.lock();
        let mut next = st.clone();
        next.ptpl = on;
        self.commit(&mut st, next).map_err(|e| {
            tracing::error!("reservation state not saved: {e}");
            Status::INTERNAL_ERROR
        })
    }

    /// Makes `next` durable (or removes the saved state when PTPL is off), then publishes it.
    fn commit(&self, st: &mut ReservationState, next: ReservationState) -> std::io::Result<()> {
        if let Some(store) = &self.store {
            if next.ptpl {
                store.save(&next)?;
            } else if st.ptpl {
                store.remove()?;
            }
        }
        *st = next;
        self.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub fn ptpl(&self) -> bool {
        self.lock().ptpl
    }

    pub fn report(&self) -> Report {
        self.lock().report()
    }
}

fn refused(status: Status) -> Outcome {
    Outcome {
        status,
        notices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvme::spec::reservation::{
        AcquireAction, AcquireCommand, RegisterAction, RegisterCommand, ReservationType,
    };

    const A: HostId = [1; 16];
    const B: HostId = [2; 16];

    fn register(key: u64, cptpl: ChangePtpl) -> Command {
        Command::Register(RegisterCommand {
            action: RegisterAction::Register,
            iekey: false,
            cptpl,
            crkey: 0,
            nrkey: key,
        })
    }

    fn acquire_ea(key: u64) -> Command {
        Command::Acquire(AcquireCommand {
            action: AcquireAction::Acquire,
            iekey: false,
            rtype: ReservationType::ExclusiveAccess,
            crkey: key,
            prkey: 0,
        })
    }

    #[test]
    fn a_cached_access_follows_every_published_change() {
        let ns = NamespaceReservation::open(None, "nqn.x", 1).unwrap();
        let mut cache_b = AccessCache::STALE;
        assert_eq!(ns.check(&mut cache_b, &B), Access::ALL);
        assert!(ns
            .execute(&A, &register(1, ChangePtpl::NoChange))
            .status
            .is_success());
        assert!(ns.execute(&A, &acquire_ea(1)).status.is_success());
        assert_eq!(ns.check(&mut cache_b, &B), Access::default());
        // A failed command publishes nothing.
        let epoch = ns.epoch.load(Ordering::Relaxed);
        assert!(!ns.execute(&B, &acquire_ea(5)).status.is_success());
        assert_eq!(ns.epoch.load(Ordering::Relaxed), epoch);
    }

    #[test]
    fn ptpl_needs_a_store_and_survives_a_reopen_only_when_set() {
        let mem = NamespaceReservation::open(None, "nqn.x", 1).unwrap();
        assert_eq!(
            mem.execute(&A, &register(1, ChangePtpl::Set)).status,
            Status::INVALID_FIELD.with_dnr()
        );
        assert_eq!(mem.set_ptpl(true), Err(Status::INVALID_FIELD.with_dnr()));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.reservations.json");
        let ns = NamespaceReservation::open(Some(path.clone()), "nqn.x", 1).unwrap();
        assert!(ns
            .execute(&A, &register(7, ChangePtpl::NoChange))
            .status
            .is_success());
        assert!(!path.exists(), "nothing persists without PTPL");
        assert!(ns
            .execute(&B, &register(8, ChangePtpl::Set))
            .status
            .is_success());
        assert!(ns.execute(&A, &acquire_ea(7)).status.is_success());
        let before = ns.report();
        drop(ns);
        let again = NamespaceReservation::open(Some(path.clone()), "nqn.x", 1).unwrap();
        assert_eq!(again.report(), before);
        assert!(again.ptpl());
        let mut cache = AccessCache::STALE;
        assert_eq!(again.check(&mut cache, &B), Access::default());
        // Clearing PTPL removes the saved state: the next start begins empty.
        again.set_ptpl(false).unwrap();
        assert!(!path.exists());
        drop(again);
        let empty = NamespaceReservation::open(Some(path), "nqn.x", 1).unwrap();
        assert_eq!(empty.report().regctl, 0);
    }

    #[test]
    fn a_damaged_state_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.reservations.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = NamespaceReservation::open(Some(path), "nqn.x", 1).unwrap_err();
        assert!(e.contains("vol0.reservations.json"), "{e}");
    }
}
