//! The state machine against a host written from the spec's formulas.

use nvmirror_nvme::dhchap::{HashId, Secret, Transcript};
use nvmirror_nvme::spec::auth::{failure, AuthMessage, FailureFrom};

use super::{HostSecrets, QueueAuth};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:host";
const SUB: &str = "nqn.2026-12.io.nvmirror:auth";

fn secret(b: u8, transform: Option<HashId>) -> Secret {
    Secret {
        transform,
        key: vec![b; 32],
    }
}

fn negotiate(tid: u16) -> Vec<u8> {
    AuthMessage::Negotiate {
        tid,
        sc_c: 0,
        hashes: vec![1, 2, 3],
        dhgroups: vec![0, 1, 2],
    }
    .to_bytes()
}

/// Runs one exchange as a host holding `host` (and `ctrl` to check the controller);
/// returns the last message the controller sent and whether the queue is authenticated.
fn exchange(q: &mut QueueAuth, host: &Secret, ctrl: Option<&Secret>) -> (AuthMessage, bool) {
    q.on_send(&negotiate(7));
    let AuthMessage::Challenge {
        tid,
        hash,
        seqnum,
        challenge,
        ..
    } = q.on_receive()
    else {
        panic!("no challenge");
    };
    assert_eq!(tid, 7);
    let hash = HashId::from_u8(hash).expect("a known hash");
    let t = Transcript {
        hash,
        challenge: &challenge,
        seqnum,
        tid,
        sc_c: 0,
        hostnqn: HOST,
        subnqn: SUB,
    };
    let c2 = vec![0x42; hash.digest_len()];
    q.on_send(
        &AuthMessage::Reply {
            tid,
            response: t.host_response(&host.transformed(HOST)),
            challenge: ctrl.map(|_| c2.clone()),
            seqnum: 99,
            dh_value: Vec::new(),
        }
        .to_bytes(),
    );
    let last = q.on_receive();
    if let (Some(k), AuthMessage::Success1 { response, .. }) = (ctrl, &last) {
        let want = Transcript {
            challenge: &c2,
            seqnum: 99,
            ..t
        }
        .controller_response(&k.transformed(SUB));
        let ok = response.as_deref() == Some(&want[..]);
        let answer = if ok {
            AuthMessage::Success2 { tid }
        } else {
            AuthMessage::Failure {
                from: FailureFrom::Host,
                tid,
                reason: failure::REASON_FAILED,
                explanation: failure::FAILED,
            }
        };
        q.on_send(&answer.to_bytes());
    }
    (last, q.authenticated())
}

fn queue(host: Secret, ctrl: Option<Secret>) -> QueueAuth {
    QueueAuth::new(HostSecrets { host, ctrl }, HOST, SUB)
}

#[test]
fn the_right_secret_authenticates() {
    let s = secret(1, Some(HashId::Sha256));
    let mut q = queue(s.clone(), None);
    assert!(!q.authenticated());
    let (last, ok) = exchange(&mut q, &s, None);
    assert!(matches!(last, AuthMessage::Success1 { response: None, .. }));
    assert!(ok);
}

#[test]
fn a_wrong_secret_gets_failure1() {
    let mut q = queue(secret(1, None), None);
    let (last, ok) = exchange(&mut q, &secret(2, None), None);
    assert!(
        matches!(last, AuthMessage::Failure { from: FailureFrom::Controller, explanation, .. } if explanation == failure::FAILED)
    );
    assert!(!ok);
}

#[test]
fn bidirectional_checks_both_sides() {
    let (h, c) = (secret(1, None), secret(9, Some(HashId::Sha512)));
    let mut q = queue(h.clone(), Some(c.clone()));
    assert!(exchange(&mut q, &h, Some(&c)).1);
    let mut q = queue(h.clone(), Some(c));
    assert!(
        !exchange(&mut q, &h, Some(&secret(8, None))).1,
        "host refuses a wrong R2"
    );
    let mut q = queue(h.clone(), None);
    let (last, ok) = exchange(&mut q, &h, Some(&secret(8, None)));
    assert!(matches!(last, AuthMessage::Failure { .. }) && !ok);
}

#[test]
fn garbage_and_out_of_order_messages_fail_cleanly() {
    let mut q = queue(secret(1, None), None);
    q.on_send(&[0xff; 3]);
    assert!(matches!(q.on_receive(), AuthMessage::Failure { .. }));
    let mut q = queue(secret(1, None), None);
    assert!(
        matches!(q.on_receive(), AuthMessage::Failure { explanation, .. } if explanation == failure::INCORRECT_MESSAGE)
    );
    let mut q = queue(secret(1, None), None);
    q.on_send(&AuthMessage::Success2 { tid: 1 }.to_bytes());
    assert!(matches!(q.on_receive(), AuthMessage::Failure { .. }));
    let mut q = queue(secret(1, None), None);
    let mut n = negotiate(1);
    n[8 + 4 + 30] = 5; // only ffdhe groups offered
    n[8 + 3] = 1;
    q.on_send(&n);
    assert!(
        matches!(q.on_receive(), AuthMessage::Failure { explanation, .. } if explanation == failure::DHGROUP_UNUSABLE)
    );
    assert!(!q.authenticated());
}
