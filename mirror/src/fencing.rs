//! Fencing of remote legs with NVMe reservations (`docs/promotion.md`).
//!
//! A volume registers the key [`fence_key`]`(volume UUID, epoch)` on every leg whose back end
//! sends reservation commands and holds a **Write Exclusive** reservation there: only the
//! holder writes, anyone may read. A promotion elsewhere bumps the epoch and takes the
//! reservation over with Preempt and Abort; from then on every write this node sends to the
//! leg meets Reservation Conflict, and the first one fences the whole volume: every host
//! command fails with Reservation Conflict and no write is acknowledged again
//! ([`FenceState`]). A leg whose target has no reservations works unfenced, with a warning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nvmirror_nvme::spec::reservation::{
    status::RESERVATION_CONFLICT, AcquireAction, AcquireCommand, ChangePtpl, RegisterAction,
    RegisterCommand, ReservationType,
};
use nvmirror_nvme::{Reservations, Status};

use crate::superblock::Uuid;

/// The reservation type a volume holds on its remote legs.
pub const FENCE_TYPE: ReservationType = ReservationType::WriteExclusive;

/// The reservation key of `volume` at `epoch`: CRC32C of the UUID in the high 32 bits, the
/// epoch's low 32 bits below. Never 0 (a zero key is not a valid registration).
pub fn fence_key(volume: Uuid, epoch: u64) -> u64 {
    let k = (u64::from(crc32c::crc32c(&volume.0)) << 32) | (epoch & 0xffff_ffff);
    k.max(1)
}

/// Whether `key` is one of `volume`'s keys; its epoch if so.
pub fn key_epoch(volume: Uuid, key: u64) -> Option<u64> {
    (key >> 32 == u64::from(crc32c::crc32c(&volume.0))).then_some(key & 0xffff_ffff)
}

/// How one leg is fenced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LegFence {
    /// Not tried (a local leg, or not yet).
    Local,
    /// This volume holds the reservation with its key.
    Held { key: u64 },
    /// The leg's back end or target has no reservations: writes to it are not fenced.
    Unfenced { why: String },
    /// Another holder (a newer epoch of this volume, or another volume) has the reservation.
    Lost { why: String },
}

impl LegFence {
    /// The state's name in `volume_status`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Held { .. } => "held",
            Self::Unfenced { .. } => "unfenced",
            Self::Lost { .. } => "lost",
        }
    }
}

/// Whether the volume has been fenced out, and why. Read on every host command (one relaxed
/// load); set once, by the first Reservation Conflict or by a start that finds a newer epoch.
#[derive(Debug, Default)]
pub struct FenceState {
    fenced: AtomicBool,
    why: Mutex<Option<String>>,
}

impl FenceState {
    #[inline]
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Fences the volume (first reason kept); true when this call did.
    #[cold]
    pub fn fence(&self, why: impl Into<String>) -> bool {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_some() {
            return false;
        }
        *w = Some(why.into());
        self.fenced.store(true, Ordering::Release);
        true
    }

    /// Why the volume is fenced, if it is.
    pub fn reason(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The status a fenced volume answers every host command with.
pub const FENCED_STATUS: Status = RESERVATION_CONFLICT;

/// Whether `s` is Reservation Conflict (whatever its DNR and More bits).
#[inline]
pub fn is_conflict(s: Status) -> bool {
    s.sct() == RESERVATION_CONFLICT.sct() && s.sc() == RESERVATION_CONFLICT.sc()
}

/// Registers `volume`'s key at `epoch` on `res` and takes the Write Exclusive reservation.
///
/// A holder with the same key (this volume's earlier run at this epoch) is preempted; with
/// `takeover` (a promotion) so is a holder with an older epoch of this volume. A holder of a
/// newer epoch or of another volume means this node has been fenced: `Lost`.
pub fn fence_leg(res: &dyn Reservations, volume: Uuid, epoch: u64, takeover: bool) -> LegFence {
    let key = fence_key(volume, epoch);
    let err = |what: &str, e: String| LegFence::Unfenced {
        why: format!("{what}: {e}"),
    };
    let reg = |action, iekey| RegisterCommand {
        action,
        iekey,
        cptpl: ChangePtpl::NoChange,
        crkey: 0,
        nrkey: key,
    };
    let st = match res.register(&reg(RegisterAction::Register, false)) {
        Ok(s) => s,
        Err(e) => return err("Reservation Register", e.to_string()),
    };
    if is_conflict(st) {
        // Registered already with another key (an earlier epoch of this host): replace it.
        match res.register(&reg(RegisterAction::Replace, true)) {
            Ok(s) if s.is_success() => {}
            Ok(s) => return err("Reservation Register (replace)", s.to_string()),
            Err(e) => return err("Reservation Register (replace)", e.to_string()),
        }
    } else if !st.is_success() {
        return err("Reservation Register", st.to_string());
    }
    let report = match res.report() {
        Ok(Ok(r)) => r,
        Ok(Err(s)) => return err("Reservation Report", s.to_string()),
        Err(e) => return err("Reservation Report", e.to_string()),
    };
    let me = res.host_id();
    let holder = report
        .rtype
        .and_then(|_| report.registrants.iter().find(|r| r.holds));
    let acquire = |action, prkey| AcquireCommand {
        action,
        iekey: false,
        rtype: FENCE_TYPE,
        crkey: key,
        prkey,
    };
    let cmd = match holder {
        None => acquire(AcquireAction::Acquire, 0),
        Some(h) if h.hostid == me => acquire(AcquireAction::Acquire, 0),
        Some(h) => match key_epoch(volume, h.rkey) {
            Some(e) if e == (epoch & 0xffff_ffff) || (takeover && e < epoch) => {
                acquire(AcquireAction::PreemptAndAbort, h.rkey)
            }
            Some(e) => {
                return LegFence::Lost {
                    why: format!("held at epoch {e} (this node is at epoch {epoch})"),
                }
            }
            None => {
                return LegFence::Lost {
                    why: format!("held by another volume (key {:#018x})", h.rkey),
                }
            }
        },
    };
    match res.acquire(&cmd) {
        Ok(s) if s.is_success() => LegFence::Held { key },
        Ok(s) if is_conflict(s) => LegFence::Lost {
            why: "Reservation Acquire: Reservation Conflict".into(),
        },
        Ok(s) => err("Reservation Acquire", s.to_string()),
        Err(e) => err("Reservation Acquire", e.to_string()),
    }
}

impl crate::Volume {
    /// The fencing epoch (0 for a volume without metadata).
    pub fn epoch(&self) -> u64 {
        self.shared()
            .meta
            .as_ref()
            .map_or(0, |m| m.epoch.load(Ordering::Acquire))
    }

    /// Why the volume is fenced out, if it is.
    pub fn fenced(&self) -> Option<String> {
        self.shared().fence.reason()
    }

    /// Fences the volume by hand (a start that found a newer epoch, an operator).
    pub fn fence_out(&self, why: impl Into<String>) {
        self.shared().fence.fence(why);
    }

    /// How each leg is fenced, by leg index (empty before [`fence_remote_legs`](Self::fence_remote_legs)).
    pub fn leg_fences(&self) -> Vec<LegFence> {
        self.shared()
            .leg_fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Registers this volume's key at its epoch and takes the reservation on every leg whose
    /// back end sends reservation commands ([`fence_leg`]; `takeover`: preempt older epochs
    /// too). A leg another holder keeps fences the whole volume; a leg without reservations
    /// stays unfenced with a warning. Control plane only: one round trip per command.
    pub fn fence_remote_legs(&self, takeover: bool) -> Vec<LegFence> {
        let sh = self.shared();
        let volume = sh.meta.as_ref().map_or(Uuid::default(), |m| m.volume_uuid);
        let epoch = self.epoch();
        let mut out = Vec::new();
        for (i, name) in sh.leg_names().iter().enumerate() {
            let Some(leg) = sh.leg(i) else {
                out.push(LegFence::Local);
                continue;
            };
            let f = match (leg.dev.reservations(), leg.dev.link()) {
                (Some(res), _) => fence_leg(res, volume, epoch, takeover),
                (None, Some(_)) => LegFence::Unfenced {
                    why: "the back end sends no reservation commands".into(),
                },
                (None, None) => LegFence::Local,
            };
            // An asynchronous leg's staging area at the far site is fenced with its image: a
            // promotion there takes both over.
            let f = match (f, leg.dev.staging_reservations()) {
                (f @ (LegFence::Held { .. } | LegFence::Unfenced { .. }), Some(res)) => {
                    match fence_leg(res, volume, epoch, takeover) {
                        LegFence::Lost { why } => LegFence::Lost {
                            why: format!("of its staging area {why}"),
                        },
                        _ => f,
                    }
                }
                (f, _) => f,
            };
            match &f {
                LegFence::Unfenced { why } => tracing::warn!(
                    volume = %sh.name, leg = i, name, "remote leg is UNFENCED: {why}; a promotion elsewhere cannot stop this node writing it"
                ),
                LegFence::Lost { why } => {
                    let why = format!("leg {i} ({name}): reservation {why}");
                    tracing::error!(volume = %sh.name, "fenced: {why}");
                    sh.fence.fence(why);
                }
                LegFence::Held { key } => {
                    tracing::info!(volume = %sh.name, leg = i, key = format!("{key:#018x}"), epoch, "reservation held")
                }
                LegFence::Local => {}
            }
            out.push(f);
        }
        *sh.leg_fences.lock().unwrap_or_else(|e| e.into_inner()) = out.clone();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_uuid_crc_and_the_epoch() {
        let u = Uuid([7; 16]);
        let k = fence_key(u, 5);
        assert_eq!(k >> 32, u64::from(crc32c::crc32c(&[7; 16])));
        assert_eq!(k & 0xffff_ffff, 5);
        assert_eq!(key_epoch(u, k), Some(5));
        assert_ne!(fence_key(u, 6), k, "a promotion changes the key");
        assert_eq!(key_epoch(Uuid([8; 16]), k), None, "another volume's key");
        assert_ne!(fence_key(Uuid::default(), 0), 0);
    }

    #[test]
    fn the_first_reason_is_kept() {
        let f = FenceState::default();
        assert!(!f.is_fenced());
        assert!(f.fence("preempted"));
        assert!(!f.fence("again"));
        assert!(f.is_fenced());
        assert_eq!(f.reason().as_deref(), Some("preempted"));
    }
}
