//! The live configuration: the one [`Config`] value `serve` runs with, changed by the object
//! RPCs (`volume_create`, `subsystem_create`, `namespace_add`, `listener_add`, … and
//! `leg_add`/`leg_remove`) and kept in `<data_dir>/nvmirror.live.toml` so that a restart
//! brings back what the operator built.
//!
//! Every change is checked by building the new `Config` and running the same
//! [`Config::validate`] as the file; only then is it applied, and the file replaced
//! atomically (write, fsync, rename, fsync the directory).
//!
//! The file's first line records the *base*: a CRC-32C of the configuration text `serve`
//! was started with (`--config`, or the embedded default) and of its command-line flags.
//! At start-up (one rule):
//!
//! - no live file: the configuration (with the flags applied) is used;
//! - a live file with the same base: the live file is used as it is (the configuration and
//!   the flags have not changed since the RPC changes were made; the flags are in it);
//! - a live file with another base: the configuration was edited, other flags were given,
//!   or another file (e.g. one `save_config` wrote): the configuration with the flags is
//!   used, and the live file is rewritten from it.
//!
//! Either way a log line says which.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{Config, ConfigError};

/// The live file's name in the data directory.
pub const LIVE_FILE: &str = "nvmirror.live.toml";

const BASE_PREFIX: &str = "# nvmirror live configuration; base ";

/// The base of configuration text `text`.
pub fn base_of(text: &str) -> String {
    format!("{:08x}", crc32c::crc32c(text.as_bytes()))
}

/// Where the live file of `data_dir` is.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(LIVE_FILE)
}

/// The text to start from: the live file's when its base is `base`, else `None` (with the
/// log line saying why).
pub fn choose(live: &Path, base: &str, config_name: &str) -> Result<Option<String>, ConfigError> {
    let text = match std::fs::read_to_string(live) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(
                config = config_name,
                "no live configuration yet; using the configuration"
            );
            return Ok(None);
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: live.to_path_buf(),
                source,
            })
        }
    };
    let stored = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(BASE_PREFIX))
        .map(str::trim);
    if stored == Some(base) {
        tracing::info!(
            live = %live.display(),
            config = config_name,
            "using the live configuration (the run-time changes made since {config_name} was loaded)"
        );
        Ok(Some(text))
    } else {
        tracing::warn!(
            live = %live.display(),
            config = config_name,
            "{config_name} differs from the one the live configuration was derived from; using {config_name}"
        );
        Ok(None)
    }
}

/// The configuration as TOML (what `save_config` writes).
pub fn to_toml(cfg: &Config) -> String {
    toml::to_string(cfg).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

/// Why a change did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// The new configuration is not valid (the message names the field) or the change
    /// makes no sense now.
    Refused(String),
    /// Applying it failed (a leg that cannot be opened, an address in use), or it could not
    /// be saved.
    Failed(String),
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// The live configuration and where it is kept.
#[derive(Debug)]
pub struct LiveConfig {
    cfg: Mutex<Config>,
    path: PathBuf,
    base: String,
}

impl LiveConfig {
    /// `cfg` as `serve` starts with it, derived from configuration text with `base`.
    pub fn new(cfg: Config, base: String) -> Self {
        let path = path_in(&cfg.data_dir);
        Self {
            cfg: Mutex::new(cfg),
            path,
            base,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the configuration as it is now.
    pub fn current(&self) -> Config {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Config> {
        self.cfg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one change: `edit` builds the new configuration from a copy of the current one
    /// (an error refuses it), [`Config::validate`] checks it (`what` names the change in its
    /// errors), `apply` makes it happen and may fill in what only applying tells (a port
    /// bound for port 0); an error there leaves everything as it was. Then the new
    /// configuration is kept and persisted. Changes run one at a time.
    pub fn change<T>(
        &self,
        what: &str,
        edit: impl FnOnce(&mut Config) -> Result<(), String>,
        apply: impl FnOnce(&mut Config) -> Result<T, String>,
    ) -> Result<T, ChangeError> {
        let mut cur = self.lock();
        let mut next = cur.clone();
        edit(&mut next).map_err(ChangeError::Refused)?;
        next.validate(what)
            .map_err(|e| ChangeError::Refused(e.to_string()))?;
        let out = apply(&mut next).map_err(ChangeError::Failed)?;
        *cur = next;
        self.store(&cur).map_err(|e| {
            ChangeError::Failed(format!(
                "the change is made but could not be saved to {}: {e}; a restart would not know it",
                self.path.display()
            ))
        })?;
        Ok(out)
    }

    /// Writes the file now (at start-up, so that its base is recorded).
    pub fn persist(&self) -> std::io::Result<()> {
        let cur = self.lock();
        self.store(&cur)
    }

    fn store(&self, cfg: &Config) -> std::io::Result<()> {
        let text = format!("{BASE_PREFIX}{}\n{}", self.base, to_toml(cfg));
        crate::durable::replace_file(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_file_round_trips_and_is_chosen_only_for_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = \"{}\"\n[nvme_tcp]\nlisten = \"127.0.0.1:4420\"\n[[nvme_tcp.listener]]\nlisten = \"127.0.0.1:4421\"\n\
             [[volume]]\nname = \"v\"\nlegs = [\"mem://64MiB\"]\n[[subsystem]]\nnqn = \"nqn.x:y\"\nnamespaces = [\"v\"]\n\
             [[subsystem.host]]\nnqn = \"nqn.h\"\n",
            dir.path().display()
        );
        let cfg = Config::parse_str(&text, "t").unwrap();
        let live = LiveConfig::new(cfg.clone(), base_of(&text));
        live.persist().unwrap();
        let back = choose(live.path(), &base_of(&text), "t").unwrap().unwrap();
        assert_eq!(Config::parse_str(&back, "live").unwrap(), cfg);
        assert!(choose(live.path(), &base_of("edited"), "t")
            .unwrap()
            .is_none());
        assert!(choose(&dir.path().join("none"), "x", "t")
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_default_and_the_shipped_example_round_trip_through_toml() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nvmirror.toml");
        for cfg in [Config::embedded_default(), Config::load(&example).unwrap()] {
            let text = to_toml(&cfg);
            assert_eq!(Config::parse_str(&text, "saved").unwrap(), cfg, "{text}");
        }
    }

    #[test]
    fn a_change_is_validated_before_it_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::parse_str("", "t").unwrap();
        cfg.data_dir = dir.path().to_path_buf();
        let live = LiveConfig::new(cfg, "0".into());
        let err = live
            .change(
                "RPC",
                |c| {
                    c.subsystems.push(crate::config::SubsystemConfig {
                        nqn: "bad".into(),
                        serial: None,
                        model: "m".into(),
                        allowed_hosts: vec![],
                        namespaces: vec![],
                        hosts: vec![],
                    });
                    Ok(())
                },
                |_| -> Result<(), String> { panic!("applied an invalid change") },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("subsystem[0].nqn"), "{err}");
        assert!(live.current().subsystems.is_empty());
        assert!(!live.path().exists());
    }
}
