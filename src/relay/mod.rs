//! The daemon: drains `qx_outbox_events` to JetStream (feature `relay`).
//!
//! Map: [`cli`] flags · [`config`] settings · [`preflight`] start-up checks · [`store`] all SQL · [`nats`] all
//! NATS · [`engine`] the claim → publish → settle loop · [`leader`] one lock · [`shard`] which rows ·
//! [`shutdown`] signals · [`notify`] wake-ups · [`housekeeping`] retention and gauges · [`telemetry`] logs ·
//! [`escape`] control characters in text output · [`metrics`] Prometheus · [`health`] what the probes judge ·
//! [`endpoint`] the HTTP endpoint · [`ops`] operator commands · [`exit`] exit codes · [`identity`] who holds a
//! lock · [`spelling`] did-you-mean.
//! This file is the task tree: [`run`] connects, checks, then relays under a leader lock (or not) until the
//! token is cancelled.

pub mod cli;
pub mod config;
pub mod endpoint;
pub(crate) mod engine;
pub(crate) mod escape;
pub(crate) mod exit;
pub(crate) mod health;
pub(crate) mod housekeeping;
pub(crate) mod identity;
pub(crate) mod leader;
pub(crate) mod metrics;
pub mod nats;
pub(crate) mod notify;
pub mod ops;
pub(crate) mod outage;
pub(crate) mod preflight;
pub(crate) mod refusal;
pub mod shard;
pub mod shutdown;
pub(crate) mod spelling;
pub mod store;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use config::{Config, LeaderMode, RelayConfig};
use engine::{Engine, Totals};
pub use exit::{error_chain, ExitCode, RelayError};
use leader::{AdvisoryLock, Kept, LeaderLock, RedisLock};
use nats::RelayPublisher;
use preflight::PreflightError;
use refusal::PostgresError;
use shard::Shard;
use store::OutboxStore;

/// After the drain: closing the NATS connection, then the background tasks, each at most this long.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Connects, checks, and relays until `shutdown` is cancelled; then finishes in-flight work within
/// `drain_timeout`.
///
/// # Errors
/// See [`RelayError`]; [`ExitCode::from`] maps each to the process exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Totals, RelayError> {
    let relay = config.relay.clone();
    let shard = Shard::of(&relay);
    // Where it connects, without credentials, and the settings as they are written in the config.
    let (nats_servers, _) = config.nats.servers_and_url_auth()?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        db = %config.db.server(),
        nats = %nats_servers.join(","),
        subject_prefix = relay.subject_prefix(),
        table = %relay.table,
        shard = %shard,
        shard_key = %relay.shard_key,
        leader = relay.leader.as_str(),
        batch_size = relay.batch_size,
        max_in_flight = relay.max_in_flight,
        on_publish = relay.on_publish.as_str(),
        notify_channel = relay.notify_channel.as_deref().unwrap_or("-"),
        "relay starting"
    );
    let stall_limit = health::stall_limit(&config);
    let health = health::Health::new(stall_limit);
    if let Some(addr) = relay.metrics_addr {
        endpoint::serve(addr, health.clone(), shutdown.clone())
            .await
            .map_err(|source| RelayError::Health { addr, source })?;
        let stall_limit = humantime::format_duration(stall_limit);
        info!(%addr, livez_stall_limit = %stall_limit, "serving /metrics, /livez and /readyz");
    }
    metrics::register(shard);
    metrics::set_leader(false);

    let connect_timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    let db_url = config.db.sqlx_url();
    let store = OutboxStore::connect(&db_url, &relay, 1, connect_timeout)
        .await
        .map_err(|err| PostgresError::connecting(&db_url, err))?;
    metrics::set_store_up(true); // standbys too; the relay loop updates it once it leads
    preflight::table(&store, &relay, Some(&shutdown)).await?;
    let publisher = RelayPublisher::connect(&config.nats, &relay).await?;
    info!(nats = %publisher.server(), "connected to Postgres and NATS");
    check_stream(&publisher, &relay).await?;
    health.set_dependencies(store.clone(), publisher.clone());

    let background = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    if let Some(channel) = &relay.notify_channel {
        background.spawn(notify::listen(store.clone(), channel.clone(), wake.clone(), shutdown.clone()));
    }
    let (sample, backlog) = watch::channel(None);
    background.spawn(housekeeping::run(
        store.clone(),
        publisher.clone(),
        relay.clone(),
        shard,
        health.clone(),
        sample,
        shutdown.clone(),
    ));
    background.close();

    let mut engine = Engine::new(store, publisher.clone(), relay.clone(), wake, backlog, health.heartbeat());
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
            (None, Kept::Ours) => run.await,
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
            if kept == Kept::Ours {
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
            Some(LeaderLock::Redis(Box::new(RedisLock::new(&config.cache, key, relay.leader_ttl)?)))
        }
        LeaderMode::Postgres => Some(LeaderLock::Postgres(AdvisoryLock::new(
            config.db.sqlx_url(),
            &shard.advisory_lock_name(&relay.table),
            Duration::from_millis(500),
        ))),
    })
}

/// The stream check at start: a missing stream only delays rows (they wait, and go once it exists), so it is
/// logged, not fatal; a duplicate window shorter than the relay's republish horizon is warned about.
async fn check_stream(publisher: &RelayPublisher, relay: &RelayConfig) -> Result<(), PreflightError> {
    let prefix = relay.subject_prefix();
    let (info, verb) = match preflight::stream(publisher, relay, relay.ensure_stream).await {
        Ok(preflight::Stream::Found(info)) => (info, "stream found"),
        Ok(preflight::Stream::Created(info)) => (info, "stream created"),
        Err(PreflightError::NoStream(_)) => {
            error!("no stream captures {prefix}.>: rows stay pending until one does (or set relay.ensure_stream)");
            return Ok(());
        }
        Err(err @ PreflightError::StreamLookup(..)) => {
            warn!(error = %error_chain(&err), "could not look up the stream; relaying anyway");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    let horizon = preflight::republish_horizon(relay);
    if info.config.duplicate_window < horizon {
        warn!(
            stream = %info.config.name,
            duplicate_window = ?info.config.duplicate_window,
            republish_horizon = ?horizon,
            "the stream's duplicate window is shorter than the relay's worst-case republish delay: \
             a republished event could be stored twice"
        );
    } else {
        info!(stream = %info.config.name, duplicate_window = ?info.config.duplicate_window, "{verb}");
    }
    Ok(())
}
