//! The daemon: drains `qx_outbox_events` to JetStream (feature `relay`).
//!
//! # Layout, by layer
//!
//! Settings and start:
//! - [`cli`]: the flags and subcommands.
//! - [`config`]: the settings, merged from file, environment and flags, and validated.
//! - [`telemetry`]: the logs.
//! - [`preflight`]: what is checked before relaying (the table, the stream).
//!
//! The servers, one wing each:
//! - [`store`]: every SQL statement on the outbox table.
//! - [`nats`]: every NATS call: the connection, publishing, PubAcks, the stream.
//! - [`lease`]: who may publish which shard: leader locks in Redis or Postgres, elastic shares, the fence.
//!
//! Relaying:
//! - [`shard`]: which rows a shard holds.
//! - [`engine`]: the claim → publish → settle loop over the shards a relay publishes.
//! - [`notify`]: wake-ups when producers insert.
//! - [`housekeeping`]: retention and the outbox sample, off the hot path.
//! - [`owned`]: the shards this relay publishes now.
//! - [`outage`]: how long a server has been failing, against `give_up_after`.
//!
//! Operators:
//! - [`metrics`], [`health`] and [`endpoint`]: Prometheus, what the probes judge, and the HTTP endpoint.
//! - [`ops`]: the operator commands; [`escape`]: control characters in their output.
//! - [`exit`]: errors and exit codes; [`causes`]: an error and its causes on one line; [`shutdown`]: signals; [`identity`]: who holds a lock; [`refusal`]: why
//!   a server refused us; [`spelling`]: did-you-mean.
//!
//! This file only composes them: [`run`] connects, checks, then relays its shard under its lock (or none), or
//! hands the shards to the elastic coordinator, until the token is cancelled.

mod causes;
pub mod cli;
pub mod config;
pub mod endpoint;
pub(crate) mod engine;
pub(crate) mod escape;
pub(crate) mod exit;
pub(crate) mod health;
pub(crate) mod housekeeping;
pub(crate) mod identity;
pub(crate) mod lease;
pub(crate) mod metrics;
pub mod nats;
pub(crate) mod notify;
pub mod ops;
pub(crate) mod outage;
pub(crate) mod owned;
pub(crate) mod preflight;
pub(crate) mod refusal;
pub mod shard;
pub mod shutdown;
pub(crate) mod spelling;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backoff::Backoff;
pub use causes::error_chain;
use config::Config;
use engine::{Engine, Totals};
pub use exit::{ExitCode, RelayError};
use lease::{elastic, fixed, Backend, LeaseError};
use nats::{ConnectError, RelayPublisher};
use outage::OutageClock;
use owned::Owned;
use refusal::PostgresError;
use shard::Shard;
use store::OutboxStore;

/// Retries of a server that does not answer at start.
const START_RETRY: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(5)).with_jitter(0.5);

/// After the drain: closing the NATS connection, then the background tasks, each at most this long.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// What the relay loop is made of once connected and checked, and what runs beside it.
struct Started {
    parts: engine::Parts,
    owned: Owned,
    background: TaskTracker,
}

/// Says what starts, serves the probes, connects, checks the table and the stream, and starts the background
/// tasks (wake-ups, housekeeping); `None` when `shutdown` came first.
async fn start(config: &Config, shutdown: &CancellationToken) -> Result<Option<Started>, RelayError> {
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
        shard_id = %relay.shard_id,
        shard_count = relay.shard_count,
        shard_key = %relay.shard_key,
        leader = relay.leader.as_str(),
        batch_size = relay.batch_size,
        max_in_flight = relay.max_in_flight,
        on_publish = relay.on_publish.as_str(),
        notify_channel = relay.notify_channel.as_deref().unwrap_or("-"),
        "relay starting"
    );
    let stall_limit = health::stall_limit(config);
    let health = health::Health::new(stall_limit);
    if let Some(addr) = relay.metrics_addr {
        endpoint::serve(addr, health.clone(), shutdown.clone())
            .await
            .map_err(|source| RelayError::Health { addr, source })?;
        let stall_limit = humantime::format_duration(stall_limit);
        info!(%addr, livez_stall_limit = %stall_limit, "serving /metrics, /livez and /readyz");
    }
    // The shards this relay may publish: its own, or any of them.
    let eligible = match shard {
        Some(shard) => vec![shard],
        None => Shard::all_of(relay.shard_count).collect(),
    };
    metrics::register(&relay.shard_id, relay.shard_count, eligible.iter().copied());

    let connect_timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    let db_url = config.db.sqlx_url();
    // One relay loop, elastic or not: its claims cover every shard it publishes.
    let connect = || async {
        OutboxStore::connect(&db_url, &relay, connect_timeout)
            .await
            .map_err(|err| PostgresError::connecting(&db_url, err))
    };
    let Some(store) = until_up(
        "Postgres",
        &relay,
        shutdown,
        metrics::set_store_up,
        connect,
        PostgresError::is_config_error,
    )
    .await?
    else {
        return Ok(None);
    };
    preflight::table(&store, &relay, Some(shutdown)).await?;
    let connect = || RelayPublisher::connect(&config.nats, &relay);
    let Some(publisher) =
        until_up("NATS", &relay, shutdown, metrics::set_nats_up, connect, ConnectError::is_config_error)
            .await?
    else {
        return Ok(None);
    };
    info!(nats = %publisher.server(), "connected to Postgres and NATS");
    preflight::stream_at_start(&publisher, &relay).await?;
    health.set_dependencies(store.clone(), publisher.clone());

    let background = TaskTracker::new();
    let (wake_up, wake) = watch::channel(());
    if let Some(channel) = &relay.notify_channel {
        background.spawn(notify::listen(store.clone(), channel.clone(), wake_up, shutdown.clone()));
    }
    let (sample, backlog) = watch::channel(None);
    let (floor, floor_seen) = watch::channel(None);
    let owned = Owned::new(health.clone());
    background.spawn(housekeeping::run(
        store.clone(),
        publisher.clone(),
        relay.clone(),
        owned.subscribe(),
        housekeeping::Sampling { sample, floor: floor_seen },
        shutdown.clone(),
    ));
    background.close();

    let parts = engine::Parts {
        store,
        publisher: publisher.clone(),
        relay: relay.clone(),
        wake,
        backlog,
        floor,
        heartbeat: health.heartbeat(),
        tally: engine::Tally::default(),
    };
    Ok(Some(Started { parts, owned, background }))
}

/// Connects to `server` with `connect` until it answers, as the relay loop retries an outage: a refusal of our
/// settings ends it at once, `give_up_after` of failures ends it with the last error, `shutdown` with `None`.
/// Meanwhile the probes and `/metrics` are served, so a relay whose dependency is down at start is seen
/// (`set_up(false)`, `/readyz` not ready) instead of exiting after one attempt.
async fn until_up<T, E, F>(
    server: &str,
    relay: &config::RelayConfig,
    shutdown: &CancellationToken,
    set_up: fn(bool),
    mut connect: impl FnMut() -> F,
    is_refusal: fn(&E) -> bool,
) -> Result<Option<T>, E>
where
    F: Future<Output = Result<T, E>>,
    E: std::error::Error,
{
    let mut outage = OutageClock::new(relay.give_up_after);
    loop {
        let started = tokio::time::Instant::now();
        let err = match connect().await {
            Ok(connected) => {
                if let Some(down_for) = outage.recovered() {
                    info!(?down_for, "{server} available");
                }
                set_up(true);
                return Ok(Some(connected));
            }
            Err(err) => err,
        };
        set_up(false);
        let first = !outage.is_down();
        if is_refusal(&err) || outage.failed(started).is_err() {
            return Err(err);
        }
        if first {
            warn!(error = %error_chain(&err), give_up_after = ?relay.give_up_after, "{server} unavailable at start; retrying");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(outage.pause(&START_RETRY)) => {}
        }
    }
}

/// Connects, checks, and relays until `shutdown` is cancelled; then finishes in-flight work within
/// `drain_timeout`.
///
/// # Errors
/// See [`RelayError`]; [`ExitCode::from`] maps each to the process exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Totals, RelayError> {
    let Some(Started { parts, owned, background }) = start(&config, &shutdown).await? else {
        return Ok(Totals::default());
    };
    let (relay, publisher) = (config.relay.clone(), parts.publisher.clone());
    let shard = Shard::of(&relay);
    let tally = parts.tally.clone();
    // Boxed so it can be dropped (abandoning the batches in flight) when the drain times out.
    let mut work: Pin<Box<dyn Future<Output = Result<(), LeaseError>> + Send + '_>> =
        match (shard, Backend::of(&config)) {
            (Some(shard), backend) => {
                let engine = Engine::new(&parts, shard);
                let lock = backend.map(|backend| backend.lock(shard)).transpose()?;
                Box::pin(fixed::relay_one(engine, shard, lock, &owned, &shutdown, &relay))
            }
            (None, Some(backend)) => {
                let coordinator = elastic::Coordinator::new(&config, backend, parts, &owned)?;
                Box::pin(coordinator.run(&shutdown))
            }
            (None, None) => unreachable!("validation refuses shard_id = \"auto\" without relay.leader"),
        };
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
    let totals = tally.totals();
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
    result.map(|()| totals).map_err(RelayError::from)
}
