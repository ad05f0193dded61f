//! What each publish outcome means for its row: the relay's failure policy as one function with no I/O, from
//! (rows, outcomes, holds, rules, now) to a [`Settlement`]. The loop writes the settlement, logs its notices
//! and counts them. README § Failures says the same in words; the tests below are named after it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use super::holds::{Holds, NO_STREAM_RETRY};
use crate::backoff::Backoff;
use crate::relay::nats::{Failure, FailureKind, Outcome};
use crate::relay::store::{OutboxRow, RowFailure};

/// The settings the verdicts follow.
#[derive(Debug, Clone)]
pub(super) struct Rules {
    /// Rejections before a row is parked.
    pub(super) max_attempts: i32,
    /// The wait before a rejected row's next try.
    pub(super) retry: Backoff,
    /// Rows are ordered by a shard key (not each its own key).
    pub(super) ordered: bool,
    /// How long a key waits after its row met an outage: until the next claim.
    pub(super) outage_hold: Duration,
    /// For naming subjects.
    pub(super) subject_prefix: String,
}

/// What to write back for a published batch, and what to tell.
#[derive(Debug, Default)]
pub(super) struct Settlement {
    /// Rows to mark (or delete).
    pub(super) published: Vec<Uuid>,
    /// Of those, already in the stream.
    pub(super) duplicates: u64,
    /// `occurred_at` → PubAck of each published row.
    pub(super) delays: Vec<Duration>,
    /// Rows to write back: attempts and last_error.
    pub(super) failures: Vec<RowFailure>,
    /// The kind of each failed publish, for the failure counter.
    pub(super) failed: Vec<FailureKind>,
    /// Rows NATS did not take, and why the first one failed: pause until it does.
    pub(super) unavailable: usize,
    pub(super) unavailable_reason: String,
    /// Wait this long before claiming again (a missing stream while rows are ordered by a key).
    pub(super) wait: Duration,
    /// What to log.
    pub(super) notices: Vec<Notice>,
}

/// Something about a row worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Notice {
    /// Parked now: it can never be published (`after_attempts` is `None`), or it ran out of attempts.
    Parked { row: usize, after_attempts: Option<i32>, reason: String },
    /// Rejected; tried again after `retry_in`.
    Retrying { row: usize, attempts: i32, retry_in: Duration, reason: String },
    /// No stream captures `subject` (said at most once a minute per subject).
    NoStream { subject: String },
    /// The stream already holds another row's message under this row's event_id; this row's content was
    /// dropped as a duplicate, and the row is marked.
    IdTaken { row: usize },
}

/// Judges every row of a published batch.
pub(super) fn judge(
    rows: &[OutboxRow],
    outcomes: Vec<Outcome>,
    holds: &mut Holds,
    rules: &Rules,
    now: Instant,
    wall_now: DateTime<Utc>,
) -> Settlement {
    let mut settlement = Settlement::default();
    for (index, (row, outcome)) in rows.iter().zip(outcomes).enumerate() {
        match outcome {
            Outcome::Published { duplicate } => {
                holds.stream_found(&row.event_name);
                settlement.published.push(row.id);
                settlement.duplicates += u64::from(duplicate);
                settlement.delays.push((wall_now - row.occurred_at).to_std().unwrap_or_default());
            }
            // Publishing it again would be dropped the same way: mark it, and say so.
            Outcome::IdTaken => {
                settlement.published.push(row.id);
                settlement.duplicates += 1;
                settlement.notices.push(Notice::IdTaken { row: index });
            }
            Outcome::Deferred => {}
            Outcome::Failed(failure) => {
                judge_failure(index, row, failure, holds, rules, now, &mut settlement)
            }
        }
    }
    settlement
}

fn judge_failure(
    index: usize,
    row: &OutboxRow,
    failure: Failure,
    holds: &mut Holds,
    rules: &Rules,
    now: Instant,
    settlement: &mut Settlement,
) {
    settlement.failed.push(failure.kind);
    match failure.kind {
        FailureKind::Poison => {
            let reason = format!("parked: {}", failure.reason);
            settlement.notices.push(Notice::Parked {
                row: index,
                after_attempts: None,
                reason: reason.clone(),
            });
            park(row, reason, rules, settlement);
        }
        FailureKind::Rejected => {
            let attempts = row.attempts + 1;
            if attempts >= rules.max_attempts {
                let notice = Notice::Parked {
                    row: index,
                    after_attempts: Some(attempts),
                    reason: failure.reason.clone(),
                };
                settlement.notices.push(notice);
                park(row, failure.reason, rules, settlement);
                return;
            }
            let retry_in = rules.retry.delay(u32::try_from(attempts).unwrap_or(1));
            holds.hold(row.order_key(), now + retry_in);
            let notice = Notice::Retrying { row: index, attempts, retry_in, reason: failure.reason.clone() };
            settlement.notices.push(notice);
            settlement.failures.push(RowFailure { id: row.id, attempts, last_error: failure.reason });
        }
        FailureKind::NoStream => {
            let subject = format!("{}.{}", rules.subject_prefix, row.event_name);
            if holds.stream_missing(&row.event_name, now).log {
                settlement.notices.push(Notice::NoStream { subject: subject.clone() });
            }
            if rules.ordered {
                // Order first: the key waits and the shard tries again soon, without letting the wait grow,
                // so the other subjects still move a batch a second.
                holds.hold(row.order_key(), now + NO_STREAM_RETRY.0);
                settlement.wait = NO_STREAM_RETRY.0;
            }
            let last_error = format!("no stream captures {subject}");
            settlement.failures.push(RowFailure { id: row.id, attempts: row.attempts, last_error });
        }
        FailureKind::Unavailable => {
            // Not the row's fault: no attempt burned, nothing written. The hold keeps its key's later rows
            // (perhaps already claimed) from overtaking it.
            holds.hold(row.order_key(), now + rules.outage_hold);
            if settlement.unavailable == 0 {
                settlement.unavailable_reason = failure.reason;
            }
            settlement.unavailable += 1;
        }
    }
}

fn park(row: &OutboxRow, last_error: String, rules: &Rules, settlement: &mut Settlement) {
    let attempts = row.attempts.max(rules.max_attempts);
    settlement.failures.push(RowFailure { id: row.id, attempts, last_error });
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "orders";

    fn rules(ordered: bool) -> Rules {
        Rules {
            max_attempts: 3,
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            ordered,
            outage_hold: Duration::from_millis(250),
            subject_prefix: PREFIX.into(),
        }
    }

    fn row(event_name: &str, attempts: i32, order_key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: Uuid::new_v4(),
            event_name: event_name.into(),
            event_version: 1,
            payload: "{}".into(),
            correlation_id: None,
            tenant_id: None,
            occurred_at: Utc::now(),
            attempts,
            order_key: order_key.map(str::to_owned),
        }
    }

    fn failed(kind: FailureKind) -> Outcome {
        Outcome::Failed(Failure { kind, reason: format!("{kind:?} reason") })
    }

    fn judge_one(
        row: &OutboxRow,
        outcome: Outcome,
        holds: &mut Holds,
        rules: &Rules,
        now: Instant,
    ) -> Settlement {
        judge(std::slice::from_ref(row), vec![outcome], holds, rules, now, Utc::now())
    }

    #[test]
    fn a_published_row_is_marked_and_its_delay_measured() {
        let (row, now) = (row("order.placed", 0, None), Instant::now());
        let settlement = judge_one(
            &row,
            Outcome::Published { duplicate: false },
            &mut Holds::default(),
            &rules(false),
            now,
        );
        assert_eq!(settlement.published, [row.id]);
        assert_eq!((settlement.duplicates, settlement.delays.len()), (0, 1));
        assert!(settlement.failures.is_empty() && settlement.notices.is_empty());
    }

    #[test]
    fn a_duplicate_is_published_all_the_same() {
        let (row, now) = (row("order.placed", 2, None), Instant::now());
        let settlement = judge_one(
            &row,
            Outcome::Published { duplicate: true },
            &mut Holds::default(),
            &rules(false),
            now,
        );
        assert_eq!((settlement.published.len(), settlement.duplicates), (1, 1));
    }

    #[test]
    fn a_rejected_row_counts_an_attempt_and_retries_after_the_backoff() {
        let (row, now) = (row("order.placed", 1, None), Instant::now());
        let settlement =
            judge_one(&row, failed(FailureKind::Rejected), &mut Holds::default(), &rules(false), now);
        assert_eq!(
            settlement.failures,
            [RowFailure { id: row.id, attempts: 2, last_error: "Rejected reason".into() }]
        );
        let retry = Notice::Retrying {
            row: 0,
            attempts: 2,
            retry_in: Duration::from_secs(2),
            reason: "Rejected reason".into(),
        };
        assert_eq!(settlement.notices, [retry]);
    }

    #[test]
    fn a_rejected_row_holds_its_key_until_its_retry() {
        let (row, now) = (row("order.placed", 0, Some("order-1")), Instant::now());
        let mut holds = Holds::default();
        judge_one(&row, failed(FailureKind::Rejected), &mut holds, &rules(true), now);
        assert!(holds.is_held("order-1", now + Duration::from_millis(999)));
        assert!(!holds.is_held("order-1", now + Duration::from_secs(1)), "free at its retry");
    }

    #[test]
    fn a_rejected_row_is_parked_at_max_attempts() {
        let (row, now) = (row("order.placed", 2, None), Instant::now());
        let settlement =
            judge_one(&row, failed(FailureKind::Rejected), &mut Holds::default(), &rules(false), now);
        assert_eq!(settlement.failures[0].attempts, 3);
        assert!(matches!(settlement.notices[..], [Notice::Parked { after_attempts: Some(3), .. }]));
    }

    #[test]
    fn a_poison_row_is_parked_at_once_with_its_reason() {
        let (row, now) = (row("order placed", 0, None), Instant::now());
        let settlement =
            judge_one(&row, failed(FailureKind::Poison), &mut Holds::default(), &rules(false), now);
        assert_eq!(settlement.failures[0].attempts, 3, "at max_attempts: parked");
        assert_eq!(settlement.failures[0].last_error, "parked: Poison reason");
        assert!(matches!(settlement.notices[..], [Notice::Parked { after_attempts: None, .. }]));
    }

    #[test]
    fn unavailable_burns_no_attempt_and_writes_nothing() {
        let (row, now) = (row("order.placed", 4, Some("order-1")), Instant::now());
        let mut holds = Holds::default();
        let settlement = judge_one(&row, failed(FailureKind::Unavailable), &mut holds, &rules(true), now);
        assert!(settlement.failures.is_empty() && settlement.published.is_empty());
        assert_eq!(
            (settlement.unavailable, settlement.unavailable_reason.as_str()),
            (1, "Unavailable reason")
        );
        assert!(holds.is_held("order-1", now), "its key waits for the next claim");
    }

    #[test]
    fn a_missing_stream_burns_no_attempt_and_says_which_subject() {
        let (row, now) = (row("order.placed", 1, None), Instant::now());
        let mut holds = Holds::default();
        let settlement = judge_one(&row, failed(FailureKind::NoStream), &mut holds, &rules(false), now);
        let last_error = format!("no stream captures {PREFIX}.order.placed");
        assert_eq!(settlement.failures, [RowFailure { id: row.id, attempts: 1, last_error }]);
        assert_eq!(settlement.notices, [Notice::NoStream { subject: format!("{PREFIX}.order.placed") }]);
        assert_eq!(settlement.wait, Duration::ZERO, "unordered: the other subjects flow on");
        assert_eq!(holds.skipped_event_names(now), ["order.placed"]);
        let again = judge_one(&row, failed(FailureKind::NoStream), &mut holds, &rules(false), now);
        assert!(again.notices.is_empty(), "said once a minute");
    }

    #[test]
    fn with_a_shard_key_a_missing_stream_holds_the_key_and_waits_a_second() {
        let (row, now) = (row("order.placed", 0, Some("order-1")), Instant::now());
        let mut holds = Holds::default();
        let settlement = judge_one(&row, failed(FailureKind::NoStream), &mut holds, &rules(true), now);
        assert_eq!(settlement.wait, NO_STREAM_RETRY.0);
        assert!(holds.is_held("order-1", now));
    }

    #[test]
    fn a_published_row_ends_its_subjects_missing_stream() {
        let now = Instant::now();
        let mut holds = Holds::default();
        holds.stream_missing("order.placed", now);
        judge_one(
            &row("order.placed", 0, None),
            Outcome::Published { duplicate: false },
            &mut holds,
            &rules(false),
            now,
        );
        assert!(holds.skipped_event_names(now).is_empty());
    }

    #[test]
    fn a_row_whose_event_id_another_row_took_is_marked_and_reported() {
        let (row, now) = (row("order.placed", 0, None), Instant::now());
        let settlement = judge_one(&row, Outcome::IdTaken, &mut Holds::default(), &rules(false), now);
        assert_eq!(settlement.published, [row.id]);
        assert_eq!(settlement.notices, [Notice::IdTaken { row: 0 }]);
    }

    #[test]
    fn deferred_rows_stay_pending_untouched() {
        let (row, now) = (row("order.placed", 0, Some("order-1")), Instant::now());
        let settlement = judge_one(&row, Outcome::Deferred, &mut Holds::default(), &rules(true), now);
        assert!(
            settlement.published.is_empty()
                && settlement.failures.is_empty()
                && settlement.notices.is_empty()
        );
    }
}
