//! The daemon: drains `qx_outbox_events` to JetStream (feature `relay`).
//!
//! Map: [`cli`] flags · [`config`] settings · [`store`] all SQL · [`publisher`] all NATS · [`engine`] the
//! claim → publish → settle loop · [`leader`] one lock · [`shard`] which rows · [`shutdown`] signals ·
//! [`telemetry`] logs · [`metrics`] Prometheus · [`health`] HTTP probes · [`ops`] operator commands.
//! [`run`] wires them: connect, check, then relay under a leader lock (or not) until the token is cancelled.

pub mod cli;
pub mod config;
pub mod engine;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod ops;
pub mod publisher;
pub mod shard;
pub mod shutdown;
pub mod store;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use config::{Config, ConfigError, LeaderMode, RelayConfig};
use engine::{Engine, EngineError, Totals};
use leader::{AdvisoryLock, Kept, LeaderLock, LockError, RedisLock};
use publisher::RelayPublisher;
use shard::Shard;
use store::{OutboxStore, StoreError, TableProblem};

/// The process exit codes, documented in `--help` and the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Clean stop.
    Ok = 0,
    /// Bad flags.
    Usage = 64,
    /// Postgres, NATS or Redis unavailable at start or for longer than `give_up_after`.
    Unavailable = 69,
    /// A bug or an unexpected state.
    Internal = 70,
    /// Bad configuration, or a table that does not match it.
    Config = 78,
    /// Second signal: stopped without finishing.
    Interrupted = 130,
}

/// How long to wait for the outbox table to appear (the service may create it at its own start).
const TABLE_POLL: Duration = Duration::from_secs(2);
/// Published rows deleted per retention statement, and statements per pass.
const RETENTION_BATCH: (i64, u32) = (1000, 20);
/// After the drain: closing the NATS connection, then the background tasks, each at most this long.
const STOP_GRACE: Duration = Duration::from_millis(500);
/// How often retention and the sampled gauges run.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A setting is wrong.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// Postgres unreachable at start.
    #[error("connecting to Postgres")]
    PostgresConnect(#[source] sqlx::Error),
    /// NATS unreachable at start.
    #[error("connecting to NATS")]
    NatsConnect(#[from] publisher::ConnectError),
    /// Postgres failed or did not answer while checking the table at start.
    #[error("checking the outbox table")]
    Postgres(#[source] StoreError),
    /// The outbox table cannot be used: missing after `give_up_after`, lacking columns, or nullable where
    /// qx-db is not.
    #[error("outbox table {table} {problem}")]
    Table {
        /// The table.
        table: String,
        /// What is wrong with it.
        problem: TableProblem,
    },
    /// JetStream refused to create the stream (`ensure_stream`).
    #[error("creating a stream for {0}.>")]
    EnsureStream(String, #[source] async_nats::Error),
    /// The relay loop gave up.
    #[error("relay loop")]
    Engine(#[from] EngineError),
    /// The leader lock backend gave up.
    #[error("leader lock")]
    Lock(#[from] LockError),
    /// The metrics endpoint could not listen.
    #[error("metrics endpoint")]
    Health(#[source] std::io::Error),
}

impl RelayError {
    /// The exit code this error stops the process with.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) | Self::Table { .. } | Self::EnsureStream(..) | Self::Health(_) => {
                ExitCode::Config
            }
            Self::PostgresConnect(_)
            | Self::Postgres(_)
            | Self::NatsConnect(_)
            | Self::Engine(_)
            | Self::Lock(_) => ExitCode::Unavailable,
        }
    }
}

/// Connects, checks, and relays until `shutdown` is cancelled; then finishes in-flight work within
/// `drain_timeout`.
///
/// # Errors
/// See [`RelayError`]; [`RelayError::exit_code`] maps each to the process exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Totals, RelayError> {
    let relay = config.relay.clone();
    let shard = Shard::of(&relay);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        subject_prefix = relay.subject_prefix(),
        table = %relay.table,
        shard = %shard,
        shard_key = %relay.shard_key,
        leader = ?relay.leader,
        batch_size = relay.batch_size,
        max_in_flight = relay.max_in_flight,
        on_publish = ?relay.on_publish,
        notify_channel = relay.notify_channel.as_deref().unwrap_or("-"),
        "relay starting"
    );
    let health = health::Health::default();
    if let Some(addr) = relay.metrics_addr {
        health::serve(addr, health.clone(), shutdown.clone()).await.map_err(RelayError::Health)?;
        info!(%addr, "serving /metrics, /livez and /readyz");
    }
    metrics::register(shard);
    metrics::set_leader(false);

    let connect_timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    let pool = OutboxStore::connect(&config.db.sqlx_url(), 1, connect_timeout)
        .await
        .map_err(RelayError::PostgresConnect)?;
    let store = OutboxStore::new(pool, &relay);
    metrics::set_store_up(true); // standbys too; the relay loop updates it once it leads
    wait_for_table(&store, &relay, &shutdown).await?;
    let publisher = RelayPublisher::connect(&config.nats, &relay).await?;
    info!(servers = config.nats.servers.len(), "connected to Postgres and NATS");
    check_stream(&publisher, &relay).await?;
    health.set_dependencies(store.clone(), publisher.clone());

    let background = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    if let Some(channel) = &relay.notify_channel {
        background.spawn(listen(store.clone(), channel.clone(), wake.clone(), shutdown.clone()));
    }
    background.spawn(housekeeping(
        store.clone(),
        publisher.clone(),
        relay.clone(),
        shard,
        health.clone(),
        shutdown.clone(),
    ));
    background.close();

    let mut engine = Engine::new(store, publisher.clone(), relay.clone(), wake);
    let lock = leader_lock(&config, shard)?;
    // Boxed so it can be dropped (abandoning the batch) when the drain times out.
    let mut work = Box::pin(async {
        match lock {
            None => {
                metrics::set_leader(true);
                health.set_leading(true);
                engine.run(&shutdown).await.map_err(RelayError::from)
            }
            Some(lock) => lead(lock, &mut engine, &shutdown, &relay, &health).await,
        }
    });
    let result = tokio::select! {
        result = &mut work => result,
        () = shutdown.cancelled() => {
            info!(drain_timeout = ?relay.drain_timeout, "draining");
            match tokio::time::timeout(relay.drain_timeout, &mut work).await {
                Ok(result) => result,
                Err(_) => {
                    warn!("drain_timeout reached; abandoning the batch in flight (its rows will be published again)");
                    Ok(())
                }
            }
        }
    };
    drop(work);
    shutdown.cancel();
    let totals = engine.totals();
    info!(
        published = totals.published,
        duplicates = totals.duplicates,
        failed = totals.failed,
        parked = totals.parked,
        "relay stopped"
    );
    if let Err(err) = &result {
        error!("relay failed: {}", error_chain(err));
    }
    // Bounded, so a stop with NATS or Postgres gone still ends within drain_timeout and a second.
    publisher.close(STOP_GRACE).await;
    let _ = tokio::time::timeout(STOP_GRACE, background.wait()).await;
    result.map(|()| totals)
}

/// Relays while holding the lock; stands by while someone else does.
async fn lead(
    mut lock: LeaderLock,
    engine: &mut Engine,
    shutdown: &CancellationToken,
    relay: &RelayConfig,
    health: &health::Health,
) -> Result<(), RelayError> {
    loop {
        info!("standing by for the leader lock");
        if !lock.acquire(shutdown, relay.give_up_after).await? {
            return Ok(());
        }
        metrics::set_leader(true);
        health.set_leading(true);
        let term = shutdown.child_token();
        let run = engine.run(&term);
        tokio::pin!(run);
        let (kept, finished) = {
            let keep = lock.keep(&term);
            tokio::pin!(keep);
            tokio::select! {
                kept = &mut keep => (kept, None),
                result = &mut run => {
                    term.cancel(); // stops the renewals
                    (keep.await, Some(result))
                }
            }
        };
        let result = match (finished, kept) {
            (Some(result), _) => result,
            // Shutdown: the batch in flight finishes (run's drain_timeout bounds it).
            (None, Kept::Held) => run.await,
            // Lost: finish the batch in flight only while nobody else can have the lock. Its rows stay locked
            // until then, so a new leader claiming later rows of the same keys would publish them first.
            (None, Kept::Lost { fence }) => match tokio::time::timeout_at(fence, &mut run).await {
                Ok(result) => result,
                Err(_) => {
                    warn!("lease ending with a batch in flight: abandoned, its rows will be published again");
                    Ok(())
                }
            },
        };
        metrics::set_leader(false);
        health.set_leading(false);
        if result.is_err() || shutdown.is_cancelled() {
            // We are exiting: let a standby take over now rather than when the lease runs out.
            if kept == Kept::Held {
                info!("stopped claiming; handing the leader lock over");
                lock.release().await;
            }
            return result.map_err(RelayError::from);
        }
        warn!("leadership lost; stopped claiming");
    }
}

fn leader_lock(config: &Config, shard: Shard) -> Result<Option<LeaderLock>, RelayError> {
    let relay = &config.relay;
    Ok(match relay.leader {
        LeaderMode::None => None,
        LeaderMode::Redis => {
            let key = shard.lock_key(&relay.leader_key);
            Some(LeaderLock::Redis(Box::new(RedisLock::new(&config.cache.url, key, relay.leader_ttl)?)))
        }
        LeaderMode::Postgres => {
            let name = shard.lock_key(&format!("qx-relay:{}", relay.table));
            Some(LeaderLock::Postgres(AdvisoryLock::new(
                config.db.sqlx_url(),
                &name,
                Duration::from_millis(500),
            )))
        }
    })
}

/// Waits for the table (a service may create it at its own start), then checks its columns.
async fn wait_for_table(
    store: &OutboxStore,
    relay: &RelayConfig,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let started = tokio::time::Instant::now();
    loop {
        match store.table_problem().await {
            Ok(None) => return Ok(()),
            Ok(Some(TableProblem::Missing)) if started.elapsed() < relay.give_up_after => {
                warn!(table = %relay.table, "outbox table not found yet; waiting");
            }
            Ok(Some(problem)) => return Err(RelayError::Table { table: relay.table.clone(), problem }),
            Err(err) => return Err(RelayError::Postgres(err)),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(TABLE_POLL) => {}
        }
    }
}

/// Creates the stream when asked to; warns when none captures the prefix or its dedupe window is too short.
async fn check_stream(publisher: &RelayPublisher, relay: &RelayConfig) -> Result<(), RelayError> {
    let prefix = relay.subject_prefix();
    let republish_horizon = republish_horizon(relay);
    let stream = if relay.ensure_stream {
        let window = republish_horizon.max(Duration::from_secs(120));
        let info = publisher
            .ensure_stream(window)
            .await
            .map_err(|err| RelayError::EnsureStream(prefix.to_owned(), err))?;
        Some(info)
    } else {
        match publisher.stream_for_prefix().await {
            Ok(stream) => stream,
            Err(err) => {
                warn!(error = %err, "could not look up the stream for {prefix}.>");
                return Ok(());
            }
        }
    };
    match stream {
        None => error!(
            "no stream captures {prefix}.>: rows stay pending until one does (or set relay.ensure_stream)"
        ),
        Some(info) if info.config.duplicate_window < republish_horizon => warn!(
            stream = %info.config.name,
            duplicate_window = ?info.config.duplicate_window,
            republish_horizon = ?republish_horizon,
            "the stream's duplicate window is shorter than the relay's worst-case republish delay: \
             a republished event could be stored twice"
        ),
        Some(info) => {
            info!(stream = %info.config.name, duplicate_window = ?info.config.duplicate_window, "stream found")
        }
    }
    Ok(())
}

/// Longest time between publishing a row and publishing it again after a failed mark: an ack wait, a drain
/// or lease, and a Postgres outage up to `give_up_after`.
fn republish_horizon(relay: &RelayConfig) -> Duration {
    relay.ack_timeout + relay.drain_timeout.max(relay.leader_ttl) + relay.give_up_after
}

/// Wakes the engine on every NOTIFY; polling covers notifications lost while reconnecting.
async fn listen(store: OutboxStore, channel: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let mut listener = match store.listen(&channel).await {
            Ok(listener) => listener,
            Err(err) => {
                warn!(error = %err, %channel, "LISTEN failed; polling only for now");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(TABLE_POLL) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                notification = listener.recv() => match notification {
                    Ok(_) => wake.notify_one(),
                    Err(err) => {
                        warn!(error = %err, %channel, "LISTEN connection lost");
                        break;
                    }
                },
            }
        }
    }
}

/// Retention (delete old published rows in small batches) and the outbox and NATS gauges, off the hot path.
/// Only the relay publishing the shard samples the outbox (standbys report zero), so a shard is read once per
/// period however many replicas stand by.
async fn housekeeping(
    store: OutboxStore,
    publisher: RelayPublisher,
    relay: RelayConfig,
    shard: Shard,
    health: health::Health,
    shutdown: CancellationToken,
) {
    loop {
        if let Some(retention) = relay.retention {
            delete_expired(&store, retention, &shutdown).await;
        }
        if relay.metrics_addr.is_some() {
            metrics::set_nats_up(publisher.is_connected());
            if !health.is_leading() {
                metrics::set_outbox(&store::Backlog::default());
            } else if let Ok(backlog) = store.backlog(shard).await {
                metrics::set_outbox(&backlog);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
    }
}

/// One retention pass: a bounded number of small deletes, so it never holds long locks.
async fn delete_expired(store: &OutboxStore, retention: Duration, shutdown: &CancellationToken) {
    let (batch, passes) = RETENTION_BATCH;
    let mut deleted = 0;
    for _ in 0..passes {
        match store.delete_published(retention, batch).await {
            Ok(n) => {
                deleted += n;
                if n < batch.unsigned_abs() || shutdown.is_cancelled() {
                    break;
                }
            }
            Err(err) => {
                warn!(error = %err, "retention delete failed");
                break;
            }
        }
    }
    if deleted > 0 {
        info!(deleted, retention = %humantime::format_duration(retention), "old published rows deleted");
    }
}

/// `outer: inner: …`, each link once (some errors, async-nats' among them, already print their source).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
