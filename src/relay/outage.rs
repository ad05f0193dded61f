//! How long a server has been failing, and when to give up on it: the one outage clock of the relay (Postgres
//! and NATS in the engine, the lock backend in the leader).
//!
//! The clock starts when the first failing step *started*, so a step that failed by timing out counts its
//! wait, and pauses between tries never run past the moment the relay gives up: giving up happens on time.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// A server's failures since it last answered.
#[derive(Debug, Clone)]
pub struct OutageClock {
    give_up_after: Duration,
    /// When the first failing step started, while failing.
    since: Option<Instant>,
    failures: u32,
}

/// The outage has lasted `give_up_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp;

impl OutageClock {
    /// A clock that gives up after `give_up_after` of failing.
    pub fn new(give_up_after: Duration) -> Self {
        Self { give_up_after, since: None, failures: 0 }
    }

    /// A step that began at `started` failed: how long the server has been down, or [`GaveUp`].
    ///
    /// # Errors
    /// When the outage has lasted `give_up_after`.
    pub fn failed(&mut self, started: Instant) -> Result<Duration, GaveUp> {
        let since = *self.since.get_or_insert(started);
        self.failures = self.failures.saturating_add(1);
        let down_for = since.elapsed();
        if down_for >= self.give_up_after {
            return Err(GaveUp);
        }
        Ok(down_for)
    }

    /// The server answered: how long it had been down, if it was.
    pub fn recovered(&mut self) -> Option<Duration> {
        self.failures = 0;
        self.since.take().map(|since| since.elapsed())
    }

    /// Whether the server is failing now.
    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }

    /// Time left before giving up (all of `give_up_after` while the server answers).
    pub fn left(&self) -> Duration {
        self.since.map_or(self.give_up_after, |since| self.give_up_after.saturating_sub(since.elapsed()))
    }

    /// The pause before trying again: `backoff` for the failures so far, never past the give-up moment.
    pub fn pause(&self, backoff: &Backoff) -> Duration {
        backoff.delay(self.failures).min(self.left())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_from_the_start_of_the_first_failing_step_and_gives_up_on_time() {
        let mut clock = OutageClock::new(Duration::from_secs(5));
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(2)).await; // the step timed out after 2 s
        assert_eq!(clock.failed(started), Ok(Duration::from_secs(2)));
        assert_eq!(clock.left(), Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(clock.failed(Instant::now()), Err(GaveUp));
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_grow_with_failures_but_never_pass_the_give_up_moment() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut clock = OutageClock::new(Duration::from_secs(1));
        assert_eq!(clock.pause(&backoff), Duration::from_millis(100), "answering: the shortest pause");
        clock.failed(Instant::now()).unwrap();
        clock.failed(Instant::now()).unwrap();
        assert_eq!(clock.pause(&backoff), Duration::from_millis(200));
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(clock.pause(&backoff), Duration::from_millis(100), "cut to what is left");
    }

    #[test]
    fn recovering_resets_the_clock() {
        let mut clock = OutageClock::new(Duration::from_secs(5));
        assert_eq!(clock.recovered(), None, "it was not down");
        clock.failed(Instant::now()).unwrap();
        assert!(clock.is_down());
        assert!(clock.recovered().is_some());
        assert!(!clock.is_down());
        assert_eq!(clock.left(), Duration::from_secs(5));
    }
}
