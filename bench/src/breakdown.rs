//! `--breakdown`: the volume's per-stage latency profile, added to the report.
//!
//! The volume records it ([`nvmirror_mirror::breakdown`]); this module turns it on before the
//! job threads open their queue pairs (with the ramp time as warm-up, so ramp I/Os are left
//! out), collects it once they have closed them, and writes it as a compact table after the
//! normal report, or as an `"nvmirror_breakdown"` object next to fio's fields in the JSON.

use std::fmt::Write as _;
use std::io::Write;

use nvmirror_mirror::breakdown::{Interval, IntervalSummary, PathKind};
use nvmirror_mirror::{Breakdown, BreakdownConfig, Volume};
use serde::{Deserialize, Serialize};

use crate::engine::RunResult;
use crate::report::FioOutput;
use crate::{Error, Result};

/// The key of the breakdown object in the JSON report.
pub const JSON_KEY: &str = "nvmirror_breakdown";

/// Turns the breakdown on for the queue pairs the run will open; refused without a volume.
pub fn enable(volume: Option<&Volume>, spec: &crate::job::JobSpec) -> Result<()> {
    let Some(vol) = volume else {
        return Err(Error::Flag {
            flag: "--breakdown",
            reason: "needs a volume: give two or more --leg, or --bitmap on".into(),
        });
    };
    // Drop anything an earlier run left behind.
    let _ = vol.take_breakdown();
    vol.set_breakdown(Some(BreakdownConfig {
        warmup: spec.ramp_time,
    }));
    Ok(())
}

/// The breakdown of a finished run (its queue pairs are closed), with the legs' names.
pub fn collect(volume: &Volume) -> StageReport {
    let b = volume.take_breakdown().unwrap_or_default();
    let names: Vec<String> = volume.leg_states().into_iter().map(|l| l.name).collect();
    StageReport::new(&b, &names)
}

/// One interval's figures, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    /// `received_to_submit`, `submit_to_leg1`, … (see [`stage_key`]).
    pub stage: String,
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p999: u64,
    pub max: u64,
}

impl StageRow {
    fn new(stage: String, s: IntervalSummary) -> Self {
        Self {
            stage,
            count: s.count,
            p50: s.p50,
            p99: s.p99,
            p999: s.p999,
            max: s.max,
        }
    }
}

/// How often one leg was the last of a mirrored write, and by how much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastLegRow {
    pub leg: usize,
    pub name: String,
    /// Mirrored writes this leg completed last.
    pub count: u64,
    /// Fraction of all mirrored writes recorded.
    pub share: f64,
    /// Its completion minus the second-to-last leg's, in nanoseconds.
    pub gap_ns: StageRow,
}

/// The breakdown as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// Every figure is in nanoseconds.
    pub unit: String,
    /// Whether writes passed a write-intent bitmap gate (a `received_to_bitmap` stage).
    pub bitmap: bool,
    /// Stage intervals of reads, in path order (empty when no read was recorded).
    pub read: Vec<StageRow>,
    /// Stage intervals of writes (fanned out to every in-sync leg).
    pub write: Vec<StageRow>,
    /// Mirrored writes: which leg completed last.
    pub last_leg: Vec<LastLegRow>,
    /// I/Os whose stamps were out of stage order (expected 0; not recorded).
    pub out_of_order: u64,
    /// I/Os not recorded because a leg command was abandoned after its timeout.
    pub abandoned: u64,
}

/// The JSON name of an interval.
pub fn stage_key(i: Interval, bitmap: bool) -> String {
    match i {
        Interval::ReceivedToBitmap => "received_to_bitmap".into(),
        Interval::ToSubmit if bitmap => "bitmap_to_submit".into(),
        Interval::ToSubmit => "received_to_submit".into(),
        Interval::Leg(l) => format!("submit_to_leg{l}"),
        Interval::LastLegToJoin => "last_leg_to_joined".into(),
        Interval::JoinToAck => "joined_to_acked".into(),
        Interval::Total => "received_to_acked".into(),
    }
}

impl StageReport {
    /// The report of `b`; `names` are the legs' names in leg order.
    pub fn new(b: &Breakdown, names: &[String]) -> Self {
        let bitmap = b.has_bitmap_stage();
        // Reads pass no bitmap gate: their first stage is received → submit.
        let rows = |kind| {
            b.intervals(kind)
                .into_iter()
                .map(|(i, s)| StageRow::new(stage_key(i, bitmap && kind == PathKind::Write), s))
                .collect()
        };
        Self {
            unit: "ns".into(),
            bitmap,
            read: rows(PathKind::Read),
            write: rows(PathKind::Write),
            last_leg: b
                .last_legs()
                .into_iter()
                .map(|l| LastLegRow {
                    leg: l.leg,
                    name: names.get(l.leg).cloned().unwrap_or_default(),
                    count: l.count,
                    share: l.share,
                    gap_ns: StageRow::new("last_minus_second".into(), l.gap),
                })
                .collect(),
            out_of_order: b.out_of_order(),
            abandoned: b.abandoned(),
        }
    }

    /// The compact table printed after the normal report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let us = |ns: u64| format!("{:.2}", ns as f64 / 1e3);
        for (name, rows) in [("read", &self.read), ("write", &self.write)] {
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\nbreakdown, {name} (usec):");
            let _ = writeln!(
                s,
                "  {:<20} {:>10} {:>9} {:>9} {:>9} {:>9}",
                "stage", "count", "p50", "p99", "p99.9", "max"
            );
            for r in rows.iter() {
                let _ = writeln!(
                    s,
                    "  {:<20} {:>10} {:>9} {:>9} {:>9} {:>9}",
                    r.stage,
                    r.count,
                    us(r.p50),
                    us(r.p99),
                    us(r.p999),
                    us(r.max)
                );
            }
        }
        if !self.last_leg.is_empty() {
            let _ = writeln!(
                s,
                "\nlast leg of mirrored writes (gap behind the second, usec):"
            );
            for l in &self.last_leg {
                let g = &l.gap_ns;
                let _ = writeln!(
                    s,
                    "  leg{} {}: {:.2}% ({}), gap p50={} p99={} p99.9={} max={}",
                    l.leg,
                    l.name,
                    l.share * 100.0,
                    l.count,
                    us(g.p50),
                    us(g.p99),
                    us(g.p999),
                    us(g.max)
                );
            }
        }
        if self.out_of_order + self.abandoned > 0 {
            let _ = writeln!(
                s,
                "  not recorded: {} out of stage order, {} with an abandoned leg",
                self.out_of_order, self.abandoned
            );
        }
        s
    }
}

/// Writes the table after the normal report.
pub fn write_text(report: &StageReport, out: &mut dyn Write) -> Result<()> {
    out.write_all(report.text().as_bytes())
        .map_err(Error::WriteReport)
}

/// fio's report with the breakdown as one more top-level field, after fio's own.
#[derive(Serialize)]
struct WithBreakdown<'a> {
    #[serde(flatten)]
    fio: &'a FioOutput,
    #[serde(rename = "nvmirror_breakdown")]
    breakdown: &'a StageReport,
}

/// Writes fio's JSON for `run` with the breakdown as one more top-level field
/// ([`JSON_KEY`]), so fio tooling still reads the rest.
pub fn write_json(run: &RunResult, report: &StageReport, out: &mut dyn Write) -> Result<()> {
    let fio = FioOutput::from_run(run);
    let doc = WithBreakdown {
        fio: &fio,
        breakdown: report,
    };
    serde_json::to_writer_pretty(&mut *out, &doc).map_err(Error::EncodeJson)?;
    writeln!(out).map_err(Error::WriteReport)
}
