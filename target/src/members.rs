//! A volume's leg list as changed at run time (`leg_add`, `leg_remove`), kept beside the data
//! so that a restart brings back what the operator built.
//!
//! The superblocks on the legs are the truth about *membership* (how many slots, which are in
//! sync, stale, detached or removed); this file only remembers *where* each slot's device is,
//! which a superblock cannot say. It lives at `<data_dir>/<volume>.legs.json`, is replaced
//! atomically (write, fsync, rename, fsync the directory) after every change, and records the
//! configured leg list it was derived from. At start-up:
//!
//! - no file: the configured legs are used;
//! - a file whose `configured` list equals today's configured legs: its `legs` are used (the
//!   RPC changes win over a config that has not been edited since);
//! - a file whose `configured` list differs: the operator edited the configuration after the
//!   RPC change, so the configuration wins and the file is ignored, with a warning.
//!
//! Either way the legs' superblocks then decide: a leg count that does not match them is
//! refused with a message naming both.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One leg slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLeg {
    pub uri: String,
    /// Retired by `leg_remove`: the slot stays taken, the device is not opened again.
    #[serde(default)]
    pub removed: bool,
}

/// The file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub volume: String,
    /// The configured legs this list was derived from.
    pub configured: Vec<String>,
    /// Every slot, by leg index.
    pub legs: Vec<MemberLeg>,
}

impl Membership {
    /// The list for `configured` legs before any run-time change.
    pub fn from_config(volume: &str, configured: &[String]) -> Self {
        Self {
            volume: volume.to_string(),
            configured: configured.to_vec(),
            legs: configured
                .iter()
                .map(|u| MemberLeg {
                    uri: u.clone(),
                    removed: false,
                })
                .collect(),
        }
    }

    /// Where the list of `volume` lives.
    pub fn path(data_dir: &Path, volume: &str) -> PathBuf {
        data_dir.join(format!("{volume}.legs.json"))
    }

    /// The list to start `volume` with: the stored one when it was derived from the same
    /// configured legs, else the configured legs (see the module docs).
    pub fn resolve(path: &Path, volume: &str, configured: &[String]) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::from_config(volume, configured))
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let stored: Self = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a leg list: {e}", path.display()))?;
        if stored.volume != volume {
            return Err(format!(
                "{}: it lists the legs of volume '{}'",
                path.display(),
                stored.volume
            ));
        }
        if stored.configured != configured {
            tracing::warn!(
                volume,
                file = %path.display(),
                "the configured legs changed since the last leg_add/leg_remove; using the configuration"
            );
            return Ok(Self::from_config(volume, configured));
        }
        if stored.legs.as_slice() != Self::from_config(volume, configured).legs.as_slice() {
            tracing::info!(
                volume,
                file = %path.display(),
                legs = ?stored.legs.iter().map(|l| if l.removed { "(removed)" } else { l.uri.as_str() }).collect::<Vec<_>>(),
                "legs as changed at run time"
            );
        }
        Ok(stored)
    }

    /// Replaces the file atomically: a crash leaves either the old list or the new one.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        crate::durable::replace_file(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stored_list_wins_until_the_config_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = Membership::path(dir.path(), "vol0");
        let cfg = legs(&["file:///a", "file:///b"]);
        assert_eq!(
            Membership::resolve(&path, "vol0", &cfg).unwrap(),
            Membership::from_config("vol0", &cfg)
        );
        let mut m = Membership::from_config("vol0", &cfg);
        m.legs.push(MemberLeg {
            uri: "file:///c".into(),
            removed: false,
        });
        m.legs[1].removed = true;
        m.store(&path).unwrap();
        assert_eq!(Membership::resolve(&path, "vol0", &cfg).unwrap(), m);
        // The operator edited the configuration since: it wins.
        let edited = legs(&["file:///a", "file:///d"]);
        assert_eq!(
            Membership::resolve(&path, "vol0", &edited)
                .unwrap()
                .legs
                .len(),
            2
        );
        // Another volume's file, or garbage, is an error naming the file.
        let err = Membership::resolve(&path, "vol1", &cfg).unwrap_err();
        assert!(err.contains("vol0") && err.contains("legs.json"), "{err}");
        std::fs::write(&path, "{").unwrap();
        let err = Membership::resolve(&path, "vol0", &cfg).unwrap_err();
        assert!(err.contains("not a leg list"), "{err}");
    }
}
