//! Who is alive among the replicas sharing the shards (`shard_id = "auto"`), in the leader locks' backend:
//!
//! - Redis: a sorted set, `<leader_key>:members`, of each replica's token scored by when its heartbeat
//!   expires. Scores are Redis' own clock, so replicas' clocks never disagree about who has expired.
//! - Postgres: a session advisory lock per replica, `(class, member)` with the class derived from the table,
//!   visible to all in `pg_locks`. It lives as long as the replica's session, which Postgres ends after
//!   `leader_ttl` idle (`idle_session_timeout`), so a replica that stops answering drops out like an expired
//!   heartbeat.

use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::PgConnection;
use tokio::time::timeout;
use tracing::debug;
use uuid::Uuid;

use super::config::{CacheConfig, Config, LeaderMode};
use super::leader::{advisory_key, session, session_outcome, LockError, RedisLink};

/// The live members of a Postgres membership: the granted two-key advisory locks of its class, in order.
const PG_MEMBERS_SQL: &str = "SELECT objid::bigint FROM pg_locks \
     WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1 \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     ORDER BY objid";

/// Drops expired members, (re)adds `ARGV[1]` until `ARGV[2]` ms from now, and returns the live members in
/// token order. The set itself expires when every replica has been gone for two TTLs.
const BEAT_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zadd', KEYS[1], now + ARGV[2], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2] * 2)
return redis.call('zrange', KEYS[1], 0, -1)";
/// The live members, without joining.
const LIVE_SCRIPT: &str = r"
local t = redis.call('time')
return redis.call('zrangebyscore', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), '+inf')";

/// This replica's entry in the membership record.
pub enum Membership {
    /// In the leader locks' Redis.
    Redis(Box<RedisMembership>),
    /// In the outbox's Postgres.
    Postgres(PgMembership),
}

impl Membership {
    /// A fresh member, in the backend of `config`'s leader locks, whose heartbeat lasts `leader_ttl`.
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub fn new(config: &Config) -> Result<Self, LockError> {
        let relay = &config.relay;
        Ok(match relay.leader {
            LeaderMode::Postgres => Self::Postgres(PgMembership {
                url: config.db.sqlx_url(),
                class: members_class(&relay.table),
                member: member_id(),
                connection: None,
                ttl: relay.leader_ttl,
            }),
            LeaderMode::Redis | LeaderMode::None => Self::Redis(Box::new(RedisMembership {
                link: RedisLink::new(&config.cache)?,
                key: members_key(&relay.leader_key),
                token: Uuid::new_v4().to_string(),
                ttl: relay.leader_ttl,
            })),
        })
    }

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

/// A member of `<leader_key>:members` in Redis.
pub struct RedisMembership {
    link: RedisLink,
    key: String,
    token: String,
    ttl: Duration,
}

impl RedisMembership {
    async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let beat =
            redis::cmd("EVAL").arg(BEAT_SCRIPT).arg(1).arg(&self.key).arg(&self.token).arg(ttl_ms).to_owned();
        self.link.query(beat, self.ttl / 3).await
    }

    async fn leave(&mut self) {
        let leave = redis::cmd("ZREM").arg(&self.key).arg(&self.token).to_owned();
        if let Err(err) = self.link.query::<i64>(leave, self.ttl / 3).await {
            debug!(error = %super::error_chain(&err), "membership not left; it expires by itself");
        }
    }
}

/// A member holding its advisory lock `(class, member)` on a session of its own.
pub struct PgMembership {
    url: String,
    class: i64,
    member: i32,
    connection: Option<PgConnection>,
    ttl: Duration,
}

impl PgMembership {
    async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        let limit = self.ttl / 3;
        if self.connection.is_none() {
            let mut connection = session(&self.url, Some(self.ttl), limit).await?;
            let class = i32::try_from(self.class).expect("a class fits an int4");
            let join = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(self.member)
                .fetch_one(&mut connection);
            let joined: bool = timeout(limit, join).await.map_err(|_| LockError::TimedOut)??;
            if !joined {
                // Another replica drew the same id: draw again next beat.
                self.member = member_id();
                return Err(LockError::TimedOut);
            }
            self.connection = Some(connection);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let members = sqlx::query_scalar::<_, i64>(PG_MEMBERS_SQL).bind(self.class).fetch_all(connection);
        let members = timeout(limit, members).await;
        let members = session_outcome(&mut self.connection, members)?;
        Ok(members.iter().map(i64::to_string).collect())
    }
}

/// How many replicas sharing `config`'s shards are alive, for `status`; `pool` is the outbox's.
///
/// # Errors
/// When the backend cannot be reached.
pub async fn live_members(config: &Config, pool: &PgPool) -> Result<usize, LockError> {
    let relay = &config.relay;
    if relay.leader == LeaderMode::Postgres {
        let members =
            sqlx::query_scalar::<_, i64>(PG_MEMBERS_SQL).bind(members_class(&relay.table)).fetch_all(pool);
        let members =
            timeout(relay.statement_timeout(), members).await.map_err(|_| LockError::TimedOut)??;
        return Ok(members.len());
    }
    redis_live_members(&config.cache, &relay.leader_key, relay.leader_ttl / 3).await
}

async fn redis_live_members(
    cache: &CacheConfig,
    leader_key: &str,
    limit: Duration,
) -> Result<usize, LockError> {
    let mut link = RedisLink::new(cache)?;
    let live = redis::cmd("EVAL").arg(LIVE_SCRIPT).arg(1).arg(members_key(leader_key)).to_owned();
    let members: Vec<String> = link.query(live, limit).await?;
    Ok(members.len())
}

fn members_key(leader_key: &str) -> String {
    format!("{leader_key}:members")
}

/// The first key of the members' advisory locks on `table`: non-negative, so `pg_locks` shows it as is.
fn members_class(table: &str) -> i64 {
    advisory_key(&format!("qx-relay:{table}:members")) & 0x7fff_ffff
}

/// A random member id: the second key of this replica's advisory lock.
fn member_id() -> i32 {
    i32::try_from(Uuid::new_v4().as_u128() & 0x7fff_ffff).expect("31 bits fit an int4")
}

/// How many of `shard_count` shards the member `me` should own: an even split in token order, the first
/// `shard_count % members` members taking one more, so every shard has an owner, no two shares differ by more
/// than one, and members beyond `shard_count` stand by. Zero when `me` is not a member.
pub fn fair_share(shard_count: u32, members: &[String], me: &str) -> u32 {
    let Some(rank) = members.iter().position(|member| member == me) else { return 0 };
    let (count, rank) = (shard_count as usize, rank);
    let share = count / members.len() + usize::from(rank < count % members.len());
    u32::try_from(share).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i:02}")).collect()
    }

    #[test]
    fn shares_cover_every_shard_and_differ_by_at_most_one() {
        for count in 1..=16 {
            for n in 1..=20 {
                let members = members(n);
                let shares: Vec<u32> = members.iter().map(|m| fair_share(count, &members, m)).collect();
                assert_eq!(shares.iter().sum::<u32>(), count, "{count} shards over {n}");
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{count} shards over {n}: {shares:?}");
                assert!(*max <= count.div_ceil(n as u32));
            }
        }
    }

    #[test]
    fn twelve_shards_split_four_ways_three_ways_and_stand_by_beyond() {
        let share = |n: usize, m: &str| fair_share(12, &members(n), m);
        assert_eq!(share(3, "m00"), 4);
        assert_eq!(share(4, "m03"), 3);
        assert_eq!(share(5, "m01"), 3);
        assert_eq!(share(5, "m04"), 2);
        assert_eq!(share(13, "m12"), 0, "the 13th replica is a hot standby");
        assert_eq!(share(3, "gone"), 0);
    }
}
