//! Who may publish which shard: one leader lock per shard, in Redis (Qx's `DistributedLock` protocol) or in
//! Postgres (session advisory locks), and, for elastic shards, the record of who is alive.
//!
//! - [`Backend`]: the backend, chosen once from the config; it makes every lock, membership and lookup.
//! - [`redis`], [`postgres`]: each backend's locks, membership and holder lookups.
//! - [`lock`]: one lock whichever its backend, and the [`Fence`] after a lost lease.
//! - [`fixed`]: a static shard (or the whole table) under its lock, or under none.
//! - [`elastic`]: shards shared by lease among replicas started alike, by the pure decisions of [`plan`].

pub(crate) mod elastic;
pub(crate) mod fixed;
mod lock;
mod plan;
mod postgres;
mod redis;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use super::config::{Config, LeaderMode};
use super::identity::Identity;
use super::refusal::Refusal;
use super::shard::Shard;
pub use lock::{Fence, Kept, LeaderLock};

/// Why the lock's backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis failed or did not answer in time.
    #[error("redis")]
    Redis(#[from] ::redis::RedisError),
    /// Redis refused our TLS settings or credentials.
    #[error("{refusal}: Redis at cache.url {url}")]
    RedisRefused {
        /// What was refused.
        refusal: Refusal,
        /// `cache.url`, redacted.
        url: String,
        /// The client's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// `rediss://` to a server that answers without TLS.
    #[error("{}: Redis at cache.url {url}: the server answers without TLS", Refusal::Tls)]
    RedisWithoutTls {
        /// `cache.url`, redacted.
        url: String,
    },
    /// A `cache.tls_*` file could not be read.
    #[error("reading {key} ({path})")]
    CertificateFile {
        /// The setting.
        key: &'static str,
        /// Its file.
        path: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The `cache.tls_*` certificates are not usable PEM.
    #[error("reading the cache.tls_* certificates")]
    Certificates(#[source] ::redis::RedisError),
    /// Postgres failed.
    #[error("postgres")]
    Postgres(#[from] sqlx::Error),
    /// The backend did not answer within the renewal interval.
    #[error("timed out")]
    TimedOut,
    /// The backend kept failing for longer than `give_up_after`.
    #[error("leader lock backend unavailable for longer than {}", humantime::format_duration(*.0))]
    GaveUp(Duration),
}

impl LockError {
    /// The settings must change, retrying cannot help: Redis refused our TLS settings or credentials, or the
    /// certificates could not be read.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            Self::RedisRefused { .. }
                | Self::RedisWithoutTls { .. }
                | Self::CertificateFile { .. }
                | Self::Certificates(_)
        )
    }
}

/// A lock and who holds it, for `qx-relay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    /// The Redis key, or the advisory lock's name.
    pub key: String,
    /// `redis` or `postgres`.
    pub backend: &'static str,
    /// Whether someone holds it.
    pub held: bool,
    /// Redis: the holder's token, if the key is set.
    pub token: Option<String>,
    /// Redis: lease left, in milliseconds.
    pub ttl_left_ms: Option<i64>,
    /// The holding relay's host and pid, when it recorded them (a Python relay does not).
    #[serde(flatten)]
    pub identity: Option<Identity>,
    /// Redis: since when the holding relay has held the lock, when it recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Postgres: the holding session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
}

/// The Postgres session holding an advisory lock.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Session {
    /// The server process of the session (`pg_terminate_backend` ends it, and the lock).
    pub backend_pid: i32,
    /// Its `application_name`.
    pub application_name: Option<String>,
    /// The client's address; none over a Unix socket, or when our role may not see it.
    pub client_addr: Option<String>,
}

/// The backend of the leader locks (and of the membership record), chosen once from the config.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Leases in the Redis of `cache.url`.
    Redis(redis::RedisBackend),
    /// Advisory locks in the outbox's Postgres.
    Postgres(postgres::PgBackend),
}

impl Backend {
    /// The backend `config` asks for; `None` without leader locks (`leader = "none"`).
    pub fn of(config: &Config) -> Option<Self> {
        let relay = &config.relay;
        match relay.leader {
            LeaderMode::None => None,
            LeaderMode::Redis => Some(Self::Redis(redis::RedisBackend {
                cache: config.cache.clone(),
                leader_key: relay.leader_key.clone(),
                ttl: relay.leader_ttl,
            })),
            LeaderMode::Postgres => Some(Self::Postgres(postgres::PgBackend {
                url: config.db.sqlx_url(),
                table: relay.table.clone(),
                ttl: relay.leader_ttl,
                statement_timeout: relay.statement_timeout(),
            })),
        }
    }

    /// `redis` or `postgres`, as the config names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Redis(_) => LeaderMode::Redis.as_str(),
            Self::Postgres(_) => LeaderMode::Postgres.as_str(),
        }
    }

    /// The lock of `shard` (of the whole table, when unsharded) that a static relay leads under; its standby
    /// keeps one session of Postgres between tries.
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub fn lock(&self, shard: Shard) -> Result<LeaderLock, LockError> {
        self.shard_lock(shard, true)
    }

    /// The lease of one of the shards elastic replicas share: it holds no Postgres session while not held, as
    /// a replica tries many shards.
    ///
    /// # Errors
    /// As [`Backend::lock`].
    pub fn lease(&self, shard: Shard) -> Result<LeaderLock, LockError> {
        self.shard_lock(shard, false)
    }

    fn shard_lock(&self, shard: Shard, standby_session: bool) -> Result<LeaderLock, LockError> {
        Ok(match self {
            Self::Redis(redis) => LeaderLock::Redis(Box::new(redis.lock(shard.lock_key(&redis.leader_key))?)),
            Self::Postgres(pg) => {
                LeaderLock::Postgres(pg.lock(&shard.advisory_lock_name(&pg.table), standby_session))
            }
        })
    }

    /// This replica's entry in the record of who is alive.
    ///
    /// # Errors
    /// As [`Backend::lock`].
    pub fn membership(&self) -> Result<Membership, LockError> {
        Ok(match self {
            Self::Redis(redis) => Membership::Redis(Box::new(redis.membership()?)),
            Self::Postgres(pg) => Membership::Postgres(pg.membership()),
        })
    }

    /// Who holds `shard`'s lock; `pool` is the outbox's.
    ///
    /// # Errors
    /// When the backend cannot be reached.
    pub async fn holder(&self, shard: Shard, pool: &PgPool) -> Result<Holder, LockError> {
        match self {
            Self::Redis(redis) => redis.holder(shard.lock_key(&redis.leader_key)).await,
            Self::Postgres(pg) => Ok(postgres::holder(pool, &shard.advisory_lock_name(&pg.table)).await?),
        }
    }

    /// How many replicas sharing the shards are alive; `pool` is the outbox's.
    ///
    /// # Errors
    /// When the backend cannot be reached.
    pub async fn live_members(&self, pool: &PgPool) -> Result<usize, LockError> {
        match self {
            Self::Redis(redis) => redis.live_members().await,
            Self::Postgres(pg) => pg.live_members(pool).await,
        }
    }
}

/// This replica's entry in the record of who is alive among the replicas sharing the shards.
pub enum Membership {
    /// A sorted set, `<leader_key>:members`, of each replica's token scored by when its heartbeat expires, on
    /// Redis' own clock, so replicas' clocks never disagree about who has expired.
    Redis(Box<redis::RedisMembership>),
    /// A session advisory lock per replica, `(class, member)`, visible to all in `pg_locks`, on a session
    /// Postgres ends after `leader_ttl` idle, so a replica that stops answering drops out.
    Postgres(postgres::PgMembership),
}

impl Membership {
    /// This replica's token in the record.
    pub fn token(&self) -> String {
        match self {
            Self::Redis(redis) => redis.token.clone(),
            Self::Postgres(postgres) => postgres.member.to_string(),
        }
    }

    /// Renews this replica's heartbeat; returns the live members, this one included, in token order.
    ///
    /// # Errors
    /// When the backend fails or does not answer within a third of the TTL.
    pub async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        match self {
            Self::Redis(redis) => redis.beat().await,
            Self::Postgres(postgres) => postgres.beat().await,
        }
    }

    /// Leaves the record, so the others rebalance now rather than when the heartbeat expires.
    pub async fn leave(&mut self) {
        match self {
            Self::Redis(redis) => redis.leave().await,
            Self::Postgres(postgres) => postgres.connection = None,
        }
    }
}
