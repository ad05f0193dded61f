//! The relay loop of one shard: claim → publish → settle, pipelined, with retries, holds and outage handling.
//!
//! Three things overlap: while batch k is being published, batch k+1 is claimed (SKIP LOCKED keeps it
//! disjoint) and batch k-1 is marked and committed. A row is marked only after its PubAck arrived, so a crash
//! anywhere means republishing, never losing; JetStream's `Nats-Msg-Id` dedupe absorbs the repeats.
//!
//! Order: rows go out in claim order `(occurred_at, id)`. When a row fails, its order key is *held*: later
//! rows of the same key are neither claimed nor published until the row's retry comes up, so consumers never
//! see one key's events out of order while other keys keep flowing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::config::{RelayConfig, ShardKey};
use super::health::Heartbeat;
use super::metrics;
use super::publisher::{Failure, FailureKind, Outcome, RelayPublisher};
use super::store::{ClaimedBatch, OutboxRow, OutboxStore, RowFailure};

/// Shortest and longest wait before trying a subject again that no stream captured; it grows with how long
/// the stream has been missing, so a long-missing stream costs a batch every half minute, not every poll.
const NO_STREAM_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Repeat the "no stream" error for one subject at most this often.
const NO_STREAM_LOG_EVERY: Duration = Duration::from_secs(60);
/// During a backlog, claims continue after the batch in flight; this often one starts from the oldest row.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// First and longest pause while Postgres or NATS is failing.
const OUTAGE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Why a shard loop stopped before being told to.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Postgres kept failing for longer than `give_up_after`.
    #[error("Postgres unavailable for longer than {}", humantime::format_duration(*.0))]
    StoreUnavailable(Duration, #[source] sqlx::Error),
    /// NATS kept failing for longer than `give_up_after`.
    #[error("NATS unavailable for longer than {}", humantime::format_duration(*.0))]
    NatsUnavailable(Duration),
}

/// What a shard loop did, for the log line at stop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Rows acknowledged by JetStream and marked (or deleted).
    pub published: u64,
    /// Of those, already in the stream's dedupe window.
    pub duplicates: u64,
    /// Failed publishes written back for a retry.
    pub failed: u64,
    /// Rows parked.
    pub parked: u64,
}

/// What to write back for a published batch.
#[derive(Debug, Default)]
struct Settlement {
    published: Vec<Uuid>,
    failures: Vec<RowFailure>,
    /// Rows NATS did not confirm, and why the first one failed: pause until it is back.
    unavailable: usize,
    unavailable_reason: String,
    /// Wait this long before claiming again (a missing stream while rows are ordered by a key).
    wait: Duration,
}

/// A subject no stream captures.
#[derive(Debug, Clone, Copy)]
struct MissingStream {
    since: Instant,
    logged: Option<Instant>,
    retry_at: Instant,
}

/// One shard's loop and its in-memory retry state (attempts and errors themselves live in the table).
pub struct Engine {
    store: OutboxStore,
    publisher: RelayPublisher,
    relay: RelayConfig,
    wake: Arc<Notify>,
    /// Order keys waiting for a failed row's retry, and until when.
    held: HashMap<String, Instant>,
    /// Event names whose subject no stream captured, by event name.
    missing_streams: HashMap<String, MissingStream>,
    /// Since when Postgres (or NATS) has been failing, if it is.
    store_down_since: Option<Instant>,
    nats_down_since: Option<Instant>,
    /// When a backlog claim last started from the oldest pending row.
    rescanned_at: Instant,
    totals: Totals,
    /// Beaten once per iteration, so `/livez` can tell a wedged loop from a busy one.
    heartbeat: Heartbeat,
}

impl Engine {
    /// An engine for the configured shard. `wake` is notified on LISTEN/NOTIFY (or never, with polling only).
    pub fn new(
        store: OutboxStore,
        publisher: RelayPublisher,
        relay: RelayConfig,
        wake: Arc<Notify>,
        heartbeat: Heartbeat,
    ) -> Self {
        Self {
            store,
            publisher,
            relay,
            wake,
            held: HashMap::new(),
            missing_streams: HashMap::new(),
            store_down_since: None,
            nats_down_since: None,
            rescanned_at: Instant::now(),
            totals: Totals::default(),
            heartbeat,
        }
    }

    /// What has been done so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Relays until `stop` is cancelled, then finishes the batch in flight (acks awaited, marks committed).
    ///
    /// `stop` is checked between batches only: a claimed batch always reaches commit or rollback.
    ///
    /// # Errors
    /// When Postgres or NATS stays unavailable for longer than `give_up_after`.
    pub async fn run(&mut self, stop: &CancellationToken) -> Result<(), EngineError> {
        let batch_size = self.relay.batch_size;
        let mut prefetched: Option<ClaimedBatch> = None;
        let mut unsettled: Option<(ClaimedBatch, Settlement)> = None;
        let mut pause = Duration::ZERO;
        loop {
            self.heartbeat.beat();
            if stop.is_cancelled() {
                drop(prefetched); // rolled back: another relay, or our restart, takes those rows
                return self.settle(unsettled.take()).await;
            }
            let mut batch = match prefetched.take() {
                Some(batch) => batch,
                None => {
                    self.settle(unsettled.take()).await?;
                    if !pause.is_zero() && !self.pause(pause, stop).await {
                        continue;
                    }
                    match self.claim().await? {
                        Some(batch) => batch,
                        None => {
                            pause = self.outage_backoff();
                            continue;
                        }
                    }
                }
            };
            let claimed = batch.rows.len();
            if claimed == 0 {
                drop(batch);
                pause = self.relay.idle_poll_interval;
                continue;
            }
            let started = Instant::now();
            let last_key = batch.rows.last().map(|row| (row.occurred_at, row.id));
            self.release_held(&mut batch);
            // A full batch means a backlog: claim the next one while this one is published, continuing after it.
            // Now and then a claim starts from the oldest row again, for rows that committed after younger ones.
            let backlog = claimed == batch_size as usize && !stop.is_cancelled();
            let resume_after = last_key.filter(|_| self.rescanned_at.elapsed() < RESCAN_EVERY);
            if backlog && resume_after.is_none() {
                self.rescanned_at = Instant::now();
            }
            let (held, skipped_names) = (self.held_keys(), self.skipped_event_names());
            let (outcomes, next, settled) = tokio::join!(
                self.publisher.publish_batch(&batch.rows),
                async {
                    match (backlog, resume_after) {
                        (false, _) => Ok(None),
                        (true, None) => self.store.claim(batch_size, &held, &skipped_names).await.map(Some),
                        (true, Some(after)) => {
                            self.store.claim_after(batch_size, &held, &skipped_names, after).await.map(Some)
                        }
                    }
                },
                self.store_settle(unsettled.take()),
            );
            self.after_settle(settled)?;
            let settlement = self.judge(&batch.rows, outcomes);
            metrics::batch_finished(started.elapsed());
            debug!(claimed, published = settlement.published.len(), failed = settlement.failures.len(),
                   elapsed = ?started.elapsed(), "batch published");
            let (unavailable, wait) = (settlement.unavailable, settlement.wait);
            if unavailable > 0 {
                warn!(rows = unavailable, reason = %settlement.unavailable_reason,
                      "NATS did not confirm publishes; pausing until it is back (no attempts counted)");
            }
            unsettled = Some((batch, settlement));
            prefetched = match next {
                Ok(next) => {
                    if next.is_some() {
                        self.store_recovered();
                    }
                    next
                }
                Err(err) => {
                    self.store_failed(err)?;
                    None
                }
            };
            pause = if unavailable > 0 {
                // Rows of a prefetched batch would fail the same way: release them and wait for NATS.
                prefetched = None;
                self.settle(unsettled.take()).await?;
                self.wait_for_nats(stop).await?
            } else if !wait.is_zero() {
                prefetched = None;
                wait
            } else {
                self.nats_down_since = None;
                if backlog {
                    Duration::ZERO
                } else {
                    self.relay.poll_interval
                }
            };
        }
    }

    /// Keys whose hold has not run out; forgets the others.
    fn held_keys(&mut self) -> Vec<String> {
        let now = Instant::now();
        self.held.retain(|_, until| *until > now);
        self.held.keys().cloned().collect()
    }

    /// Event names to leave out of claims while their stream is missing. Only when every row is its own key:
    /// with a shard key, skipping one event name could let a key's later events overtake it, so the loop
    /// pauses instead.
    fn skipped_event_names(&self) -> Vec<String> {
        if self.relay.shard_key != ShardKey::Id {
            return Vec::new();
        }
        let now = Instant::now();
        self.missing_streams
            .iter()
            .filter(|(_, missing)| missing.retry_at > now)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Claims a batch, or `None` after a database error (the outage clock is running).
    async fn claim(&mut self) -> Result<Option<ClaimedBatch>, EngineError> {
        let (held, skipped_names) = (self.held_keys(), self.skipped_event_names());
        match self.store.claim(self.relay.batch_size, &held, &skipped_names).await {
            Ok(batch) => {
                self.store_recovered();
                Ok(Some(batch))
            }
            Err(err) => {
                self.store_failed(err)?;
                Ok(None)
            }
        }
    }

    /// Drops rows whose key became held after the batch was claimed; they stay locked until commit, untouched.
    fn release_held(&self, batch: &mut ClaimedBatch) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        batch.rows.retain(|row| self.held.get(&row.order_key()).is_none_or(|until| *until <= now));
    }

    async fn settle(&mut self, unsettled: Option<(ClaimedBatch, Settlement)>) -> Result<(), EngineError> {
        let settled = self.store_settle(unsettled).await;
        self.after_settle(settled)
    }

    /// Whether there was a batch to settle, or why settling it failed.
    async fn store_settle(&self, unsettled: Option<(ClaimedBatch, Settlement)>) -> Result<bool, sqlx::Error> {
        match unsettled {
            Some((batch, settlement)) => {
                self.store.settle(batch, &settlement.published, &settlement.failures).await.map(|()| true)
            }
            None => Ok(false),
        }
    }

    fn after_settle(&mut self, settled: Result<bool, sqlx::Error>) -> Result<(), EngineError> {
        match settled {
            Ok(true) => {
                self.store_recovered();
                Ok(())
            }
            Ok(false) => Ok(()),
            // Published but not marked: those rows go out again later and the stream drops the repeats.
            Err(err) => self.store_failed(err),
        }
    }

    /// Turns publish outcomes into writes, holds and log lines.
    fn judge(&mut self, rows: &[OutboxRow], outcomes: Vec<Outcome>) -> Settlement {
        let mut settlement = Settlement::default();
        let mut duplicates = 0;
        let now = Instant::now();
        let wall_now = chrono::Utc::now();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Published { duplicate } => {
                    settlement.published.push(row.id);
                    if !self.missing_streams.is_empty() {
                        self.missing_streams.remove(&row.event_name);
                    }
                    metrics::publish_delay((wall_now - row.occurred_at).to_std().unwrap_or_default());
                    self.totals.published += 1;
                    duplicates += u64::from(duplicate);
                }
                Outcome::HeldBack => {}
                Outcome::Failed(failure) => self.judge_failure(row, failure, now, &mut settlement),
            }
        }
        self.totals.duplicates += duplicates;
        metrics::rows_published(settlement.published.len() as u64, duplicates);
        settlement
    }

    fn judge_failure(
        &mut self,
        row: &OutboxRow,
        failure: Failure,
        now: Instant,
        settlement: &mut Settlement,
    ) {
        metrics::publish_failed(failure.kind);
        let key = row.order_key();
        match failure.kind {
            FailureKind::Poison => {
                error!(id = %row.id, event_name = %row.event_name, reason = %failure.reason, "row parked: it can never be published");
                self.park(row, format!("parked: {}", failure.reason), settlement);
            }
            FailureKind::Rejected => {
                let attempts = row.attempts + 1;
                if attempts >= self.relay.max_attempts {
                    error!(id = %row.id, event_name = %row.event_name, attempts, reason = %failure.reason,
                           "row parked after max_attempts");
                    self.park(row, failure.reason, settlement);
                } else {
                    let delay = self.retry_delay(attempts);
                    warn!(id = %row.id, event_name = %row.event_name, attempts, retry_in = ?delay,
                          reason = %failure.reason, "publish failed; will retry");
                    self.held.insert(key, now + delay);
                    self.totals.failed += 1;
                    settlement.failures.push(RowFailure { id: row.id, attempts, last_error: failure.reason });
                }
            }
            FailureKind::NoStream => {
                let prefix = self.relay.subject_prefix();
                let subject = format!("{prefix}.{}", row.event_name);
                let missing = self.missing_streams.entry(row.event_name.clone()).or_insert(MissingStream {
                    since: now,
                    logged: None,
                    retry_at: now,
                });
                if missing.logged.is_none_or(|at| now.duration_since(at) >= NO_STREAM_LOG_EVERY) {
                    error!(%subject, "no stream captures {subject}: create a JetStream stream whose subjects \
                           include it (e.g. {prefix}.>); its rows stay pending");
                    missing.logged = Some(now);
                }
                let retry_in = now.duration_since(missing.since).clamp(NO_STREAM_RETRY.0, NO_STREAM_RETRY.1);
                missing.retry_at = now + retry_in;
                if self.relay.shard_key != ShardKey::Id {
                    // Order first: retry the whole shard soon, without letting the wait grow, so the other
                    // subjects still move a batch a second.
                    self.held.insert(key, now + NO_STREAM_RETRY.0);
                    settlement.wait = NO_STREAM_RETRY.0;
                }
                let last_error = format!("no stream captures {subject}");
                settlement.failures.push(RowFailure { id: row.id, attempts: row.attempts, last_error });
            }
            FailureKind::Unavailable => {
                // Not the row's fault: no attempt burned, nothing written. The hold keeps its key's later rows
                // (perhaps already claimed) from overtaking it.
                self.held.insert(key, now + self.relay.poll_interval);
                if settlement.unavailable == 0 {
                    settlement.unavailable_reason = failure.reason;
                }
                settlement.unavailable += 1;
            }
        }
    }

    fn park(&mut self, row: &OutboxRow, last_error: String, settlement: &mut Settlement) {
        self.totals.parked += 1;
        metrics::row_parked();
        let attempts = row.attempts.max(self.relay.max_attempts);
        settlement.failures.push(RowFailure { id: row.id, attempts, last_error });
    }

    /// `retry_backoff · 2^(attempts-1)`, capped, with jitter so failing rows do not retry in lockstep.
    fn retry_delay(&self, attempts: i32) -> Duration {
        let exponent = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(20);
        let full = self.relay.retry_backoff.saturating_mul(1 << exponent).min(self.relay.retry_backoff_max);
        full.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Sleeps `delay`, waking early on NOTIFY; false when `stop` fired.
    async fn pause(&self, delay: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = self.wake.notified() => true,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    fn store_failed(&mut self, err: sqlx::Error) -> Result<(), EngineError> {
        let since = *self.store_down_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.relay.give_up_after {
            return Err(EngineError::StoreUnavailable(self.relay.give_up_after, err));
        }
        warn!(error = %err, down_for = ?since.elapsed(), "Postgres unavailable; retrying");
        metrics::set_store_up(false);
        Ok(())
    }

    fn store_recovered(&mut self) {
        if let Some(since) = self.store_down_since.take() {
            info!(down_for = ?since.elapsed(), "Postgres available again");
        }
        metrics::set_store_up(true);
    }

    fn outage_backoff(&self) -> Duration {
        let down_for = self.store_down_since.or(self.nats_down_since).map_or(Duration::ZERO, |s| s.elapsed());
        (OUTAGE_BACKOFF.0 + down_for / 4).min(OUTAGE_BACKOFF.1)
    }

    /// After a batch NATS did not confirm: waits for the connection, then returns a pause so a server that
    /// answers but does not ack (e.g. JetStream restarting) is not hammered.
    async fn wait_for_nats(&mut self, stop: &CancellationToken) -> Result<Duration, EngineError> {
        let since = *self.nats_down_since.get_or_insert_with(Instant::now);
        let left = self.relay.give_up_after.saturating_sub(since.elapsed());
        let connected = tokio::select! {
            _ = stop.cancelled() => return Ok(Duration::ZERO),
            connected = self.publisher.wait_connected(left) => connected,
        };
        if left.is_zero() || !connected {
            return Err(EngineError::NatsUnavailable(self.relay.give_up_after));
        }
        Ok(self.outage_backoff())
    }
}
