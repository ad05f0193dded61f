//! Exponential backoff with jitter: the one shape of "wait longer each time" in this crate (a failing row's
//! retries, an outage's pauses, a lock backend's retries, a consumer's redeliveries).

use std::time::Duration;

/// `first · 2^(attempt−1)`, capped at `max`, then shortened at random by up to `jitter` of itself, so many
/// waiters do not retry in lockstep.
///
/// ```
/// use std::time::Duration;
/// use qx_relay::backoff::Backoff;
/// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// assert_eq!(backoff.delay(3), Duration::from_secs(4));
/// assert_eq!(backoff.delay(100), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// Doubling from `first` up to `max`, without jitter.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, jitter: 0.0 }
    }

    /// The same, each delay shortened at random by up to `fraction` (0 to 1) of itself.
    pub const fn with_jitter(self, fraction: f64) -> Self {
        Self { jitter: fraction, ..self }
    }

    /// The wait before try number `attempt` after the first (1 = the first retry); 0 counts as 1.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let full = self.first.saturating_mul(1 << exponent).min(self.max);
        if self.jitter <= 0.0 {
            return full;
        }
        full.mul_f64(1.0 - self.jitter.min(1.0) * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_up_to_the_cap() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = [0, 1, 2, 3, 4, 5, 1000].map(|n| backoff.delay(n).as_millis()).into();
        assert_eq!(delays, [100, 100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_only_shortens_and_by_at_most_its_fraction() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).with_jitter(0.5);
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(4)).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_secs(4) && *d <= Duration::from_secs(8)));
        assert!(delays.iter().any(|d| *d != delays[0]), "random, not constant");
    }
}
