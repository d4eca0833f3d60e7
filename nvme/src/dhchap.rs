//! DH-HMAC-CHAP secrets and responses (NVMe Base 2.0 §8.13.5, TP 8006), as the Linux host
//! (`drivers/nvme/common/auth.c`, `drivers/nvme/host/auth.c`) computes them.
//!
//! A secret is written `DHHC-1:XX:<base64>:`: the base64 of the key (32, 48 or 64 bytes)
//! followed by its CRC-32 (IEEE, little-endian); `XX` names the hash that transforms the key
//! before use (`00` none, `01` SHA-256, `02` SHA-384, `03` SHA-512), the format
//! `nvme gen-dhchap-key` writes. Only the NULL Diffie-Hellman group is implemented: the
//! challenge and response then carry no DH value and the session needs no key exchange.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384, Sha512};

/// The label appended to the NQN in the key transform (Base §8.13.5.7).
const TRANSFORM_LABEL: &[u8] = b"NVMe-over-Fabrics";

/// Hash functions of DH-HMAC-CHAP (HashID, Base figure "DH-HMAC-CHAP Hash Functions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HashId {
    Sha256 = 0x01,
    Sha384 = 0x02,
    Sha512 = 0x03,
}

impl HashId {
    /// Every hash, strongest last (the order the Linux host offers them).
    pub const ALL: [Self; 3] = [Self::Sha256, Self::Sha384, Self::Sha512];

    /// Decodes a HashID.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Sha256,
            0x02 => Self::Sha384,
            0x03 => Self::Sha512,
            _ => return None,
        })
    }

    /// Digest length in bytes (HL in the messages).
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// HMAC over the concatenation of `parts`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key)
                .expect("HMAC takes a key of any length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha256 => run::<Hmac<Sha256>>(key, parts),
            Self::Sha384 => run::<Hmac<Sha384>>(key, parts),
            Self::Sha512 => run::<Hmac<Sha512>>(key, parts),
        }
    }
}

/// Why a `DHHC-1:` secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("does not start with 'DHHC-1:'")]
    Prefix,
    #[error("the key transform must be 00, 01, 02 or 03")]
    Transform,
    #[error("must end with ':' after the base64 key")]
    Suffix,
    #[error("the key is not valid base64")]
    Base64,
    #[error("the key is {0} bytes; it must be 32, 48 or 64 (plus 4 of CRC-32)")]
    Length(usize),
    #[error("the key's CRC-32 does not match")]
    Crc,
}

/// A DH-HMAC-CHAP secret as configured (`DHHC-1:XX:<base64>:`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The hash of the key transform; `None` (`00`): the key is used as it is.
    pub transform: Option<HashId>,
    /// The key bytes (32, 48 or 64).
    pub key: Vec<u8>,
}

/// Secrets never appear in logs.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("transform", &self.transform)
            .field("key_len", &self.key.len())
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// Parses `DHHC-1:XX:<base64 of key || CRC-32 LE>:`.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let rest = s.strip_prefix("DHHC-1:").ok_or(SecretError::Prefix)?;
        let (xx, rest) = rest.split_once(':').ok_or(SecretError::Transform)?;
        let transform = match xx {
            "00" => None,
            "01" | "02" | "03" => HashId::from_u8(xx.as_bytes()[1] - b'0'),
            _ => return Err(SecretError::Transform),
        };
        let b64 = rest.strip_suffix(':').ok_or(SecretError::Suffix)?;
        let raw = STANDARD.decode(b64).map_err(|_| SecretError::Base64)?;
        let key_len = raw.len().saturating_sub(4);
        if raw.len() < 4 || ![32, 48, 64].contains(&key_len) {
            return Err(SecretError::Length(key_len));
        }
        let (key, crc) = raw.split_at(key_len);
        if crc32fast::hash(key).to_le_bytes() != crc {
            return Err(SecretError::Crc);
        }
        Ok(Self {
            transform,
            key: key.to_vec(),
        })
    }

    /// The `DHHC-1:` text of this secret.
    pub fn encode(&self) -> String {
        let mut raw = self.key.clone();
        raw.extend_from_slice(&crc32fast::hash(&self.key).to_le_bytes());
        let xx = self.transform.map_or(0, |h| h as u8);
        format!("DHHC-1:{xx:02}:{}:", STANDARD.encode(raw))
    }

    /// The key used in responses: HMAC(key, `nqn` || "NVMe-over-Fabrics") with the transform
    /// hash, or the key itself. The host's secret is transformed with the host NQN, the
    /// controller's with the subsystem NQN.
    pub fn transformed(&self, nqn: &str) -> Vec<u8> {
        match self.transform {
            None => self.key.clone(),
            Some(h) => h.hmac(&self.key, &[nqn.as_bytes(), TRANSFORM_LABEL]),
        }
    }
}

/// What a response authenticates: the values of one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    pub hash: HashId,
    /// The challenge (C1 from the controller, C2 from the host), `hash.digest_len()` bytes.
    pub challenge: &'a [u8],
    /// The sequence number sent with the challenge (S1, S2).
    pub seqnum: u32,
    /// Transaction identifier (T_ID).
    pub tid: u16,
    /// Secure channel concatenation (SC_C), 0 here.
    pub sc_c: u8,
    pub hostnqn: &'a str,
    pub subnqn: &'a str,
}

impl Transcript<'_> {
    /// The host's response R1 = HMAC(Kh, C1 || S1 || T_ID || SC_C || "HostHost" || NQNh ||
    /// 00h || NQNc), `key` the transformed host secret.
    pub fn host_response(&self, key: &[u8]) -> Vec<u8> {
        self.response(key, b"HostHost", self.hostnqn, self.subnqn)
    }

    /// The controller's response R2 = HMAC(Kc, C2 || S2 || T_ID || SC_C || "Controller" ||
    /// NQNc || 00h || NQNh), `key` the transformed controller secret.
    pub fn controller_response(&self, key: &[u8]) -> Vec<u8> {
        self.response(key, b"Controller", self.subnqn, self.hostnqn)
    }

    fn response(&self, key: &[u8], label: &[u8], first: &str, second: &str) -> Vec<u8> {
        self.hash.hmac(
            key,
            &[
                self.challenge,
                &self.seqnum.to_le_bytes(),
                &self.tid.to_le_bytes(),
                &[self.sc_c],
                label,
                first.as_bytes(),
                &[0],
                second.as_bytes(),
            ],
        )
    }
}

/// Compares two responses without an early exit.
pub fn responses_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_malformed_secrets() {
        let good = Secret {
            transform: Some(HashId::Sha256),
            key: vec![7; 32],
        }
        .encode();
        assert!(Secret::parse(&good).is_ok());
        assert_eq!(Secret::parse("DHHC-2:00:x:"), Err(SecretError::Prefix));
        assert_eq!(
            Secret::parse(&good.replace(":01:", ":04:")),
            Err(SecretError::Transform)
        );
        assert_eq!(
            Secret::parse(good.trim_end_matches(':')),
            Err(SecretError::Suffix)
        );
        assert_eq!(Secret::parse("DHHC-1:00:!!!!:"), Err(SecretError::Base64));
        let short = format!("DHHC-1:00:{}:", STANDARD.encode([1u8; 20]));
        assert_eq!(Secret::parse(&short), Err(SecretError::Length(16)));
        let mut raw = vec![7u8; 32];
        raw.extend_from_slice(&[0, 0, 0, 0]);
        let bad_crc = format!("DHHC-1:00:{}:", STANDARD.encode(raw));
        assert_eq!(Secret::parse(&bad_crc), Err(SecretError::Crc));
    }

    /// `nvme gen-dhchap-key --secret=aa..aa --hmac=H --nqn=N` (nvme-cli 2.3) prints the
    /// secret with its CRC-32 and, for H > 0, the key already transformed with N.
    #[test]
    fn matches_nvme_cli_gen_dhchap_key() {
        let raw = Secret::parse("DHHC-1:00:qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqppAbGi:")
            .expect("nvme-cli's secret parses");
        assert_eq!(raw.key, vec![0xaa; 32]);
        assert_eq!(raw.transform, None);
        let cli = Secret::parse("DHHC-1:01:hB6RKHtl5ocyie87X7uckXE/RLGoWil9b9ibedvC/MsHrqD6:")
            .expect("nvme-cli's transformed secret parses");
        let ours = Secret {
            transform: Some(HashId::Sha256),
            key: vec![0xaa; 32],
        };
        assert_eq!(
            ours.transformed("nqn.2014-08.org.nvmexpress:uuid:test"),
            cli.key
        );
        assert_ne!(ours.transformed("nqn.other"), cli.key);
    }

    #[test]
    fn debug_hides_the_key() {
        let s = Secret {
            transform: None,
            key: vec![0x5a; 32],
        };
        assert!(!format!("{s:?}").contains("90"));
    }

    #[test]
    fn responses_depend_on_every_input() {
        let c = [3u8; 32];
        let t = Transcript {
            hash: HashId::Sha256,
            challenge: &c,
            seqnum: 1,
            tid: 2,
            sc_c: 0,
            hostnqn: "nqn.h",
            subnqn: "nqn.s",
        };
        let r = t.host_response(b"k");
        assert_eq!(r.len(), 32);
        assert_ne!(r, t.controller_response(b"k"));
        assert_ne!(r, Transcript { seqnum: 2, ..t }.host_response(b"k"));
        assert_ne!(r, Transcript { tid: 3, ..t }.host_response(b"k"));
        assert_ne!(r, t.host_response(b"j"));
        assert!(responses_match(&r, &t.host_response(b"k")));
        assert!(!responses_match(&r, &r[..31]));
    }

    proptest! {
        #[test]
        fn secrets_round_trip(len in prop::sample::select(vec![32usize, 48, 64]),
                              xx in 0u8..4, seed in any::<u64>()) {
            let key: Vec<u8> = (0..len as u64).map(|i| (seed.wrapping_mul(i + 1) >> 7) as u8).collect();
            let s = Secret { transform: HashId::from_u8(xx), key };
            prop_assert_eq!(Secret::parse(&s.encode()), Ok(s));
        }

        #[test]
        fn parse_never_panics(text in "DHHC-1:[0-9]{0,3}:[A-Za-z0-9+/=:]{0,100}") {
            let _ = Secret::parse(&text);
        }
    }
}
