//! One leader lock: who may publish a shard. Knows nothing about shards beyond the key it is given.
//!
//! Redis: Qx's `DistributedLock` protocol (`SET key token NX`, compare-token renew and release), so a Python
//! relay holding the key keeps us waiting and the other way round. Unlike the Python relay we renew every
//! third of the TTL and step down the moment a renewal fails or finds another token, before the lease could
//! have run out. Postgres: a session advisory lock on a dedicated connection; it dies with the session, so a
//! partitioned leader is fenced by construction.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use sqlx::{Connection, PgConnection};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

/// Standbys never wait longer than this between attempts, so a released lock is taken within about a second.
const STANDBY_POLL_MAX: Duration = Duration::from_millis(500);

/// Renew only if the key still holds our token.
const RENEW_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
/// Delete only if the key still holds our token.
const RELEASE_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Why the lock's backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis failed or did not answer in time.
    #[error("redis")]
    Redis(#[from] redis::RedisError),
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

/// The lock's holder as Redis shows it, for `qx-relay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    /// The lock key.
    pub key: String,
    /// The holder's token, if the key is set.
    pub token: Option<String>,
    /// Lease left, in milliseconds.
    pub ttl_left_ms: Option<i64>,
}

/// A leader lock on one key.
pub enum LeaderLock {
    /// Redis lease.
    Redis(Box<RedisLock>),
    /// Postgres advisory lock.
    Postgres(AdvisoryLock),
}

impl LeaderLock {
    /// Waits until the lock is ours; `Ok(false)` when `stop` fired first.
    ///
    /// # Errors
    /// [`LockError::GaveUp`] when the backend stayed unreachable for `give_up_after`.
    pub async fn acquire(
        &mut self,
        stop: &CancellationToken,
        give_up_after: Duration,
    ) -> Result<bool, LockError> {
        let mut failing_since: Option<Instant> = None;
        loop {
            let attempt = match self {
                Self::Redis(lock) => lock.try_acquire().await,
                Self::Postgres(lock) => lock.try_acquire().await,
            };
            let wait = match attempt {
                Ok(Acquired::Yes) => return Ok(true),
                Ok(Acquired::No { retry_in }) => {
                    failing_since = None;
                    retry_in
                }
                Err(err) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > give_up_after {
                        return Err(LockError::GaveUp(give_up_after));
                    }
                    warn!(error = %super::error_chain(&err), "leader lock backend unavailable; standing by");
                    STANDBY_POLL_MAX
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Keeps the lock until `term` is cancelled, renewing it; cancels `term` itself the moment the lease can
    /// no longer be proven (renewal failed, timed out, or found another token). Returns whether we still hold it.
    pub async fn keep(&mut self, term: &CancellationToken) -> bool {
        let interval = self.renew_interval();
        loop {
            tokio::select! {
                _ = term.cancelled() => return true,
                _ = tokio::time::sleep(interval) => {}
            }
            let renewed = match self {
                Self::Redis(lock) => lock.renew().await,
                Self::Postgres(lock) => lock.check(interval).await,
            };
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    warn!("leader lock taken by another holder; stepping down");
                    term.cancel();
                    return false;
                }
                Err(err) => {
                    warn!(error = %super::error_chain(&err), "leader lock renewal failed; stepping down");
                    term.cancel();
                    return false;
                }
            }
        }
    }

    /// Gives the lock up so a standby takes over at once.
    pub async fn release(&mut self) {
        let released = match self {
            Self::Redis(lock) => lock.release().await,
            Self::Postgres(lock) => lock.release().await,
        };
        match released {
            Ok(()) => info!("leader lock released"),
            Err(err) => {
                warn!(error = %super::error_chain(&err), "leader lock not released; it expires by itself")
            }
        }
    }

    fn renew_interval(&self) -> Duration {
        match self {
            Self::Redis(lock) => lock.ttl / 3,
            Self::Postgres(lock) => lock.check_every,
        }
    }
}

enum Acquired {
    Yes,
    No { retry_in: Duration },
}

/// A Redis lease compatible with Qx's `DistributedLock`.
pub struct RedisLock {
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    key: String,
    token: String,
    ttl: Duration,
}

impl RedisLock {
    /// A lock on `key` with a fresh random token (uuid4 text, as Qx uses).
    ///
    /// # Errors
    /// When `url` is not a Redis URL.
    pub fn new(url: &str, key: String, ttl: Duration) -> Result<Self, LockError> {
        let client = redis::Client::open(url)?;
        Ok(Self { client, connection: None, key, token: Uuid::new_v4().to_string(), ttl })
    }

    /// Our token, logged so operators can tell holders apart.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The key's current holder.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn holder(&mut self) -> Result<Holder, LockError> {
        let token: Option<String> = self.query(redis::cmd("GET").arg(&self.key).to_owned()).await?;
        let ttl: i64 = self.query(redis::cmd("PTTL").arg(&self.key).to_owned()).await?;
        Ok(Holder { key: self.key.clone(), token, ttl_left_ms: (ttl >= 0).then_some(ttl) })
    }

    async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(&self.key)
                    .arg(&self.token)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms())
                    .to_owned(),
            )
            .await?;
        if set.is_some() {
            info!(key = %self.key, token = %self.token, "leader lock acquired");
            return Ok(Acquired::Yes);
        }
        // Wake just after the holder's lease would end, but poll at least every STANDBY_POLL_MAX.
        let left: i64 = self.query(redis::cmd("PTTL").arg(&self.key).to_owned()).await?;
        let until_expiry = Duration::from_millis(u64::try_from(left).unwrap_or(0) + 10);
        Ok(Acquired::No { retry_in: until_expiry.min(self.ttl / 3).min(STANDBY_POLL_MAX) })
    }

    async fn renew(&mut self) -> Result<bool, LockError> {
        let renew = self.script(RENEW_SCRIPT).arg(self.ttl_ms()).to_owned();
        let renewed: i64 = self.query(renew).await?;
        Ok(renewed == 1)
    }

    async fn release(&mut self) -> Result<(), LockError> {
        let _: i64 = self.query(self.script(RELEASE_SCRIPT)).await?;
        Ok(())
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// `EVAL script 1 key token`; sent as text each time, which at one call per renewal costs nothing.
    fn script(&self, script: &str) -> redis::Cmd {
        redis::cmd("EVAL").arg(script).arg(1).arg(&self.key).arg(&self.token).to_owned()
    }

    /// Runs `cmd` within a third of the TTL, dropping the connection on any failure so the next call
    /// reconnects.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: redis::Cmd) -> Result<T, LockError> {
        let limit = self.ttl / 3;
        if self.connection.is_none() {
            let connect = self.client.get_multiplexed_async_connection();
            self.connection = Some(timeout(limit, connect).await.map_err(|_| LockError::TimedOut)??);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let result = match timeout(limit, cmd.query_async(connection)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => Err(LockError::TimedOut),
        };
        self.connection = None;
        result
    }
}

/// A Postgres session advisory lock held on a connection of its own.
pub struct AdvisoryLock {
    url: String,
    key: i64,
    connection: Option<PgConnection>,
    check_every: Duration,
}

impl AdvisoryLock {
    /// A lock identified by `name` (hashed to the advisory lock's 64-bit key).
    pub fn new(url: String, name: &str, check_every: Duration) -> Self {
        Self { url, key: advisory_key(name), connection: None, check_every }
    }

    async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        if self.connection.is_none() {
            let connect = PgConnection::connect(&self.url);
            self.connection =
                Some(timeout(self.check_every * 2, connect).await.map_err(|_| LockError::TimedOut)??);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let locked: Result<bool, sqlx::Error> =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(self.key).fetch_one(connection).await;
        match locked {
            Ok(true) => {
                info!(key = self.key, "leader lock acquired (postgres advisory lock)");
                Ok(Acquired::Yes)
            }
            Ok(false) => Ok(Acquired::No { retry_in: STANDBY_POLL_MAX }),
            Err(err) => {
                self.connection = None;
                Err(err.into())
            }
        }
    }

    /// The session is alive, so the lock is still ours.
    async fn check(&mut self, limit: Duration) -> Result<bool, LockError> {
        let Some(connection) = self.connection.as_mut() else { return Ok(false) };
        match timeout(limit, connection.ping()).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(err)) => {
                self.connection = None;
                Err(err.into())
            }
            Err(_) => {
                self.connection = None;
                Err(LockError::TimedOut)
            }
        }
    }

    async fn release(&mut self) -> Result<(), LockError> {
        if let Some(connection) = self.connection.take() {
            // Closing the session releases the lock; no unlock call needed.
            connection.close().await?;
        }
        Ok(())
    }
}

/// A stable 64-bit key for `name` (FNV-1a), so every relay of a table and shard picks the same lock.
fn advisory_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_are_stable_and_distinct() {
        assert_eq!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:0"));
        assert_ne!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:1"));
    }
}
