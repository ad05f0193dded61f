//! The progress line: a relay that publishes says so at most every [`PROGRESS_EVERY`], and an idle one says
//! nothing. Counting is a few additions per batch; the line itself is written by the engine.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two progress lines.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Rows published since the last progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// When the first batch counted since the last line started; `None` while nothing was published.
    started: Option<Instant>,
    published: u64,
}

/// What a progress line reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Period {
    /// Rows published.
    pub published: u64,
    /// From the start of the period's first batch to the end of its last.
    pub elapsed: Duration,
}

impl Period {
    /// Rows per second over the period.
    pub fn per_second(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

impl Progress {
    /// Counts a batch that started at `started`, ended at `now` and published `published` rows; returns the
    /// period to report once it has lasted [`PROGRESS_EVERY`], and starts the next.
    pub fn count(&mut self, published: u64, started: Instant, now: Instant) -> Option<Period> {
        if published == 0 && self.started.is_none() {
            return None;
        }
        let since = *self.started.get_or_insert(started);
        self.published += published;
        let elapsed = now.saturating_duration_since(since);
        if elapsed < PROGRESS_EVERY {
            return None;
        }
        let period = Period { published: self.published, elapsed };
        *self = Self::default();
        Some(period)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_flow_is_reported_every_period_and_silence_not_at_all() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut progress = Progress::default();
        let mut lines = Vec::new();
        // A batch of 100 rows every 250 ms for 70 s, then five minutes of empty claims.
        for step in 0..1480 {
            let begin = at(step * 250);
            let rows = if step < 280 { 100 } else { 0 };
            if let Some(period) = progress.count(rows, begin, begin + Duration::from_millis(50)) {
                lines.push((step, period));
            }
        }
        let steps: Vec<u64> = lines.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps, [120, 241, 362], "two full periods, then the rest once its period is over");
        for (_, period) in &lines[..2] {
            assert!(
                period.elapsed >= PROGRESS_EVERY && period.elapsed < PROGRESS_EVERY + Duration::from_secs(1)
            );
            assert!((390.0..=410.0).contains(&period.per_second()), "{period:?}");
        }
        assert_eq!(lines[0].1.published, 12_100, "the batches of the first 30.05 s");
        assert_eq!(lines[2].1.published, 3_800, "the rest of the flow");
    }

    #[test]
    fn a_trickle_is_reported_when_its_period_is_over() {
        let start = Instant::now();
        let mut progress = Progress::default();
        assert_eq!(progress.count(3, start, start), None);
        let later = start + Duration::from_secs(90);
        let period = progress.count(2, later, later).expect("the period is over");
        assert_eq!(period, Period { published: 5, elapsed: Duration::from_secs(90) });
        assert_eq!(progress.count(0, later, later + Duration::from_secs(60)), None, "nothing since");
    }
}
