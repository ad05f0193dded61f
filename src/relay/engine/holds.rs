//! What keeps rows back for a while, in memory: order keys on hold until a failed row's retry, and event
//! names whose subject no stream captures. Every question takes `now`, so the rules are tested without
//! waiting.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Shortest and longest wait before trying again a subject that no stream captured; it grows with how long
/// the stream has been missing, so a long-missing stream costs a batch every half minute, not every poll.
pub(super) const NO_STREAM_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Say that a subject has no stream at most this often.
const NO_STREAM_LOG_EVERY: Duration = Duration::from_secs(60);

/// Keys on hold and subjects without a stream.
#[derive(Debug, Default)]
pub(super) struct Holds {
    /// Order keys whose rows wait, and until when.
    keys: HashMap<String, Instant>,
    /// Event names whose subject no stream captured.
    missing_streams: HashMap<String, MissingStream>,
}

/// A subject no stream captures.
#[derive(Debug, Clone, Copy)]
struct MissingStream {
    since: Instant,
    logged: Option<Instant>,
    retry_at: Instant,
}

/// What to do about a subject found without a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NoStream {
    /// Say so now (at most once a minute per subject).
    pub(super) log: bool,
    /// When to try the subject again.
    pub(super) retry_in: Duration,
}

impl Holds {
    /// Keeps `key`'s rows back until `until` (or later, if already held longer).
    pub(super) fn hold(&mut self, key: String, until: Instant) {
        let held = self.keys.entry(key).or_insert(until);
        *held = (*held).max(until);
    }

    /// Whether `key` is on hold at `now`.
    pub(super) fn is_held(&self, key: &str, now: Instant) -> bool {
        self.keys.get(key).is_some_and(|until| *until > now)
    }

    /// Whether any key may be on hold (a cheap test before looking row by row).
    pub(super) fn any_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The keys on hold at `now`; forgets the others.
    pub(super) fn held_keys(&mut self, now: Instant) -> Vec<String> {
        self.keys.retain(|_, until| *until > now);
        self.keys.keys().cloned().collect()
    }

    /// Event names to leave out of claims at `now`: those whose stream is missing and not due for a retry.
    pub(super) fn skipped_event_names(&self, now: Instant) -> Vec<String> {
        self.missing_streams
            .iter()
            .filter(|(_, missing)| missing.retry_at > now)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A publish of `event_name` found no stream at `now`.
    pub(super) fn stream_missing(&mut self, event_name: &str, now: Instant) -> NoStream {
        let missing = self.missing_streams.entry(event_name.to_owned()).or_insert(MissingStream {
            since: now,
            logged: None,
            retry_at: now,
        });
        let log = missing.logged.is_none_or(|at| now.duration_since(at) >= NO_STREAM_LOG_EVERY);
        if log {
            missing.logged = Some(now);
        }
        let retry_in = now.duration_since(missing.since).clamp(NO_STREAM_RETRY.0, NO_STREAM_RETRY.1);
        missing.retry_at = now + retry_in;
        NoStream { log, retry_in }
    }

    /// A publish of `event_name` went through: its stream exists.
    pub(super) fn stream_found(&mut self, event_name: &str) {
        if !self.missing_streams.is_empty() {
            self.missing_streams.remove(event_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_when_its_time_comes_and_is_then_forgotten() {
        let now = Instant::now();
        let mut holds = Holds::default();
        holds.hold("order-1".into(), now + Duration::from_secs(2));
        holds.hold("order-1".into(), now + Duration::from_secs(1)); // a shorter hold never shortens it
        assert!(holds.is_held("order-1", now + Duration::from_millis(1500)));
        assert_eq!(holds.held_keys(now), ["order-1"]);
        assert!(!holds.is_held("order-1", now + Duration::from_secs(2)));
        assert!(holds.held_keys(now + Duration::from_secs(2)).is_empty());
        assert!(!holds.any_keys(), "forgotten");
    }

    #[test]
    fn a_missing_stream_is_said_once_a_minute_and_retried_later_the_longer_it_is_missing() {
        let now = Instant::now();
        let mut holds = Holds::default();
        assert_eq!(
            holds.stream_missing("order.placed", now),
            NoStream { log: true, retry_in: NO_STREAM_RETRY.0 }
        );
        assert_eq!(holds.skipped_event_names(now), ["order.placed"]);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            holds.stream_missing("order.placed", later),
            NoStream { log: false, retry_in: Duration::from_secs(10) }
        );
        let much_later = now + Duration::from_secs(90);
        assert_eq!(
            holds.stream_missing("order.placed", much_later),
            NoStream { log: true, retry_in: NO_STREAM_RETRY.1 }
        );
        assert!(holds.skipped_event_names(much_later + NO_STREAM_RETRY.1).is_empty(), "due for a retry");
        holds.stream_found("order.placed");
        assert!(holds.skipped_event_names(much_later).is_empty());
    }
}
