//! `nvmirror status --watch` on a terminal: each volume's table redrawn in place, and a live
//! `indicatif` progress bar per running resync, with the server's copy rate and ETA.
//!
//! Off a terminal (`--watch` piped into a file) the plain [`crate::status::render`] text is
//! printed once per interval instead.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::status::{resync_progress, volume_table};

const BAR_TEMPLATE: &str =
    "  {prefix}: [{bar:30}] {percent:>3}%  {binary_bytes} / {binary_total_bytes}  {msg}";

/// One volume on screen: its table, and its resync bar while one runs.
#[derive(Debug)]
struct VolumeView {
    name: String,
    table: ProgressBar,
    resync: Option<ProgressBar>,
}

/// The live view: one block per volume, updated from successive `volume_status` samples.
#[derive(Debug)]
pub struct Watch {
    multi: MultiProgress,
    volumes: Vec<VolumeView>,
    empty: Option<ProgressBar>,
}

impl Watch {
    /// A view drawing on stdout (hidden when stdout is not a terminal).
    pub fn stdout() -> Self {
        Self::with_target(ProgressDrawTarget::stdout())
    }

    /// A view drawing on `target` (tests draw into an in-memory terminal).
    pub fn with_target(target: ProgressDrawTarget) -> Self {
        Self {
            multi: MultiProgress::with_draw_target(target),
            volumes: Vec::new(),
            empty: None,
        }
    }

    /// Whether the view is drawn anywhere (false off a terminal).
    pub fn is_visible(&self) -> bool {
        !self.multi.is_hidden()
    }

    /// Redraws from `volumes` (each a `volume_status` result); `prev` and `interval` give the
    /// rates, as for [`crate::status::render`].
    pub fn update(&mut self, volumes: &[Value], prev: Option<&[Value]>, interval: Duration) {
        let name_of = |v: &Value| {
            v.get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        // Volumes that went away lose their block.
        self.volumes.retain(|view| {
            let keep = volumes.iter().any(|v| name_of(v) == view.name);
            if !keep {
                view.table.finish_and_clear();
                if let Some(bar) = &view.resync {
                    bar.finish_and_clear();
                }
            }
            keep
        });
        match (volumes.is_empty(), &self.empty) {
            (true, None) => {
                let line = self.multi.add(text_line());
                line.set_message("no volumes");
                self.empty = Some(line);
            }
            (false, Some(line)) => {
                line.finish_and_clear();
                self.empty = None;
            }
            _ => {}
        }
        for vol in volumes {
            let name = name_of(vol);
            let idx = match self.volumes.iter().position(|v| v.name == name) {
                Some(i) => i,
                None => {
                    let table = self.multi.add(text_line());
                    self.volumes.push(VolumeView {
                        name,
                        table,
                        resync: None,
                    });
                    self.volumes.len() - 1
                }
            };
            let view = &mut self.volumes[idx];
            let table = volume_table(vol, prev, interval);
            view.table
                .set_message(table.trim_end_matches('\n').to_string());
            match (resync_progress(vol), &view.resync) {
                (Some(r), bar) => {
                    let bar = match bar {
                        Some(bar) => bar.clone(),
                        None => {
                            let bar = self.multi.insert_after(&view.table, resync_bar());
                            view.resync = Some(bar.clone());
                            bar
                        }
                    };
                    bar.set_prefix(r.label.clone());
                    bar.set_length(r.total);
                    bar.set_position(r.done.min(r.total));
                    bar.set_message(r.rate_and_eta());
                }
                (None, Some(bar)) => {
                    bar.finish_and_clear();
                    view.resync = None;
                }
                (None, None) => {}
            }
        }
        for view in &self.volumes {
            view.table.tick();
            if let Some(bar) = &view.resync {
                bar.tick();
            }
        }
    }
}

fn text_line() -> ProgressBar {
    ProgressBar::new(1).with_style(ProgressStyle::with_template("{msg}").expect("static template"))
}

fn resync_bar() -> ProgressBar {
    let style = ProgressStyle::with_template(BAR_TEMPLATE)
        .expect("static template")
        .progress_chars("#>-");
    ProgressBar::new(0).with_style(style)
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::InMemoryTerm;
    use serde_json::json;

    fn vol(copied: u64, resync: bool) -> Value {
        let mut v = json!({
            "name": "vol0", "capacity_bytes": 1073741824u64, "num_blocks": 2097152, "lba_size": 512,
            "legs": [
                {"uri": "mem://1GiB", "role": "primary", "state": "in_sync",
                 "ops": 100, "lat_p50_us": 20.0, "lat_p99_us": 40.0, "errors": 0, "completed_last": 1},
                {"uri": "mem://1GiB", "role": "mirror", "state": if resync { "resyncing" } else { "in_sync" },
                 "ops": 50, "lat_p50_us": 22.0, "lat_p99_us": 80.0, "errors": 0, "completed_last": 9}
            ],
            "bitmap": null,
            "resync": null
        });
        if resync {
            v["resync"] = json!({"leg": 1, "state": "running", "bytes_copied": copied,
                                 "bytes_total": 1073741824u64, "rate_bytes_per_sec": 104857600u64});
        }
        v
    }

    fn screen(term: &InMemoryTerm) -> String {
        term.contents()
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn draws_the_table_and_a_live_resync_bar() {
        let term = InMemoryTerm::new(12, 120);
        let mut watch = Watch::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        assert!(watch.is_visible());
        let prev = [vol(0, true)];
        watch.update(&[vol(440401920, true)], Some(&prev), Duration::from_secs(1));
        let want = "\
volume vol0: 1.0 GiB (2097152 blocks of 512 B), 1/2 legs in sync, DEGRADED
  leg role     state           iops    p50 us    p99 us  errors    last  uri
  0   primary  in_sync            0      20.0      40.0       0       1  mem://1GiB
  1   mirror   resyncing          0      22.0      80.0       0       9  mem://1GiB
  resync leg 1 (running): [############>-----------------]  41%  420.00 MiB / 1.00 GiB  100.0 MiB/s  ETA 6s";
        assert_eq!(screen(&term), want, "\n{}", screen(&term));

        // The bar moves in place, and goes away when the resync ends.
        watch.update(
            &[vol(1073741824, true)],
            Some(&prev),
            Duration::from_secs(1),
        );
        assert!(
            screen(&term).contains("100%  1.00 GiB / 1.00 GiB"),
            "{}",
            screen(&term)
        );
        watch.update(&[vol(0, false)], None, Duration::ZERO);
        let done = screen(&term);
        assert!(!done.contains("resync leg"), "{done}");
        assert!(done.contains("2/2 legs in sync, healthy"), "{done}");
        assert_eq!(done.lines().count(), 4, "{done}");
    }

    #[test]
    fn shows_when_there_are_no_volumes() {
        let term = InMemoryTerm::new(6, 80);
        let mut watch = Watch::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        watch.update(&[], None, Duration::ZERO);
        assert_eq!(screen(&term), "no volumes");
        watch.update(&[vol(0, false)], None, Duration::ZERO);
        assert!(
            screen(&term).starts_with("volume vol0"),
            "{}",
            screen(&term)
        );
        assert!(!screen(&term).contains("no volumes"));
    }

    #[test]
    fn hidden_off_a_terminal() {
        let watch = Watch::with_target(ProgressDrawTarget::hidden());
        assert!(!watch.is_visible());
    }
}
