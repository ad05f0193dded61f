//! The daemon: drains `qx_outbox_events` to JetStream (feature `relay`).
//!
//! Map: [`cli`] flags · [`config`] settings · [`preflight`] start-up checks · [`store`] all SQL · [`nats`] all
//! NATS · [`engine`] the claim → publish → settle loop of one shard · [`leader`] one lock · [`shard`] which rows
//! · [`elastic`] shards shared by lease among replicas · [`members`] who is alive, and each one's fair share ·
//! [`shutdown`] signals · [`notify`] wake-ups · [`housekeeping`] retention and gauges · [`telemetry`] logs ·
//! [`escape`] control characters in text output · [`metrics`] Prometheus · [`health`] what the probes judge ·
//! [`endpoint`] the HTTP endpoint · [`ops`] operator commands · [`exit`] exit codes · [`identity`] who holds a
//! lock · [`spelling`] did-you-mean.
//! This file is the task tree: [`run`] connects, checks, then relays its shard under a leader lock (or not), or
//! hands the shards to the elastic coordinator, until the token is cancelled.

pub mod cli;
pub mod config;
pub(crate) mod elastic;
pub mod endpoint;
pub(crate) mod engine;
pub(crate) mod escape;
pub(crate) mod exit;
pub(crate) mod health;
pub(crate) mod housekeeping;
pub(crate) mod identity;
pub(crate) mod leader;
pub(crate) mod members;
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

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
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
    let stall_limit = health::stall_limit(&config);
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
    let tally = parts.tally.clone();
    // Boxed so it can be dropped (abandoning the batches in flight) when the drain times out.
    let mut work: Pin<Box<dyn Future<Output = Result<(), RelayError>> + Send + '_>> = match shard {
        Some(shard) => {
            let engine = Engine::new(&parts, shard);
            let lock = leader_lock(&config, shard)?;
            Box::pin(relay_one(engine, shard, lock, &owned, &shutdown, &relay))
        }
        None => {
            let coordinator = elastic::Coordinator::new(&config, parts, &owned)?;
            Box::pin(coordinator.run(&shutdown))
        }
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
    result.map(|()| totals)
}

/// One shard's loop, under its leader lock or without one.
async fn relay_one(
    mut engine: Engine,
    shard: Shard,
    lock: Option<LeaderLock>,
    owned: &Owned,
    shutdown: &CancellationToken,
    relay: &RelayConfig,
) -> Result<(), RelayError> {
    let result = match lock {
        None => {
            owned.insert(shard);
            engine.run(shutdown).await.map_err(RelayError::from)
        }
        Some(lock) => lead(lock, &mut engine, shard, owned, shutdown, relay).await,
    };
    owned.remove(shard);
    result
}

/// Relays while holding the lock; stands by while someone else does.
async fn lead(
    mut lock: LeaderLock,
    engine: &mut Engine,
    shard: Shard,
    owned: &Owned,
    shutdown: &CancellationToken,
    relay: &RelayConfig,
) -> Result<(), RelayError> {
    loop {
        info!("standing by for the leader lock");
        if !lock.acquire(shutdown, relay.give_up_after).await? {
            return Ok(());
        }
        owned.insert(shard);
        let (kept, result) = hold(&mut lock, engine, shutdown).await;
        owned.remove(shard);
        if result.is_err() || shutdown.is_cancelled() {
            // We are exiting: let a standby take over now rather than when the lease runs out.
            if kept == Kept::Ours {
                info!("stopped claiming; handing the leader lock over");
                if lock.release().await {
                    info!("leader lock released");
                }
            }
            return result.map_err(RelayError::from);
        }
        warn!("leadership lost; stopped claiming");
    }
}

/// Relays `engine`'s shard under `lock`, which is ours, until `stop` is cancelled or the lease can no longer
/// be proven; the lock is still held afterwards only when it was [`Kept::Ours`].
async fn hold(
    lock: &mut LeaderLock,
    engine: &mut Engine,
    stop: &CancellationToken,
) -> (Kept, Result<(), engine::EngineError>) {
    let term = stop.child_token();
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
        // Stop: the batch in flight finishes (the caller's drain_timeout bounds it).
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
    (kept, result)
}

/// The shards this relay publishes now, told to the metrics, the probes and the outbox sample.
struct Owned {
    shards: watch::Sender<Vec<Shard>>,
    health: health::Health,
}

impl Owned {
    fn new(health: health::Health) -> Self {
        Self { shards: watch::Sender::new(Vec::new()), health }
    }

    fn subscribe(&self) -> watch::Receiver<Vec<Shard>> {
        self.shards.subscribe()
    }

    fn insert(&self, shard: Shard) {
        metrics::set_leader(shard, true);
        self.shards.send_modify(|shards| shards.push(shard));
        self.changed();
    }

    fn remove(&self, shard: Shard) {
        metrics::set_leader(shard, false);
        self.shards.send_modify(|shards| shards.retain(|s| *s != shard));
        self.changed();
    }

    fn changed(&self) {
        let count = self.shards.borrow().len();
        metrics::set_owned(count);
        self.health.set_leading(count > 0);
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
