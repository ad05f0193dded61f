//! What the lock backends answer, whichever the backend: why one could not be used, the outcome of an attempt
//! on a lock, and who holds a lock.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::relay::identity::Identity;
use crate::relay::refusal::Refusal;

/// Standbys never wait longer than this between attempts, so a released lock is taken within about a second.
pub(super) const STANDBY_POLL_MAX: Duration = Duration::from_millis(500);

/// One attempt on a lock.
pub(super) enum Acquired {
    Yes,
    No { retry_in: Duration },
}

/// Why the lock's backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis failed.
    #[error("Redis at cache.url {url}")]
    Redis {
        /// `cache.url`, redacted.
        url: String,
        /// The client's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// Redis did not answer in time.
    #[error("Redis at cache.url {url}: no answer within {}", humantime::format_duration(*.limit))]
    RedisTimedOut {
        /// `cache.url`, redacted.
        url: String,
        /// How long it had.
        limit: Duration,
    },
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
