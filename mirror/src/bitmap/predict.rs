//! Sequential-stream prediction, per volume queue pair: when a write starts where the previous
//! one ended (or ends where it started, for a backward stream) and touches an unmarked region,
//! the next `ahead` regions in the stream's direction are marked in the same metadata write.
//! `ahead` doubles at each such first touch while the stream goes on (1, 2, 4, … up to the
//! configured maximum) and drops to zero when a write breaks the stream, so random writes
//! never mark regions they do not touch.

use super::RegionRange;

/// One core's stream detector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamPredictor {
    /// First block of the last write started.
    start: u64,
    /// Block after the last write started.
    end: u64,
    /// Regions to pre-mark at the next first touch (0: no stream).
    ahead: u64,
    max: u64,
}

impl StreamPredictor {
    /// A predictor marking at most `max` regions ahead (0 turns prediction off).
    pub(crate) fn new(max: u32) -> Self {
        Self {
            start: u64::MAX,
            end: u64::MAX,
            ahead: 0,
            max: u64::from(max),
        }
    }

    /// A write of `[slba, slba + nlb)` started.
    #[inline]
    pub(crate) fn observe(&mut self, slba: u64, nlb: u32) {
        let end = slba + u64::from(nlb);
        if slba != self.end && end != self.start {
            self.ahead = 0;
        }
        self.start = slba;
        self.end = end;
    }

    /// The write `[slba, slba + nlb)` over regions `r` is a first touch: the regions to
    /// pre-mark with it (empty when it is not part of a stream), below `regions`. Grows the
    /// look-ahead for the next first touch.
    pub(crate) fn predict(
        &mut self,
        slba: u64,
        nlb: u32,
        r: RegionRange,
        regions: u64,
    ) -> Option<RegionRange> {
        if self.max == 0 {
            return None;
        }
        let forward = slba == self.end;
        let backward = slba + u64::from(nlb) == self.start;
        if !forward && !backward {
            return None;
        }
        self.ahead = (self.ahead * 2).clamp(1, self.max);
        let k = self.ahead;
        if forward && r.last + 1 < regions {
            Some(RegionRange {
                first: r.last + 1,
                last: (r.last + k).min(regions - 1),
            })
        } else if backward && r.first > 0 {
            Some(RegionRange {
                first: r.first.saturating_sub(k),
                last: r.first - 1,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(first: u64, last: u64) -> RegionRange {
        RegionRange { first, last }
    }

    #[test]
    fn a_forward_stream_doubles_up_to_the_maximum() {
        let mut p = StreamPredictor::new(4);
        p.observe(0, 8);
        assert_eq!(p.predict(8, 8, rr(1, 1), 100), Some(rr(2, 2)));
        p.observe(8, 8);
        assert_eq!(p.predict(16, 8, rr(3, 3), 100), Some(rr(4, 5)));
        p.observe(16, 8);
        assert_eq!(p.predict(24, 8, rr(6, 6), 100), Some(rr(7, 10)));
        p.observe(24, 8);
        assert_eq!(p.predict(32, 8, rr(11, 11), 100), Some(rr(12, 15)));
        // Clipped at the end of the namespace.
        p.observe(32, 8);
        assert_eq!(p.predict(40, 8, rr(98, 98), 100), Some(rr(99, 99)));
    }

    #[test]
    fn random_writes_predict_nothing_and_reset_the_stream() {
        let mut p = StreamPredictor::new(64);
        p.observe(0, 8);
        p.predict(8, 8, rr(1, 1), 100);
        p.observe(8, 8);
        p.observe(500, 8);
        assert_eq!(p.predict(9000, 8, rr(50, 50), 100), None);
        p.observe(9000, 8);
        assert_eq!(
            p.predict(9008, 8, rr(51, 51), 100),
            Some(rr(52, 52)),
            "restarts at 1"
        );
    }

    #[test]
    fn a_backward_stream_marks_below() {
        let mut p = StreamPredictor::new(64);
        p.observe(80, 8);
        assert_eq!(p.predict(72, 8, rr(9, 9), 100), Some(rr(8, 8)));
        p.observe(72, 8);
        assert_eq!(p.predict(64, 8, rr(8, 8), 100), Some(rr(6, 7)));
        let mut off = StreamPredictor::new(0);
        off.observe(0, 8);
        assert_eq!(off.predict(8, 8, rr(1, 1), 100), None);
    }
}
