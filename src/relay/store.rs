//! The outbox table: every SQL statement the relay runs, and [`OutboxRow`]. Knows nothing about NATS.
//!
//! Works on the qx-db table exactly as qx-db creates it (no schema change). Rows are claimed with
//! `FOR UPDATE SKIP LOCKED` inside a transaction that stays open only while the batch is published, so
//! concurrent relays (Python or Rust) never claim the same row and a crash simply releases the locks.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::query::QueryAs;
use sqlx::{Arguments, Connection, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use super::config::{LeaderMode, OnPublish, RelayConfig, ShardKey};
use super::identity::Identity;
use super::refusal::{postgres_address, SessionNeeded};
use super::shard::{Scope, Shard};

/// Starts a claim transaction, in the same round trip as `BEGIN`:
/// - the claim must walk the pending index in order and stop after `limit` rows, whatever the statistics
///   say. A burst leaves them stale (the planner then expects one pending row per shard), and the cheapest
///   plan for one row is to read every pending row of the shard and sort them: 4.7 s instead of 6 ms for a
///   1,000-row claim with 1M rows pending. With sequential, bitmap and full sorts off, the only plan left
///   is the index walk with an incremental sort of ties. A disabled sort still costs the plan that needs one
///   (the ordered claim's final sort of its batch) so much that the server would JIT-compile it, 300 ms a
///   claim, so JIT is off too;
/// - its commit (the marks) need not wait for the WAL flush: a mark lost in a Postgres crash only means the
///   row is published again, and the stream's dedupe drops the repeat;
/// - a relay that stops answering (frozen, partitioned) must not keep its rows locked for as long as TCP
///   takes to notice: Postgres ends a claim left idle for `idle_limit`, which releases the rows to the
///   other relays. A live relay never idles that long inside a claim; if it did, its marks would fail and the
///   rows would be published again;
/// - a statement of a live but overloaded server ends at `statement_timeout` on its side too, and a claim
///   that waits for the table itself (a schema change, `LOCK TABLE`) gives up after `lock_wait`, to be
///   tried again. Claims never wait for rows: they skip or report rows other relays hold.
fn claim_begin(idle_limit: Duration, statement_timeout: Duration, lock_wait: Duration) -> String {
    let ms = |d: Duration| d.as_millis().clamp(1, i32::MAX as u128);
    format!(
        "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; \
         SET LOCAL jit = off; \
         SET LOCAL synchronous_commit = off; SET LOCAL idle_in_transaction_session_timeout = {}; \
         SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
        ms(idle_limit),
        ms(statement_timeout),
        ms(lock_wait),
    )
}

/// How long a claim may sit idle in Postgres before it ends it. A claimed batch idles while the batch
/// before it and then itself are published (two `ack_timeout`s at most). Without a lease, that is all
/// that bounds it: `give_up_after`. With one, a frozen relay's rows go back once its lease has ended, so
/// the shard's next owner waits for them no longer than for the lease.
fn claim_idle_limit(relay: &RelayConfig) -> Duration {
    match relay.leader {
        LeaderMode::None => relay.give_up_after,
        LeaderMode::Redis | LeaderMode::Postgres => {
            relay.give_up_after.min(relay.leader_ttl.max(relay.ack_timeout * 2))
        }
    }
}

/// Connections of a relay's pool: three for the loop's overlapping claim, publish and settle, two for the
/// outbox sample and LISTEN.
const POOL_SIZE: u32 = 5;

/// How long a claim waits for a lock on the table before trying again later.
const LOCK_WAIT_MAX: Duration = Duration::from_secs(1);

/// After the pool timed out waiting for a connection, how long the one attempt that looks for the cause may take.
const CAUSE_WAIT: Duration = Duration::from_secs(1);

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

/// Columns qx-db declares `NOT NULL`. A hand-made table that allows NULL there would stop every claim at the
/// first such row (or hide it from `status`), so the relay refuses it at start.
pub const NOT_NULL_COLUMNS: &[&str] =
    &["id", "event_name", "event_version", "payload", "occurred_at", "attempts"];

/// Why the outbox table cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableProblem {
    /// No such table (yet).
    #[error("not found")]
    Missing,
    /// Columns the relay needs are absent.
    #[error("lacks columns {0:?}")]
    MissingColumns(Vec<&'static str>),
    /// Columns qx-db declares NOT NULL allow NULL.
    #[error("allows NULL in {0:?}, which qx-db declares NOT NULL")]
    NullableColumns(Vec<&'static str>),
}

/// Why a statement on the outbox table failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres did not answer in time: hung, frozen or cut off. An outage like a refused connection.
    #[error("Postgres did not answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// A claim waited `lock_wait` for a lock on the table another session holds (a schema change,
    /// `LOCK TABLE`); not an outage.
    #[error("the table is locked by another session")]
    TableLocked,
    /// A statement found the server read-only: a hot standby, or an old primary after a failover. An outage:
    /// the pool drops its connections and makes new ones, which find the new primary once the address does.
    #[error("Postgres at {server} is read-only (a hot standby, or an old primary after a failover)")]
    ReadOnly {
        /// `host:port`, or the socket path.
        server: String,
    },
    /// The pool found no connection in time; `source` is why a fresh one failed (refused, reset, no answer).
    #[error("Postgres at {server} unreachable")]
    Unreachable {
        /// `host:port`, or the socket path.
        server: String,
        /// Why a connection failed.
        #[source]
        source: sqlx::Error,
    },
    /// Anything else from the driver or the server.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    fn from_driver(err: sqlx::Error) -> Self {
        // lock_not_available: our lock_timeout.
        match err.as_database_error().and_then(|e| e.code()).as_deref() {
            Some("55P03") => Self::TableLocked,
            _ => Self::Database(err),
        }
    }
}

/// Why Postgres cannot be reached, or `None` when it answers now. The pool retries a refused connection until
/// its timeout and then says only that it timed out: one attempt of our own, of at most `limit` and
/// [`CAUSE_WAIT`], tells why (refused, no route, reset, no answer).
async fn why_unreachable(options: &PgConnectOptions, limit: Duration) -> Option<sqlx::Error> {
    let limit = limit.min(CAUSE_WAIT);
    let attempt = async {
        let mut connection = PgConnection::connect_with(options).await?;
        refuse_read_only(&mut connection).await
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Err(cause)) => Some(cause),
        Ok(Ok(())) => None,
        Err(_) => Some(no_answer(limit)),
    }
}

/// What a wait of `limit` on Postgres that ran out says.
fn no_answer(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {}", humantime::format_duration(limit)),
    ))
}

/// `$statement` (a future run on the transaction `$tx`) in a transaction of its own. Behind a transaction
/// pooler a statement's round trips (prepare, then bind and execute) reach one server session only inside a
/// transaction; anywhere else the transaction is the one Postgres would have made for the statement alone.
macro_rules! in_transaction {
    ($pool:expr, |$tx:ident| $statement:expr) => {
        async {
            let mut $tx = $pool.begin().await?;
            let value = $statement.await?;
            $tx.commit().await?;
            Ok::<_, sqlx::Error>(value)
        }
    };
}

/// SQLSTATE read_only_sql_transaction: a write on a read-only server.
const READ_ONLY: &str = "25006";

/// Fails a new connection to a read-only server (a hot standby, an old primary after a failover). By the simple
/// protocol, as it may run before the pool knows it is behind a transaction pooler: no statement is prepared.
async fn refuse_read_only(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    let row =
        sqlx::Executor::fetch_one(&mut *connection, sqlx::raw_sql("SHOW transaction_read_only")).await?;
    let read_only: String = row.try_get(0)?;
    if read_only == "on" {
        return Err(sqlx::Error::Io(std::io::Error::other(
            "the server is read-only (a hot standby, or an old primary after a failover)",
        )));
    }
    Ok(())
}

/// Whether the connections of `pool` reach other server sessions between transactions, as through PgBouncer
/// in `pool_mode = transaction`: there a statement prepared on one session and kept would be run on another,
/// which lacks it or holds another of the same name. Either sign tells it: the session one connection freed
/// after its statement is handed to another connection (PgBouncer's default hands out the session freed last),
/// or one connection's statements run on other sessions in turn (`server_round_robin = 1`). A session pooler or
/// Postgres itself shows neither. Another client of the pooler may take the freed session first, so it is
/// asked a few times. By the simple protocol: nothing is prepared.
async fn shares_sessions(pool: &PgPool) -> Result<bool, sqlx::Error> {
    const TRIES: usize = 3;
    let backend = |row: sqlx::postgres::PgRow| row.try_get::<i32, _>(0);
    let backend_of = || sqlx::raw_sql("SELECT pg_backend_pid()");
    let (mut first, mut second) = (pool.acquire().await?, pool.acquire().await?);
    for _ in 0..TRIES {
        let freed = backend(sqlx::Executor::fetch_one(&mut *first, backend_of()).await?)?;
        let mut transaction = second.begin().await?;
        let held = backend(sqlx::Executor::fetch_one(&mut *transaction, backend_of()).await?)?;
        transaction.rollback().await?;
        let again = backend(sqlx::Executor::fetch_one(&mut *first, backend_of()).await?)?;
        let once_more = backend(sqlx::Executor::fetch_one(&mut *first, backend_of()).await?)?;
        if freed == held || again != freed || once_more != again {
            return Ok(true);
        }
    }
    Ok(false)
}

/// When a statement last found the server read-only.
#[derive(Debug, Default)]
struct ReadOnlySeen(std::sync::Mutex<Option<std::time::Instant>>);

impl ReadOnlySeen {
    fn now(&self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    /// Whether a connection opened `age` ago was opened after the server was last found read-only.
    fn after(&self, age: Duration) -> bool {
        let seen = *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.is_none_or(|seen| std::time::Instant::now().checked_sub(age).is_some_and(|opened| opened > seen))
    }
}

/// Why the server refuses TCP connections outright (stopped, or nothing at the address), or `None`: a hung
/// server's kernel still accepts them, and a socket path is not looked at.
async fn refused(options: &PgConnectOptions) -> Option<std::io::Error> {
    if options.get_socket().is_some() || options.get_host().starts_with('/') {
        return None;
    }
    let connect = tokio::net::TcpStream::connect((options.get_host(), options.get_port()));
    tokio::time::timeout(CAUSE_WAIT, connect).await.ok()?.err()
}

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
    /// The claim took as many rows as it asked for: more are likely pending.
    pub filled: bool,
    /// Rows locked by this claim are not in `rows` (the byte budget cut the batch, or their key is held
    /// elsewhere); they are pending again once the batch settles.
    pub left_out: bool,
    /// Order keys of rows another relay holds, met by an ordered claim. That key's later rows are locked by
    /// this claim but left out of `rows`, so they cannot overtake the held one.
    pub held_elsewhere: Vec<String>,
    /// `occurred_at` of the scope's oldest pending row the claim met, its own or held elsewhere.
    pub first_seen: Option<DateTime<Utc>>,
    /// Of a claim from the oldest row: `occurred_at` of the table's oldest unpublished row, any shard's.
    pub oldest_of_table: Option<DateTime<Utc>>,
}

impl ClaimedBatch {
    /// Runs a claim query in `tx` and reads its rows straight into the batch: room for `limit` rows is taken
    /// once, at the first row, instead of growing a list of rows and copying it into another. Rows are kept
    /// while the bytes before them are under `budget` (so the first row always fits); the rest are read and
    /// dropped one by one, so memory is bounded by bytes, not rows, whatever the rows weigh.
    /// A row held elsewhere keeps its key's later rows out of the batch.
    async fn read(
        mut tx: Transaction<'static, Postgres>,
        query: QueryAs<'_, Postgres, ClaimedRow, PgArguments>,
        limit: u32,
        budget: usize,
    ) -> Result<Self, sqlx::Error> {
        let (mut rows, mut locations, mut held_elsewhere) = (Vec::new(), HashMap::new(), Vec::new());
        let (mut bytes, mut seen, mut left_out, mut first_seen) = (0, 0, false, None);
        let mut claimed = query.fetch(&mut *tx);
        while let Some(ClaimedRow { row, location, elsewhere }) = claimed.try_next().await? {
            seen += 1;
            first_seen.get_or_insert(row.occurred_at);
            if elsewhere || !held_elsewhere.is_empty() {
                let key = row.order_key();
                if elsewhere || held_elsewhere.contains(&key) {
                    if !held_elsewhere.contains(&key) {
                        held_elsewhere.push(key);
                    }
                    left_out |= !elsewhere;
                    continue;
                }
            }
            if bytes >= budget {
                left_out = true;
                continue;
            }
            if rows.is_empty() {
                rows.reserve_exact(limit as usize);
                locations.reserve(limit as usize);
            }
            bytes += row.payload.len();
            if let Some(location) = location {
                locations.insert(row.id, location);
            }
            rows.push(row);
        }
        drop(claimed);
        let filled = seen >= limit as usize;
        Ok(Self { tx, locations, rows, filled, left_out, held_elsewhere, first_seen, oldest_of_table: None })
    }

    /// Frees the rows' payloads once published: settling needs only the ids and locations, and the next
    /// batch is already being read.
    pub fn release_payloads(&mut self) {
        self.rows = Vec::new();
    }
}

/// A row a claim met.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    /// Only the id, order key and `occurred_at` when `elsewhere`.
    #[sqlx(flatten)]
    row: OutboxRow,
    /// `ctid` as text (the driver has no `tid` type); `None` for a row of a partition or child table, where
    /// a `ctid` alone does not name one row.
    location: Option<String>,
    /// Another relay holds the row (ordered claims only; the others skip such rows unseen).
    elsewhere: bool,
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

/// Unpublished rows one outbox sample reads at most, oldest first.
pub const SAMPLE_ROWS: i64 = 5_000;

/// Rows published in the last five minutes that `status` counts at most.
pub const PUBLISHED_COUNT_MAX: i64 = 1_000_000;

/// What waits in a shard: the outbox gauges.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Backlog {
    /// Rows waiting to be published (not parked); of the sampled rows only when `more`.
    pub pending: i64,
    /// Age of the oldest pending row.
    pub oldest_pending_seconds: Option<f64>,
    /// Rows at `max_attempts`: parked until requeued; of the sampled rows only when `more`.
    pub parked: i64,
    /// More rows are unpublished than one sample reads ([`SAMPLE_ROWS`], oldest first): `pending` and
    /// `parked` count those only.
    pub more: bool,
}

/// Counts for `qx-relay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxStats {
    /// Pending and parked rows.
    #[serde(flatten)]
    pub backlog: Backlog,
    /// Rows whose `published_at` is within the last five minutes, up to [`PUBLISHED_COUNT_MAX`].
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

/// [`StoredRow::state`] of a row at `max_attempts`, not published.
pub const PARKED: &str = "parked";
/// [`StoredRow::state`] of a published row.
pub const PUBLISHED: &str = "published";

/// A row with every column the relay knows, for `qx-relay dead show`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StoredRow {
    /// Row id.
    pub id: Uuid,
    /// Event name.
    pub event_name: String,
    /// Event version.
    pub event_version: i32,
    /// When the producer raised it.
    pub occurred_at: DateTime<Utc>,
    /// The correlation id column.
    pub correlation_id: Option<Uuid>,
    /// The tenant id column.
    pub tenant_id: Option<Uuid>,
    /// When it was published, if it was.
    pub published_at: Option<DateTime<Utc>>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// `published`, `parked` or `pending`.
    pub state: String,
    /// The envelope, as Postgres prints it (the message body).
    pub payload: String,
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

/// All SQL on the outbox table, built once from the config. Every call has a deadline: `statement_timeout`
/// bounds the connection it waits for, each statement and the commit, so a hung Postgres is an outage like a
/// refused connection.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    pool: PgPool,
    /// When a statement last found the server read-only; the pool's connections from before are dropped.
    read_only_seen: Arc<ReadOnlySeen>,
    /// Whether statements are prepared once per connection and kept: not behind a transaction pooler, whose
    /// sessions change under a connection between transactions. There every statement is parsed anew, within
    /// a transaction.
    prepared: bool,
    max_attempts: i32,
    max_batch_bytes: usize,
    statement_timeout: Duration,
    /// `BEGIN` with the plan pinned to the walk of the pending index, and the claim's limits.
    pinned_begin: String,
    /// Whether claims take the assigned shards' ids as a parameter.
    assigned: bool,
    claim_sql: String,
    /// The oldest pending row of a rescan's scope, when its claim skips rows unseen.
    oldest_pending_sql: Option<String>,
    /// The oldest unpublished row of the table.
    oldest_of_table_sql: String,
    claim_after_sql: String,
    settle_located_sql: String,
    settle_by_id_sql: String,
    fail_sql: String,
    table: String,
    key_sql: String,
}

impl OutboxStore {
    /// Connects a pool sized for the relay loop (a claim, a publish and a settle overlap, each on a connection
    /// of its own) and two more (the sample, LISTEN), for `relay`'s table, shard key and publish mode. Its
    /// claims take the whole table; [`Self::for_scope`] narrows them.
    ///
    /// # Errors
    /// When Postgres cannot be reached within `connect_timeout`.
    pub async fn connect(
        url: &str,
        relay: &RelayConfig,
        connect_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut options = PgConnectOptions::from_str(url)?;
        // So that pg_stat_activity tells the relay's sessions, and which relay's, unless the URL names them.
        if options.get_application_name().is_none() {
            options = options.application_name(&Identity::current().application_name());
        }
        // The relay reads no floats, and PgBouncer refuses a startup parameter it is not told to ignore.
        options = options.extra_float_digits(None);
        let read_only_seen = Arc::new(ReadOnlySeen::default());
        let pool = || {
            let seen = read_only_seen.clone();
            PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(connect_timeout)
                // A failover can leave the old primary up and read-only, or point the address at a standby: such a
                // server is no connection of ours, and after a statement found one, nor is any connection from before.
                .after_connect(|connection, _| Box::pin(refuse_read_only(connection)))
                .before_acquire(move |_, metadata| {
                    let fresh = seen.after(metadata.age);
                    Box::pin(async move { Ok(fresh) })
                })
        };
        let pool = match pool().connect_with(options.clone()).await {
            Err(sqlx::Error::PoolTimedOut) => match why_unreachable(&options, connect_timeout).await {
                Some(cause) => Err(cause),
                // It answers now: it was starting up.
                None => pool().connect_with(options).await,
            },
            result => result,
        }?;
        // A server that hangs right after answering must not hang the start.
        let pooled = tokio::time::timeout(connect_timeout, shares_sessions(&pool))
            .await
            .map_err(|_| no_answer(connect_timeout))??;
        let needs_session = match (&relay.leader, &relay.notify_channel) {
            (LeaderMode::Postgres, _) => Some("relay.leader = \"postgres\" (a session advisory lock)"),
            (_, Some(_)) => Some("relay.notify_channel (LISTEN)"),
            _ => None,
        };
        if let (true, Some(setting)) = (pooled, needs_session) {
            return Err(sqlx::Error::Configuration(Box::new(SessionNeeded(setting))));
        }
        if pooled {
            tracing::info!(
                "db.url leads to a transaction pooler: each statement is parsed anew, in a transaction of its own"
            );
        }
        Ok(Self::new(pool, read_only_seen, !pooled, relay, Scope::One(Shard::WHOLE)))
    }

    /// The same pool, claiming the rows of `scope` only.
    pub fn for_scope(&self, relay: &RelayConfig, scope: Scope) -> Self {
        Self::new(self.pool.clone(), self.read_only_seen.clone(), self.prepared, relay, scope)
    }

    fn new(
        pool: PgPool,
        read_only_seen: Arc<ReadOnlySeen>,
        prepared: bool,
        relay: &RelayConfig,
        scope: Scope,
    ) -> Self {
        let table = relay.table.clone();
        let key_sql = key_sql(&relay.shard_key);
        let ordered = relay.shard_key != ShardKey::Id;
        let order_key = if ordered { key_sql.as_str() } else { "NULL::text" };
        // The pending rows of the scope from `from`, after `$1..$4` (see `claim`); the shards' ids are the
        // parameter after `from`'s.
        let pending = |from: &str, shards_param: usize| {
            format!(
                "published_at IS NULL AND attempts < $1 AND {key_sql} <> ALL($3) AND event_name <> ALL($4) \
                 {from} {}",
                scope.sql_clause(&key_sql, shards_param)
            )
        };
        let columns =
            "event_name, event_version, payload::text AS payload, correlation_id, tenant_id, attempts";
        let location = format!("CASE WHEN tableoid = '{table}'::regclass THEN ctid::text END AS location");
        // `ORDER BY published_at, occurred_at` walks qx-db's (published_at, occurred_at) index instead of
        // sorting every pending row; `id` breaks ties with an incremental sort.
        //
        // An ordered claim reads the pending rows in order (no lock), then locks each one it can, without
        // waiting. A row another relay holds (a frozen or stepping-down owner's batch) comes back as
        // `elsewhere`, so its key's later rows are left out instead of overtaking it, and no other key waits
        // for it.
        let seeing = |pending: String| {
            format!(
                "WITH pending AS MATERIALIZED (\
                   SELECT ctid AS at, tableoid AS part, id, occurred_at, {order_key} AS order_key \
                   FROM {table} WHERE {pending} \
                   ORDER BY published_at, occurred_at, id LIMIT $2) \
                 SELECT p.id, COALESCE(c.event_name, '') AS event_name, \
                        COALESCE(c.event_version, 0) AS event_version, COALESCE(c.payload, '') AS payload, \
                        c.correlation_id, c.tenant_id, COALESCE(c.attempts, 0) AS attempts, p.occurred_at, \
                        p.order_key, c.location, c.payload IS NULL AS elsewhere \
                 FROM pending p LEFT JOIN LATERAL (\
                   SELECT {columns}, {location} FROM {table} t \
                   WHERE t.ctid = p.at AND t.tableoid = p.part AND t.published_at IS NULL AND t.attempts < $1 \
                   FOR UPDATE SKIP LOCKED) c ON true \
                 ORDER BY p.occurred_at, p.id"
            )
        };
        // When every row is its own key, one walk skips the rows other relays hold unseen, so relays sharing
        // a shard split its rows between them.
        let skipping = |pending: String| {
            format!(
                "SELECT id, {columns}, occurred_at, NULL::text AS order_key, {location}, false AS elsewhere \
                 FROM {table} WHERE {pending} \
                 ORDER BY published_at, occurred_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            )
        };
        let claim = |pending: String| if ordered { seeing(pending) } else { skipping(pending) };
        // A rescan from `$5` (from the oldest row when NULL), an index condition. Where it skips rows unseen,
        // a second look finds the oldest pending row, held or not (`$2` = 1).
        let rescan = pending("AND occurred_at >= COALESCE($5::timestamptz, '-infinity')", 6);
        let oldest_pending_sql = (!ordered).then(|| {
            format!("SELECT occurred_at FROM {table} WHERE {rescan} ORDER BY published_at, occurred_at, id LIMIT $2")
        });
        let claim_sql = claim(rescan);
        // After the batches in flight: the scan starts there instead of fetching and lock-checking their rows
        // (and stepping over the dead entries of settled ones) again.
        let claim_after_sql = claim(pending("AND occurred_at >= $5 AND (occurred_at, id) > ($5, $6)", 7));
        // By `ctid` (a fifth of the cost of deleting by id, a tenth less for marking), in the table itself
        // only; by id for rows of partitions or child tables, and for rows whose claim has ended.
        let located = "ctid = ANY($1::text[]::tid[])";
        let (settle_located_sql, settle_by_id_sql) = match relay.on_publish {
            OnPublish::Mark => (
                format!("UPDATE ONLY {table} SET published_at = now() WHERE {located}"),
                format!(
                    "UPDATE {table} SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL"
                ),
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
        let statement_timeout = relay.statement_timeout();
        let lock_wait = LOCK_WAIT_MAX.min(statement_timeout / 2);
        Self {
            pool,
            read_only_seen,
            prepared,
            max_attempts: relay.max_attempts,
            max_batch_bytes: usize::try_from(relay.max_batch_bytes).unwrap_or(usize::MAX),
            statement_timeout,
            pinned_begin: claim_begin(claim_idle_limit(relay), statement_timeout, lock_wait),
            assigned: matches!(scope, Scope::Assigned { .. }),
            claim_sql,
            oldest_pending_sql,
            oldest_of_table_sql: format!(
                "SELECT occurred_at FROM {table} WHERE published_at IS NULL ORDER BY published_at, occurred_at LIMIT 1"
            ),
            claim_after_sql,
            settle_located_sql,
            settle_by_id_sql,
            fail_sql,
            table,
            key_sql,
        }
    }

    /// Runs `work` within `statement_timeout`.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.statement_timeout, work).await {
            Ok(Err(sqlx::Error::PoolTimedOut)) => {
                let source = why_unreachable(&self.pool.connect_options(), self.statement_timeout)
                    .await
                    .unwrap_or(sqlx::Error::PoolTimedOut);
                Err(StoreError::Unreachable { server: self.server(), source })
            }
            Ok(Err(err)) if err.as_database_error().and_then(|e| e.code()).as_deref() == Some(READ_ONLY) => {
                self.read_only_seen.now();
                Err(StoreError::ReadOnly { server: self.server() })
            }
            Ok(result) => result.map_err(StoreError::from_driver),
            // Waiting for a connection to a stopped server looks like a hung one from here.
            Err(_) => match refused(&self.pool.connect_options()).await {
                Some(cause) => Err(StoreError::Unreachable { server: self.server(), source: cause.into() }),
                None => Err(StoreError::TimedOut(self.statement_timeout)),
            },
        }
    }

    /// The server the pool connects to: `host:port`, or the socket path.
    pub fn server(&self) -> String {
        postgres_address(&self.pool.connect_options())
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Locks and returns up to `limit` pending rows of this store's scope (of the `assigned` shards, when its
    /// shards are assigned), oldest first, and no more bytes than `max_batch_bytes` past the first row; leaves
    /// out rows whose order key is in `held` (keys waiting for a failed row's retry) and rows of
    /// `skipped_names` (event names whose stream is missing). Rows other relays hold are skipped when every row
    /// is its own key; otherwise their keys come back in [`ClaimedBatch::held_elsewhere`], with those keys'
    /// later rows left out.
    ///
    /// # Errors
    /// Any database error, a timeout, or [`StoreError::TableLocked`]; nothing is locked then.
    pub async fn claim(
        &self,
        limit: u32,
        held: &[String],
        skipped_names: &[String],
        assigned: &[i32],
    ) -> Result<ClaimedBatch, StoreError> {
        self.claim_from(limit, held, skipped_names, assigned, None).await
    }

    /// As [`OutboxStore::claim`], but only rows that occurred at `from` or later, when given: a rescan that
    /// starts where the scope's oldest pending row was, instead of walking again over rows of other shards
    /// (or parked ones) ahead of it.
    ///
    /// # Errors
    /// Any database error, a timeout, or [`StoreError::TableLocked`]; nothing is locked then.
    pub async fn claim_from(
        &self,
        limit: u32,
        held: &[String],
        skipped_names: &[String],
        assigned: &[i32],
        from: Option<DateTime<Utc>>,
    ) -> Result<ClaimedBatch, StoreError> {
        self.bounded(async {
            let tx = self.pool.begin_with(self.pinned_begin.clone()).await?;
            let args = |limit| self.rescan_args(limit, held, skipped_names, assigned, from);
            let query =
                sqlx::query_as_with(&self.claim_sql, args(i64::from(limit))?).persistent(self.prepared);
            let mut batch = ClaimedBatch::read(tx, query, limit, self.max_batch_bytes).await?;
            if let Some(sql) = &self.oldest_pending_sql {
                let query = sqlx::query_scalar_with(sql, args(1)?).persistent(self.prepared);
                batch.first_seen = query.fetch_optional(&mut *batch.tx).await?;
            }
            if from.is_none() {
                let oldest = sqlx::query_scalar(&self.oldest_of_table_sql).persistent(self.prepared);
                batch.oldest_of_table = oldest.fetch_optional(&mut *batch.tx).await?;
            }
            Ok(batch)
        })
        .await
    }

    /// The plan of [`OutboxStore::claim_from`] (nothing held or skipped) as `EXPLAIN (ANALYZE, COSTS OFF)`
    /// prints it, in a claim transaction that is then rolled back: what a claim costs on the table as it is.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn explain_claim(
        &self,
        limit: u32,
        assigned: &[i32],
        from: Option<DateTime<Utc>>,
    ) -> Result<String, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin_with(self.pinned_begin.clone()).await?;
            let explain = format!("EXPLAIN (ANALYZE, COSTS OFF) {}", self.claim_sql);
            let args = self.rescan_args(i64::from(limit), &[], &[], assigned, from)?;
            let lines: Vec<String> =
                sqlx::query_scalar_with(&explain, args).persistent(self.prepared).fetch_all(&mut *tx).await?;
            tx.rollback().await?;
            Ok(lines.join("\n"))
        })
        .await
    }

    /// The parameters of a rescan's statements (see [`OutboxStore::claim`]): `$1` the parked threshold, `$2`
    /// `limit`, `$3` the held keys, `$4` the skipped event names, `$5` `from`, then the assigned shards' ids.
    fn rescan_args(
        &self,
        limit: i64,
        held: &[String],
        skipped_names: &[String],
        assigned: &[i32],
        from: Option<DateTime<Utc>>,
    ) -> Result<PgArguments, sqlx::Error> {
        let mut args = PgArguments::default();
        args.add(self.max_attempts).map_err(sqlx::Error::Encode)?;
        args.add(limit).map_err(sqlx::Error::Encode)?;
        args.add(held).map_err(sqlx::Error::Encode)?;
        args.add(skipped_names).map_err(sqlx::Error::Encode)?;
        args.add(from).map_err(sqlx::Error::Encode)?;
        if self.assigned {
            args.add(assigned).map_err(sqlx::Error::Encode)?;
        }
        Ok(args)
    }

    /// As [`OutboxStore::claim`], but only rows after `after` (an `(occurred_at, id)` claim key): the next batch
    /// of a backlog, claimed while the batch ending at `after` is in flight. Rows before it that are still
    /// pending (committed late, or locked by another relay) are left to the next [`OutboxStore::claim`].
    ///
    /// # Errors
    /// Any database error, a timeout, or [`StoreError::TableLocked`]; nothing is locked then.
    pub async fn claim_after(
        &self,
        limit: u32,
        held: &[String],
        skipped_names: &[String],
        assigned: &[i32],
        after: (DateTime<Utc>, Uuid),
    ) -> Result<ClaimedBatch, StoreError> {
        self.bounded(async {
            let tx = self.pool.begin_with(self.pinned_begin.clone()).await?;
            let mut query = sqlx::query_as(&self.claim_after_sql)
                .persistent(self.prepared)
                .bind(self.max_attempts)
                .bind(i64::from(limit))
                .bind(held)
                .bind(skipped_names)
                .bind(after.0)
                .bind(after.1);
            if self.assigned {
                query = query.bind(assigned);
            }
            ClaimedBatch::read(tx, query, limit, self.max_batch_bytes).await
        })
        .await
    }

    /// Marks (or deletes) the published rows, writes the failures back and commits, in one transaction.
    ///
    /// # Errors
    /// Any database error or a timeout; the batch is rolled back, so its rows are pending again.
    pub async fn settle(
        &self,
        batch: ClaimedBatch,
        published: &[Uuid],
        failures: &[RowFailure],
    ) -> Result<(), StoreError> {
        self.bounded(async {
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
                    sqlx::query(&self.settle_located_sql)
                        .persistent(self.prepared)
                        .bind(located)
                        .execute(&mut *tx)
                        .await?;
                }
                if !by_id.is_empty() {
                    sqlx::query(&self.settle_by_id_sql)
                        .persistent(self.prepared)
                        .bind(by_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            if !failures.is_empty() {
                let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
                let attempts: Vec<i32> = failures.iter().map(|f| f.attempts).collect();
                let errors: Vec<String> = failures.iter().map(|f| truncate_chars(&f.last_error)).collect();
                sqlx::query(&self.fail_sql)
                    .persistent(self.prepared)
                    .bind(ids)
                    .bind(attempts)
                    .bind(errors)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
        .await
    }

    /// Marks (or deletes) rows JetStream acknowledged whose batch could not be settled, by id, outside any
    /// claim: so a Postgres outage between PubAck and mark does not publish them again once it is over.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn mark_published(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        let mark = sqlx::query(&self.settle_by_id_sql).persistent(self.prepared).bind(ids);
        self.bounded(in_transaction!(self.pool, |tx| mark.execute(&mut *tx))).await.map(|_| ())
    }

    /// Deletes up to `limit` rows published before `older_than` ago; returns how many. Skips rows another
    /// transaction holds, so it never waits on a drain.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn delete_published(&self, older_than: Duration, limit: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM {table} WHERE id IN (\
               SELECT id FROM {table} WHERE published_at < now() - $1::interval \
               LIMIT $2 FOR UPDATE SKIP LOCKED)",
            table = self.table
        );
        let older_than =
            sqlx::postgres::types::PgInterval::try_from(older_than).map_err(sqlx::Error::Encode)?;
        let delete = sqlx::query(&sql).persistent(self.prepared).bind(older_than).bind(limit);
        let done = self.bounded(in_transaction!(self.pool, |tx| delete.execute(&mut *tx))).await?;
        Ok(done.rows_affected())
    }

    /// Subscribes to `channel` for immediate wake-ups when producers insert.
    ///
    /// # Errors
    /// When the listening connection cannot be opened in time.
    pub async fn listen(&self, channel: &str) -> Result<PgListener, StoreError> {
        self.bounded(async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(channel).await?;
            Ok(listener)
        })
        .await
    }

    /// Whether the table is fit to relay: it exists, has the relay's columns, and declares qx-db's NOT NULL
    /// columns so.
    ///
    /// # Errors
    /// A database error or a timeout.
    pub async fn table_problem(&self) -> Result<Option<TableProblem>, StoreError> {
        let exists: Option<String> = self
            .bounded(in_transaction!(self.pool, |tx| sqlx::query_scalar("SELECT to_regclass($1)::text")
                .persistent(self.prepared)
                .bind(&self.table)
                .fetch_one(&mut *tx)))
            .await?;
        if exists.is_none() {
            return Ok(Some(TableProblem::Missing));
        }
        let columns: Vec<(String, bool)> = self
            .bounded(in_transaction!(self.pool, |tx| sqlx::query_as(
                "SELECT attname::text, attnotnull FROM pg_attribute \
                     WHERE attrelid = to_regclass($1) AND NOT attisdropped",
            )
            .persistent(self.prepared)
            .bind(&self.table)
            .fetch_all(&mut *tx)))
            .await?;
        let find = |name: &str| columns.iter().find(|(have, _)| have == name);
        let missing: Vec<&'static str> =
            REQUIRED_COLUMNS.iter().copied().filter(|c| find(c).is_none()).collect();
        if !missing.is_empty() {
            return Ok(Some(TableProblem::MissingColumns(missing)));
        }
        let nullable: Vec<&'static str> = NOT_NULL_COLUMNS
            .iter()
            .copied()
            .filter(|c| find(c).is_some_and(|(_, not_null)| !not_null))
            .collect();
        if !nullable.is_empty() {
            return Ok(Some(TableProblem::NullableColumns(nullable)));
        }
        Ok(None)
    }

    /// Pending and parked rows of `shards` (of one split) among the [`SAMPLE_ROWS`] oldest unpublished rows
    /// of the table, in one walk of the pending index, and the age of the shards' oldest pending row: a
    /// sample costs the same few milliseconds whatever the backlog. Past that many rows, the counts are those
    /// of the oldest and [`Backlog::more`] says so; the age is always exact. When the shards' rows are all
    /// younger than the sample (another shard's backlog is ahead), their oldest is looked for from `from`, the
    /// relay loop's floor, when there is one.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn backlog(
        &self,
        shards: &[Shard],
        from: Option<DateTime<Utc>>,
    ) -> Result<Backlog, StoreError> {
        let in_scope = Shard::set_condition(shards, &self.key_sql);
        let sample = format!(
            "SELECT count(*) FILTER (WHERE attempts < $1 AND in_scope), \
                    min(occurred_at) FILTER (WHERE attempts < $1 AND in_scope), \
                    count(*) FILTER (WHERE attempts >= $1 AND in_scope), count(*) \
             FROM (SELECT occurred_at, attempts, {in_scope} AS in_scope FROM {table} \
                   WHERE published_at IS NULL ORDER BY published_at, occurred_at LIMIT $2) oldest",
            table = self.table
        );
        let oldest_pending = format!(
            "SELECT occurred_at FROM {table} \
             WHERE published_at IS NULL AND occurred_at >= COALESCE($2::timestamptz, '-infinity') \
                   AND attempts < $1 AND {in_scope} \
             ORDER BY published_at, occurred_at LIMIT 1",
            table = self.table
        );
        let (pending, oldest, parked, sampled, now) = self
            .bounded(async {
                let mut tx = self.pool.begin_with(self.pinned_begin.clone()).await?;
                let (pending, mut oldest, parked, sampled): (i64, Option<DateTime<Utc>>, i64, i64) =
                    sqlx::query_as(&sample)
                        .persistent(self.prepared)
                        .bind(self.max_attempts)
                        .bind(SAMPLE_ROWS)
                        .fetch_one(&mut *tx)
                        .await?;
                if oldest.is_none() && sampled >= SAMPLE_ROWS {
                    oldest = sqlx::query_scalar(&oldest_pending)
                        .persistent(self.prepared)
                        .bind(self.max_attempts)
                        .bind(from)
                        .fetch_optional(&mut *tx)
                        .await?;
                }
                let now: DateTime<Utc> =
                    sqlx::query_scalar("SELECT now()").persistent(self.prepared).fetch_one(&mut *tx).await?;
                tx.rollback().await?;
                Ok((pending, oldest, parked, sampled, now))
            })
            .await?;
        let oldest_pending_seconds =
            oldest.map(|at| (now - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6);
        Ok(Backlog { pending, oldest_pending_seconds, parked, more: sampled >= SAMPLE_ROWS })
    }

    /// The backlog of `shard` and its rows published in the last five minutes (a range of the same index),
    /// counted up to [`PUBLISHED_COUNT_MAX`].
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn stats(&self, shard: Shard) -> Result<OutboxStats, StoreError> {
        let backlog = self.backlog(&[shard], None).await?;
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} WHERE published_at > now() - interval '5 minutes' {} \
             LIMIT $1) recent",
            self.table,
            shard.sql_clause(&self.key_sql)
        );
        let count = sqlx::query_scalar(&sql).persistent(self.prepared).bind(PUBLISHED_COUNT_MAX);
        let published_last_5m =
            self.bounded(in_transaction!(self.pool, |tx| count.fetch_one(&mut *tx))).await?;
        Ok(OutboxStats { backlog, published_last_5m })
    }

    /// Parked rows, oldest first.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn parked(&self, limit: i64, event_name: Option<&str>) -> Result<Vec<ParkedRow>, StoreError> {
        let sql = format!(
            "SELECT id, event_name, attempts, last_error, occurred_at FROM {} \
             WHERE published_at IS NULL AND attempts >= $1 AND ($2::text IS NULL OR event_name = $2) \
             ORDER BY occurred_at, id LIMIT $3",
            self.table
        );
        self.bounded(in_transaction!(self.pool, |tx| sqlx::query_as(&sql)
            .persistent(self.prepared)
            .bind(self.max_attempts)
            .bind(event_name)
            .bind(limit)
            .fetch_all(&mut *tx)))
            .await
    }

    /// Gives parked rows a fresh start (`attempts = 0`, `last_error = NULL`); returns how many.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn requeue(&self, which: &Requeue) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {} SET attempts = 0, last_error = NULL WHERE {}",
            self.table,
            Self::parked_where(which)
        );
        let query = sqlx::query(&sql).persistent(self.prepared).bind(self.max_attempts);
        let query = match which {
            Requeue::Ids(ids) => query.bind(ids),
            Requeue::EventName(name) => query.bind(name),
            Requeue::All => query,
        };
        Ok(self.bounded(in_transaction!(self.pool, |tx| query.execute(&mut *tx))).await?.rows_affected())
    }

    /// The parked rows [`OutboxStore::requeue`] would requeue, oldest first, changing nothing.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn requeue_candidates(&self, which: &Requeue) -> Result<Vec<ParkedRow>, StoreError> {
        let sql = format!(
            "SELECT id, event_name, attempts, last_error, occurred_at FROM {} WHERE {} ORDER BY occurred_at, id",
            self.table,
            Self::parked_where(which)
        );
        let query = sqlx::query_as(&sql).persistent(self.prepared).bind(self.max_attempts);
        let query = match which {
            Requeue::Ids(ids) => query.bind(ids),
            Requeue::EventName(name) => query.bind(name),
            Requeue::All => query,
        };
        self.bounded(in_transaction!(self.pool, |tx| query.fetch_all(&mut *tx))).await
    }

    /// Parked rows matching `which`, with `$1` the parked threshold and `$2` the ids or the event name.
    fn parked_where(which: &Requeue) -> &'static str {
        match which {
            Requeue::Ids(_) => "published_at IS NULL AND attempts >= $1 AND id = ANY($2)",
            Requeue::EventName(_) => "published_at IS NULL AND attempts >= $1 AND event_name = $2",
            Requeue::All => "published_at IS NULL AND attempts >= $1",
        }
    }

    /// The rows with these ids, every column (the payload as text), whatever their state.
    ///
    /// # Errors
    /// Any database error or a timeout.
    pub async fn rows(&self, ids: &[Uuid]) -> Result<Vec<StoredRow>, StoreError> {
        let sql = format!(
            "SELECT id, event_name, event_version, occurred_at, correlation_id, tenant_id, published_at, attempts, \
                    last_error, payload::text AS payload, \
                    CASE WHEN published_at IS NOT NULL THEN '{PUBLISHED}' \
                         WHEN attempts >= $1 THEN '{PARKED}' ELSE 'pending' END AS state \
             FROM {} WHERE id = ANY($2) ORDER BY occurred_at, id",
            self.table
        );
        let rows = sqlx::query_as(&sql).persistent(self.prepared).bind(self.max_attempts).bind(ids);
        self.bounded(in_transaction!(self.pool, |tx| rows.fetch_all(&mut *tx))).await
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
