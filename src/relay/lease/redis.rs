//! The Redis backend: Qx's `DistributedLock` protocol (`SET key token NX`, compare-token renew and release),
//! so a Python relay holding the key keeps us waiting and the other way round; the membership record of the
//! replicas sharing elastic shards; and the lookups of who holds what, for `status`.
//!
//! Unlike the Python relay we renew every third of the TTL and step down the moment a renewal fails or finds
//! another token, at least a third of the TTL before the lease could have run out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, TlsCertificates};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tracing::debug;
use uuid::Uuid;

use super::outcome::{Acquired, Holder, LockError, STANDBY_POLL_MAX};
use crate::relay::causes::error_chain;
use crate::relay::config::CacheConfig;
use crate::relay::identity::Identity;
use crate::relay::refusal;

/// The longest a plain-RESP probe of a `rediss://` server that does not answer may take.
const PROBE_LIMIT: Duration = Duration::from_secs(1);

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

/// Where the locks and the membership record live: the Redis of `cache.url`, under `leader_key`.
#[derive(Debug, Clone)]
pub(crate) struct RedisBackend {
    pub(super) cache: CacheConfig,
    pub(super) leader_key: String,
    pub(super) ttl: Duration,
}

impl RedisBackend {
    /// The lock on `key`, with a fresh token.
    pub(super) fn lock(&self, key: String) -> Result<RedisLock, LockError> {
        RedisLock::new(&self.cache, key, self.ttl)
    }

    /// A fresh member of `<leader_key>:members`.
    pub(super) fn membership(&self) -> Result<RedisMembership, LockError> {
        Ok(RedisMembership {
            link: RedisLink::new(&self.cache)?,
            key: members_key(&self.leader_key),
            token: Uuid::new_v4().to_string(),
            ttl: self.ttl,
        })
    }

    /// Who holds `key`.
    pub(super) async fn holder(&self, key: String) -> Result<Holder, LockError> {
        self.lock(key)?.holder().await
    }

    /// How many replicas sharing the shards are alive.
    pub(super) async fn live_members(&self) -> Result<usize, LockError> {
        let mut link = RedisLink::new(&self.cache)?;
        let live = redis::cmd("EVAL").arg(LIVE_SCRIPT).arg(1).arg(members_key(&self.leader_key)).to_owned();
        let members: Vec<String> = link.query(live, self.ttl / 3).await?;
        Ok(members.len())
    }
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

/// A Redis lease compatible with Qx's `DistributedLock`.
pub(crate) struct RedisLock {
    link: RedisLink,
    pub(super) key: String,
    /// `<key>:holder`: who we are, while we hold the key.
    holder_key: String,
    pub(super) token: String,
    /// Who we are, for the holder record.
    identity: Identity,
    /// The [`HolderRecord`] of our current lease, as JSON.
    record: String,
    pub(super) ttl: Duration,
    /// Until when the lease is certainly ours: when the last `SET` or renewal that succeeded was *sent*, plus
    /// the TTL (Redis started the lease after that).
    pub(super) lease_until: Option<Instant>,
}

impl RedisLock {
    /// A lock on `key` in the Redis of `cache`, with a fresh random token (uuid4 text, as Qx uses).
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    fn new(cache: &CacheConfig, key: String, ttl: Duration) -> Result<Self, LockError> {
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
    async fn holder(&mut self) -> Result<Holder, LockError> {
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

    pub(super) async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
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
                debug!(error = %error_chain(&err), "leader lock holder record not written");
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

    pub(super) async fn renew(&mut self) -> Result<bool, LockError> {
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

    pub(super) async fn release(&mut self) -> Result<(), LockError> {
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
struct RedisLink {
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
    fn new(cache: &CacheConfig) -> Result<Self, LockError> {
        Ok(Self { client: redis_client(cache)?, url: cache.redacted_url(), connection: None })
    }

    /// Runs `cmd` within `limit`, connecting first if needed; drops the connection on any failure so the next
    /// call reconnects.
    async fn query<T: redis::FromRedisValue>(
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
            Err(_) => Err(self.timed_out(limit)),
        };
        self.connection = None;
        result
    }

    /// A connection attempt that timed out. A plaintext Redis keeps a TLS ClientHello in its buffer waiting for a
    /// line end, so `rediss://` to it hangs instead of failing: asking in plain RESP tells it from a server that
    /// does not answer at all.
    async fn connect_timed_out(&self, limit: Duration) -> LockError {
        let ConnectionAddr::TcpTls { host, port, .. } = self.client.get_connection_info().addr() else {
            return self.timed_out(limit);
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
            _ => self.timed_out(limit),
        }
    }

    fn timed_out(&self, limit: Duration) -> LockError {
        LockError::RedisTimedOut { url: self.url.clone(), limit }
    }

    fn redis_error(&self, err: redis::RedisError) -> LockError {
        match refusal::of_redis(&err) {
            Some(refusal) => LockError::RedisRefused { refusal, url: self.url.clone(), source: err },
            None => LockError::Redis { url: self.url.clone(), source: err },
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
        return redis::Client::open(cache.url.as_str())
            .map_err(|source| LockError::Redis { url: cache.redacted_url(), source });
    }
    redis::Client::build_with_tls(cache.url.as_str(), TlsCertificates { client_tls, root_cert })
        .map_err(LockError::Certificates)
}

/// A member of `<leader_key>:members` in Redis.
pub(crate) struct RedisMembership {
    link: RedisLink,
    key: String,
    pub(super) token: String,
    ttl: Duration,
}

impl RedisMembership {
    pub(super) async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let beat =
            redis::cmd("EVAL").arg(BEAT_SCRIPT).arg(1).arg(&self.key).arg(&self.token).arg(ttl_ms).to_owned();
        self.link.query(beat, self.ttl / 3).await
    }

    pub(super) async fn leave(&mut self) {
        let leave = redis::cmd("ZREM").arg(&self.key).arg(&self.token).to_owned();
        if let Err(err) = self.link.query::<i64>(leave, self.ttl / 3).await {
            debug!(error = %error_chain(&err), "membership not left; it expires by itself");
        }
    }
}

fn members_key(leader_key: &str) -> String {
    format!("{leader_key}:members")
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
}
