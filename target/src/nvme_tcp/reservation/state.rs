//! The reservation state of one namespace and the rules of Base §8.19, as a pure function of
//! (state, issuing host, command) → (status, notifications). Nothing here does I/O or knows
//! about controllers: hosts are their 128-bit Host Identifiers from the Connect data.
//!
//! Rules, where the spec leaves a choice, follow the Linux kernel target (nvmet) so a Linux
//! host sees the same answers from both:
//! - Register of a host already registered succeeds only with its current key as NRKEY;
//!   Replace and Unregister need the current key unless IEKEY is set; Replace of a host that
//!   is not registered is a Reservation Conflict.
//! - Acquire and Release need the issuer registered with CRKEY as its key; IEKEY there is
//!   reserved since revision 1.3 (RESCAP bit 7) and refused as Invalid Field.
//! - Release of a type other than the one held is Invalid Field; Release by a registrant that
//!   does not hold the reservation succeeds and changes nothing.
//! - The generation counter moves on every successful Register (any action), Preempt,
//!   Preempt and Abort, and Clear; never on Acquire or Release.

use nvmirror_nvme::spec::reservation::{
    status::RESERVATION_CONFLICT, AcquireAction, AcquireCommand, ChangePtpl, NotificationType,
    RegisterAction, RegisterCommand, ReleaseAction, ReleaseCommand, Report, ReportedRegistrant,
    ReservationType,
};
use nvmirror_nvme::spec::Status;

/// A host as reservations know it: its 128-bit Host Identifier.
pub(crate) type HostId = [u8; 16];

/// Controller ID reported for every registrant under the dynamic controller model.
const CNTLID_DYNAMIC: u16 = 0xffff;

/// A registered host and its reservation key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Registrant {
    pub host: HostId,
    pub key: u64,
}

/// Who holds a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// One host (the types other than All Registrants).
    Host(HostId),
    /// Every registrant (Write Exclusive / Exclusive Access - All Registrants).
    AllRegistrants,
}

impl Holder {
    fn for_type(t: ReservationType, host: HostId) -> Self {
        if t.all_registrants() {
            Self::AllRegistrants
        } else {
            Self::Host(host)
        }
    }
}

/// A reservation command, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Register(RegisterCommand),
    Acquire(AcquireCommand),
    Release(ReleaseCommand),
}

/// A notification for the controllers of `host` (Reservation Notification log page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Notice {
    pub host: HostId,
    pub kind: NotificationType,
}

/// What a host may do to the namespace now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Access {
    /// Commands of the read group (Read).
    pub read: bool,
    /// Commands of the write group (Write, Write Zeroes, Dataset Management, Flush).
    pub write: bool,
}

impl Access {
    pub const ALL: Self = Self {
        read: true,
        write: true,
    };
}

/// Reservation state of one namespace.
///
/// Invariants (pinned by the property tests): registrants have distinct hosts; a
/// [`Holder::Host`] is a registrant; an All Registrants reservation has at least one
/// registrant; a command that fails leaves the state as it was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReservationState {
    /// Generation (GEN of the Report), wrapping.
    pub generation: u32,
    /// Persist Through Power Loss.
    pub ptpl: bool,
    /// In registration order.
    pub registrants: Vec<Registrant>,
    /// The reservation and its holder, if the namespace is reserved.
    pub reservation: Option<(ReservationType, Holder)>,
}

/// The result of one command: success or the status to complete it with, and notifications.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub status: Status,
    pub notices: Vec<Notice>,
}

fn conflict() -> Status {
    RESERVATION_CONFLICT.with_dnr()
}

fn invalid() -> Status {
    Status::INVALID_FIELD.with_dnr()
}

impl ReservationState {
    fn registrant(&self, host: &HostId) -> Option<&Registrant> {
        self.registrants.iter().find(|r| &r.host == host)
    }

    /// Whether `host` holds the reservation.
    pub fn holds(&self, host: &HostId) -> bool {
        match self.reservation {
            Some((_, Holder::Host(h))) => &h == host,
            Some((_, Holder::AllRegistrants)) => self.registrant(host).is_some(),
            None => false,
        }
    }

    /// What `host` may do (Base §8.19, Figure "Command Behavior in the Presence of a
    /// Reservation").
    pub fn access(&self, host: &HostId) -> Access {
        let Some((t, _)) = self.reservation else {
            return Access::ALL;
        };
        if self.holds(host) || (t.admits_registrants() && self.registrant(host).is_some()) {
            return Access::ALL;
        }
        Access {
            read: !t.excludes_reads(),
            write: false,
        }
    }

    /// The Report data (every registrant, the dynamic controller ID for each).
    pub fn report(&self) -> Report {
        Report {
            gen: self.generation,
            rtype: self.reservation.map(|(t, _)| t),
            ptpl: self.ptpl,
            regctl: self.registrants.len().min(usize::from(u16::MAX)) as u16,
            registrants: self
                .registrants
                .iter()
                .map(|r| ReportedRegistrant {
                    cntlid: CNTLID_DYNAMIC,
                    holds: self.holds(&r.host),
                    hostid: r.host,
                    rkey: r.key,
                })
                .collect(),
        }
    }

    /// Applies `cmd` from `host`. On failure the state is unchanged.
    pub fn apply(&mut self, host: &HostId, cmd: &Command) -> Outcome {
        let mut next = self.clone();
        let mut notices = Vec::new();
        let r = match cmd {
            Command::Register(c) => next.register(host, c, &mut notices),
            Command::Acquire(c) => next.acquire(host, c, &mut notices),
            Command::Release(c) => next.release(host, c, &mut notices),
        };
        match r {
            Ok(()) => {
                *self = next;
                Outcome {
                    status: Status::SUCCESS,
                    notices,
                }
            }
            Err(status) => Outcome {
                status,
                notices: Vec::new(),
            },
        }
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Notifies every registrant other than `except` with `kind`.
    fn notify_others(&self, except: &HostId, kind: NotificationType, out: &mut Vec<Notice>) {
        out.extend(
            self.registrants
                .iter()
                .filter(|r| &r.host != except)
                .map(|r| Notice { host: r.host, kind }),
        );
    }

    /// Removes `host`'s registration and what goes with it: a single holder's reservation is
    /// released (Registrants Only types tell the other registrants), an All Registrants
    /// reservation ends with its last registrant.
    fn unregister_one(&mut self, host: &HostId, out: &mut Vec<Notice>) {
        self.registrants.retain(|r| &r.host != host);
        match self.reservation {
            Some((t, Holder::Host(h))) if &h == host => {
                self.reservation = None;
                if t.admits_registrants() {
                    self.notify_others(host, NotificationType::ReservationReleased, out);
                }
            }
            Some((_, Holder::AllRegistrants)) if self.registrants.is_empty() => {
                self.reservation = None;
            }
            _ => {}
        }
    }

    /// Unregisters every host whose key is `key` (the issuer included, if its key matches);
    /// those other than the issuer are told their registration was preempted. Conflict
    /// when none matches.
    fn unregister_by_key(
        &mut self,
        issuer: &HostId,
        key: u64,
        spare_issuer: bool,
        out: &mut Vec<Notice>,
    ) -> Result<(), Status> {
        let victims: Vec<HostId> = self
            .registrants
            .iter()
            .filter(|r| r.key == key && !(spare_issuer && &r.host == issuer))
            .map(|r| r.host)
            .collect();
        if victims.is_empty() && !spare_issuer {
            return Err(conflict());
        }
        for v in victims {
            self.unregister_one(&v, out);
            if &v != issuer {
                out.push(Notice {
                    host: v,
                    kind: NotificationType::RegistrationPreempted,
                });
            }
        }
        Ok(())
    }

    fn register(
        &mut self,
        host: &HostId,
        c: &RegisterCommand,
        out: &mut Vec<Notice>,
    ) -> Result<(), Status> {
        let current = self.registrant(host).map(|r| r.key);
        match (c.action, current) {
            (RegisterAction::Register, Some(k)) if k != c.nrkey => return Err(conflict()),
            (RegisterAction::Register, Some(_)) => {}
            (RegisterAction::Register, None) => self.registrants.push(Registrant {
                host: *host,
                key: c.nrkey,
            }),
            (RegisterAction::Unregister | RegisterAction::Replace, None) => return Err(conflict()),
            (_, Some(k)) if k != c.crkey && !c.iekey => return Err(conflict()),
            (RegisterAction::Unregister, Some(_)) => self.unregister_one(host, out),
            (RegisterAction::Replace, Some(_)) => {
                for r in self.registrants.iter_mut().filter(|r| &r.host == host) {
                    r.key = c.nrkey;
                }
            }
        }
        match c.cptpl {
            ChangePtpl::NoChange => {}
            ChangePtpl::Clear => self.ptpl = false,
            ChangePtpl::Set => self.ptpl = true,
        }
        self.bump();
        Ok(())
    }

    /// The issuer of an Acquire or Release: registered, with `crkey` as its key.
    fn check_issuer(&self, host: &HostId, iekey: bool, crkey: u64) -> Result<(), Status> {
        if iekey {
            return Err(invalid());
        }
        match self.registrant(host) {
            Some(r) if r.key == crkey => Ok(()),
            _ => Err(conflict()),
        }
    }

    fn acquire(
        &mut self,
        host: &HostId,
        c: &AcquireCommand,
        out: &mut Vec<Notice>,
    ) -> Result<(), Status> {
        self.check_issuer(host, c.iekey, c.crkey)?;
        if c.action == AcquireAction::Acquire {
            return match self.reservation {
                None => {
                    self.reservation = Some((c.rtype, Holder::for_type(c.rtype, *host)));
                    Ok(())
                }
                Some((t, _)) if self.holds(host) && t == c.rtype => Ok(()),
                Some(_) => Err(conflict()),
            };
        }
        // Preempt, Preempt and Abort (Base §8.19.8). Commands the preempted hosts already
        // have in flight complete; every later one meets the new reservation.
        match self.reservation {
            None => self.unregister_by_key(host, c.prkey, false, out)?,
            Some((_, Holder::AllRegistrants)) if c.prkey == 0 => {
                self.reservation = Some((c.rtype, Holder::for_type(c.rtype, *host)));
                let others: Vec<HostId> = self
                    .registrants
                    .iter()
                    .map(|r| r.host)
                    .filter(|h| h != host)
                    .collect();
                for h in others {
                    self.unregister_one(&h, out);
                    out.push(Notice {
                        host: h,
                        kind: NotificationType::RegistrationPreempted,
                    });
                }
            }
            Some((_, Holder::AllRegistrants)) => {
                self.unregister_by_key(host, c.prkey, false, out)?
            }
            Some((t, Holder::Host(h))) if &h == host => {
                self.reservation = Some((c.rtype, Holder::for_type(c.rtype, *host)));
                if t != c.rtype {
                    self.notify_others(host, NotificationType::ReservationReleased, out);
                }
            }
            Some((t, Holder::Host(h))) => {
                let holder_key = self.registrant(&h).map(|r| r.key);
                if holder_key == Some(c.prkey) {
                    // The new reservation first, so the holder's removal does not release it.
                    self.reservation = Some((c.rtype, Holder::for_type(c.rtype, *host)));
                    self.unregister_by_key(host, c.prkey, true, out)?;
                    if t != c.rtype {
                        self.notify_others(host, NotificationType::ReservationReleased, out);
                    }
                } else if c.prkey != 0 {
                    self.unregister_by_key(host, c.prkey, false, out)?;
                } else {
                    return Err(invalid());
                }
            }
        }
        self.bump();
        Ok(())
    }

    fn release(
        &mut self,
        host: &HostId,
        c: &ReleaseCommand,
        out: &mut Vec<Notice>,
    ) -> Result<(), Status> {
        self.check_issuer(host, c.iekey, c.crkey)?;
        match c.action {
            ReleaseAction::Release => {
                let Some((t, _)) = self.reservation else {
                    return Ok(());
                };
                if !self.holds(host) {
                    return Ok(());
                }
                if t as u8 != c.rtype {
                    return Err(invalid());
                }
                self.reservation = None;
                if t.admits_registrants() {
                    self.notify_others(host, NotificationType::ReservationReleased, out);
                }
            }
            ReleaseAction::Clear => {
                self.notify_others(host, NotificationType::ReservationPreempted, out);
                self.reservation = None;
                self.registrants.clear();
                self.bump();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
