//! Who may publish which shard: one leader lock per shard, in Redis (Qx's `DistributedLock` protocol) or in
//! Postgres (session advisory locks), and, for elastic shards, the record of who is alive.
//!
//! - [`Backend`]: the backend, chosen once from the config; it makes every lock, membership and lookup.
//! - [`redis`], [`postgres`]: each backend's locks, membership and holder lookups.
//! - [`lock`]: one lock whichever its backend, and the [`Fence`] after a lost lease.
//! - [`outcome`]: what the backends answer: errors, attempts, holders.
//! - [`fixed`]: a static shard (or the whole table) under its lock, or under none.
//! - [`elastic`]: shards shared by lease among replicas started alike, by the pure decisions of [`plan`].

pub(crate) mod elastic;
pub(crate) mod fixed;
mod lock;
mod outcome;
mod plan;
mod postgres;
mod redis;

use sqlx::postgres::PgPool;

use super::config::{Config, LeaderMode};
use super::engine::EngineError;
use super::shard::Shard;
pub use lock::{Fence, Kept, LeaderLock};
pub use outcome::{Holder, LockError};

/// Why relaying under a lock (or elastic leases) ended before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The relay loop gave up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The lock backend gave up, or refused our settings.
    #[error(transparent)]
    Lock(#[from] LockError),
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
