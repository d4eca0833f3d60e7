//! The host side of DH-HMAC-CHAP (NVMe Base 2.0 §8.13.5): a queue whose Connect response
//! sets ATR authenticates before any other command, with Authentication Send and Receive on
//! its control connection.
//!
//! ```text
//! Auth Send  AUTH_Negotiate (SHA-256/384/512, NULL DH) ──►
//! Auth Recv                                           ◄── Challenge (hash, C1, S1)
//! Auth Send  Reply (R1 [, C2, S2])                     ──►
//! Auth Recv                                           ◄── Success1 [R2] or Failure1
//! Auth Send  Success2 (R2 checked) or Failure2         ──►   (bidirectional only)
//! ```
//!
//! Only the NULL DH group is offered, as the target implements it (`docs/auth.md`).

use std::time::Duration;

use rand::RngCore;

use super::control::ControlConn;
use crate::dhchap::{responses_match, HashId, Secret, Transcript};
use crate::spec::auth::{failure, AuthCommand, AuthMessage, FailureFrom, DHGROUP_NULL};
use crate::spec::fabrics::{fabrics_sqe, FabricsCommandType};
use crate::Result;

/// The secrets a host authenticates with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhchapKeys {
    /// The host's secret (the target holds the same).
    pub host: Secret,
    /// The controller's secret: set, the host also checks the controller (bidirectional).
    pub ctrl: Option<Secret>,
}

/// How long each authentication command may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Authentication Receive's allocation length: more than any DH-HMAC-CHAP message without a
/// DH value.
const RECEIVE_LEN: usize = 1024;

/// What `authenticate` needs to know about the queue.
pub(super) struct Queue<'a> {
    /// `"admin queue"` or `"I/O queue N"`, for errors.
    pub what: &'a str,
    pub hostnqn: &'a str,
    pub subnqn: &'a str,
    /// The transaction ID (T_ID) of this exchange.
    pub tid: u16,
}

/// Runs the exchange on a queue whose Connect asked for it. Errors say which side refused and
/// why; the connection is then unusable.
pub(super) fn authenticate(
    conn: &mut ControlConn,
    q: &Queue<'_>,
    keys: Option<&DhchapKeys>,
) -> Result<()> {
    let step = format!("{} DH-HMAC-CHAP", q.what);
    let Some(keys) = keys else {
        return Err(conn.peer.err(
            &step,
            "the target requires in-band authentication for this host: \
             set dhchap_secret_file= on the leg URI",
        ));
    };
    let negotiate = AuthMessage::Negotiate {
        tid: q.tid,
        sc_c: 0,
        hashes: HashId::ALL.iter().map(|&h| h as u8).collect(),
        dhgroups: vec![DHGROUP_NULL],
    };
    send(conn, &step, &negotiate)?;
    let (hash, c1, s1) = match receive(conn, &step)? {
        AuthMessage::Challenge {
            tid,
            hash,
            dhgid,
            seqnum,
            challenge,
            dh_value,
        } if tid == q.tid => {
            let h = HashId::from_u8(hash)
                .filter(|h| challenge.len() == h.digest_len())
                .ok_or_else(|| {
                    conn.peer.err(
                        &step,
                        format!(
                            "the Challenge names hash {hash:#04x} with a {}-byte C1",
                            challenge.len()
                        ),
                    )
                })?;
            if dhgid != DHGROUP_NULL || !dh_value.is_empty() {
                fail2(conn, q.tid, failure::DHGROUP_UNUSABLE);
                return Err(conn.peer.err(
                    &step,
                    format!("the Challenge asks for DH group {dhgid:#04x}; only NULL is offered"),
                ));
            }
            (h, challenge, seqnum)
        }
        other => return Err(unexpected(conn, &step, "a Challenge", &other)),
    };
    let t = Transcript {
        hash,
        challenge: &c1,
        seqnum: s1,
        tid: q.tid,
        sc_c: 0,
        hostnqn: q.hostnqn,
        subnqn: q.subnqn,
    };
    let r1 = t.host_response(&keys.host.transformed(q.hostnqn));
    let mut rng = rand::rngs::OsRng;
    let c2 = keys.ctrl.as_ref().map(|_| {
        let mut c = vec![0u8; hash.digest_len()];
        rng.fill_bytes(&mut c);
        c
    });
    let s2 = if c2.is_some() {
        rng.next_u32().max(1)
    } else {
        0
    };
    let reply = AuthMessage::Reply {
        tid: q.tid,
        response: r1,
        challenge: c2.clone(),
        seqnum: s2,
        dh_value: Vec::new(),
    };
    send(conn, &step, &reply)?;
    let r2 = match receive(conn, &step)? {
        AuthMessage::Success1 { tid, response, .. } if tid == q.tid => response,
        other => return Err(unexpected(conn, &step, "Success1", &other)),
    };
    let (Some(ctrl), Some(c2)) = (keys.ctrl.as_ref(), c2) else {
        return Ok(());
    };
    let want = Transcript {
        challenge: &c2,
        seqnum: s2,
        ..t
    }
    .controller_response(&ctrl.transformed(q.subnqn));
    if !r2.as_deref().is_some_and(|r2| responses_match(r2, &want)) {
        fail2(conn, q.tid, failure::FAILED);
        return Err(conn.peer.err(
            &step,
            "the controller's response does not match its secret (dhchap_ctrl_secret_file)",
        ));
    }
    send(conn, &step, &AuthMessage::Success2 { tid: q.tid })
}

fn send(conn: &mut ControlConn, step: &str, msg: &AuthMessage) -> Result<()> {
    let bytes = msg.to_bytes();
    let mut sqe = fabrics_sqe(FabricsCommandType::AuthenticationSend, 0);
    AuthCommand::dhchap(bytes.len() as u32).write_to(&mut sqe);
    let (c, _) = conn.command(step, sqe, &bytes, 0, AUTH_TIMEOUT)?;
    if !c.status().is_success() {
        return Err(conn.peer.err(
            step,
            format!("Authentication Send failed: NVMe status {}", c.status()),
        ));
    }
    Ok(())
}

fn receive(conn: &mut ControlConn, step: &str) -> Result<AuthMessage> {
    let mut sqe = fabrics_sqe(FabricsCommandType::AuthenticationReceive, 0);
    AuthCommand::dhchap(RECEIVE_LEN as u32).write_to(&mut sqe);
    let (c, data) = conn.command(step, sqe, &[], RECEIVE_LEN, AUTH_TIMEOUT)?;
    if !c.status().is_success() {
        return Err(conn.peer.err(
            step,
            format!("Authentication Receive failed: NVMe status {}", c.status()),
        ));
    }
    AuthMessage::parse(&data).map_err(|e| {
        conn.peer
            .err(step, format!("bad message from the target: {e}"))
    })
}

/// The error for a message out of sequence; a Failure1 says why the target refused.
fn unexpected(conn: &ControlConn, step: &str, wanted: &str, got: &AuthMessage) -> crate::Error {
    match got {
        AuthMessage::Failure {
            from: FailureFrom::Controller,
            explanation,
            ..
        } => conn.peer.err(
            step,
            format!(
                "the target refused authentication ({}): check dhchap_secret_file",
                explain(*explanation)
            ),
        ),
        other => conn
            .peer
            .err(step, format!("expected {wanted}, got {other:?}")),
    }
}

/// Tells the controller the host gives up (AUTH_Failure2); best effort, the queue is closed
/// after it anyway.
fn fail2(conn: &mut ControlConn, tid: u16, explanation: u8) {
    let msg = AuthMessage::Failure {
        from: FailureFrom::Host,
        tid,
        reason: failure::REASON_FAILED,
        explanation,
    };
    let _ = send(conn, "DH-HMAC-CHAP Failure2", &msg);
}

/// A reason code explanation in words.
fn explain(rcexp: u8) -> &'static str {
    match rcexp {
        failure::FAILED => "authentication failed",
        failure::NOT_USABLE => "authentication protocol not usable",
        failure::CONCAT_MISMATCH => "secure channel concatenation mismatch",
        failure::HASH_UNUSABLE => "hash function not usable",
        failure::DHGROUP_UNUSABLE => "DH group not usable",
        failure::INCORRECT_PAYLOAD => "incorrect payload",
        failure::INCORRECT_MESSAGE => "incorrect protocol message",
        _ => "unknown reason",
    }
}
