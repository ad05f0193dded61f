//! The relay's Prometheus metrics: each family's name, type and HELP text written once, the exporter's
//! settings, and what it renders besides the recorded values (the `process_*` families). Recording goes
//! through the `metrics` facade, a no-op until [`install`] runs.

mod process;

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::config::ShardId;
use super::nats::FailureKind;
use super::shard::Shard;
use super::store::Backlog;

/// Declares each family once: a const documented by its HELP text, and its `describe_*!` call.
macro_rules! families {
    ($($kind:ident $id:ident = $name:literal, $help:literal;)+) => {
        $( #[doc = $help] pub const $id: &str = $name; )+

        /// Gives every family its HELP line.
        fn describe() {
            $( families!(@describe $kind $id $help); )+
        }
    };
    (@describe counter $id:ident $help:literal) => { describe_counter!($id, $help) };
    (@describe gauge $id:ident $help:literal) => { describe_gauge!($id, $help) };
    (@describe histogram $id:ident $help:literal) => { describe_histogram!($id, $help) };
}

families! {
    counter PUBLISHED = "qx_relay_published_total",
        "Outbox rows acknowledged by JetStream and marked published.";
    counter DUPLICATES = "qx_relay_duplicates_total",
        "Of the published rows, those JetStream reported as already in the stream.";
    counter PUBLISH_FAILURES = "qx_relay_publish_failures_total",
        "Failed publishes, by reason: poison, rejected, no_stream, unavailable.";
    counter PARKED = "qx_relay_parked_total",
        "Rows parked (attempts set to max_attempts) until requeued with qx-relay dead requeue.";
    counter LOCK_RENEWAL_FAILURES = "qx_relay_lock_renewal_failures_total",
        "Leader lock renewals that failed or timed out; each made this relay step down.";
    histogram BATCH_SECONDS = "qx_relay_batch_duration_seconds",
        "Claim, publish and settle of one batch.";
    histogram DELAY_SECONDS = "qx_relay_publish_delay_seconds",
        "From a row's occurred_at to its PubAck.";
    gauge PENDING_ROWS = "qx_relay_pending_rows",
        "Rows waiting to be published, sampled by the relay publishing the shard (0 on standbys).";
    gauge OLDEST_PENDING_SECONDS = "qx_relay_oldest_pending_age_seconds",
        "Age of the oldest pending row (0 on standbys); the one to alert on.";
    gauge PARKED_ROWS = "qx_relay_parked_rows",
        "Rows parked in the table now (0 on standbys).";
    gauge IS_LEADER = "qx_relay_is_leader",
        "1 for each shard this relay publishes (holds its lock, or needs none), 0 for shards it does not.";
    gauge OWNED_SHARDS = "qx_relay_owned_shards",
        "Shards this relay publishes now.";
    gauge MEMBERS = "qx_relay_members",
        "Live replicas sharing the shards (shard_id = auto), as this relay last saw them.";
    gauge SHARD_INFO = "qx_relay_shard_info",
        "Always 1; the shard this relay serves (auto when replicas share them) and the shard count are its labels.";
    gauge STORE_UP = "qx_relay_postgres_up",
        "1 while Postgres answers: set on connecting, then by the loop of the relay publishing the shard.";
    gauge NATS_UP = "qx_relay_nats_up",
        "1 while NATS takes messages: connected, and JetStream stored the last batch it answered.";
    gauge BUILD_INFO = "qx_relay_build_info",
        "Always 1; the version and source revision of this build are its labels.";
}

/// A batch takes a millisecond or two for a few rows and tens of milliseconds for a full one; seconds only
/// while acks are slow (bounded by ack_timeout) or Postgres stalls.
const BATCH_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// A millisecond with LISTEN/NOTIFY, the poll interval without it, and minutes to hours behind a backlog or
/// an outage: the high buckets tell "late" from "very late".
const DELAY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];
/// Recorded samples wait in the recorder until folded into the buckets; this often at most, so memory stays
/// flat however rarely (or never) the endpoint is scraped.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// The source revision, when the build was given one (the Dockerfile passes its REVISION build argument).
const REVISION: &str = match option_env!("QX_RELAY_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Every [`FailureKind`], so each reason is exported at 0 before its first failure.
const FAILURE_KINDS: [FailureKind; 4] =
    [FailureKind::Poison, FailureKind::Rejected, FailureKind::NoStream, FailureKind::Unavailable];

/// The installed recorder; renders the recorded families and the process metrics.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
}

impl Exporter {
    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        process::render(&mut text);
        text
    }
}

/// Installs the recorder, with real histograms (buckets add up across replicas and shards, quantiles do
/// not), and folds recorded samples into their buckets until `shutdown`.
///
/// # Errors
/// When a recorder is already installed.
pub fn install(shutdown: CancellationToken) -> Result<Exporter, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_SECONDS.to_owned()), &BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DELAY_SECONDS.to_owned()), &DELAY_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => upkeep.run_upkeep(),
            }
        }
    });
    Ok(Exporter { handle })
}

/// Describes every family and exports every series before its first event, counters at 0, for the `shards`
/// this relay may publish: `increase(qx_relay_parked_total[1h]) > 0` must see the first row parked after a
/// restart, which it cannot when the series starts at 1.
pub(super) fn register(shard_id: &ShardId, shard_count: u32, shards: impl Iterator<Item = Shard>) {
    describe();
    for name in [PUBLISHED, DUPLICATES, PARKED, LOCK_RENEWAL_FAILURES] {
        counter!(name).increment(0);
    }
    for kind in FAILURE_KINDS {
        counter!(PUBLISH_FAILURES, "reason" => reason(kind)).increment(0);
    }
    // Registered, a histogram renders its buckets at 0.
    let _ = histogram!(BATCH_SECONDS);
    let _ = histogram!(DELAY_SECONDS);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "revision" => REVISION).set(1.0);
    gauge!(SHARD_INFO, "shard" => shard_id.to_string(), "shard_count" => shard_count.to_string()).set(1.0);
    for shard in shards {
        set_leader(shard, false);
    }
    gauge!(OWNED_SHARDS).set(0.0);
}

fn reason(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Poison => "poison",
        FailureKind::Rejected => "rejected",
        FailureKind::NoStream => "no_stream",
        FailureKind::Unavailable => "unavailable",
    }
}

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
    counter!(PUBLISH_FAILURES, "reason" => reason(kind)).increment(1);
}

pub(super) fn row_parked() {
    counter!(PARKED).increment(1);
}

pub(super) fn lock_renewal_failed() {
    counter!(LOCK_RENEWAL_FAILURES).increment(1);
}

pub(super) fn set_store_up(up: bool) {
    gauge!(STORE_UP).set(f64::from(u8::from(up)));
}

pub(super) fn set_nats_up(up: bool) {
    gauge!(NATS_UP).set(f64::from(u8::from(up)));
}

pub(super) fn set_leader(shard: Shard, leading: bool) {
    gauge!(IS_LEADER, "shard" => shard.id.to_string()).set(f64::from(u8::from(leading)));
}

pub(super) fn set_owned(shards: usize) {
    gauge!(OWNED_SHARDS).set(shards as f64);
}

pub(super) fn set_members(members: usize) {
    gauge!(MEMBERS).set(members as f64);
}

pub(super) fn set_outbox(backlog: &Backlog) {
    gauge!(PENDING_ROWS).set(backlog.pending as f64);
    gauge!(OLDEST_PENDING_SECONDS).set(backlog.oldest_pending_seconds.unwrap_or(0.0));
    gauge!(PARKED_ROWS).set(backlog.parked as f64);
}
