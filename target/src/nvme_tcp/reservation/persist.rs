//! The reservation state of a namespace on disk while Persist Through Power Loss is set: a
//! small JSON file under the data directory, replaced atomically on every change and removed
//! when PTPL is cleared. Without PTPL nothing is written and a restart begins with no
//! registrants and no reservation, as after a power loss.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use nvmirror_nvme::spec::reservation::ReservationType;

use super::state::{Holder, HostId, Registrant, ReservationState};

/// Where one namespace's state is saved.
#[derive(Debug)]
pub(super) struct Store {
    path: PathBuf,
    subnqn: String,
    nsid: u32,
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    subsystem: String,
    nsid: u32,
    generation: u32,
    /// Reservation type (1..=6), absent when not reserved.
    #[serde(default)]
    rtype: Option<u8>,
    /// The holding host's identifier in hex, or "all registrants".
    #[serde(default)]
    holder: Option<String>,
    registrants: Vec<SavedRegistrant>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedRegistrant {
    host: String,
    key: u64,
}

const ALL_REGISTRANTS: &str = "all registrants";

fn hex(h: &HostId) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<HostId> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut h = [0u8; 16];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(h)
}

impl Store {
    pub fn new(path: PathBuf, subnqn: &str, nsid: u32) -> Self {
        Self {
            path,
            subnqn: subnqn.to_string(),
            nsid,
        }
    }

    /// The saved state, `None` when there is none; an error names the file and the field.
    pub fn load(&self) -> Result<Option<ReservationState>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let bad = |what: String| format!("{}: {what}", self.path.display());
        let s: SavedState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if s.subsystem != self.subnqn || s.nsid != self.nsid {
            return Err(bad(format!(
                "saved for {} namespace {}, not {} namespace {}",
                s.subsystem, s.nsid, self.subnqn, self.nsid
            )));
        }
        let mut registrants = Vec::with_capacity(s.registrants.len());
        for r in &s.registrants {
            let host = unhex(&r.host).ok_or_else(|| {
                bad(format!(
                    "registrants: host {:?} is not 32 hex digits",
                    r.host
                ))
            })?;
            if registrants.iter().any(|o: &Registrant| o.host == host) {
                return Err(bad(format!("registrants: host {} appears twice", r.host)));
            }
            registrants.push(Registrant { host, key: r.key });
        }
        let reservation = match (s.rtype, s.holder.as_deref()) {
            (None, None) => None,
            (Some(t), Some(h)) => {
                let t = ReservationType::from_u8(t)
                    .ok_or_else(|| bad(format!("rtype: {t} is not a reservation type")))?;
                let holder =
                    if h == ALL_REGISTRANTS && t.all_registrants() && !registrants.is_empty() {
                        Holder::AllRegistrants
                    } else {
                        let host = unhex(h)
                            .filter(|h| {
                                !t.all_registrants() && registrants.iter().any(|r| &r.host == h)
                            })
                            .ok_or_else(|| {
                                bad(format!(
                                    "holder: {h:?} is not a registrant holding a {t:?} reservation"
                                ))
                            })?;
                        Holder::Host(host)
                    };
                Some((t, holder))
            }
            _ => return Err(bad("rtype and holder: one without the other".into())),
        };
        Ok(Some(ReservationState {
            generation: s.generation,
            ptpl: true,
            registrants,
            reservation,
        }))
    }

    pub fn save(&self, st: &ReservationState) -> std::io::Result<()> {
        let saved = SavedState {
            subsystem: self.subnqn.clone(),
            nsid: self.nsid,
            generation: st.generation,
            rtype: st.reservation.map(|(t, _)| t as u8),
            holder: st.reservation.map(|(_, h)| match h {
                Holder::Host(h) => hex(&h),
                Holder::AllRegistrants => ALL_REGISTRANTS.to_string(),
            }),
            registrants: st
                .registrants
                .iter()
                .map(|r| SavedRegistrant {
                    host: hex(&r.host),
                    key: r.key,
                })
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&saved).map_err(std::io::Error::other)?;
        text.push('\n');
        crate::durable::replace_file(&self.path, text.as_bytes())
    }

    pub fn remove(&self) -> std::io::Result<()> {
        crate::durable::remove_file(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_and_bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("v.json"), "nqn.a", 1);
        for (t, holder) in [
            (ReservationType::WriteExclusive, Holder::Host([1; 16])),
            (
                ReservationType::ExclusiveAccessAllRegistrants,
                Holder::AllRegistrants,
            ),
        ] {
            let st = ReservationState {
                generation: 9,
                ptpl: true,
                registrants: vec![
                    Registrant {
                        host: [1; 16],
                        key: 5,
                    },
                    Registrant {
                        host: [2; 16],
                        key: u64::MAX,
                    },
                ],
                reservation: Some((t, holder)),
            };
            store.save(&st).unwrap();
            assert_eq!(store.load().unwrap(), Some(st));
        }
        let other = Store::new(dir.path().join("v.json"), "nqn.b", 1);
        assert!(other.load().unwrap_err().contains("nqn.a"));
        let text = std::fs::read_to_string(dir.path().join("v.json")).unwrap();
        std::fs::write(
            dir.path().join("v.json"),
            text.replace("\"rtype\": 6", "\"rtype\": 9"),
        )
        .unwrap();
        assert!(store.load().unwrap_err().contains("rtype"));
        store.remove().unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.remove().unwrap();
    }
}
