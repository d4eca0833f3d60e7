//! The `[nvme_tcp]` section of the `serve` configuration: the first listener, more
//! listeners (`[[nvme_tcp.listener]]`, further NVM subsystem ports), the ANA state each
//! listener's groups start in, and the controller ID range of this node.
//!
//! ```toml
//! [nvme_tcp]
//! listen = "0.0.0.0:4420"
//! ana_state = "optimized"        # the default
//! cntlid_min = 1                 # 1..=65519 by default
//! cntlid_max = 32767
//! max_admin_queue_size = 256     # ASQSZ; the default (32..=4096)
//!
//! [[nvme_tcp.listener]]
//! listen = "0.0.0.0:4421"
//! ana_state = "non-optimized"
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::nvme_tcp::{
    AnaState, ListenerConfig, DEFAULT_MAX_ADMIN_QUEUE_SIZE, MAX_CNTLID, MIN_ADMIN_QUEUE_SIZE,
};

/// `[nvme_tcp]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NvmeTcpConfig {
    pub listen: String,
    /// `optimized`, `non-optimized`, `inaccessible`, `persistent-loss` or `change`.
    #[serde(default = "optimized")]
    pub ana_state: String,
    #[serde(default = "one")]
    pub cntlid_min: u16,
    #[serde(default = "max_cntlid")]
    pub cntlid_max: u16,
    /// Largest admin queue a host may connect (ASQSZ in the discovery log).
    #[serde(default = "max_admin_queue_size")]
    pub max_admin_queue_size: u16,
    /// More listeners.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<NvmeTcpListener>,
}

/// `[[nvme_tcp.listener]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NvmeTcpListener {
    pub listen: String,
    #[serde(default = "optimized")]
    pub ana_state: String,
}

fn optimized() -> String {
    "optimized".into()
}
fn one() -> u16 {
    1
}
fn max_cntlid() -> u16 {
    MAX_CNTLID
}
fn max_admin_queue_size() -> u16 {
    DEFAULT_MAX_ADMIN_QUEUE_SIZE
}

impl NvmeTcpConfig {
    /// One listener on `listen`, every other field at its default.
    pub fn at(listen: impl Into<String>) -> Self {
        Self {
            listen: listen.into(),
            ana_state: optimized(),
            cntlid_min: 1,
            cntlid_max: MAX_CNTLID,
            max_admin_queue_size: DEFAULT_MAX_ADMIN_QUEUE_SIZE,
            listeners: Vec::new(),
        }
    }

    /// Checks the section; errors name the field (`nvme_tcp.listener[1].ana_state`).
    pub fn check(&self) -> Result<(), (String, String)> {
        parse_addr("nvme_tcp.listen", &self.listen)?;
        parse_state("nvme_tcp.ana_state", &self.ana_state)?;
        if self.cntlid_min == 0 || self.cntlid_min > self.cntlid_max || self.cntlid_max > MAX_CNTLID
        {
            return Err((
                "nvme_tcp.cntlid_min".into(),
                format!(
                    "{}..={} is not a range within 1..={MAX_CNTLID}",
                    self.cntlid_min, self.cntlid_max
                ),
            ));
        }
        if !(MIN_ADMIN_QUEUE_SIZE..=4096).contains(&self.max_admin_queue_size) {
            return Err((
                "nvme_tcp.max_admin_queue_size".into(),
                format!(
                    "{} is not in {MIN_ADMIN_QUEUE_SIZE}..=4096 entries",
                    self.max_admin_queue_size
                ),
            ));
        }
        let mut seen = vec![self.listen.as_str()];
        for (i, l) in self.listeners.iter().enumerate() {
            parse_addr(&format!("nvme_tcp.listener[{i}].listen"), &l.listen)?;
            parse_state(&format!("nvme_tcp.listener[{i}].ana_state"), &l.ana_state)?;
            // Port 0 (any free port) may appear more than once.
            if !l.listen.ends_with(":0") && seen.contains(&l.listen.as_str()) {
                return Err((
                    format!("nvme_tcp.listener[{i}].listen"),
                    format!("'{}' is used twice", l.listen),
                ));
            }
            seen.push(&l.listen);
        }
        Ok(())
    }

    /// The first listener's address and ANA state (after [`check`](Self::check)).
    pub fn first(&self) -> Result<(SocketAddr, AnaState), (String, String)> {
        Ok((
            parse_addr("nvme_tcp.listen", &self.listen)?,
            parse_state("nvme_tcp.ana_state", &self.ana_state)?,
        ))
    }

    /// The further listeners (after [`check`](Self::check)).
    pub fn more(&self) -> Result<Vec<ListenerConfig>, (String, String)> {
        self.listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(ListenerConfig {
                    listen: parse_addr(&format!("nvme_tcp.listener[{i}].listen"), &l.listen)?,
                    ana_state: parse_state(
                        &format!("nvme_tcp.listener[{i}].ana_state"),
                        &l.ana_state,
                    )?,
                })
            })
            .collect()
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, (String, String)> {
    s.parse()
        .map_err(|e| (field.to_string(), format!("'{s}': {e}")))
}

fn parse_state(field: &str, s: &str) -> Result<AnaState, (String, String)> {
    AnaState::parse(s).ok_or_else(|| {
        (
            field.to_string(),
            format!("'{s}': optimized, non-optimized, inaccessible, persistent-loss or change"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NvmeTcpConfig, String> {
        toml::from_str::<NvmeTcpConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn listeners_states_and_cntlid_range_parse() {
        let c = parse(
            "listen = \"127.0.0.1:4420\"\ncntlid_min = 100\ncntlid_max = 199\n\
             [[listener]]\nlisten = \"127.0.0.1:4421\"\nana_state = \"inaccessible\"\n",
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(
            c.first().unwrap(),
            ("127.0.0.1:4420".parse().unwrap(), AnaState::Optimized)
        );
        assert_eq!(c.more().unwrap()[0].ana_state, AnaState::Inaccessible);
        assert_eq!((c.cntlid_min, c.cntlid_max), (100, 199));
        let plain = parse("listen = \"127.0.0.1:4420\"\n").unwrap();
        assert_eq!(plain, NvmeTcpConfig::at("127.0.0.1:4420"));
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("listen = \"x\"\n", "nvme_tcp.listen"),
            ("listen = \"127.0.0.1:1\"\nana_state = \"standby\"\n", "nvme_tcp.ana_state"),
            ("listen = \"127.0.0.1:1\"\ncntlid_min = 0\n", "nvme_tcp.cntlid_min"),
            (
                "listen = \"127.0.0.1:1\"\nmax_admin_queue_size = 31\n",
                "nvme_tcp.max_admin_queue_size",
            ),
            ("listen = \"127.0.0.1:1\"\ncntlid_min = 9\ncntlid_max = 8\n", "nvme_tcp.cntlid_min"),
            ("listen = \"127.0.0.1:1\"\ncntlid_max = 65520\n", "nvme_tcp.cntlid_min"),
            ("listen = \"127.0.0.1:1\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\n", "nvme_tcp.listener[0].listen"),
            ("listen = \"127.0.0.1:1\"\n[[listener]]\nlisten = \"127.0.0.1:2\"\nana_state = \"x\"\n", "nvme_tcp.listener[0].ana_state"),
        ];
        for (text, want) in cases {
            let (field, _) = parse(text).unwrap().check().unwrap_err();
            assert_eq!(field, want, "{text}");
        }
    }
}
