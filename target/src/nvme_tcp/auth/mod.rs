//! DH-HMAC-CHAP in-band authentication of one host queue (NVMe Base 2.0 §8.13.5).
//!
//! A queue whose host has a secret in the subsystem config answers its Connect with ATR set
//! and accepts nothing but Authentication Send/Receive (and Disconnect) until the exchange
//! ends in success:
//!
//! ```text
//! host                                   controller (QueueAuth)
//! Auth Send  AUTH_Negotiate      ──►     AwaitNegotiate → ChallengeReady
//! Auth Recv                      ◄──     DH-HMAC-CHAP_Challenge (C1, S1) → AwaitReply
//! Auth Send  Reply (R1[, C2, S2]) ──►    checks R1 → Success1Ready (or Failure1Ready)
//! Auth Recv                      ◄──     Success1 [R2] → done (or AwaitSuccess2)
//! Auth Send  Success2 / Failure2 ──►     done / failed
//! ```
//!
//! Only the NULL DH group is offered. Every message is the host's to get wrong: a bad one
//! moves the queue to Failure1, which the next Authentication Receive returns, and the queue
//! stays unauthenticated.

mod commands;

use nvmirror_nvme::dhchap::{responses_match, HashId, Secret, Transcript};
use nvmirror_nvme::spec::auth::{failure, AuthMessage, FailureFrom, DHGROUP_NULL};
use rand::RngCore;

pub(crate) use commands::{auth_receive, auth_send, MAX_SEND_LEN};

/// The secrets of one host in a subsystem's config.
#[derive(Clone, Debug)]
pub struct HostSecrets {
    /// The host's secret (`dhchap_secret`): the host proves it knows it.
    pub host: Secret,
    /// The controller's secret (`dhchap_ctrl_secret`): set, the controller can prove itself
    /// to a host that asks (bidirectional authentication).
    pub ctrl: Option<Secret>,
}

/// Where one transaction is.
#[derive(Debug)]
enum Step {
    AwaitNegotiate,
    ChallengeReady {
        tid: u16,
        hash: HashId,
    },
    AwaitReply {
        tid: u16,
        hash: HashId,
    },
    Success1Ready {
        tid: u16,
        hash: HashId,
        r2: Option<Vec<u8>>,
    },
    AwaitSuccess2 {
        tid: u16,
    },
    Failure1Ready {
        tid: u16,
        explanation: u8,
    },
    Failed,
}

/// The authentication state of one queue.
#[derive(Debug)]
pub(crate) struct QueueAuth {
    keys: HostSecrets,
    hostnqn: String,
    subnqn: String,
    step: Step,
    /// C1 and S1 of the transaction in progress.
    c1: Vec<u8>,
    s1: u32,
    authenticated: bool,
}

impl QueueAuth {
    pub fn new(keys: HostSecrets, hostnqn: &str, subnqn: &str) -> Self {
        Self {
            keys,
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            step: Step::AwaitNegotiate,
            c1: Vec::new(),
            s1: 0,
            authenticated: false,
        }
    }

    /// Whether the host has proved itself (and the queue may carry other commands).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    fn fail(&mut self, tid: u16, explanation: u8, reason: &str) {
        tracing::warn!(host = %self.hostnqn, subsystem = %self.subnqn, "authentication failed: {reason}");
        self.authenticated = false;
        self.step = Step::Failure1Ready { tid, explanation };
    }

    /// An Authentication Send's message.
    pub fn on_send(&mut self, bytes: &[u8]) {
        let msg = match AuthMessage::parse(bytes) {
            Ok(m) => m,
            Err(e) => return self.fail(0, e.explanation, e.reason),
        };
        let step = std::mem::replace(&mut self.step, Step::Failed);
        match (step, msg) {
            (
                Step::AwaitNegotiate | Step::Failed,
                AuthMessage::Negotiate {
                    tid,
                    sc_c,
                    hashes,
                    dhgroups,
                },
            ) => self.negotiate(tid, sc_c, &hashes, &dhgroups),
            (
                Step::AwaitReply { tid, hash },
                AuthMessage::Reply {
                    tid: t,
                    response,
                    challenge,
                    seqnum,
                    dh_value,
                },
            ) => {
                if t != tid {
                    return self.fail(
                        tid,
                        failure::INCORRECT_PAYLOAD,
                        "Reply for another transaction",
                    );
                }
                if response.len() != hash.digest_len() || !dh_value.is_empty() {
                    return self.fail(
                        tid,
                        failure::INCORRECT_PAYLOAD,
                        "Reply with a wrong hash length or a DH value",
                    );
                }
                self.reply(tid, hash, &response, challenge.as_deref(), seqnum);
            }
            (Step::AwaitSuccess2 { tid }, AuthMessage::Success2 { tid: t }) if t == tid => {
                tracing::info!(host = %self.hostnqn, subsystem = %self.subnqn, "host authenticated (bidirectional)");
                self.authenticated = true;
                self.step = Step::AwaitNegotiate;
            }
            (
                _,
                AuthMessage::Failure {
                    from: FailureFrom::Host,
                    explanation,
                    ..
                },
            ) => {
                tracing::warn!(host = %self.hostnqn, subsystem = %self.subnqn, explanation, "host refused the controller's response (AUTH_Failure2)");
                self.authenticated = false;
                self.step = Step::Failed;
            }
            (_, _) => self.fail(0, failure::INCORRECT_MESSAGE, "message out of sequence"),
        }
    }

    fn negotiate(&mut self, tid: u16, sc_c: u8, hashes: &[u8], dhgroups: &[u8]) {
        if sc_c != 0 {
            return self.fail(
                tid,
                failure::CONCAT_MISMATCH,
                "secure channel concatenation requested",
            );
        }
        let Some(hash) = hashes.iter().find_map(|&h| HashId::from_u8(h)) else {
            return self.fail(
                tid,
                failure::HASH_UNUSABLE,
                "no usable hash function offered",
            );
        };
        if !dhgroups.contains(&DHGROUP_NULL) {
            return self.fail(
                tid,
                failure::DHGROUP_UNUSABLE,
                "the NULL DH group is not offered",
            );
        }
        let mut rng = rand::rngs::OsRng;
        self.c1 = vec![0; hash.digest_len()];
        rng.fill_bytes(&mut self.c1);
        self.s1 = rng.next_u32().max(1);
        self.step = Step::ChallengeReady { tid, hash };
    }

    fn reply(&mut self, tid: u16, hash: HashId, r1: &[u8], c2: Option<&[u8]>, s2: u32) {
        let c1 = std::mem::take(&mut self.c1);
        let t = Transcript {
            hash,
            challenge: &c1,
            seqnum: self.s1,
            tid,
            sc_c: 0,
            hostnqn: &self.hostnqn,
            subnqn: &self.subnqn,
        };
        let want = t.host_response(&self.keys.host.transformed(&self.hostnqn));
        if !responses_match(&want, r1) {
            return self.fail(
                tid,
                failure::FAILED,
                "the host's response does not match its secret",
            );
        }
        let r2 =
            match (c2, &self.keys.ctrl) {
                (None, _) => None,
                (Some(_), None) => return self.fail(
                    tid,
                    failure::FAILED,
                    "host asked for bidirectional authentication, and no dhchap_ctrl_secret is set",
                ),
                (Some(c2), Some(k)) => Some(
                    Transcript {
                        challenge: c2,
                        seqnum: s2,
                        ..t
                    }
                    .controller_response(&k.transformed(&self.subnqn)),
                ),
            };
        self.step = Step::Success1Ready { tid, hash, r2 };
    }

    /// The message an Authentication Receive returns.
    pub fn on_receive(&mut self) -> AuthMessage {
        match std::mem::replace(&mut self.step, Step::Failed) {
            Step::ChallengeReady { tid, hash } => {
                self.step = Step::AwaitReply { tid, hash };
                AuthMessage::Challenge {
                    tid,
                    hash: hash as u8,
                    dhgid: DHGROUP_NULL,
                    seqnum: self.s1,
                    challenge: self.c1.clone(),
                    dh_value: Vec::new(),
                }
            }
            Step::Success1Ready { tid, hash, r2 } => {
                if r2.is_some() {
                    self.step = Step::AwaitSuccess2 { tid };
                } else {
                    tracing::info!(host = %self.hostnqn, subsystem = %self.subnqn, "host authenticated");
                    self.authenticated = true;
                    self.step = Step::AwaitNegotiate;
                }
                AuthMessage::Success1 {
                    tid,
                    hl: hash.digest_len() as u8,
                    response: r2,
                }
            }
            Step::Failure1Ready { tid, explanation } => Self::failure1(tid, explanation),
            _ => {
                tracing::warn!(host = %self.hostnqn, subsystem = %self.subnqn, "authentication failed: Authentication Receive out of sequence");
                self.authenticated = false;
                Self::failure1(0, failure::INCORRECT_MESSAGE)
            }
        }
    }

    fn failure1(tid: u16, explanation: u8) -> AuthMessage {
        AuthMessage::Failure {
            from: FailureFrom::Controller,
            tid,
            reason: failure::REASON_FAILED,
            explanation,
        }
    }
}

#[cfg(test)]
mod tests;
