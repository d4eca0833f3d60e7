//! The chaos driver: about once a second, one action picked at random (seeded) from the
//! list below, through `nvmirror rpc`, a dropped host connection or `kill -9` and a restart
//! of the server. Refusals (a job already running, a leg busy) are normal and counted.

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::{json, Value};

use crate::serve::{ServeProcess, VOLUME};

/// Slots a volume has in its life (`MAX_LEGS`).
const MAX_SLOTS: usize = 4;
/// Legs kept (not removed) at most; at least two always stay.
const MAX_ACTIVE: usize = 3;

/// What the driver can do, with its weight in the draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    FaultGone,
    FaultHang,
    FaultFailWrites,
    FaultClear,
    Detach,
    Attach,
    LegAdd,
    LegRemove,
    ResyncPause,
    ResyncResume,
    ResyncCancel,
    VerifyRepair,
    HostDisconnect,
    Kill9,
}

const WEIGHTS: [(Action, u32); 14] = [
    (Action::FaultGone, 2),
    (Action::FaultHang, 2),
    (Action::FaultFailWrites, 2),
    (Action::FaultClear, 4),
    (Action::Detach, 3),
    (Action::Attach, 6),
    (Action::LegAdd, 1),
    (Action::LegRemove, 1),
    (Action::ResyncPause, 2),
    (Action::ResyncResume, 2),
    (Action::ResyncCancel, 1),
    (Action::VerifyRepair, 2),
    (Action::HostDisconnect, 3),
    (Action::Kill9, 1),
];

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::FaultGone => "fault gone",
            Self::FaultHang => "fault hang",
            Self::FaultFailWrites => "fault fail_writes",
            Self::FaultClear => "leg_fault_clear",
            Self::Detach => "leg_detach",
            Self::Attach => "leg_attach",
            Self::LegAdd => "leg_add",
            Self::LegRemove => "leg_remove",
            Self::ResyncPause => "resync_pause",
            Self::ResyncResume => "resync_resume",
            Self::ResyncCancel => "resync_cancel",
            Self::VerifyRepair => "verify_start repair",
            Self::HostDisconnect => "host disconnect",
            Self::Kill9 => "kill -9 + restart",
        }
    }
}

/// Per action: done, refused by the server, skipped (nothing to do it to).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub done: u64,
    pub refused: u64,
    pub skipped: u64,
}

/// What happened, for the summary.
#[derive(Debug, Default)]
pub struct ChaosLog {
    pub tally: BTreeMap<Action, Tally>,
    /// Refusal texts and how often each came.
    pub refusals: BTreeMap<String, u64>,
}

/// What an action did.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Refused(String),
    Skipped,
    /// The host connection of writer N is to be dropped.
    Disconnect(usize),
    Kill9,
}

/// A leg as `volume_status` shows it.
#[derive(Clone, Debug)]
struct Leg {
    index: usize,
    state: String,
    faults_armed: u64,
}

fn legs(status: &Value) -> Vec<Leg> {
    status["legs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| Leg {
                    index: l["index"].as_u64().unwrap_or(0) as usize,
                    state: l["state"].as_str().unwrap_or("").to_string(),
                    faults_armed: l["faults_armed"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Draws an action by weight.
pub fn draw(rng: &mut SmallRng) -> Action {
    let total: u32 = WEIGHTS.iter().map(|w| w.1).sum();
    let mut x = rng.gen_range(0..total);
    for (a, w) in WEIGHTS {
        if x < w {
            return a;
        }
        x -= w;
    }
    unreachable!("the weights sum to the total")
}

/// Carries out `action` against the volume as it is now (`status`); the driver does the
/// disconnect and the kill itself.
pub fn act(
    action: Action,
    status: &Value,
    serve: &ServeProcess,
    rng: &mut SmallRng,
    leg_dir: &Path,
    writers: usize,
) -> Outcome {
    let legs = legs(status);
    let primary = status["primary"].as_u64().unwrap_or(0) as usize;
    let in_sync: Vec<&Leg> = legs.iter().filter(|l| l.state == "in_sync").collect();
    let active = legs.iter().filter(|l| l.state != "removed").count();
    let pick = |rng: &mut SmallRng, from: &[&Leg]| -> Option<usize> {
        (!from.is_empty()).then(|| from[rng.gen_range(0..from.len())].index)
    };
    let call = |method: &str, params: Value| match serve.rpc(method, &params) {
        Ok(_) => Outcome::Done,
        Err(Some(text)) => Outcome::Refused(text),
        Err(None) => Outcome::Refused(format!("{method}: no answer within the RPC deadline")),
    };
    let fault = |rng: &mut SmallRng, kind: &str| {
        // Take a leg out only while another one stays in sync.
        if in_sync.len() < 2 {
            return Outcome::Skipped;
        }
        let leg = pick(rng, &in_sync).expect("in-sync legs");
        call(
            "leg_fault_inject",
            json!({"volume": VOLUME, "leg": leg, "fault": kind}),
        )
    };
    match action {
        Action::FaultGone => fault(rng, "gone"),
        Action::FaultHang => fault(rng, "hang"),
        Action::FaultFailWrites => fault(rng, "fail_writes"),
        Action::FaultClear => {
            let armed: Vec<&Leg> = legs.iter().filter(|l| l.faults_armed > 0).collect();
            match pick(rng, &armed) {
                Some(leg) => call("leg_fault_clear", json!({"volume": VOLUME, "leg": leg})),
                None => Outcome::Skipped,
            }
        }
        Action::Detach => {
            if in_sync.len() < 2 {
                return Outcome::Skipped;
            }
            let leg = pick(rng, &in_sync).expect("in-sync legs");
            call("leg_detach", json!({"volume": VOLUME, "leg": leg}))
        }
        Action::Attach => {
            let out: Vec<&Leg> = legs
                .iter()
                .filter(|l| l.state == "faulted" || l.state == "detached")
                .collect();
            match pick(rng, &out) {
                Some(leg) => call("leg_attach", json!({"volume": VOLUME, "leg": leg})),
                None => Outcome::Skipped,
            }
        }
        Action::LegAdd => {
            if legs.len() >= MAX_SLOTS || active >= MAX_ACTIVE {
                return Outcome::Skipped;
            }
            let uri = format!(
                "file://{}/leg{}.img?create=64MiB",
                leg_dir.display(),
                legs.len()
            );
            call("leg_add", json!({"volume": VOLUME, "uri": uri}))
        }
        Action::LegRemove => {
            if active <= 2 {
                return Outcome::Skipped;
            }
            let mirrors: Vec<&Leg> = legs
                .iter()
                .filter(|l| l.state != "removed" && l.index != primary)
                .collect();
            match pick(rng, &mirrors) {
                Some(leg) => call("leg_remove", json!({"volume": VOLUME, "leg": leg})),
                None => Outcome::Skipped,
            }
        }
        Action::ResyncPause => call("resync_pause", json!({"volume": VOLUME})),
        Action::ResyncResume => call("resync_resume", json!({"volume": VOLUME})),
        Action::ResyncCancel => call("resync_cancel", json!({"volume": VOLUME})),
        Action::VerifyRepair => call(
            "verify_start",
            json!({"volume": VOLUME, "repair": rng.gen_bool(0.7)}),
        ),
        Action::HostDisconnect => Outcome::Disconnect(rng.gen_range(0..writers)),
        Action::Kill9 => Outcome::Kill9,
    }
}

impl ChaosLog {
    pub fn record(&mut self, action: Action, outcome: &Outcome) {
        let t = self.tally.entry(action).or_default();
        match outcome {
            Outcome::Refused(text) => {
                t.refused += 1;
                // Texts differ in numbers only; keep the first line.
                let key = text.lines().next().unwrap_or("").to_string();
                *self
                    .refusals
                    .entry(format!("{}: {key}", action.name()))
                    .or_default() += 1;
            }
            Outcome::Skipped => t.skipped += 1,
            _ => t.done += 1,
        }
    }
}
