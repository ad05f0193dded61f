//! The outbox table: every SQL statement the relay runs, and [`OutboxRow`]. Knows nothing about NATS.
//!
//! Works on the qx-db table exactly as qx-db creates it (no schema change). Rows are claimed with
//! `FOR UPDATE SKIP LOCKED` inside a transaction that stays open only while the batch is published, so
//! concurrent relays (Python or Rust) never claim the same row and a crash simply releases the locks.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgListener, PgPool, PgPoolOptions};
use sqlx::query::QueryAs;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::config::{OnPublish, RelayConfig, ShardKey};
use super::shard::Shard;

/// Starts a claim transaction, in the same round trip as `BEGIN`:
/// - the claim must walk the pending index in order and stop after `limit` rows; when few rows look pending,
///   the planner may otherwise choose a bitmap or sequential scan that sorts every pending row (80-200 ms
///   instead of 3 ms per claim near the end of a 200k-row drain);
/// - its commit (the marks) need not wait for the WAL flush: a mark lost in a Postgres crash only means the
///   row is published again, and the stream's dedupe drops the repeat;
/// - a relay that stops answering (frozen, partitioned) must not keep its rows locked for as long as TCP
///   takes to notice: Postgres ends a claim left idle for `give_up_after`, which releases the rows to the
///   other relays. A live relay never idles that long inside a claim; if it did, its marks would fail and the
///   rows would be published again.
fn claim_begin(give_up_after: Duration) -> String {
    let idle_ms = give_up_after.as_millis().clamp(1, i32::MAX as u128);
    format!(
        "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL synchronous_commit = off; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
    )
}

/// `last_error` is `VARCHAR(2048)`: longer text would fail the whole update.
const LAST_ERROR_MAX_CHARS: usize = 2048;

/// Columns the relay reads or writes; `check` verifies them. The claim also reads two system columns that
/// every table has and a view lacks.
pub const REQUIRED_COLUMNS: &[&str] = &[
    "id",
    "event_name",
    "event_version",
    "payload",
    "occurred_at",
    "correlation_id",
    "tenant_id",
    "published_at",
    "attempts",
    "last_error",
    "ctid",
    "tableoid",
];

/// A pending row, as much of it as publishing needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Random per row; the dedupe id when the envelope has no `event_id`.
    pub id: Uuid,
    /// The last part of the subject.
    pub event_name: String,
    /// Sent as `qx.event_version`.
    pub event_version: i32,
    /// The `payload` column as Postgres prints it: the message body, unchanged.
    pub payload: String,
    /// Sent as `qx.correlation_id`.
    pub correlation_id: Option<Uuid>,
    /// Sent as `qx.tenant_id`.
    pub tenant_id: Option<Uuid>,
    /// When the producer raised it; for the commit → PubAck delay.
    pub occurred_at: DateTime<Utc>,
    /// Failed publishes so far.
    pub attempts: i32,
    /// The shard/order key's value; `None` when the key is the row id.
    pub order_key: Option<String>,
}

impl OutboxRow {
    /// The value that orders this row against others: its shard key, or its id.
    pub fn order_key(&self) -> String {
        self.order_key.clone().unwrap_or_else(|| self.id.to_string())
    }
}

/// Rows claimed by one transaction; their locks are held until [`OutboxStore::settle`] or drop (rollback).
#[derive(Debug)]
pub struct ClaimedBatch {
    tx: Transaction<'static, Postgres>,
    /// The `ctid` of each claimed row stored in the table itself (not in a partition or child), by id.
    /// `tx` locks the row, so that version stays where it is until `tx` ends: settling finds it by `ctid`
    /// instead of one primary-key lookup per row.
    locations: HashMap<Uuid, String>,
    /// In claim order: `(occurred_at, id)`.
    pub rows: Vec<OutboxRow>,
}

impl ClaimedBatch {
    /// Runs a claim query in `tx` and reads its rows straight into the batch: room for `limit` rows is taken
    /// once, at the first row, instead of growing a list of rows and copying it into another.
    async fn read(
        mut tx: Transaction<'static, Postgres>,
        query: QueryAs<'_, Postgres, ClaimedRow, PgArguments>,
        limit: u32,
    ) -> Result<Self, sqlx::Error> {
        let (mut rows, mut locations) = (Vec::new(), HashMap::new());
        let mut claimed = query.fetch(&mut *tx);
        while let Some(ClaimedRow { row, location }) = claimed.try_next().await? {
            if rows.is_empty() {
                rows.reserve_exact(limit as usize);
                locations.reserve(limit as usize);
            }
            if let Some(location) = location {
                locations.insert(row.id, location);
            }
            rows.push(row);
        }
        drop(claimed);
        Ok(Self { tx, locations, rows })
    }
}

/// A claimed row and where its locked version is.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    row: OutboxRow,
    /// `ctid` as text (the driver has no `tid` type); `None` for a row of a partition or child table, where
    /// a `ctid` alone does not name one row.
    location: Option<String>,
}

/// How a row that was not published is written back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailure {
    /// The row.
    pub id: Uuid,
    /// New `attempts`: unchanged, plus one, or `max_attempts` to park it.
    pub attempts: i32,
    /// Why, for operators; cut to the column's size.
    pub last_error: String,
}

/// Counts for `qx-relay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxStats {
    /// Rows waiting to be published (not parked).
    pub pending: i64,
    /// Age of the oldest pending row.
    pub oldest_pending_seconds: Option<f64>,
    /// Rows at `max_attempts`: parked until requeued.
    pub parked: i64,
    /// Rows whose `published_at` is within the last five minutes.
    pub published_last_5m: i64,
}

/// A parked row, for `qx-relay dead list`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ParkedRow {
    /// Row id.
    pub id: Uuid,
    /// Event name.
    pub event_name: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the producer raised it.
    pub occurred_at: DateTime<Utc>,
}

/// Which parked rows to requeue.
#[derive(Debug, Clone)]
pub enum Requeue {
    /// These ids.
    Ids(Vec<Uuid>),
    /// Every parked row of this event name.
    EventName(String),
    /// Every parked row.
    All,
}

/// All SQL on the outbox table, built once from the config.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    pool: PgPool,
    max_attempts: i32,
    claim_begin: String,
    claim_sql: String,
    claim_after_sql: String,
    settle_located_sql: String,
    settle_by_id_sql: String,
    fail_sql: String,
    table: String,
    key_sql: String,
}

impl OutboxStore {
    /// Connects a pool sized for `shards` claim/publish/settle pipelines.
    ///
    /// # Errors
    /// When Postgres cannot be reached within `connect_timeout`.
    pub async fn connect(url: &str, shards: u32, connect_timeout: Duration) -> Result<PgPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(3 * shards + 2)
            .acquire_timeout(connect_timeout)
            .connect(url)
            .await
    }

    /// The store for `relay`'s table, shard key and publish mode.
    pub fn new(pool: PgPool, relay: &RelayConfig) -> Self {
        let table = relay.table.clone();
        let key_sql = key_sql(&relay.shard_key);
        let shard_clause = Shard::of(relay).sql_clause(&key_sql);
        let order_key_column = match relay.shard_key {
            ShardKey::Id => "NULL::text".to_owned(),
            _ => key_sql.clone(),
        };
        // `ORDER BY published_at, occurred_at` walks qx-db's (published_at, occurred_at) index instead of
        // sorting every pending row; `id` breaks ties with an incremental sort.
        let claim_sql = |after: &str| {
            format!(
                "SELECT id, event_name, event_version, payload::text AS payload, correlation_id, tenant_id, \
                        occurred_at, attempts, {order_key_column} AS order_key, \
                        CASE WHEN tableoid = '{table}'::regclass THEN ctid::text END AS location \
                 FROM {table} \
                 WHERE published_at IS NULL AND attempts < $1 AND {key_sql} <> ALL($3) AND event_name <> ALL($4) \
                       {after} {shard_clause} \
                 ORDER BY published_at, occurred_at, id \
                 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED"
            )
        };
        // `occurred_at >= $5` is an index condition: the scan starts after the batches in flight instead of
        // fetching and lock-checking their rows (and stepping over the dead entries of settled ones) again.
        let claim_after_sql = claim_sql("AND occurred_at >= $5 AND (occurred_at, id) > ($5, $6)");
        let claim_sql = claim_sql("");
        // By `ctid` (a fifth of the cost of deleting by id, a tenth less for marking), in the table itself
        // only; by id for rows of partitions or child tables.
        let located = "ctid = ANY($1::text[]::tid[])";
        let (settle_located_sql, settle_by_id_sql) = match relay.on_publish {
            OnPublish::Mark => (
                format!("UPDATE ONLY {table} SET published_at = now() WHERE {located}"),
                format!("UPDATE {table} SET published_at = now() WHERE id = ANY($1)"),
            ),
            OnPublish::Delete => (
                format!("DELETE FROM ONLY {table} WHERE {located}"),
                format!("DELETE FROM {table} WHERE id = ANY($1)"),
            ),
        };
        let fail_sql = format!(
            "UPDATE {table} AS t SET attempts = f.attempts, last_error = f.last_error \
             FROM UNNEST($1::uuid[], $2::int[], $3::text[]) AS f(id, attempts, last_error) \
             WHERE t.id = f.id"
        );
        Self {
            pool,
            max_attempts: relay.max_attempts,
            claim_begin: claim_begin(relay.give_up_after),
            claim_sql,
            claim_after_sql,
            settle_located_sql,
            settle_by_id_sql,
            fail_sql,
            table,
            key_sql,
        }
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Locks and returns up to `limit` pending rows of this relay's shard, oldest first, skipping rows other relays hold
    /// rows whose order key is in `held` (keys waiting for a failed row's retry) and rows of `skipped_names`
    /// (event names whose stream is missing).
    ///
    /// # Errors
    /// Any database error; nothing is locked then.
    pub async fn claim(
        &self,
        limit: u32,
        held: &[String],
        skipped_names: &[String],
    ) -> Result<ClaimedBatch, sqlx::Error> {
        let tx = self.pool.begin_with(self.claim_begin.clone()).await?;
        let query = sqlx::query_as(&self.claim_sql)
            .bind(self.max_attempts)
            .bind(i64::from(limit))
            .bind(held)
            .bind(skipped_names);
        ClaimedBatch::read(tx, query, limit).await
    }

    /// As [`OutboxStore::claim`], but only rows after `after` (an `(occurred_at, id)` claim key): the next batch
    /// of a backlog, claimed while the batch ending at `after` is in flight. Rows before it that are still
    /// pending (committed late, or locked by another relay) are left to the next [`OutboxStore::claim`].
    ///
    /// # Errors
    /// Any database error; nothing is locked then.
    pub async fn claim_after(
        &self,
        limit: u32,
        held: &[String],
        skipped_names: &[String],
        after: (DateTime<Utc>, Uuid),
    ) -> Result<ClaimedBatch, sqlx::Error> {
        let tx = self.pool.begin_with(self.claim_begin.clone()).await?;
        let query = sqlx::query_as(&self.claim_after_sql)
            .bind(self.max_attempts)
            .bind(i64::from(limit))
            .bind(held)
            .bind(skipped_names)
            .bind(after.0)
            .bind(after.1);
        ClaimedBatch::read(tx, query, limit).await
    }

    /// Marks (or deletes) the published rows, writes the failures back and commits, in one transaction.
    ///
    /// # Errors
    /// Any database error; the batch is rolled back, so its rows are published again later (dedupe absorbs it).
    pub async fn settle(
        &self,
        batch: ClaimedBatch,
        published: &[Uuid],
        failures: &[RowFailure],
    ) -> Result<(), sqlx::Error> {
        let mut tx = batch.tx;
        if !published.is_empty() {
            let (mut located, mut by_id) = (Vec::with_capacity(published.len()), Vec::new());
            for id in published {
                match batch.locations.get(id) {
                    Some(location) => located.push(location.as_str()),
                    None => by_id.push(*id),
                }
            }
            if !located.is_empty() {
                sqlx::query(&self.settle_located_sql).bind(located).execute(&mut *tx).await?;
            }
            if !by_id.is_empty() {
                sqlx::query(&self.settle_by_id_sql).bind(by_id).execute(&mut *tx).await?;
            }
        }
        if !failures.is_empty() {
            let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
            let attempts: Vec<i32> = failures.iter().map(|f| f.attempts).collect();
            let errors: Vec<String> = failures.iter().map(|f| truncate_chars(&f.last_error)).collect();
            sqlx::query(&self.fail_sql).bind(ids).bind(attempts).bind(errors).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// Deletes up to `limit` rows published before `older_than` ago; returns how many. Skips rows another
    /// transaction holds, so it never waits on a drain.
    ///
    /// # Errors
    /// Any database error.
    pub async fn delete_published(&self, older_than: Duration, limit: i64) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "DELETE FROM {table} WHERE id IN (\
               SELECT id FROM {table} WHERE published_at < now() - $1::interval \
               LIMIT $2 FOR UPDATE SKIP LOCKED)",
            table = self.table
        );
        let older_than =
            sqlx::postgres::types::PgInterval::try_from(older_than).map_err(sqlx::Error::Encode)?;
        let done = sqlx::query(&sql).bind(older_than).bind(limit).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// Subscribes to `channel` for immediate wake-ups when producers insert.
    ///
    /// # Errors
    /// When the listening connection cannot be opened.
    pub async fn listen(&self, channel: &str) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(channel).await?;
        Ok(listener)
    }

    /// The relay's columns that the table lacks; an error when the table does not exist.
    ///
    /// # Errors
    /// A database error, or `RowNotFound` when there is no such table.
    pub async fn missing_columns(&self) -> Result<Vec<&'static str>, sqlx::Error> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&self.table)
            .fetch_one(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(sqlx::Error::RowNotFound);
        }
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND NOT attisdropped",
        )
        .bind(&self.table)
        .fetch_all(&self.pool)
        .await?;
        Ok(REQUIRED_COLUMNS.iter().copied().filter(|c| !columns.iter().any(|have| have == c)).collect())
    }

    /// Pending, parked and recently published counts for `shard`.
    ///
    /// # Errors
    /// Any database error.
    pub async fn stats(&self, shard: Shard) -> Result<OutboxStats, sqlx::Error> {
        let table = &self.table;
        let shard_clause = shard.sql_clause(&self.key_sql);
        let sql = format!(
            "SELECT \
               count(*) FILTER (WHERE published_at IS NULL AND attempts < $1), \
               EXTRACT(EPOCH FROM now() - min(occurred_at) FILTER (WHERE published_at IS NULL AND attempts < $1))::float8, \
               count(*) FILTER (WHERE published_at IS NULL AND attempts >= $1), \
               count(*) FILTER (WHERE published_at > now() - interval '5 minutes') \
             FROM {table} WHERE true {shard_clause}"
        );
        let (pending, oldest_pending_seconds, parked, published_last_5m) =
            sqlx::query_as(&sql).bind(self.max_attempts).fetch_one(&self.pool).await?;
        Ok(OutboxStats { pending, oldest_pending_seconds, parked, published_last_5m })
    }

    /// Parked rows, oldest first.
    ///
    /// # Errors
    /// Any database error.
    pub async fn parked(&self, limit: i64, event_name: Option<&str>) -> Result<Vec<ParkedRow>, sqlx::Error> {
        let sql = format!(
            "SELECT id, event_name, attempts, last_error, occurred_at FROM {} \
             WHERE published_at IS NULL AND attempts >= $1 AND ($2::text IS NULL OR event_name = $2) \
             ORDER BY occurred_at, id LIMIT $3",
            self.table
        );
        sqlx::query_as(&sql).bind(self.max_attempts).bind(event_name).bind(limit).fetch_all(&self.pool).await
    }

    /// Gives parked rows a fresh start (`attempts = 0`, `last_error = NULL`); returns how many.
    ///
    /// # Errors
    /// Any database error.
    pub async fn requeue(&self, which: &Requeue) -> Result<u64, sqlx::Error> {
        let base = format!(
            "UPDATE {} SET attempts = 0, last_error = NULL WHERE published_at IS NULL AND attempts >= $1",
            self.table
        );
        let done = match which {
            Requeue::Ids(ids) => {
                sqlx::query(&format!("{base} AND id = ANY($2)"))
                    .bind(self.max_attempts)
                    .bind(ids)
                    .execute(&self.pool)
                    .await?
            }
            Requeue::EventName(name) => {
                sqlx::query(&format!("{base} AND event_name = $2"))
                    .bind(self.max_attempts)
                    .bind(name)
                    .execute(&self.pool)
                    .await?
            }
            Requeue::All => sqlx::query(&base).bind(self.max_attempts).execute(&self.pool).await?,
        };
        Ok(done.rows_affected())
    }
}

/// The SQL expression of a row's shard/order key. Rows whose key is NULL fall back to their id, so they are
/// still sharded (and never pile up unowned).
fn key_sql(key: &ShardKey) -> String {
    let column = match key {
        ShardKey::Id => return "id::text".to_owned(),
        ShardKey::TenantId => "tenant_id::text".to_owned(),
        ShardKey::CorrelationId => "correlation_id::text".to_owned(),
        ShardKey::EventName => "event_name".to_owned(),
        // Path parts are validated as [A-Za-z0-9_]+, so they are safe inside the literal.
        ShardKey::Envelope(path) => format!("(payload #>> '{{{}}}')", path.join(",")),
    };
    format!("COALESCE({column}, id::text)")
}

fn truncate_chars(text: &str) -> String {
    match text.char_indices().nth(LAST_ERROR_MAX_CHARS) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_is_cut_by_characters() {
        let long = "ü".repeat(3000);
        assert_eq!(truncate_chars(&long).chars().count(), LAST_ERROR_MAX_CHARS);
        assert_eq!(truncate_chars("short"), "short");
    }

    #[test]
    fn key_expressions() {
        assert_eq!(key_sql(&ShardKey::Id), "id::text");
        assert_eq!(
            key_sql(&"payload.order_id".parse().unwrap()),
            "COALESCE((payload #>> '{payload,order_id}'), id::text)"
        );
    }
}
