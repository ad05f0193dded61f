//! One leader lock: who may publish a shard. Knows nothing about shards beyond the key it is given.
//!
//! Redis: Qx's `DistributedLock` protocol (`SET key token NX`, compare-token renew and release), so a Python
//! relay holding the key keeps us waiting and the other way round. Unlike the Python relay we renew every
//! third of the TTL and step down the moment a renewal fails or finds another token, at least a third of the
//! TTL before the lease could have run out; [`Kept::Lost`] then says by when the work started under the lease
//! must have stopped, so a new leader never claims around rows an old one still holds. Postgres: a session
//! advisory lock on a dedicated connection; it dies with the session, so a partitioned leader is fenced by
//! construction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, TlsCertificates};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::config::CacheConfig;
use super::identity::Identity;
use super::outage::OutageClock;
use super::refusal::{self, Refusal};
use crate::backoff::Backoff;

/// The longest a plain-RESP probe of a `rediss://` server that does not answer may take.
const PROBE_LIMIT: Duration = Duration::from_secs(1);

/// Standbys never wait longer than this between attempts, so a released lock is taken within about a second.
const STANDBY_POLL_MAX: Duration = Duration::from_millis(500);
/// Retries while the backend fails: quickly at first, never slower than a standby polls.
const BACKEND_RETRY: Backoff = Backoff::new(Duration::from_millis(100), STANDBY_POLL_MAX).with_jitter(0.5);

// The scripts take the lock key, then its holder record, then the token, the TTL in ms and the record. The
// record is written with pcall: a Redis that refuses new keys (maxmemory) must not make a leader step down.
/// Renew only if the key still holds our token.
const RENEW_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.pcall('set', KEYS[2], ARGV[3], 'PX', ARGV[2])
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0";
/// After a refused `SET NX`: `{1, 0}` and a fresh lease when the key holds our own token, else `{0, PTTL}`.
const RECLAIM_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  redis.pcall('set', KEYS[2], ARGV[3], 'PX', ARGV[2])
  return {1, 0}
end
return {0, redis.call('pttl', KEYS[1])}";
/// Delete only if the key still holds our token.
const RELEASE_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[2]) return redis.call('del', KEYS[1]) end
return 0";

/// Why the lock's backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis failed or did not answer in time.
    #[error("redis")]
    Redis(#[from] redis::RedisError),
    /// Redis refused our TLS settings or credentials.
    #[error("{refusal}: Redis at cache.url {url}")]
    RedisRefused {
        /// What was refused.
        refusal: Refusal,
        /// `cache.url`, redacted.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
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
    Certificates(#[source] redis::RedisError),
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

/// What a relay writes next to the Redis lock key (`<key>:holder`, same TTL), so that `status` can name a
/// holder a person can act on. The key itself keeps Qx's plain token, which Python relays compare.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HolderRecord {
    token: String,
    #[serde(flatten)]
    identity: Identity,
    since: DateTime<Utc>,
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
        let mut outage = OutageClock::new(give_up_after);
        loop {
            let started = Instant::now();
            let wait = match self.attempt().await {
                Ok(Acquired::Yes) => {
                    match self {
                        Self::Redis(lock) => {
                            info!(key = %lock.key, token = %lock.token, "leader lock acquired")
                        }
                        Self::Postgres(lock) => {
                            info!(key = lock.key, "leader lock acquired (postgres advisory lock)")
                        }
                    }
                    return Ok(true);
                }
                Ok(Acquired::No { retry_in }) => {
                    if let Some(down_for) = outage.recovered() {
                        info!(?down_for, "leader lock backend available again");
                    }
                    retry_in
                }
                Err(err) if err.is_config_error() => return Err(err),
                Err(err) => {
                    let first = !outage.is_down();
                    let down_for = outage.failed(started).map_err(|_| LockError::GaveUp(give_up_after))?;
                    // WARN once per outage: standbys retry twice a second.
                    if first {
                        warn!(error = %super::error_chain(&err), "leader lock backend unavailable; standing by");
                    } else {
                        debug!(error = %super::error_chain(&err), ?down_for, "leader lock backend still unavailable");
                    }
                    outage.pause(&BACKEND_RETRY)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One attempt: `Ok(true)` when the lock is ours now.
    ///
    /// # Errors
    /// When the backend fails or does not answer in time.
    pub async fn try_acquire(&mut self) -> Result<bool, LockError> {
        Ok(matches!(self.attempt().await?, Acquired::Yes))
    }

    async fn attempt(&mut self) -> Result<Acquired, LockError> {
        match self {
            Self::Redis(lock) => lock.try_acquire().await,
            Self::Postgres(lock) => lock.try_acquire().await,
        }
    }

    /// The lock's key (Redis) or its advisory key.
    pub fn key(&self) -> String {
        match self {
            Self::Redis(lock) => lock.key.clone(),
            Self::Postgres(lock) => lock.key.to_string(),
        }
    }

    /// Keeps the lock until `term` is cancelled, renewing it; cancels `term` itself the moment the lease can
    /// no longer be proven (renewal failed, timed out, or found another token).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the renewals.
    pub async fn keep(&mut self, term: &CancellationToken) -> Kept {
        let interval = self.renew_interval();
        let mut next = Instant::now() + interval;
        loop {
            tokio::select! {
                _ = term.cancelled() => return Kept::Ours,
                _ = tokio::time::sleep_until(next) => {}
            }
            // Counted from when a renewal starts, so a slow reply does not push the next one back.
            next = Instant::now() + interval;
            let renewed = match self {
                Self::Redis(lock) => lock.renew().await,
                Self::Postgres(lock) => lock.check(interval).await,
            };
            match renewed {
                Ok(true) => continue,
                Ok(false) => warn!("leader lock taken by another holder; stepping down"),
                Err(err) => {
                    super::metrics::lock_renewal_failed();
                    warn!(error = %super::error_chain(&err), "leader lock renewal failed; stepping down")
                }
            }
            term.cancel();
            return Kept::Lost { fence: self.fence() };
        }
    }

    /// After a lost lease: when work started under it must have stopped. A Redis lease we could not renew
    /// runs on for at least a third of the TTL after we stepped down; stopping half way there leaves the
    /// rollback of the batch in flight time to land before anyone else can claim. Otherwise at once: another
    /// holder may already lead (the key holds another token, or our advisory lock's session is gone).
    fn fence(&self) -> Instant {
        let now = Instant::now();
        match self {
            Self::Redis(lock) => {
                lock.lease_until.and_then(|until| until.checked_sub(lock.ttl / 6)).map_or(now, |f| f.max(now))
            }
            Self::Postgres(_) => now,
        }
    }

    /// Gives the lock up so a standby takes over at once; `false` (and a warning) when it could not, and
    /// expires by itself.
    pub async fn release(&mut self) -> bool {
        let released = match self {
            Self::Redis(lock) => lock.release().await,
            Self::Postgres(lock) => lock.release().await,
        };
        if let Err(err) = &released {
            warn!(key = %self.key(), error = %super::error_chain(err), "leader lock not released; it expires by itself");
        }
        released.is_ok()
    }

    fn renew_interval(&self) -> Duration {
        match self {
            Self::Redis(lock) => lock.ttl / 3,
            Self::Postgres(lock) => lock.check_every,
        }
    }
}

/// How keeping the lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// `term` was cancelled by the caller; the lock is still ours to release.
    Ours,
    /// The lease could no longer be proven: stop what was started under it by `fence`, abandoning it if need
    /// be (its rows are rolled back and published again, deduplicated).
    Lost {
        /// When work under the lost lease must have stopped.
        fence: Instant,
    },
}

enum Acquired {
    Yes,
    No { retry_in: Duration },
}

/// A Redis lease compatible with Qx's `DistributedLock`.
pub struct RedisLock {
    link: RedisLink,
    key: String,
    /// `<key>:holder`: who we are, while we hold the key.
    holder_key: String,
    token: String,
    /// Who we are, for the holder record.
    identity: Identity,
    /// The [`HolderRecord`] of our current lease, as JSON.
    record: String,
    ttl: Duration,
    /// Until when the lease is certainly ours: when the last `SET` or renewal that succeeded was *sent*, plus
    /// the TTL (Redis started the lease after that).
    lease_until: Option<Instant>,
}

impl RedisLock {
    /// A lock on `key` in the Redis of `cache`, with a fresh random token (uuid4 text, as Qx uses).
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub fn new(cache: &CacheConfig, key: String, ttl: Duration) -> Result<Self, LockError> {
        Ok(Self {
            link: RedisLink::new(cache)?,
            holder_key: format!("{key}:holder"),
            key,
            token: Uuid::new_v4().to_string(),
            identity: Identity::current(),
            record: String::new(),
            ttl,
            lease_until: None,
        })
    }

    /// The key's current holder.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn holder(&mut self) -> Result<Holder, LockError> {
        let limit = self.ttl / 3;
        let token: Option<String> =
            self.link.query(redis::cmd("GET").arg(&self.key).to_owned(), limit).await?;
        let ttl: i64 = self.link.query(redis::cmd("PTTL").arg(&self.key).to_owned(), limit).await?;
        let record: Option<String> =
            self.link.query(redis::cmd("GET").arg(&self.holder_key).to_owned(), limit).await?;
        // Only the record of the current token: a stale one names a relay that no longer holds the key.
        let record = record
            .and_then(|record| serde_json::from_str::<HolderRecord>(&record).ok())
            .filter(|record| token.as_deref() == Some(record.token.as_str()));
        Ok(Holder {
            key: self.key.clone(),
            backend: "redis",
            held: token.is_some(),
            token,
            ttl_left_ms: (ttl >= 0).then_some(ttl),
            since: record.as_ref().map(|record| record.since),
            identity: record.map(|record| record.identity),
            session: None,
        })
    }

    /// A fresh record of who holds the lock, from now.
    fn new_record(&mut self) {
        let record =
            HolderRecord { token: self.token.clone(), identity: self.identity.clone(), since: Utc::now() };
        self.record = serde_json::to_string(&record).expect("a holder record serializes");
    }

    async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        let set_cmd = redis::cmd("SET")
            .arg(&self.key)
            .arg(&self.token)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms())
            .to_owned();
        let sent = Instant::now();
        let set: Option<String> = self.link.query(set_cmd, self.ttl / 3).await?;
        self.new_record();
        if set.is_some() {
            self.lease_until = Some(sent + self.ttl);
            debug!(key = %self.key, token = %self.token, "lock acquired");
            // Best effort, like the record's renewals: status then names us a renewal later.
            let record = redis::cmd("SET")
                .arg(&self.holder_key)
                .arg(&self.record)
                .arg("PX")
                .arg(self.ttl_ms())
                .to_owned();
            if let Err(err) = self.link.query::<()>(record, self.ttl / 3).await {
                debug!(error = %super::error_chain(&err), "leader lock holder record not written");
            }
            return Ok(Acquired::Yes);
        }
        // The key may hold our own token: a SET whose reply timed out but which Redis still ran (it runs what a
        // frozen server had queued), or a lease we stepped down from for want of a reply. Only we write our
        // token, so nobody else held the key since: take it back now rather than standing by for our own lease.
        let reclaim = self.script(RECLAIM_SCRIPT).arg(self.ttl_ms()).arg(&self.record).to_owned();
        let sent = Instant::now();
        let (ours, left): (i64, i64) = self.link.query(reclaim, self.ttl / 3).await?;
        if ours == 1 {
            self.lease_until = Some(sent + self.ttl);
            debug!(key = %self.key, token = %self.token, reclaimed = true, "lock acquired");
            return Ok(Acquired::Yes);
        }
        Ok(Acquired::No { retry_in: standby_wait(left, self.ttl) })
    }

    async fn renew(&mut self) -> Result<bool, LockError> {
        let sent = Instant::now();
        let lease_left =
            self.lease_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(sent));
        let limit = renew_limit(lease_left, self.ttl);
        if limit.is_zero() {
            return Err(LockError::TimedOut);
        }
        let renew = self.script(RENEW_SCRIPT).arg(self.ttl_ms()).arg(&self.record).to_owned();
        let renewed = self.link.query::<i64>(renew, limit).await? == 1;
        self.lease_until = renewed.then_some(sent + self.ttl);
        Ok(renewed)
    }

    async fn release(&mut self) -> Result<(), LockError> {
        self.lease_until = None;
        let _: i64 = self.link.query(self.script(RELEASE_SCRIPT), self.ttl / 3).await?;
        Ok(())
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// `EVAL script 2 key holder_key token`; sent as text each time, which at one call per renewal costs
    /// nothing.
    fn script(&self, script: &str) -> redis::Cmd {
        redis::cmd("EVAL").arg(script).arg(2).arg(&self.key).arg(&self.holder_key).arg(&self.token).to_owned()
    }
}

/// One connection to `cache.url`, opened on first use and again after any failure.
pub(crate) struct RedisLink {
    client: redis::Client,
    /// `cache.url` redacted, to name the server in errors.
    url: String,
    connection: Option<MultiplexedConnection>,
}

impl RedisLink {
    /// A link to the Redis of `cache` (not connected yet).
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub(crate) fn new(cache: &CacheConfig) -> Result<Self, LockError> {
        Ok(Self { client: redis_client(cache)?, url: cache.redacted_url(), connection: None })
    }

    /// Runs `cmd` within `limit`, connecting first if needed; drops the connection on any failure so the next
    /// call reconnects.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: redis::Cmd,
        limit: Duration,
    ) -> Result<T, LockError> {
        if self.connection.is_none() {
            // Our `limit` is the only timeout: the client's default 500 ms reply timeout would make a leader step
            // down on a hiccup its lease easily covers.
            let config = AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None);
            let connect = self.client.get_multiplexed_async_connection_with_config(&config);
            let connected = match timeout(limit, connect).await {
                Ok(connected) => connected,
                Err(_) => return Err(self.connect_timed_out(limit).await),
            };
            self.connection = Some(connected.map_err(|err| self.redis_error(err))?);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let result = match timeout(limit, cmd.query_async(connection)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => Err(self.redis_error(err)),
            Err(_) => Err(LockError::TimedOut),
        };
        self.connection = None;
        result
    }

    /// A connection attempt that timed out. A plaintext Redis keeps a TLS ClientHello in its buffer waiting for a
    /// line end, so `rediss://` to it hangs instead of failing: asking in plain RESP tells it from a server that
    /// does not answer at all.
    async fn connect_timed_out(&self, limit: Duration) -> LockError {
        let ConnectionAddr::TcpTls { host, port, .. } = self.client.get_connection_info().addr() else {
            return LockError::TimedOut;
        };
        let probe = async {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.ok()?;
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut first = [0u8; 1];
            stream.read_exact(&mut first).await.ok()?;
            // A RESP reply: +PONG, or an error such as -NOAUTH.
            Some(matches!(first[0], b'+' | b'-'))
        };
        match timeout(limit.min(PROBE_LIMIT), probe).await {
            Ok(Some(true)) => LockError::RedisWithoutTls { url: self.url.clone() },
            _ => LockError::TimedOut,
        }
    }

    fn redis_error(&self, err: redis::RedisError) -> LockError {
        match refusal::of_redis(&err) {
            Some(refusal) => LockError::RedisRefused { refusal, url: self.url.clone(), source: err },
            None => LockError::Redis(err),
        }
    }
}

/// A client for `cache.url`, trusting `cache.tls_ca_file` (else the public web roots) and presenting the
/// client certificate when one is set.
fn redis_client(cache: &CacheConfig) -> Result<redis::Client, LockError> {
    let read = |key: &'static str, path: &Option<String>| {
        path.as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|source| LockError::CertificateFile {
                    key,
                    path: path.clone(),
                    source,
                })
            })
            .transpose()
    };
    let root_cert = read("cache.tls_ca_file", &cache.tls_ca_file)?;
    let client_tls = match (
        read("cache.tls_cert_file", &cache.tls_cert_file)?,
        read("cache.tls_key_file", &cache.tls_key_file)?,
    ) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig { client_cert, client_key }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(redis::Client::open(cache.url.as_str())?);
    }
    redis::Client::build_with_tls(cache.url.as_str(), TlsCertificates { client_tls, root_cert })
        .map_err(LockError::Certificates)
}

/// A Postgres session advisory lock held on a connection of its own.
pub struct AdvisoryLock {
    url: String,
    key: i64,
    connection: Option<PgConnection>,
    check_every: Duration,
    /// A leased lock's session ends on the server after this long without a check, so a frozen holder lets go.
    lease: Option<Duration>,
}

impl AdvisoryLock {
    /// A lock identified by `name` (hashed to the advisory lock's 64-bit key).
    pub fn new(url: String, name: &str, check_every: Duration) -> Self {
        Self { url, key: advisory_key(name), connection: None, check_every, lease: None }
    }

    /// A lock as [`AdvisoryLock::new`] whose session Postgres ends after `ttl` without a check
    /// (`idle_session_timeout`, PostgreSQL 14 and later), so a holder that stops answering loses it like a Redis
    /// lease; and which holds no session while it is not held.
    pub fn leased(url: String, name: &str, ttl: Duration) -> Self {
        let check_every = (ttl / 3).min(STANDBY_POLL_MAX);
        Self { lease: Some(ttl), ..Self::new(url, name, check_every) }
    }

    async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        if self.connection.is_none() {
            self.connection = Some(session(&self.url, self.lease, self.check_every * 2).await?);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let locked =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(self.key).fetch_one(connection);
        let locked = timeout(self.check_every * 2, locked).await;
        if session_outcome(&mut self.connection, locked)? {
            return Ok(Acquired::Yes);
        }
        if self.lease.is_some() {
            self.connection = None;
        }
        Ok(Acquired::No { retry_in: STANDBY_POLL_MAX })
    }

    /// The session is alive, so the lock is still ours.
    async fn check(&mut self, limit: Duration) -> Result<bool, LockError> {
        let Some(connection) = self.connection.as_mut() else { return Ok(false) };
        let pinged = timeout(limit, connection.ping()).await;
        session_outcome(&mut self.connection, pinged).map(|()| true)
    }

    async fn release(&mut self) -> Result<(), LockError> {
        if let Some(connection) = self.connection.take() {
            // Closing the session releases the lock; no unlock call needed.
            timeout(self.check_every * 2, connection.close()).await.map_err(|_| LockError::TimedOut)??;
        }
        Ok(())
    }
}

/// A session of its own on `url`, named after this process so that `status` (through `pg_stat_activity`) can
/// say who holds its locks; ended by the server after `lease` idle, when given.
///
/// # Errors
/// When `url` is not a Postgres URL, or no session opens within `limit`.
pub(crate) async fn session(
    url: &str,
    lease: Option<Duration>,
    limit: Duration,
) -> Result<PgConnection, LockError> {
    let mut options =
        url.parse::<PgConnectOptions>()?.application_name(&Identity::current().application_name());
    if let Some(lease) = lease {
        options = options.options([("idle_session_timeout", lease.as_millis().to_string())]);
    }
    timeout(limit, PgConnection::connect_with(&options))
        .await
        .map_err(|_| LockError::TimedOut)?
        .map_err(Into::into)
}

/// The outcome of a step on the session in `slot`, given its deadline: a session that failed or did not answer
/// is dropped, so the next step opens a new one.
///
/// # Errors
/// The step's error, or [`LockError::TimedOut`].
pub(crate) fn session_outcome<T>(
    slot: &mut Option<PgConnection>,
    outcome: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
) -> Result<T, LockError> {
    let result = match outcome {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(LockError::TimedOut),
    };
    *slot = None;
    result
}

/// Who holds the advisory lock `name` in the database of `pool`: the session from `pg_locks`, named by
/// `pg_stat_activity` (`application_name` is visible to every role; the client address only to the same role
/// or `pg_read_all_stats`).
///
/// # Errors
/// Any database error.
pub async fn advisory_holder(pool: &PgPool, name: &str) -> Result<Holder, sqlx::Error> {
    // A bigint advisory key shows in pg_locks as its high half (classid) and low half (objid), objsubid 1.
    let session: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT a.pid, a.application_name, host(a.client_addr) \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(advisory_key(name))
    .fetch_optional(pool)
    .await?;
    let identity =
        session.as_ref().and_then(|(_, app, _)| app.as_deref().and_then(Identity::from_application_name));
    Ok(Holder {
        key: name.to_owned(),
        backend: "postgres",
        held: session.is_some(),
        token: None,
        ttl_left_ms: None,
        identity,
        since: None,
        session: session.map(|(backend_pid, application_name, client_addr)| Session {
            backend_pid,
            application_name,
            client_addr,
        }),
    })
}

/// How long a standby waits after finding the key held with `pttl` ms left: just past the holder's lease, but
/// never longer than a third of our TTL or [`STANDBY_POLL_MAX`]. PTTL is -2 when the key has just gone (retry at
/// once) and -1 when it never expires (poll).
fn standby_wait(pttl: i64, ttl: Duration) -> Duration {
    let until_expiry = match u64::try_from(pttl) {
        Ok(left) => Duration::from_millis(left + 10),
        Err(_) if pttl == -2 => Duration::ZERO,
        Err(_) => STANDBY_POLL_MAX,
    };
    until_expiry.min(ttl / 3).min(STANDBY_POLL_MAX)
}

/// How long to wait for a renewal's reply with `lease_left` on the lease: only as long as the reply could still
/// prove the lease in time. Stepping down at least a third of the TTL before the lease could end leaves the
/// batch in flight time to finish inside it.
fn renew_limit(lease_left: Duration, ttl: Duration) -> Duration {
    lease_left.saturating_sub(ttl / 3).min(ttl / 3)
}

/// A stable 64-bit key for `name` (FNV-1a), so every relay of a table and shard picks the same lock.
pub(crate) fn advisory_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standbys_wake_after_the_lease_and_poll_at_least_twice_a_second() {
        let ttl = Duration::from_secs(3);
        assert_eq!(standby_wait(200, ttl), Duration::from_millis(210));
        assert_eq!(standby_wait(2500, ttl), STANDBY_POLL_MAX);
        assert_eq!(standby_wait(-2, ttl), Duration::ZERO, "key gone: retry at once");
        assert_eq!(standby_wait(-1, ttl), STANDBY_POLL_MAX, "key without expiry: poll, don't spin");
        assert_eq!(standby_wait(900, Duration::from_secs(1)), Duration::from_secs(1) / 3);
    }

    #[test]
    fn renewals_give_up_a_third_of_the_ttl_before_the_lease_ends() {
        let ttl = Duration::from_secs(3);
        assert_eq!(renew_limit(Duration::from_secs(2), ttl), Duration::from_secs(1));
        assert_eq!(renew_limit(Duration::from_millis(1500), ttl), Duration::from_millis(500));
        assert_eq!(renew_limit(Duration::from_millis(900), ttl), Duration::ZERO);
        assert_eq!(renew_limit(Duration::from_secs(3), ttl), Duration::from_secs(1), "never above ttl/3");
    }

    #[test]
    fn advisory_keys_are_stable_and_distinct() {
        assert_eq!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:0"));
        assert_ne!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:1"));
    }
}
