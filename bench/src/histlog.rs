//! `--hdr-log DIR`: per-interval latency histograms, written as HdrHistogram interval logs
//! (V2 deflate encoding), one file per job per direction: `DIR/<job>.<read|write|trim>.hlog`.
//!
//! A job thread records the latency of each counted I/O (the same value as `lat_ns`) into a
//! per-direction interval histogram; once per `--log_interval` it copies each histogram into
//! its log and resets it. That copy happens once per interval, never per I/O. Threads are
//! merged interval by interval; interval *i* covers `[i, i+1) × log_interval` of the measured
//! window, and the last one ends with the window.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use crate::engine::{latency_histogram, Direction, RunResult};
use crate::{Error, Result};

/// One interval of a log.
#[derive(Clone, Debug)]
pub struct LoggedInterval {
    /// Start, from the start of the measured window.
    pub start: Duration,
    pub length: Duration,
    pub hist: Histogram<u64>,
}

/// Interval histograms of one job, per direction (indexed by [`Direction::index`]).
#[derive(Clone, Debug, Default)]
pub struct IntervalLog {
    pub dirs: [Vec<LoggedInterval>; 3],
}

impl IntervalLog {
    /// Adds another thread's intervals, index by index.
    pub fn merge(&mut self, other: &IntervalLog) -> Result<()> {
        for (mine, theirs) in self.dirs.iter_mut().zip(&other.dirs) {
            for (i, iv) in theirs.iter().enumerate() {
                match mine.get_mut(i) {
                    Some(m) => {
                        m.hist
                            .add(&iv.hist)
                            .map_err(|e| Error::Histogram(format!("{e:?}")))?;
                        m.length = m.length.max(iv.length);
                    }
                    None => mine.push(iv.clone()),
                }
            }
        }
        Ok(())
    }
}

/// The interval histograms of one job thread while it runs.
#[derive(Debug)]
pub struct IntervalRecorder {
    interval_ns: u64,
    /// Start of the measured window, ns since the thread's epoch.
    window_start: u64,
    /// End of the current interval, ns since the thread's epoch.
    next_cut: u64,
    current: [Histogram<u64>; 3],
    active: [bool; 3],
    log: IntervalLog,
}

impl IntervalRecorder {
    /// A recorder cutting every `interval` from `window_start_ns`, for the directions marked
    /// `active`.
    pub fn new(interval: Duration, window_start_ns: u64, active: [bool; 3]) -> Result<Self> {
        let interval_ns = interval.as_nanos().max(1) as u64;
        Ok(Self {
            interval_ns,
            window_start: window_start_ns,
            next_cut: window_start_ns + interval_ns,
            current: [
                latency_histogram()?,
                latency_histogram()?,
                latency_histogram()?,
            ],
            active,
            log: IntervalLog::default(),
        })
    }

    /// Records one latency of direction `dir`.
    #[inline]
    pub fn record(&mut self, dir: usize, ns: u64) {
        self.current[dir].saturating_record(ns);
    }

    /// Closes every interval that ended at or before `now_ns`.
    #[inline]
    pub fn tick(&mut self, now_ns: u64) {
        while now_ns >= self.next_cut {
            self.cut(self.next_cut);
            self.next_cut += self.interval_ns;
        }
    }

    fn cut(&mut self, end_ns: u64) {
        let start_ns = self.next_cut - self.interval_ns;
        for d in 0..3 {
            if !self.active[d] {
                continue;
            }
            self.log.dirs[d].push(LoggedInterval {
                start: Duration::from_nanos(start_ns - self.window_start),
                length: Duration::from_nanos(end_ns - start_ns),
                hist: self.current[d].clone(),
            });
            self.current[d].reset();
        }
    }

    /// Closes the last interval at the window's end and returns the log.
    pub fn finish(mut self, window_end_ns: u64) -> IntervalLog {
        self.tick(window_end_ns);
        let start = self.next_cut - self.interval_ns;
        if window_end_ns > start {
            self.cut(window_end_ns);
        }
        self.log
    }
}

/// A job name made safe for a file name.
pub fn file_stem(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `DIR/<job>.<direction>.hlog` for each direction the job issues; returns the paths.
pub fn write_logs(dir: &Path, run: &RunResult) -> Result<Vec<PathBuf>> {
    let io = |path: &Path, e: std::io::Error| Error::HdrLog {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let Some(log) = &run.stats.intervals else {
        return Ok(Vec::new());
    };
    let started = SystemTime::now()
        .checked_sub(run.stats.runtime)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut paths = Vec::new();
    for d in Direction::ALL {
        if !d.issued_by(run.spec.rw) {
            continue;
        }
        let path = dir.join(format!(
            "{}.{}.hlog",
            file_stem(run.spec.job_name()),
            d.name()
        ));
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        let mut out = BufWriter::new(file);
        let mut serializer = V2DeflateSerializer::new();
        let mut writer = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "nvmirror-bench {} job {} {} latency, ns",
                env!("CARGO_PKG_VERSION"),
                run.spec.job_name(),
                d.name()
            ))
            .with_start_time(started)
            .with_base_time(started)
            .begin_log_with(&mut out, &mut serializer)
            .map_err(|e| io(&path, e))?;
        for iv in &log.dirs[d.index()] {
            writer
                .write_histogram(&iv.hist, iv.start, iv.length, None)
                .map_err(|e| Error::HdrLog {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        }
        drop(writer);
        std::io::Write::flush(&mut out).map_err(|e| io(&path, e))?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_cut_on_time_and_the_last_ends_with_the_window() {
        let mut r =
            IntervalRecorder::new(Duration::from_nanos(100), 1000, [true, false, false]).unwrap();
        r.record(0, 5);
        r.tick(1050);
        r.record(0, 6);
        r.tick(1100);
        r.record(0, 7);
        r.record(0, 8);
        r.tick(1320);
        r.record(0, 9);
        let log = r.finish(1350);
        let counts: Vec<(u64, u64, u64)> = log.dirs[0]
            .iter()
            .map(|iv| {
                (
                    iv.start.as_nanos() as u64,
                    iv.length.as_nanos() as u64,
                    iv.hist.len(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            [(0, 100, 2), (100, 100, 2), (200, 100, 0), (300, 50, 1)]
        );
        assert!(log.dirs[1].is_empty());
        assert_eq!(file_stem("seq write/1"), "seq_write_1");
    }
}
