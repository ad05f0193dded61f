//! The relay loop of one shard (or of the shards assigned to this replica): claim → publish → settle → next
//! pause, pipelined, over the pure decisions of
//! [`verdict`] (what an outcome means for its row) and [`holds`] (what waits), with one [`OutageClock`] per
//! server.
//!
//! Three things overlap: while batch k is being published, batch k+1 is claimed (continuing after batch k, so
//! it is disjoint) and batch k-1 is marked and committed. A row is marked only after its PubAck arrived, so a
//! crash anywhere means republishing, never losing; JetStream's `Nats-Msg-Id` dedupe absorbs the repeats.
//!
//! Order: rows go out in claim order `(occurred_at, id)`. When a row fails, its order key is *held*: later
//! rows of the same key are neither claimed nor published until the row's retry comes up, so consumers never
//! see one key's events out of order while other keys keep flowing.

mod assignment;
mod floor;
mod holds;
mod progress;
mod verdict;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::causes::error_chain;
use super::config::{RelayConfig, ShardKey};
use super::health::Heartbeat;
use super::metrics;
use super::nats::{self, RelayPublisher};
use super::outage::OutageClock;
use super::shard::{Scope, Shard};
use super::store::{Backlog, ClaimedBatch, OutboxRow, OutboxStore, StoreError};
use crate::backoff::Backoff;
pub use assignment::{Assignee, Assigner};
use floor::Floor;
use holds::Holds;
use progress::Progress;
pub use progress::PROGRESS_EVERY;
use verdict::{Notice, Rules, Settlement};

/// During a backlog, claims continue after the batch in flight; this often one starts again from the scope's
/// oldest pending row (a rescan).
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How long a key whose oldest pending row another relay holds is left out of claims before it is tried again.
const HELD_ELSEWHERE_RETRY: Duration = Duration::from_secs(1);
/// Pauses while Postgres or NATS is failing.
const OUTAGE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(0.5);

/// Why a relay loop stopped before being told to.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Postgres kept failing (or not answering) for longer than `give_up_after`.
    #[error("Postgres unavailable for longer than {}", humantime::format_duration(*.0))]
    StoreUnavailable(Duration, #[source] StoreError),
    /// NATS kept failing (or JetStream kept refusing for want of room) for longer than `give_up_after`.
    #[error("NATS unavailable for longer than {}: {}", humantime::format_duration(*.0), .1)]
    NatsUnavailable(Duration, String),
}

/// What a relay loop did, for the log line at stop.
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

/// The totals of the relay loop, added up as batches settle: they outlive a loop that is dropped at the
/// drain deadline, or abandoned and started anew after a lost lease (elastic shards).
#[derive(Debug, Default, Clone)]
pub struct Tally(Arc<Mutex<Totals>>);

impl Tally {
    /// What has been done so far.
    pub fn totals(&self) -> Totals {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, published: u64, duplicates: u64, failed: u64, parked: u64) {
        let mut totals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        totals.published += published;
        totals.duplicates += duplicates;
        totals.failed += failed;
        totals.parked += parked;
    }
}

/// A published batch waiting to be written back.
type Unsettled = (ClaimedBatch, Settlement);

/// How the next batch is claimed while this one is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefetch {
    /// Not at all: the next claim waits until this batch settles.
    No,
    /// From the scope's oldest pending row (at its floor).
    Rescan,
    /// After this batch's last row.
    After(DateTime<Utc>, Uuid),
}

/// What a relay loop is made of, kept to start a new one: one pool, one NATS connection, the wake-ups, the
/// outbox sample and the heartbeat.
#[derive(Clone)]
pub struct Parts {
    /// The pool, claiming the whole table; each engine narrows it to its shard or its assigned shards.
    pub store: OutboxStore,
    /// The NATS connection.
    pub publisher: RelayPublisher,
    /// The settings.
    pub relay: RelayConfig,
    /// Changes on LISTEN/NOTIFY (or never, with polling only).
    pub wake: watch::Receiver<()>,
    /// The latest outbox sample, if any.
    pub backlog: watch::Receiver<Option<Backlog>>,
    /// Where the loop's rescans start (see [`Floor`]), for the outbox sample: the scope has no pending row
    /// older than this but for a few, so a sample need not walk another shard's backlog to find its oldest.
    pub floor: watch::Sender<Option<DateTime<Utc>>>,
    /// Beaten once per iteration of any loop, so `/livez` can tell a wedged relay from a busy one.
    pub heartbeat: Heartbeat,
    /// What the relay loop (and any started anew after it) has done.
    pub tally: Tally,
}

/// One shard's loop and its in-memory retry state (attempts and errors themselves live in the table).
pub struct Engine {
    store: OutboxStore,
    publisher: RelayPublisher,
    relay: RelayConfig,
    rules: Rules,
    wake: watch::Receiver<()>,
    holds: Holds,
    store_outage: OutageClock,
    nats_outage: OutageClock,
    /// Rows JetStream acknowledged whose batch could not be settled: marked by id before the next claim, so
    /// a Postgres outage between PubAck and mark does not publish them again.
    unmarked: Vec<Uuid>,
    /// Whether claims are leaving out keys whose oldest pending row another relay holds (logged once per
    /// wait).
    waiting_for_held: bool,
    /// Whether the last claim waited in vain for a lock on the table (logged once per wait).
    waiting_for_table: bool,
    /// When a claim last started from the oldest pending row.
    rescanned_at: Instant,
    /// Where rescans start.
    floor: Floor,
    /// Where the floor is told, as it moves.
    floor_shown: watch::Sender<Option<DateTime<Utc>>>,
    /// Rows to ask for per claim: `batch_size`, or fewer when rows are large, so a claim seldom returns
    /// more rows than the byte budget keeps.
    claim_limit: u32,
    tally: Tally,
    /// Where the shards to claim come from, when they are assigned (elastic shards).
    assignee: Option<Assignee>,
    /// The assigned shards claims take now.
    assigned: Vec<i32>,
    /// Rows published since the last progress line.
    progress: Progress,
    /// The last outbox sample (housekeeping's), for the progress line: the hot path runs no count.
    backlog: watch::Receiver<Option<Backlog>>,
    /// Beaten once per iteration, so `/livez` can tell a wedged loop from a busy one.
    heartbeat: Heartbeat,
}

impl Engine {
    /// An engine for `shard`.
    pub fn new(parts: &Parts, shard: Shard) -> Self {
        Self::with_scope(parts, Scope::One(shard), None)
    }

    /// An engine for the shards of `count` that `assignee` assigns it.
    pub fn assigned(parts: &Parts, count: u32, assignee: Assignee) -> Self {
        Self::with_scope(parts, Scope::Assigned { count }, Some(assignee))
    }

    fn with_scope(parts: &Parts, scope: Scope, assignee: Option<Assignee>) -> Self {
        let relay = parts.relay.clone();
        let rules = Rules {
            max_attempts: relay.max_attempts,
            retry: Backoff::new(relay.retry_backoff, relay.retry_backoff_max).with_jitter(0.5),
            ordered: relay.shard_key != ShardKey::Id,
            outage_hold: relay.poll_interval,
            subject_prefix: relay.subject_prefix().to_owned(),
        };
        parts.floor.send_replace(None); // a new loop rescans from the oldest row
        Self {
            store: parts.store.for_scope(&relay, scope),
            publisher: parts.publisher.clone(),
            rules,
            wake: parts.wake.clone(),
            holds: Holds::default(),
            claim_limit: relay.batch_size,
            store_outage: OutageClock::new(relay.give_up_after),
            nats_outage: OutageClock::new(relay.give_up_after),
            relay,
            unmarked: Vec::new(),
            waiting_for_held: false,
            waiting_for_table: false,
            rescanned_at: Instant::now(),
            floor: Floor::new(Instant::now()),
            floor_shown: parts.floor.clone(),
            tally: parts.tally.clone(),
            assigned: assignee.as_ref().map(Assignee::shards).unwrap_or_default(),
            assignee,
            progress: Progress::default(),
            backlog: parts.backlog.clone(),
            heartbeat: parts.heartbeat.clone(),
        }
    }

    /// Relays until `stop` is cancelled, then finishes the batch in flight (acks awaited, marks committed).
    ///
    /// `stop` is checked between batches only: a claimed batch always reaches commit or rollback.
    ///
    /// # Errors
    /// When Postgres or NATS stays unavailable for longer than `give_up_after`.
    pub async fn run(&mut self, stop: &CancellationToken) -> Result<(), EngineError> {
        let mut prefetched: Option<ClaimedBatch> = None;
        let mut unsettled: Option<Unsettled> = None;
        let mut pause = Duration::ZERO;
        while !stop.is_cancelled() {
            self.heartbeat.beat();
            if self.assignee.as_ref().is_some_and(Assignee::changed) {
                // Nothing claimed under the old assignment may stay open once it is acknowledged.
                prefetched = None;
                self.settle(unsettled.take()).await?;
                self.take_assignment();
            }
            if self.assignee.is_some() && self.assigned.is_empty() {
                self.pause(self.relay.idle_poll_interval, stop).await;
                continue;
            }
            // Claim (unless the previous round did already).
            let mut batch = match prefetched.take() {
                Some(batch) => batch,
                None => {
                    self.settle(unsettled.take()).await?;
                    if !pause.is_zero() && !self.pause(pause, stop).await {
                        continue;
                    }
                    if self.assignee.as_ref().is_some_and(Assignee::changed) {
                        pause = Duration::ZERO; // claim under the new assignment at once
                        continue;
                    }
                    match self.claim().await? {
                        Some(batch) => batch,
                        None => {
                            pause = self.store_outage.pause(&OUTAGE_BACKOFF);
                            continue;
                        }
                    }
                }
            };
            if batch.rows.is_empty() {
                // The last rows of a flow are reported once their period is over.
                self.note_progress(0, Instant::now());
                self.watch_idle_nats()?;
                pause = self.relay.idle_poll_interval;
                continue;
            }
            // Publish it, claiming the next and settling the previous meanwhile.
            let started = Instant::now();
            self.claim_limit = claim_limit(&batch.rows, self.relay.max_batch_bytes, self.relay.batch_size);
            let backlog = (batch.filled || batch.left_out) && !stop.is_cancelled();
            let prefetch = if backlog {
                prefetch_plan(
                    batch.left_out,
                    batch.rows.last(),
                    self.rescanned_at.elapsed(),
                    self.rules.ordered,
                )
            } else {
                Prefetch::No
            };
            if prefetch == Prefetch::Rescan {
                self.rescanned_at = Instant::now();
            }
            self.drop_held_rows(&mut batch);
            let (held, skipped_names) = self.left_out();
            let (claimed_at, sees_whole_scope) = (Utc::now(), held.is_empty() && skipped_names.is_empty());
            let rescan_from = match prefetch {
                Prefetch::Rescan => self.floor.rescan_from(Instant::now()),
                _ => None,
            };
            let (outcomes, next, settled) = tokio::join!(
                self.publisher.publish_batch(&batch.rows),
                async {
                    let limit = self.claim_limit;
                    match prefetch {
                        Prefetch::No => Ok(None),
                        Prefetch::Rescan => self
                            .store
                            .claim_from(limit, &held, &skipped_names, &self.assigned, rescan_from)
                            .await
                            .map(Some),
                        Prefetch::After(at, id) => self
                            .store
                            .claim_after(limit, &held, &skipped_names, &self.assigned, (at, id))
                            .await
                            .map(Some),
                    }
                },
                self.store_settle(unsettled.take()),
            );
            self.after_settle(settled, started)?;
            let (now, wall_now) = (Instant::now(), Utc::now());
            let settlement =
                verdict::judge(&batch.rows, outcomes, &mut self.holds, &self.rules, now, wall_now);
            self.report(&batch.rows, &settlement, started);
            batch.release_payloads();
            if let (Prefetch::Rescan, Ok(Some(next))) = (prefetch, &next) {
                let sweep = rescan_from.is_none().then_some(next.oldest_of_table);
                self.floor.rescanned(next.first_seen, claimed_at, sees_whole_scope, sweep);
                self.floor_shown.send_replace(self.floor.at());
            }
            prefetched = self.after_prefetch(next, started)?;
            let (unavailable, wait) = (settlement.unavailable, settlement.wait);
            let unavailable_reason = settlement.unavailable_reason.clone();
            unsettled = Some((batch, settlement));
            // The next pause.
            pause = if unavailable > 0 {
                // Rows of a prefetched batch would fail the same way: release them and wait for NATS.
                prefetched = None;
                self.settle(unsettled.take()).await?;
                self.wait_for_nats(started, unavailable_reason, stop).await?
            } else if !wait.is_zero() {
                prefetched = None;
                wait
            } else {
                self.nats_outage.recovered();
                if backlog {
                    Duration::ZERO
                } else {
                    self.relay.poll_interval
                }
            };
        }
        drop(prefetched); // rolled back: another relay, or our restart, takes those rows
        self.settle(unsettled.take()).await
    }

    /// Keys on hold and event names without a stream: what claims leave out now.
    fn left_out(&mut self) -> (Vec<String>, Vec<String>) {
        let now = Instant::now();
        let held = self.holds.held_keys(now);
        // Only when every row is its own key: with a shard key, skipping one event name could let a key's
        // later events overtake it, so the loop pauses instead.
        let skipped_names = if self.rules.ordered { Vec::new() } else { self.holds.skipped_event_names(now) };
        (held, skipped_names)
    }

    /// Claims a batch from the oldest pending row, or `None` after a database error (the outage clock is
    /// running) or a wait for a lock on the table. Rows published but left unmarked by an outage are marked
    /// first.
    async fn claim(&mut self) -> Result<Option<ClaimedBatch>, EngineError> {
        let started = Instant::now();
        if !self.unmarked.is_empty() {
            if let Err(err) = self.store.mark_published(&self.unmarked).await {
                self.store_failed(err, started)?;
                return Ok(None);
            }
            info!(rows = self.unmarked.len(), "marked the rows published before the Postgres outage");
            self.unmarked = Vec::new();
        }
        let (held, skipped_names) = self.left_out();
        let (claimed_at, sees_whole_scope) = (Utc::now(), held.is_empty() && skipped_names.is_empty());
        self.rescanned_at = started;
        let from = self.floor.rescan_from(started);
        match self.store.claim_from(self.claim_limit, &held, &skipped_names, &self.assigned, from).await {
            Ok(batch) => {
                let sweep = from.is_none().then_some(batch.oldest_of_table);
                self.floor.rescanned(batch.first_seen, claimed_at, sees_whole_scope, sweep);
                self.floor_shown.send_replace(self.floor.at());
                self.store_recovered();
                if std::mem::take(&mut self.waiting_for_table) {
                    info!("the outbox table is free again");
                }
                self.hold_keys_held_elsewhere(&batch, started);
                Ok(Some(batch))
            }
            Err(StoreError::TableLocked) => {
                self.store_recovered();
                if !std::mem::replace(&mut self.waiting_for_table, true) {
                    info!("the outbox table is locked by another session (a schema change, LOCK TABLE); waiting");
                }
                Ok(None)
            }
            Err(err) => {
                self.store_failed(err, started)?;
                Ok(None)
            }
        }
    }

    /// Keys whose oldest pending row another relay holds (a frozen or stepping-down owner's batch) are left
    /// out of claims for a while, so no key's later events overtake it and no other key waits for it.
    fn hold_keys_held_elsewhere(&mut self, batch: &ClaimedBatch, claimed_at: Instant) {
        if batch.held_elsewhere.is_empty() {
            if !self.holds.any_keys() && std::mem::take(&mut self.waiting_for_held) {
                info!("rows another relay held are free again; claiming their keys in order");
            }
            return;
        }
        if !std::mem::replace(&mut self.waiting_for_held, true) {
            info!(
                keys = batch.held_elsewhere.len(),
                "pending rows are held by another relay (a stopped or stepping-down owner's batch); their keys \
                 wait for them, so no key's later events overtake them, and the other keys go on"
            );
        }
        for key in &batch.held_elsewhere {
            self.holds.hold(key.clone(), claimed_at + HELD_ELSEWHERE_RETRY);
        }
    }

    /// The batch claimed while the last one was published, if any.
    fn after_prefetch(
        &mut self,
        next: Result<Option<ClaimedBatch>, StoreError>,
        started: Instant,
    ) -> Result<Option<ClaimedBatch>, EngineError> {
        match next {
            Ok(next) => {
                if let Some(batch) = &next {
                    self.store_recovered();
                    self.hold_keys_held_elsewhere(batch, started);
                }
                Ok(next)
            }
            Err(StoreError::TableLocked) => Ok(None),
            Err(err) => {
                self.store_failed(err, started)?;
                Ok(None)
            }
        }
    }

    /// Drops rows whose key went on hold after the batch was claimed; they stay locked until commit, untouched.
    fn drop_held_rows(&self, batch: &mut ClaimedBatch) {
        if !self.holds.any_keys() {
            return;
        }
        let now = Instant::now();
        batch.rows.retain(|row| !self.holds.is_held(&row.order_key(), now));
    }

    async fn settle(&mut self, unsettled: Option<Unsettled>) -> Result<(), EngineError> {
        let started = Instant::now();
        let settled = self.store_settle(unsettled).await;
        self.after_settle(settled, started)
    }

    /// Whether there was a batch to settle, or why settling it failed and which rows it had published.
    async fn store_settle(&self, unsettled: Option<Unsettled>) -> Result<bool, (StoreError, Vec<Uuid>)> {
        match unsettled {
            Some((batch, settlement)) => self
                .store
                .settle(batch, &settlement.published, &settlement.failures)
                .await
                .map(|()| true)
                .map_err(|err| (err, settlement.published)),
            None => Ok(false),
        }
    }

    fn after_settle(
        &mut self,
        settled: Result<bool, (StoreError, Vec<Uuid>)>,
        started: Instant,
    ) -> Result<(), EngineError> {
        match settled {
            Ok(true) => {
                self.store_recovered();
                Ok(())
            }
            Ok(false) => Ok(()),
            // Published but not marked: marked by id once Postgres is back (or, if we stop first, published
            // again later, and the stream drops the repeats within its duplicate window).
            Err((err, published)) => {
                self.unmarked.extend(published);
                self.store_failed(err, started)
            }
        }
    }

    /// Logs and counts what a batch's verdicts say.
    fn report(&mut self, rows: &[OutboxRow], settlement: &Settlement, started: Instant) {
        for notice in &settlement.notices {
            match notice {
                Notice::Parked { row, after_attempts: None, reason } => {
                    let row = &rows[*row];
                    error!(id = %row.id, event_name = %row.event_name, %reason, "row parked: it can never be published");
                }
                Notice::Parked { row, after_attempts: Some(attempts), reason } => {
                    let row = &rows[*row];
                    error!(id = %row.id, event_name = %row.event_name, attempts, %reason, "row parked after max_attempts");
                }
                Notice::Retrying { row, attempts, retry_in, reason } => {
                    let row = &rows[*row];
                    warn!(id = %row.id, event_name = %row.event_name, attempts, ?retry_in, %reason,
                          "publish failed; will retry");
                }
                Notice::NoStream { subject } => error!(
                    %subject,
                    "no stream captures {subject}: its rows stay pending; {}",
                    nats::no_stream_hint(&self.rules.subject_prefix)
                ),
                Notice::IdTaken { row } => {
                    let row = &rows[*row];
                    warn!(id = %row.id, event_name = %row.event_name,
                          "the stream already holds another message under this row's event_id (two rows share \
                           it): this row's content was dropped as a duplicate; the row is marked");
                }
            }
        }
        let parked = settlement.notices.iter().filter(|n| matches!(n, Notice::Parked { .. })).count() as u64;
        let retried =
            settlement.notices.iter().filter(|n| matches!(n, Notice::Retrying { .. })).count() as u64;
        self.tally.add(settlement.published.len() as u64, settlement.duplicates, retried, parked);
        metrics::rows_published(settlement.published.len() as u64, settlement.duplicates);
        for delay in &settlement.delays {
            metrics::publish_delay(*delay);
        }
        for kind in &settlement.failed {
            metrics::publish_failed(*kind);
        }
        for _ in 0..parked {
            metrics::row_parked();
        }
        metrics::batch_finished(started.elapsed());
        self.note_progress(settlement.published.len() as u64, started);
        debug!(claimed = rows.len(), published = settlement.published.len(), failed = settlement.failures.len(),
               elapsed = ?started.elapsed(), "batch published");
        if settlement.unavailable > 0 {
            warn!(rows = settlement.unavailable, reason = %settlement.unavailable_reason,
                  "NATS did not confirm publishes; pausing until it is back (no attempts counted)");
        }
    }

    /// Counts rows published by a batch that began at `started`, and says how the relay is doing once a
    /// progress period is over (and rows were published in it).
    fn note_progress(&mut self, published: u64, started: Instant) {
        let Some(period) = self.progress.count(published, started, Instant::now()) else { return };
        let backlog = self.backlog.borrow().clone();
        let tenths = |value: f64| (value * 10.0).round() / 10.0;
        info!(
            published = period.published,
            seconds = period.elapsed.as_secs(),
            per_second = tenths(period.per_second()),
            pending = backlog.as_ref().map(|backlog| backlog.pending),
            oldest_pending_seconds =
                backlog.as_ref().and_then(|backlog| backlog.oldest_pending_seconds).map(tenths),
            parked = backlog.as_ref().map(|backlog| backlog.parked),
            "relaying"
        );
    }

    /// Sleeps `delay`, waking early on NOTIFY or a new assignment; false when `stop` fired.
    async fn pause(&mut self, delay: Duration, stop: &CancellationToken) -> bool {
        let woken = async {
            // Without a listener nothing ever wakes us.
            if self.wake.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let reassigned = async {
            match &self.assignee {
                Some(assignee) => assignee.reassigned().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            () = woken => true,
            () = reassigned => true,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Claims follow the new assignment from now on.
    fn take_assignment(&mut self) {
        if let Some(assignee) = &mut self.assignee {
            assignee.acknowledge();
            self.assigned = assignee.shards();
            self.floor.reset();
            self.floor_shown.send_replace(None);
            debug!(shards = ?self.assigned, "claiming the assigned shards");
        }
    }

    /// A Postgres step that began at `started` failed: the outage goes on, or the relay gives up.
    fn store_failed(&mut self, err: StoreError, started: Instant) -> Result<(), EngineError> {
        metrics::set_store_up(false);
        match self.store_outage.failed(started) {
            Ok(down_for) => {
                warn!(error = %error_chain(&err), server = %self.store.server(), ?down_for,
                      "Postgres unavailable; retrying");
                Ok(())
            }
            Err(_) => {
                if !self.unmarked.is_empty() {
                    error!(
                        rows = self.unmarked.len(),
                        "giving up with rows published but not marked: they will be \
                           published again once Postgres is back (stored twice if that is after the stream's \
                           duplicate window)"
                    );
                }
                Err(EngineError::StoreUnavailable(self.relay.give_up_after, err))
            }
        }
    }

    fn store_recovered(&mut self) {
        if let Some(down_for) = self.store_outage.recovered() {
            info!(?down_for, "Postgres available again");
        }
        metrics::set_store_up(true);
    }

    /// With nothing to publish, NATS is only watched: a connection gone for `give_up_after` ends the relay as
    /// a failed publish would, so an idle relay does not sit on a dead connection unnoticed.
    fn watch_idle_nats(&mut self) -> Result<(), EngineError> {
        if self.publisher.is_connected() {
            self.nats_outage.recovered();
            return Ok(());
        }
        let why = self.publisher.why_disconnected().unwrap_or_else(|| "not connected".to_owned());
        self.nats_outage
            .failed(Instant::now())
            .map(drop)
            .map_err(|_| EngineError::NatsUnavailable(self.relay.give_up_after, why))
    }

    /// After a batch NATS did not confirm (its publishing started at `started`): waits for the connection,
    /// then returns a pause so a server that answers but does not ack (e.g. JetStream restarting, or a full
    /// stream) is not hammered.
    async fn wait_for_nats(
        &mut self,
        started: Instant,
        reason: String,
        stop: &CancellationToken,
    ) -> Result<Duration, EngineError> {
        let give_up_after = self.relay.give_up_after;
        // A failed reconnect's reason (credentials, a certificate) is the cause, not the batch's unanswered acks.
        let publisher = self.publisher.clone();
        let gave_up = |reason| {
            EngineError::NatsUnavailable(give_up_after, publisher.why_disconnected().unwrap_or(reason))
        };
        if self.nats_outage.failed(started).is_err() {
            return Err(gave_up(reason));
        }
        let connected = tokio::select! {
            _ = stop.cancelled() => return Ok(Duration::ZERO),
            connected = self.publisher.wait_connected(self.nats_outage.left()) => connected,
        };
        if !connected || self.nats_outage.left().is_zero() {
            return Err(gave_up(reason));
        }
        Ok(self.nats_outage.pause(&OUTAGE_BACKOFF))
    }
}

/// How to claim the next batch of a backlog while a batch is published (its last row `last`, `since_rescan`
/// after the last rescan): after it, and now and then from the scope's oldest row again, for rows that
/// committed after younger ones. Not after a batch that left rows out (they stay locked until it settles), and
/// an ordered rescan waits until this batch settles, since it would find this batch's own rows held.
fn prefetch_plan(
    left_out: bool,
    last: Option<&OutboxRow>,
    since_rescan: Duration,
    ordered: bool,
) -> Prefetch {
    if left_out {
        return Prefetch::No;
    }
    match last {
        Some(last) if since_rescan < RESCAN_EVERY => Prefetch::After(last.occurred_at, last.id),
        _ if ordered => Prefetch::No,
        _ => Prefetch::Rescan,
    }
}

/// Rows to ask for per claim: what `max_batch_bytes` holds of rows like `rows`, at most `batch_size`: many
/// small rows fit a batch, few large ones do.
fn claim_limit(rows: &[OutboxRow], max_batch_bytes: u64, batch_size: u32) -> u32 {
    let bytes: usize = rows.iter().map(|row| row.payload.len()).sum();
    let average = (bytes / rows.len().max(1)).max(1) as u64;
    let fits = u32::try_from(max_batch_bytes / average).unwrap_or(u32::MAX);
    fits.clamp(1, batch_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(payload_bytes: usize) -> OutboxRow {
        OutboxRow {
            id: Uuid::new_v4(),
            event_name: "order.placed".into(),
            event_version: 1,
            payload: "x".repeat(payload_bytes),
            correlation_id: None,
            tenant_id: None,
            occurred_at: Utc::now(),
            attempts: 0,
            order_key: None,
        }
    }

    #[test]
    fn claims_ask_for_what_the_byte_budget_holds_of_rows_like_the_last() {
        assert_eq!(claim_limit(&[row(1000), row(1000)], 1_000_000, 1000), 1000, "small rows: the batch size");
        assert_eq!(claim_limit(&[row(100_000)], 1_000_000, 1000), 10);
        assert_eq!(claim_limit(&[row(5_000_000)], 1_000_000, 1000), 1, "a row above the budget goes alone");
        assert_eq!(claim_limit(&[], 1_000_000, 1000), 1000, "no rows: as if each were a byte");
    }

    #[test]
    fn the_next_batch_continues_after_this_one_and_rescans_now_and_then() {
        let last = row(10);
        let after = Prefetch::After(last.occurred_at, last.id);
        let soon = RESCAN_EVERY / 2;
        assert_eq!(prefetch_plan(false, Some(&last), soon, false), after);
        assert_eq!(prefetch_plan(false, Some(&last), RESCAN_EVERY, false), Prefetch::Rescan);
        assert_eq!(
            prefetch_plan(false, Some(&last), RESCAN_EVERY, true),
            Prefetch::No,
            "ordered: after settling"
        );
        assert_eq!(prefetch_plan(true, Some(&last), soon, false), Prefetch::No, "rows left out stay locked");
    }
}
