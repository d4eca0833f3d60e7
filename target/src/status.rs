//! `nvmirror status`: a human view of volumes, legs, rates, latency, bitmap and resync
//! progress, rendered from the JSON the `volume_status` RPC returns.
//!
//! Rates (IOPS) come from two samples: the renderer takes the previous sample and the interval.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// Formats a byte count with binary units.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A text progress bar of `width` cells.
pub fn progress_bar(fraction: f64, width: usize) -> String {
    let f = fraction.clamp(0.0, 1.0);
    let filled = (f * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

/// Renders volumes (each a `volume_status` result). `prev` is the sample taken `interval`
/// earlier, for rates; without it the IOPS column shows `-`.
pub fn render(volumes: &[Value], prev: Option<&[Value]>, interval: Duration) -> String {
    let mut out = String::new();
    if volumes.is_empty() {
        out.push_str("no volumes\n");
        return out;
    }
    for vol in volumes {
        out.push_str(&volume_table(vol, prev, interval));
        out.push_str(&ana_line(vol));
        match resync_progress(vol) {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "  {}: {} {:5.1}%  {} / {}  {}",
                    r.label,
                    progress_bar(r.fraction(), 30),
                    r.fraction() * 100.0,
                    human_bytes(r.done as f64),
                    human_bytes(r.total as f64),
                    r.rate_and_eta()
                );
            }
            None => out.push_str("  resync: none\n"),
        }
    }
    out
}

/// The volume's ANA state through each NVMe/TCP listener (nothing when it is not exported).
pub fn ana_line(vol: &Value) -> String {
    let states = vol
        .get("ana")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if states.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = states
        .iter()
        .map(|a| format!("{} {}", text(a, "listener"), text(a, "state")))
        .collect();
    format!("  ana: {}\n", parts.join(", "))
}

/// The lines of one volume above its resync line: the header, one line per leg, the bitmap.
pub fn volume_table(vol: &Value, prev: Option<&[Value]>, interval: Duration) -> String {
    let mut out = String::new();
    let name = text(vol, "name");
    let legs = vol
        .get("legs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let in_sync = legs
        .iter()
        .filter(|l| text(l, "state") == "in_sync")
        .count();
    let health = if in_sync == legs.len() {
        "healthy"
    } else {
        "DEGRADED"
    };
    let _ = writeln!(
        out,
        "volume {name}: {} ({} blocks of {} B), {in_sync}/{} legs in sync, {health}",
        human_bytes(num(vol, "capacity_bytes")),
        num(vol, "num_blocks"),
        num(vol, "lba_size"),
        legs.len()
    );
    let _ = writeln!(
        out,
        "  {:<3} {:<8} {:<10} {:>9} {:>9} {:>9} {:>7} {:>7}  uri",
        "leg", "role", "state", "iops", "p50 us", "p99 us", "errors", "last"
    );
    let prev_legs = prev
        .and_then(|p| p.iter().find(|v| text(v, "name") == name))
        .and_then(|v| v.get("legs"))
        .and_then(Value::as_array);
    for (i, leg) in legs.iter().enumerate() {
        let iops = match prev_legs.and_then(|p| p.get(i)) {
            Some(p) if !interval.is_zero() => {
                let d = (num(leg, "ops") - num(p, "ops")).max(0.0);
                format!("{:.0}", d / interval.as_secs_f64())
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<3} {:<8} {:<10} {:>9} {:>9.1} {:>9.1} {:>7} {:>7}  {}",
            i,
            text(leg, "role"),
            text(leg, "state"),
            iops,
            num(leg, "lat_p50_us"),
            num(leg, "lat_p99_us"),
            num(leg, "errors"),
            num(leg, "completed_last"),
            text(leg, "uri")
        );
        if let Some(r) = leg.get("replication").filter(|r| !r.is_null()) {
            let _ = writeln!(
                out,
                "      {}: {}, rpo {:.3} s, lag {} write(s) / {} bytes, {}, journal {} of {} bytes, {} step-down(s)",
                text(r, "mode"),
                text(r, "state"),
                num(r, "rpo_seconds"),
                num(r, "lag_writes"),
                num(r, "lag_bytes"),
                if r.get("consistent").and_then(Value::as_bool) == Some(false) {
                    "far image NOT CONSISTENT until the catch-up is applied".to_string()
                } else {
                    format!(
                        "consistent at #{}",
                        r.get("consistent_point").map_or(0.0, |c| num(c, "seq"))
                    )
                },
                num(r, "journal_used"),
                num(r, "journal_capacity"),
                num(r, "step_downs"),
            );
            if let Some(c) = r.get("cycle").filter(|c| !c.is_null()) {
                let _ = writeln!(
                    out,
                    "      cycle #{} ({}), last {} bytes in {:.3} s, staged {} of {} changed bytes",
                    num(c, "cycle"),
                    match num(c, "interval_s") {
                        i if i > 0.0 => format!("every {i} s"),
                        _ => "batches of a backlog".to_string(),
                    },
                    num(c, "cycle_bytes"),
                    num(c, "ship_seconds"),
                    num(c, "staged_bytes"),
                    num(c, "changed_bytes"),
                );
            }
            if let Some(e) = r.get("error").and_then(Value::as_str) {
                let _ = writeln!(out, "      ERROR: {e}");
            }
        }
        if let Some(link) = leg.get("link").filter(|l| !l.is_null()) {
            let connected = link.get("connected").and_then(Value::as_bool) == Some(true);
            let rtt = link
                .get("rtt_us")
                .and_then(Value::as_f64)
                .map_or("-".to_string(), |r| format!("{r:.0} us"));
            let mut line = format!(
                "      link: {}, rtt {rtt}, {} reconnect attempt(s)",
                if connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                num(link, "reconnect_attempts")
            );
            let fence = num(link, "fence_remaining_s");
            if fence > 0.0 {
                line += &format!(
                    ", fenced {fence:.1} s ({} command(s))",
                    num(link, "fenced_commands")
                );
            }
            if let Some(e) = link.get("last_error").and_then(Value::as_str) {
                line += &format!(", last error: {e}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some(bm) = vol.get("bitmap").filter(|b| !b.is_null()) {
        let _ = writeln!(
            out,
            "  bitmap: {} dirty of {} regions ({} each), {} metadata writes",
            num(bm, "dirty_regions"),
            num(bm, "regions"),
            human_bytes(num(bm, "region_size")),
            num(bm, "metadata_writes")
        );
    }
    if let Some(ca) = vol.get("cycle_apply").filter(|c| !c.is_null()) {
        let mut line = format!(
            "  cycle apply from {}: image at cycle #{}, {} cycle(s) / {} applied here",
            text(ca, "staging"),
            num(ca, "cycle"),
            num(ca, "applied_cycles"),
            human_bytes(num(ca, "applied_bytes")),
        );
        if let Some(e) = ca.get("last_error").and_then(Value::as_str) {
            line += &format!(", last error: {e}");
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

/// A running (or paused) resync of one volume, as `volume_status` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ResyncProgress {
    /// `resync leg 1 (running)`.
    pub label: String,
    /// Bytes copied so far.
    pub done: u64,
    /// Bytes the resync copies in all.
    pub total: u64,
    /// Copy rate the server measured, bytes per second.
    pub rate: f64,
}

impl ResyncProgress {
    /// Share done, 1.0 for an empty resync.
    pub fn fraction(&self) -> f64 {
        if self.total > 0 {
            self.done as f64 / self.total as f64
        } else {
            1.0
        }
    }

    /// `100.0 MiB/s  ETA 6s`, from the server's rate (`-` while it has none).
    pub fn rate_and_eta(&self) -> String {
        let eta = if self.rate > 0.0 {
            human_duration(self.total.saturating_sub(self.done) as f64 / self.rate)
        } else {
            "-".into()
        };
        format!("{}/s  ETA {eta}", human_bytes(self.rate))
    }
}

/// The volume's resync, if one is under way.
pub fn resync_progress(vol: &Value) -> Option<ResyncProgress> {
    let r = vol.get("resync").filter(|r| !r.is_null())?;
    Some(ResyncProgress {
        label: format!("resync leg {} ({})", num(r, "leg"), text(r, "state")),
        done: num(r, "bytes_copied") as u64,
        total: num(r, "bytes_total") as u64,
        rate: num(r, "rate_bytes_per_sec"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(ops0: u64, ops1: u64) -> Value {
        json!({
            "name": "vol0", "capacity_bytes": 1073741824u64, "num_blocks": 2097152, "lba_size": 512,
            "legs": [
                {"uri": "file:///data/primary.img", "role": "primary", "state": "in_sync",
                 "ops": ops0, "lat_p50_us": 21.5, "lat_p99_us": 40.25, "errors": 0, "completed_last": 120},
                {"uri": "file:///data/mirror.img", "role": "mirror", "state": "resyncing",
                 "ops": ops1, "lat_p50_us": 23.0, "lat_p99_us": 88.0, "errors": 2, "completed_last": 880}
            ],
            "bitmap": {"dirty_regions": 12, "regions": 1024, "region_size": 1048576, "metadata_writes": 31},
            "resync": {"leg": 1, "state": "running", "bytes_copied": 440401920u64,
                       "bytes_total": 1073741824u64, "rate_bytes_per_sec": 104857600u64}
        })
    }

    #[test]
    fn golden_status() {
        let prev = [sample(1000, 500)];
        let now = [sample(21000, 10500)];
        let got = render(&now, Some(&prev), Duration::from_secs(2));
        let want = "\
volume vol0: 1.0 GiB (2097152 blocks of 512 B), 1/2 legs in sync, DEGRADED
  leg role     state           iops    p50 us    p99 us  errors    last  uri
  0   primary  in_sync        10000      21.5      40.2       0     120  file:///data/primary.img
  1   mirror   resyncing       5000      23.0      88.0       2     880  file:///data/mirror.img
  bitmap: 12 dirty of 1024 regions (1.0 MiB each), 31 metadata writes
  resync leg 1 (running): [############------------------]  41.0%  420.0 MiB / 1.0 GiB  100.0 MiB/s  ETA 6s
";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn without_a_previous_sample_rates_are_dashes() {
        let got = render(&[sample(1, 1)], None, Duration::ZERO);
        assert!(got.lines().nth(2).unwrap().contains("        -"), "{got}");
        assert_eq!(render(&[], None, Duration::ZERO), "no volumes\n");
    }

    #[test]
    fn helpers() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_duration(3725.0), "1h02m");
        assert_eq!(progress_bar(0.5, 4), "[##--]");
        assert_eq!(progress_bar(7.0, 2), "[##]");
    }
}
