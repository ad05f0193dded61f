//! The relay's Prometheus metrics: names written once, recorded through the `metrics` facade (a no-op until
//! [`super::endpoint`] installs the exporter).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::nats::FailureKind;
use super::shard::Shard;
use super::store::Backlog;

/// Rows acknowledged by JetStream.
pub const PUBLISHED: &str = "qx_relay_published_total";
/// Acks that reported the message as already in the stream.
pub const DUPLICATES: &str = "qx_relay_duplicates_total";
/// Failed publishes, by `reason`.
pub const PUBLISH_FAILURES: &str = "qx_relay_publish_failures_total";
/// Rows parked (attempts set to max_attempts).
pub const PARKED: &str = "qx_relay_parked_total";
/// Claim → publish → settle of one batch.
pub const BATCH_SECONDS: &str = "qx_relay_batch_duration_seconds";
/// `occurred_at` → PubAck.
pub const DELAY_SECONDS: &str = "qx_relay_publish_delay_seconds";
/// Rows waiting to be published.
pub const PENDING_ROWS: &str = "qx_relay_pending_rows";
/// Age of the oldest pending row; the one to alert on.
pub const OLDEST_PENDING_SECONDS: &str = "qx_relay_oldest_pending_age_seconds";
/// Rows parked in the table now.
pub const PARKED_ROWS: &str = "qx_relay_parked_rows";
/// 1 while this relay may publish its shard (holds the lock, or needs none).
pub const IS_LEADER: &str = "qx_relay_is_leader";
/// This relay's shard id and count.
pub const SHARD_ID: &str = "qx_relay_shard_id";
/// See [`SHARD_ID`].
pub const SHARD_COUNT: &str = "qx_relay_shard_count";
/// 1 while Postgres answers.
pub const STORE_UP: &str = "qx_relay_postgres_up";

pub(super) fn batch_finished(elapsed: Duration) {
    histogram!(BATCH_SECONDS).record(elapsed.as_secs_f64());
}

pub(super) fn rows_published(published: u64, duplicates: u64) {
    counter!(PUBLISHED).increment(published);
    counter!(DUPLICATES).increment(duplicates);
}

pub(super) fn publish_delay(delay: Duration) {
    histogram!(DELAY_SECONDS).record(delay.as_secs_f64());
}

pub(super) fn publish_failed(kind: FailureKind) {
    let reason = match kind {
        FailureKind::Poison => "poison",
        FailureKind::Rejected => "rejected",
        FailureKind::NoStream => "no_stream",
        FailureKind::Unavailable => "unavailable",
    };
    counter!(PUBLISH_FAILURES, "reason" => reason).increment(1);
}

pub(super) fn row_parked() {
    counter!(PARKED).increment(1);
}

pub(super) fn set_store_up(up: bool) {
    gauge!(STORE_UP).set(f64::from(u8::from(up)));
}

pub(super) fn set_leader(leading: bool) {
    gauge!(IS_LEADER).set(f64::from(u8::from(leading)));
}

pub(super) fn set_shard(shard: Shard) {
    gauge!(SHARD_ID).set(f64::from(shard.id));
    gauge!(SHARD_COUNT).set(f64::from(shard.count));
}

pub(super) fn set_outbox(backlog: &Backlog) {
    gauge!(PENDING_ROWS).set(backlog.pending as f64);
    gauge!(OLDEST_PENDING_SECONDS).set(backlog.oldest_pending_seconds.unwrap_or(0.0));
    gauge!(PARKED_ROWS).set(backlog.parked as f64);
}
