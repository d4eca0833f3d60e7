//! `nvmirror-bench plot run1.json run2.json … -o lat.svg`: draws runs saved with
//! `--output-format json` into one SVG with two panels:
//!
//! - top: completion-latency percentile curves, the usual HDR view: x is `1/(1-quantile)` on a
//!   log scale labelled 50 %, 90 %, 99 %, 99.9 %, 99.99 %; y is latency in µs on a log scale
//!   (tails are often orders of magnitude above the median); one curve per run and direction;
//! - bottom: IOPS bars, one group per run, one bar per direction.
//!
//! Legends name each run after its file name (without `.json`) and fio's jobname. Only SVG is
//! written: plotters' PNG backend needs a font rasteriser with system fonts to draw text.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{FioDirection, FioOutput};
use crate::{Error, Result};

/// The x positions (`1/(1-q)`) of the labelled quantiles and their labels.
pub const QUANTILE_TICKS: [(f64, &str); 5] = [
    (2.0, "50%"),
    (10.0, "90%"),
    (100.0, "99%"),
    (1_000.0, "99.9%"),
    (10_000.0, "99.99%"),
];

/// Image size in pixels (both panels).
const SIZE: (u32, u32) = (1000, 900);

/// Draws latency percentile curves and IOPS bars of saved runs.
#[derive(Debug, Parser)]
#[command(name = "nvmirror-bench plot")]
pub struct PlotArgs {
    /// Runs saved with `--output-format json`
    #[arg(value_name = "RUN.json", required = true)]
    pub runs: Vec<PathBuf>,

    /// The image to write (`.svg`)
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,

    /// Title above the latency panel
    #[arg(long, default_value = "completion latency by percentile")]
    pub title: String,
}

/// One direction of one run: what a curve and a bar show.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// `<file stem> <jobname> <direction>`.
    pub label: String,
    /// The run it belongs to (`<file stem> <jobname>`).
    pub run: String,
    pub direction: &'static str,
    pub iops: f64,
    /// `(1/(1-q), latency µs)` for every reported percentile q.
    pub points: Vec<(f64, f64)>,
}

/// Reads a saved run; errors name the file.
pub fn read_run(path: &Path) -> Result<FioOutput> {
    let text = fs::read_to_string(path).map_err(|source| Error::ReadRun {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::ParseRun {
        path: path.to_path_buf(),
        source,
    })
}

/// The series of one saved run: each direction that did I/O, in every job.
pub fn series_of(path: &Path, run: &FioOutput) -> Vec<Series> {
    let stem = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into(),
    );
    let mut out = Vec::new();
    for job in &run.jobs {
        let name = format!("{stem} {}", job.jobname);
        for (direction, d) in [("read", &job.read), ("write", &job.write)] {
            if d.total_ios == 0 {
                continue;
            }
            out.push(Series {
                label: format!("{name} {direction}"),
                run: name.clone(),
                direction,
                iops: d.iops,
                points: curve(d),
            });
        }
    }
    out
}

/// `(1/(1-q), µs)` of a direction's completion-latency percentiles, in ascending q (q < 1).
fn curve(d: &FioDirection) -> Vec<(f64, f64)> {
    let Some(pct) = &d.clat_ns.percentile else {
        return Vec::new();
    };
    pct.0
        .iter()
        .filter(|(p, _)| (0.0..100.0).contains(p))
        .map(|(p, ns)| (1.0 / (1.0 - p / 100.0), (*ns as f64 / 1e3).max(1e-3)))
        .collect()
}

/// The label of an x position that is one of [`QUANTILE_TICKS`] (others get none).
fn quantile_label(x: f64) -> String {
    QUANTILE_TICKS
        .iter()
        .find(|(t, _)| (x / t - 1.0).abs() < 1e-6)
        .map_or_else(String::new, |(_, l)| (*l).to_string())
}

/// Runs `nvmirror-bench plot` with `argv` (`plot` first, then its arguments); bad arguments
/// and `--help` end the process the way clap does.
pub fn main(argv: impl IntoIterator<Item = String>) -> Result<PathBuf> {
    let args = PlotArgs::parse_from(argv);
    plot(&args)?;
    Ok(args.output)
}

/// Reads every run and writes the image.
pub fn plot(args: &PlotArgs) -> Result<()> {
    let ext = args
        .output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => {}
        Some("png") => {
            return Err(Error::Flag {
                flag: "-o",
                reason: "PNG is not supported (it needs system fonts to draw text); write .svg"
                    .into(),
            })
        }
        _ => {
            return Err(Error::Flag {
                flag: "-o",
                reason: format!("{}: the file name must end in .svg", args.output.display()),
            })
        }
    }
    let mut series = Vec::new();
    for path in &args.runs {
        let run = read_run(path)?;
        let s = series_of(path, &run);
        if s.is_empty() {
            return Err(Error::Plot {
                path: path.clone(),
                reason: "the run completed no I/O".into(),
            });
        }
        series.extend(s);
    }
    draw_svg(&args.output, &args.title, &series)
}

/// Draws both panels into an SVG file.
pub fn draw_svg(out: &Path, title: &str, series: &[Series]) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| Error::Plot {
        path: out.to_path_buf(),
        reason: e.to_string(),
    };
    let root = SVGBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(SIZE.1 * 62 / 100);
    draw_latency(&top, title, series).map_err(|e| fail(&e))?;
    draw_iops(&bottom, series).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    std::result::Result<(), DrawingAreaErrorKind<<SVGBackend<'a> as DrawingBackend>::ErrorType>>;

fn draw_latency<'a>(area: &Area<'a>, title: &str, series: &[Series]) -> DrawResult<'a> {
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold((f64::MAX, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if hi <= 0.0 { (1.0, 10.0) } else { (lo, hi) };
    let x_max = QUANTILE_TICKS[QUANTILE_TICKS.len() - 1].0;
    let x = (1.0f64..x_max)
        .log_scale()
        .with_key_points(QUANTILE_TICKS.iter().map(|(t, _)| *t).collect());
    let y = ((lo * 0.8).max(1e-3)..hi * 1.25).log_scale();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| quantile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn draw_iops<'a>(area: &Area<'a>, series: &[Series]) -> DrawResult<'a> {
    let max = series.iter().map(|s| s.iops).fold(0f64, f64::max).max(1.0);
    let n = series.len().max(1);
    // Tenths of a slot: bar i spans [10i + 1, 10i + 9]; its label sits under 10i + 5.
    let n = n as i32;
    let centers: Vec<i32> = (0..n).map(|i| 10 * i + 5).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("IOPS", ("sans-serif", 22))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..10 * n).with_key_points(centers), 0.0..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| {
            let i = usize::try_from(*x / 10).unwrap_or(usize::MAX);
            series.get(i).map_or_else(String::new, |s| s.label.clone())
        })
        .y_label_formatter(&|y| si(*y))
        .y_desc("IOPS")
        .draw()?;
    let above =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let x = 10 * i as i32;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 1, 0.0), (x + 9, s.iops)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            si(s.iops),
            (x + 5, s.iops + max * 0.01),
            above.clone(),
        )))?;
    }
    Ok(())
}

/// `1.23M`, `456k`: an axis or bar figure.
fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_map_onto_the_hdr_axis() {
        let d: FioDirection = serde_json::from_value(serde_json::json!({
            "io_bytes": 0, "io_kbytes": 0, "bw_bytes": 0, "bw": 0, "iops": 10.0, "runtime": 1,
            "total_ios": 10, "short_ios": 0, "drop_ios": 0,
            "slat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0},
            "clat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 10,
                        "percentile": {"50.000000": 2000, "99.900000": 9000}},
            "lat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
        }))
        .unwrap();
        let c = curve(&d);
        assert_eq!(c.len(), 2);
        assert!((c[0].0 - 2.0).abs() < 1e-9 && (c[0].1 - 2.0).abs() < 1e-9);
        assert!((c[1].0 - 1000.0).abs() < 1e-6 && (c[1].1 - 9.0).abs() < 1e-9);
        assert_eq!(quantile_label(1000.0000001), "99.9%");
        assert_eq!(quantile_label(10.0), "90%");
        assert_eq!(quantile_label(5.0), "");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(456_000.0), "456k");
    }
}
