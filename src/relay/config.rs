//! Settings: defaults < TOML file < environment < flags, validated before anything connects.
//!
//! Env names are the Qx ones (`QX_NATS__SERVERS`, `QX_DB__URL`, `QX_CACHE__URL`) plus `QX_RELAY__*`. A sidecar
//! shares its service's environment, so only keys this file knows are taken from `QX_NATS__`, `QX_DB__` and
//! `QX_CACHE__`; `QX_RELAY__*` is ours, so a typo there is an error, as is an unknown key in the file.
//! Its only I/O is reading the file and the environment.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use super::spelling;

/// The env variable naming the log filter; a process setting, not part of the relay's config.
pub const ENV_LOG_FILTER: &str = "QX_RELAY__LOG";

/// Keys Qx's own settings share with us: the ones we read from `QX_NATS__*`, `QX_DB__*` and `QX_CACHE__*`.
const SHARED_ENV_KEYS: &[&str] = &[
    "nats__servers",
    "nats__max_reconnect_attempts",
    "nats__reconnect_time_wait_seconds",
    "nats__connect_timeout_seconds",
    "nats__name",
    "nats__creds_file",
    "nats__user",
    "nats__password",
    "nats__token",
    "nats__tls_required",
    "nats__tls_ca_file",
    "nats__tls_cert_file",
    "nats__tls_key_file",
    "db__url",
    "cache__url",
    "cache__tls_ca_file",
    "cache__tls_cert_file",
    "cache__tls_key_file",
];

/// Qx's own settings under those prefixes that the relay does not read (qx-db 1.1.0 `DatabaseSettings`, qx-cache
/// 1.1.0 `CacheSettings`; qx-events' `NatsSettings` has none beyond ours). A sidecar sees them in its service's
/// environment: they are no typo.
const QX_ONLY_ENV_KEYS: &[&str] = &[
    "db__pool_size",
    "db__max_overflow",
    "db__pool_timeout_seconds",
    "db__pool_recycle_seconds",
    "db__pool_pre_ping",
    "db__pool_kind",
    "db__echo",
    "db__statement_timeout_ms",
    "cache__max_connections",
    "cache__decode_responses",
    "cache__socket_timeout_seconds",
    "cache__socket_connect_timeout_seconds",
    "cache__health_check_interval_seconds",
];

/// A setting that cannot be used: which key, and why. Displayed as one line.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// Dotted key, e.g. `relay.batch_size`, with the env variable or file it came from when known.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn invalid(key: &str, reason: impl fmt::Display) -> Self {
        Self { key: key.to_owned(), reason: reason.to_string() }
    }
}

/// Everything the relay reads from its settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The NATS connection.
    pub nats: NatsConfig,
    /// The Postgres database holding the outbox table.
    pub db: DbConfig,
    /// Redis, used for the leader lock.
    pub cache: CacheConfig,
    /// What the relay does.
    pub relay: RelayConfig,
}

/// `[nats]`, as Qx names it, plus the credentials and TLS a real cluster needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs; in env a JSON list (as Qx writes it) or a comma-separated list.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub servers: Vec<String>,
    /// Reconnect attempts before the client gives up; 0 or less retries forever.
    pub max_reconnect_attempts: i64,
    /// Pause between reconnect attempts.
    pub reconnect_time_wait_seconds: f64,
    /// Timeout of each connection attempt.
    pub connect_timeout_seconds: f64,
    /// Connection name shown by the server.
    pub name: Option<String>,
    /// NATS credentials file (JWT + NKey).
    pub creds_file: Option<String>,
    /// User for user/password auth.
    pub user: Option<String>,
    /// Password for user/password auth.
    pub password: Option<String>,
    /// Token auth.
    pub token: Option<String>,
    /// Require TLS even without certificates configured.
    pub tls_required: bool,
    /// CA certificate (PEM) to verify the server.
    pub tls_ca_file: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert_file: Option<String>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key_file: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://localhost:4222".into()],
            max_reconnect_attempts: 60,
            reconnect_time_wait_seconds: 2.0,
            connect_timeout_seconds: 5.0,
            name: None,
            creds_file: None,
            user: None,
            password: None,
            token: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `[db]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// `postgres://`, `postgresql://` or SQLAlchemy's `postgresql+asyncpg://`; TLS via `sslmode`.
    pub url: String,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self { url: "postgresql+asyncpg://postgres:postgres@localhost:5432/qx".into() }
    }
}

impl DbConfig {
    /// The URL as sqlx takes it: SQLAlchemy's `+driver` dropped, asyncpg's `ssl=` written as the `sslmode=` it
    /// means, and `sslmode=require` with a root certificate raised to `verify-ca`, as libpq does. Call it on a
    /// validated config.
    pub fn sqlx_url(&self) -> String {
        self.to_sqlx().expect("validate() checks db.url")
    }

    fn to_sqlx(&self) -> Result<String, ConfigError> {
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let base = scheme.split_once('+').map_or(scheme, |(base, _driver)| base);
                format!("{base}://{rest}")
            }
            None => self.url.clone(),
        };
        let (base, query) = url.split_once('?').unwrap_or((&url, ""));
        // Raw `key=value` text as written; keys and values are compared decoded, as sqlx reads them.
        let mut pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key.to_owned(), value.to_owned())
            })
            .collect();
        let is = |names: &[&str], key: &str| names.contains(&percent_decode(key).as_str());
        if pairs.iter().any(|(key, _)| is(&["sslpassword"], key)) {
            // sqlx cannot read an encrypted key, and would log the unknown parameter with its value.
            return Err(ConfigError::invalid(
                "db.url",
                "sslpassword is not supported: give an unencrypted key in sslkey",
            ));
        }
        let asyncpg = pairs.iter().any(|(key, _)| is(&[ASYNCPG_SSL], key));
        if asyncpg && pairs.iter().any(|(key, _)| is(SSLMODE_KEYS, key)) {
            return Err(ConfigError::invalid("db.url", "has both ssl (asyncpg's) and sslmode: keep one"));
        }
        for (key, value) in &mut pairs {
            if is(&[ASYNCPG_SSL], key) {
                let mode = asyncpg_sslmode(&percent_decode(value))
                    .ok_or_else(|| ConfigError::invalid("db.url", ASYNCPG_SSL_VALUES))?;
                (*key, *value) = (SSLMODE_KEYS[0].to_owned(), mode.to_owned());
            }
        }
        // sqlx reads PGSSLMODE and PGSSLROOTCERT under the URL's parameters, as libpq does.
        let last = |names: &[&str]| {
            pairs.iter().rev().find(|(key, _)| is(names, key)).map(|(_, v)| percent_decode(v))
        };
        let mode = last(SSLMODE_KEYS).or_else(|| std::env::var("PGSSLMODE").ok());
        let root_cert = last(SSLROOTCERT_KEYS).or_else(|| std::env::var("PGSSLROOTCERT").ok());
        if mode.is_some_and(|mode| mode.eq_ignore_ascii_case("require"))
            && root_cert.is_some_and(|c| !c.is_empty())
        {
            // libpq verifies the chain under `require` when given a root certificate; sqlx would not.
            pairs.retain(|(key, _)| !is(SSLMODE_KEYS, key));
            pairs.push((SSLMODE_KEYS[0].to_owned(), "verify-ca".to_owned()));
        }
        if pairs.is_empty() {
            return Ok(base.to_owned());
        }
        let query: Vec<String> = pairs.iter().map(|(key, value)| format!("{key}={value}")).collect();
        Ok(format!("{base}?{}", query.join("&")))
    }
}

impl DbConfig {
    /// Where the relay connects, fit to log: `host:port/database` (or the socket directory), no credentials.
    /// Call it on a validated config.
    pub fn server(&self) -> String {
        let options =
            sqlx::postgres::PgConnectOptions::from_str(&self.sqlx_url()).expect("validate() checks db.url");
        // Without a database in the URL, Postgres takes the user's name.
        let database = options.get_database().unwrap_or_else(|| options.get_username());
        format!("{}/{database}", super::refusal::postgres_address(&options))
    }
}

/// asyncpg's TLS parameter in a SQLAlchemy URL (`postgresql+asyncpg://…?ssl=require`).
const ASYNCPG_SSL: &str = "ssl";
const ASYNCPG_SSL_VALUES: &str =
    "ssl must be disable, allow, prefer, require, verify-ca, verify-full, true or false (asyncpg's values)";
/// The names sqlx reads the TLS mode and the root certificate under; the first is libpq's.
const SSLMODE_KEYS: &[&str] = &["sslmode", "ssl-mode"];
const SSLROOTCERT_KEYS: &[&str] = &["sslrootcert", "ssl-root-cert", "ssl-ca"];

/// The `sslmode` an asyncpg `ssl=` value means. asyncpg takes `verify_full` for `verify-full`; `true` is its
/// `ssl=True`, a default TLS context that checks the chain and the host name.
fn asyncpg_sslmode(value: &str) -> Option<&'static str> {
    Some(match value.to_ascii_lowercase().replace('_', "-").as_str() {
        "disable" | "false" => "disable",
        "allow" => "allow",
        "prefer" => "prefer",
        "require" => "require",
        "verify-ca" => "verify-ca",
        "verify-full" | "true" => "verify-full",
        _ => return None,
    })
}

/// `[cache]`: Redis, as Qx's `QX_CACHE__URL`, plus the certificates a `rediss://` server may need.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// CA certificate (PEM) to verify a `rediss://` server; the public web roots when unset.
    pub tls_ca_file: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert_file: Option<String>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key_file: Option<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            url: "redis://localhost:6379/0".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl CacheConfig {
    /// `url` fit to print: its password replaced.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url, LoneUserinfo::User)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.url.as_str())
            .map_err(|err| ConfigError::invalid("cache.url", format!("not a Redis URL: {err}")))?;
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::invalid(
                "cache.tls_key_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        for (key, path) in [
            ("cache.tls_ca_file", &self.tls_ca_file),
            ("cache.tls_cert_file", &self.tls_cert_file),
            ("cache.tls_key_file", &self.tls_key_file),
        ] {
            let Some(path) = path else { continue };
            if !self.url.starts_with("rediss://") {
                return Err(ConfigError::invalid(key, "needs a rediss:// cache.url"));
            }
            if !Path::new(path).is_file() {
                return Err(ConfigError::invalid(key, format!("no such file: {path}")));
            }
        }
        Ok(())
    }
}

/// How a relay makes sure it is the only one publishing its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LeaderMode {
    /// No lock: relays on one shard split rows by `SKIP LOCKED` (no per-key order across them).
    #[default]
    None,
    /// A Redis lease, compatible with Qx's `DistributedLock`.
    Redis,
    /// A Postgres session advisory lock; dies with the session, so no Redis is needed.
    Postgres,
}

impl LeaderMode {
    /// As the setting is written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }
}

/// What happens to a row once JetStream acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPublish {
    /// Set `published_at`, as the Python relay does.
    #[default]
    Mark,
    /// Delete the row in the statement that would have marked it.
    Delete,
}

impl OnPublish {
    /// As the setting is written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mark => "mark",
            Self::Delete => "delete",
        }
    }
}

/// The value rows are sharded and ordered by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ShardKey {
    /// The row id: the Python relay's split; every row is its own key.
    #[default]
    Id,
    /// The `tenant_id` column.
    TenantId,
    /// The `correlation_id` column.
    CorrelationId,
    /// The `event_name` column.
    EventName,
    /// A path into the envelope, e.g. `payload.order_id`.
    Envelope(Vec<String>),
}

impl FromStr for ShardKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "id" => Self::Id,
            "tenant_id" => Self::TenantId,
            "correlation_id" => Self::CorrelationId,
            "event_name" => Self::EventName,
            path => {
                let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
                let word =
                    |p: &String| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !parts.iter().all(word) {
                    return Err(format!(
                        "{path:?} is not id, tenant_id, correlation_id, event_name or a dotted path of \
                         [A-Za-z0-9_] names into the envelope"
                    ));
                }
                Self::Envelope(parts)
            }
        })
    }
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id => f.write_str("id"),
            Self::TenantId => f.write_str("tenant_id"),
            Self::CorrelationId => f.write_str("correlation_id"),
            Self::EventName => f.write_str("event_name"),
            Self::Envelope(path) => f.write_str(&path.join(".")),
        }
    }
}

impl Serialize for ShardKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShardKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Which shard a relay publishes: a fixed one, or `auto`: replicas share the shards by lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardId {
    /// This one, `0..shard_count`, the Python relay's split.
    Fixed(u32),
    /// Elastic: every replica runs alike and owns a fair share of the shards (needs `leader = "redis"`).
    Auto,
}

impl Default for ShardId {
    fn default() -> Self {
        Self::Fixed(0)
    }
}

impl FromStr for ShardId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            number => {
                number.parse().map(Self::Fixed).map_err(|_| format!("{text:?} is not a shard number or auto"))
            }
        }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(id) => write!(f, "{id}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for ShardId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fixed(id) => serializer.serialize_u32(*id),
            Self::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ShardId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NumberOrText {
            Number(u32),
            Text(String),
        }
        match NumberOrText::deserialize(deserializer)? {
            NumberOrText::Number(id) => Ok(Self::Fixed(id)),
            NumberOrText::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[relay]`: the relay's own knobs (`QX_RELAY__*`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Subjects are `<subject_prefix>.<event_name>`; required, typically the service name.
    pub subject_prefix: Option<String>,
    /// The outbox table, optionally schema-qualified.
    pub table: String,
    /// Rows claimed per batch.
    pub batch_size: u32,
    /// Bytes of row bodies a batch may hold past its first row (a row up to NATS' `max_payload` always fits);
    /// also the bytes awaiting PubAcks at once. Bounds the relay's memory whatever the rows weigh.
    pub max_batch_bytes: u64,
    /// Publishes awaiting their PubAck at once.
    pub max_in_flight: u32,
    /// Wait after a short batch before claiming again.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wait after an empty claim.
    #[serde(with = "humantime_serde")]
    pub idle_poll_interval: Duration,
    /// On SIGTERM, time to finish the in-flight batch.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long publishing may go without a PubAck; then the batch's unconfirmed rows wait for NATS.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Longest wait for Postgres in one step (a connection, a statement, a commit); past it Postgres counts as
    /// unavailable for that step, as when it refuses connections. Unset: see [`RelayConfig::statement_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub statement_timeout: Option<Duration>,
    /// Failed publishes before a row is parked.
    pub max_attempts: i32,
    /// First retry delay of a failing row; doubles per attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest retry delay of a failing row.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// This relay's shard, `0..shard_count`, or `auto` to share the shards with the other replicas.
    pub shard_id: ShardId,
    /// Number of shards the table is split into; 1 = no sharding.
    pub shard_count: u32,
    /// What rows are sharded and ordered by.
    pub shard_key: ShardKey,
    /// Exit 69 when Postgres, NATS or Redis stays unreachable this long. Also the longest a claimed batch may
    /// sit idle in its transaction before Postgres ends it, releasing the rows of a relay that stopped answering.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Postgres channel to LISTEN on for immediate wake-up; polling alone when unset.
    pub notify_channel: Option<String>,
    /// Leader election.
    pub leader: LeaderMode,
    /// Redis key of the leader lock (suffixed with `:<shard_id>` when sharded); with `shard_id = "auto"`,
    /// `<leader_key>:members` is the membership record.
    pub leader_key: String,
    /// Lease of the Redis leader lock; renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub leader_ttl: Duration,
    /// What to do with a published row.
    pub on_publish: OnPublish,
    /// Delete published rows older than this; keep them forever when unset.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    /// Create a stream capturing `<subject_prefix>.>` when none does (for development).
    pub ensure_stream: bool,
    /// Serve `/metrics`, `/livez` and `/readyz` on this address (`:9464` for every interface); off when unset.
    #[serde(deserialize_with = "optional_listen_addr")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            subject_prefix: None,
            table: "qx_outbox_events".into(),
            batch_size: 1000,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_in_flight: 1024,
            poll_interval: Duration::from_millis(250),
            idle_poll_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(5),
            statement_timeout: None,
            max_attempts: 10,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            shard_id: ShardId::Fixed(0),
            shard_count: 1,
            shard_key: ShardKey::Id,
            give_up_after: Duration::from_secs(60),
            notify_channel: None,
            leader: LeaderMode::None,
            leader_key: "leader:outbox-relay".into(),
            leader_ttl: Duration::from_secs(10),
            on_publish: OnPublish::Mark,
            retention: None,
            ensure_stream: false,
            metrics_addr: None,
        }
    }
}

impl RelayConfig {
    /// The validated subject prefix.
    pub fn subject_prefix(&self) -> &str {
        self.subject_prefix.as_deref().expect("validate() requires relay.subject_prefix")
    }

    /// The longest wait for Postgres in one step: as set, else 5s, or half of `give_up_after` when that is
    /// shorter, so an outage is always tried again before the relay gives up.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout.unwrap_or_else(|| DEFAULT_STATEMENT_TIMEOUT.min(self.give_up_after / 2))
    }

    /// Whether the table is split across relays.
    pub fn is_sharded(&self) -> bool {
        self.shard_count > 1
    }
}

/// Settings given as flags; they win over the file and the environment. The CLI flattens these flags, and
/// they are merged as the `[relay]` layer on top.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct Overrides {
    /// This relay's shard, or auto to share them with the other replicas (`relay.shard_id`).
    #[arg(long, global = true, value_name = "N|auto")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_id: Option<ShardId>,
    /// Number of shards (`relay.shard_count`).
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<u32>,
    /// Leader election (`relay.leader`).
    #[arg(long, global = true, value_name = "MODE", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderMode>,
    /// Serve /metrics, /livez and /readyz here; :PORT for every interface (`relay.metrics_addr`).
    #[arg(long, global = true, value_name = "ADDR", value_parser = parse_listen_addr)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Config {
    /// Loads defaults < `file` < environment < `overrides`, then validates.
    ///
    /// # Errors
    /// A missing or unparsable file, an unknown key, a bad value or a broken cross-field rule, naming the key.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::invalid("--config", format!("no such file: {}", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(qx_env())
            .merge(Serialized::default("relay", overrides))
            .extract()
            .map_err(|err| from_figment(&err))?;
        config.validate()?;
        Ok(config)
    }

    /// Ranges and cross-field rules.
    ///
    /// # Errors
    /// The first key that breaks a rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let relay = &self.relay;
        match relay.subject_prefix.as_deref() {
            None | Some("") => {
                return Err(ConfigError::invalid(
                    "relay.subject_prefix",
                    "required (set it in [relay] or QX_RELAY__SUBJECT_PREFIX)",
                ))
            }
            Some(prefix) => crate::wire::validate_event_name(prefix)
                .map_err(|_| ConfigError::invalid("relay.subject_prefix", "not a valid literal subject"))?,
        }
        if !is_sql_name(&relay.table, true) {
            return Err(ConfigError::invalid("relay.table", "must be a table name, optionally schema.table"));
        }
        if let Some(channel) = &relay.notify_channel {
            if !is_sql_name(channel, false) {
                return Err(ConfigError::invalid("relay.notify_channel", "must be a plain identifier"));
            }
        }
        positive("relay.batch_size", relay.batch_size.into())?;
        if relay.batch_size > BATCH_SIZE_LIMIT {
            return Err(ConfigError::invalid(
                "relay.batch_size",
                format!("must be at most {BATCH_SIZE_LIMIT}, got {}", relay.batch_size),
            ));
        }
        positive("relay.max_in_flight", relay.max_in_flight.into())?;
        if relay.max_in_flight > MAX_IN_FLIGHT_LIMIT {
            return Err(ConfigError::invalid(
                "relay.max_in_flight",
                format!("must be at most {MAX_IN_FLIGHT_LIMIT}, got {}", relay.max_in_flight),
            ));
        }
        positive("relay.max_attempts", relay.max_attempts.into())?;
        positive("relay.shard_count", relay.shard_count.into())?;
        match (relay.shard_id, relay.leader) {
            (ShardId::Fixed(id), _) if id >= relay.shard_count => {
                return Err(ConfigError::invalid(
                    "relay.shard_id",
                    format!("must be below shard_count ({}), got {id}", relay.shard_count),
                ))
            }
            (ShardId::Auto, LeaderMode::None) => {
                return Err(ConfigError::invalid(
                    "relay.shard_id",
                    "auto needs relay.leader = \"redis\" or \"postgres\": shards are shared by lease",
                ))
            }
            _ => {}
        }
        let retention = relay.retention.map(|retention| ("relay.retention", retention, RETENTION_LIMIT));
        let statement_timeout =
            relay.statement_timeout.map(|timeout| ("relay.statement_timeout", timeout, DURATION_LIMIT));
        for (key, value, limit) in [
            ("relay.poll_interval", relay.poll_interval, DURATION_LIMIT),
            ("relay.idle_poll_interval", relay.idle_poll_interval, DURATION_LIMIT),
            ("relay.drain_timeout", relay.drain_timeout, DURATION_LIMIT),
            ("relay.ack_timeout", relay.ack_timeout, DURATION_LIMIT),
            ("relay.retry_backoff", relay.retry_backoff, DURATION_LIMIT),
            ("relay.retry_backoff_max", relay.retry_backoff_max, DURATION_LIMIT),
            ("relay.leader_ttl", relay.leader_ttl, DURATION_LIMIT),
            ("relay.give_up_after", relay.give_up_after, GIVE_UP_AFTER_LIMIT),
        ]
        .into_iter()
        .chain(retention)
        .chain(statement_timeout)
        {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be longer than 0s"));
            }
            if value > limit {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be at most {}, got {}", human(limit), human(value)),
                ));
            }
        }
        if relay.max_batch_bytes < MIN_BATCH_BYTES {
            return Err(ConfigError::invalid(
                "relay.max_batch_bytes",
                format!("must be at least {MIN_BATCH_BYTES}, got {}", relay.max_batch_bytes),
            ));
        }
        if relay.retry_backoff_max < relay.retry_backoff {
            return Err(ConfigError::invalid("relay.retry_backoff_max", "must not be below retry_backoff"));
        }
        if relay.leader_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid("relay.leader_ttl", "must be at least 1s"));
        }
        // Postgres ends a claim left idle for give_up_after, and a claimed batch sits idle while the batch
        // before it and then itself wait for their PubAcks: any shorter, and batches go out but their marks
        // fail, over and over.
        let shortest_give_up = (relay.ack_timeout * 2).max(Duration::from_secs(1));
        if relay.give_up_after < shortest_give_up {
            return Err(ConfigError::invalid(
                "relay.give_up_after",
                format!(
                    "must be at least 1s and at least twice relay.ack_timeout ({}), got {}",
                    human(relay.ack_timeout),
                    human(relay.give_up_after)
                ),
            ));
        }
        if relay.statement_timeout.is_some_and(|timeout| timeout >= relay.give_up_after) {
            return Err(ConfigError::invalid(
                "relay.statement_timeout",
                "must be shorter than give_up_after, so an outage is retried before the relay gives up",
            ));
        }
        if relay.leader_key.is_empty() {
            return Err(ConfigError::invalid("relay.leader_key", "must not be empty"));
        }
        let db_url = self.db.to_sqlx()?;
        if !(db_url.starts_with("postgres://") || db_url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "db.url",
                "must start with postgres://, postgresql:// or postgresql+<driver>://",
            ));
        }
        sqlx::postgres::PgConnectOptions::from_str(&db_url)
            .map_err(|err| ConfigError::invalid("db.url", format!("not a Postgres URL: {err}")))?;
        if relay.leader == LeaderMode::Redis {
            self.cache.validate()?;
        }
        self.nats.validate()
    }

    /// A copy fit to print: passwords and tokens replaced.
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.db.url = redact_url(&copy.db.url, LoneUserinfo::User);
        copy.cache.url = copy.cache.redacted_url();
        copy.nats.servers = copy.nats.servers.iter().map(|s| redact_url(s, LoneUserinfo::Token)).collect();
        for secret in [&mut copy.nats.password, &mut copy.nats.token] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        copy
    }
}

impl NatsConfig {
    /// The server URLs without the credentials written in them, which is what the client gets (it logs server
    /// addresses at debug), and those credentials.
    ///
    /// # Errors
    /// When servers carry different credentials: the client sends one set to every server.
    pub fn servers_and_url_auth(&self) -> Result<(Vec<String>, Option<UrlAuth>), ConfigError> {
        let mut auth: Option<UrlAuth> = None;
        let mut servers = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            let parts = UrlParts::of(server);
            servers.push(format!("{}{}", parts.head, parts.rest));
            let Some(found) = parts.userinfo.filter(|userinfo| !userinfo.is_empty()).map(UrlAuth::parse)
            else {
                continue;
            };
            match &auth {
                Some(seen) if *seen != found => {
                    return Err(ConfigError::invalid(
                        "nats.servers",
                        "servers carry different credentials; the client sends one set to every server",
                    ))
                }
                _ => auth = Some(found),
            }
        }
        Ok((servers, auth))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::invalid("nats.servers", "must list at least one server"));
        }
        let (servers, _) = self.servers_and_url_auth()?;
        for (server, written) in servers.iter().zip(&self.servers) {
            async_nats::ServerAddr::from_str(server).map_err(|err| {
                let server = redact_url(written, LoneUserinfo::Token);
                ConfigError::invalid("nats.servers", format!("{server:?}: {err}"))
            })?;
        }
        let most = DURATION_LIMIT.as_secs_f64();
        for (key, value) in [
            ("nats.reconnect_time_wait_seconds", self.reconnect_time_wait_seconds),
            ("nats.connect_timeout_seconds", self.connect_timeout_seconds),
        ] {
            // NaN fails both comparisons.
            if !(value > 0.0 && value <= most) {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be a number of seconds above 0 and at most {most}, got {value}"),
                ));
            }
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConfigError::invalid("nats.password", "user and password go together"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::invalid(
                "nats.tls_key_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        for (key, path) in [
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = path {
                if !Path::new(path).is_file() {
                    return Err(ConfigError::invalid(key, format!("no such file: {path}")));
                }
            }
        }
        Ok(())
    }
}

/// Credentials written in a NATS server URL, read as nats-py reads them: `user:password@` is user and password,
/// a lone `token@` a token, each taken as written (not percent-decoded).
#[derive(Clone, PartialEq, Eq)]
pub enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// `nats://token@host`.
    Token(String),
}

impl UrlAuth {
    fn parse(userinfo: &str) -> Self {
        match userinfo.split_once(':') {
            Some((user, password)) => {
                Self::UserPassword { user: user.to_owned(), password: password.to_owned() }
            }
            None => Self::Token(userinfo.to_owned()),
        }
    }
}

impl fmt::Debug for UrlAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}:{REDACTED})"),
            Self::Token(_) => write!(f, "Token({REDACTED})"),
        }
    }
}

const REDACTED: &str = "***";

/// What a lone userinfo (`scheme://name@host`) is: a user name to Postgres and Redis, a token to NATS.
#[derive(Debug, Clone, Copy)]
enum LoneUserinfo {
    User,
    Token,
}

/// A URL cut around its userinfo: `head` (`scheme://`, or nothing), `userinfo`, and `rest` from the host on.
struct UrlParts<'a> {
    head: &'a str,
    userinfo: Option<&'a str>,
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> Self {
        let head_len = url.find("://").map_or(0, |at| at + 3);
        let (head, after) = url.split_at(head_len);
        let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
        // The last `@` ends the userinfo, as URL parsers and Python's urlparse read it.
        match after[..authority_len].rfind('@') {
            Some(at) => Self { head, userinfo: Some(&after[..at]), rest: &after[at + 1..] },
            None => Self { head, userinfo: None, rest: after },
        }
    }
}

/// `url` with every secret in it replaced: the userinfo's password (or, where it is one, a lone token), and the
/// values of query parameters that hold a password or token (`password=`, `sslpassword=`, `token=`, …).
/// Everything else is printed as written.
fn redact_url(url: &str, lone: LoneUserinfo) -> String {
    let parts = UrlParts::of(url);
    let mut out = parts.head.to_owned();
    match (parts.userinfo, lone) {
        (Some(userinfo), _) if userinfo.contains(':') => {
            let (user, _password) = userinfo.split_once(':').expect("contains ':'");
            out.push_str(&format!("{user}:{REDACTED}@"));
        }
        (Some(token), LoneUserinfo::Token) if !token.is_empty() => out.push_str(&format!("{REDACTED}@")),
        (Some(user), _) => out.push_str(&format!("{user}@")),
        (None, _) => {}
    }
    let (before_fragment, fragment) =
        parts.rest.split_once('#').map_or((parts.rest, None), |(b, f)| (b, Some(f)));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _value)) if is_secret_param(&percent_decode(key)) => {
                        format!("{key}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&format!("{path}?{}", query.join("&")));
        }
        None => out.push_str(before_fragment),
    }
    if let Some(fragment) = fragment {
        out.push_str(&format!("#{fragment}"));
    }
    out
}

/// Query parameters whose value is a secret: libpq's `password` and `sslpassword`, and tokens, secrets and
/// passwords under any other name. `sslkey`, `sslrootcert` and `passfile` are paths, not secrets.
fn is_secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    ["password", "passwd", "token", "secret"].iter().any(|suffix| key.ends_with(suffix))
        || key == "pass"
        || key == "pwd"
}

/// URL query text decoded as URL parsers (and so sqlx) decode it: `%XX` escapes and `+` for a space.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = || {
            std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (bytes[at], hex()) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `QX_*` variables that are ours; see the module docs.
fn qx_env() -> Env {
    Env::prefixed("QX_")
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            let ours = key.starts_with("relay__") && key != ENV_LOG_FILTER[3..].to_ascii_lowercase();
            ours || SHARED_ENV_KEYS.contains(&key.as_str())
        })
        .split("__")
}

/// Warnings about the variables among `names` under `QX_NATS__`, `QX_DB__` and `QX_CACHE__` that neither the
/// relay nor Qx reads: such a typo (`QX_NATS__SERVER`) would leave the default in place without a word. Only
/// warnings, as a service may keep settings of its own under these prefixes.
pub fn unknown_env_keys(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut warnings = Vec::new();
    for name in names {
        let lower = name.to_ascii_lowercase();
        let Some(key) = lower.strip_prefix("qx_") else { continue };
        let Some((section, field)) =
            key.split_once("__").filter(|(section, _)| ["nats", "db", "cache"].contains(section))
        else {
            continue;
        };
        if SHARED_ENV_KEYS.contains(&key) || QX_ONLY_ENV_KEYS.contains(&key) {
            continue;
        }
        let fields = SHARED_ENV_KEYS.iter().chain(QX_ONLY_ENV_KEYS).filter_map(|known| {
            known.split_once("__").filter(|(known_section, _)| *known_section == section).map(|(_, f)| f)
        });
        let mut warning = format!("{name} is not a setting of qx-relay or Qx: ignored");
        if let Some(field) = spelling::did_you_mean(field, fields) {
            let variable = format!("QX_{section}__{field}").to_ascii_uppercase();
            warning.push_str(&format!("; did you mean {variable}?"));
        }
        warnings.push(warning);
    }
    warnings.sort();
    warnings
}

/// The most rows `relay.batch_size` may claim at once: a batch is one transaction whose rows stay locked, and
/// in the relay's memory, until their marks commit.
pub const BATCH_SIZE_LIMIT: u32 = 100_000;

/// `relay.statement_timeout` by default, unless `give_up_after` asks for less.
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `relay.max_batch_bytes` by default: a batch of ~1 KB rows is never cut, and the claimed, in-flight and
/// prefetched batches together stay far below the manifests' 128 MiB memory limit.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 8 << 20;

/// The least `relay.max_batch_bytes` accepted: a smaller budget only makes every batch one row.
const MIN_BATCH_BYTES: u64 = 64 << 10;

/// The most PubAcks `relay.max_in_flight` may keep pending: the NATS client buffers this many messages for the
/// relay's ack subscription and drops the rest.
pub const MAX_IN_FLIGHT_LIMIT: u32 = 65_536;

/// The longest any of the relay's waits and timeouts may be (the NATS ones included), except `give_up_after`
/// and `retention`: none needs more, and the relay adds them up (the republish horizon, the `/livez` stall
/// limit), which must not overflow.
pub const DURATION_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The longest `relay.give_up_after`: a week outlasts any outage worth waiting out in place.
pub const GIVE_UP_AFTER_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest `relay.retention` (humantime's 100 years); to keep published rows for good, leave it unset.
pub const RETENTION_LIMIT: Duration = Duration::from_secs(100 * 31_557_600);

fn human(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

fn positive(key: &str, value: i64) -> Result<(), ConfigError> {
    if value < 1 {
        return Err(ConfigError::invalid(key, format!("must be at least 1, got {value}")));
    }
    Ok(())
}

/// `name` or `schema.name`, each an unquoted SQL identifier; we interpolate it into SQL.
fn is_sql_name(name: &str, qualified: bool) -> bool {
    let ident = |part: &str| {
        part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    let mut parts = name.split('.');
    let count = name.split('.').count();
    (count == 1 || (qualified && count == 2)) && parts.all(ident)
}

/// One line naming the key once, where it came from (the env variable as written, or the file), and why it is
/// wrong, with the key it probably meant.
fn from_figment(err: &figment::Error) -> ConfigError {
    let mut path = err.path.clone();
    let reason = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            // figment's path may already end with the unknown key.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            match spelling::did_you_mean(field, expected.iter().copied()) {
                Some(known) => format!("unknown key; did you mean {known}?"),
                None => "unknown key".to_owned(),
            }
        }
        figment::error::Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing".to_owned()
        }
        kind => one_line(&kind.to_string()),
    };
    let mut key = if path.is_empty() { "config".to_owned() } else { path.join(".") };
    if let Some(metadata) = &err.metadata {
        let source = match &metadata.source {
            Some(source) => source.to_string(),
            // Name the variable as the user wrote it, not figment's dotted path.
            None if metadata.name.contains("environment") => env_variable(&path),
            None => metadata.name.to_string(),
        };
        key = format!("{key} (from {source})");
    }
    ConfigError { key, reason }
}

/// The variable a setting at `path` came from, as written: `QX_RELAY__BATCH_SIZE` for `relay.batch_size`, or
/// one that nests below it (`QX_RELAY__BATCHSIZE__X` makes `relay.batchsize` a table).
fn env_variable(path: &[String]) -> String {
    let key = format!("qx_{}", path.join("__")).to_ascii_lowercase();
    let nested = format!("{key}__");
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            let name = name.to_ascii_lowercase();
            name == key || name.starts_with(&nested)
        })
        .min_by_key(String::len)
        .unwrap_or_else(|| key.to_ascii_uppercase())
}

/// A parser's message on one line: a TOML syntax error comes with the offending line and a caret under it,
/// which a log line does without (the message names the line and column).
fn one_line(message: &str) -> String {
    let excerpt = |line: &str| {
        line.starts_with('|') || line.split_once(" |").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    };
    let lines: Vec<&str> =
        message.lines().map(str::trim).filter(|line| !line.is_empty() && !excerpt(line)).collect();
    lines.join(": ")
}

/// A listening address: `host:port`, or `:port` for every interface (IPv4), as Prometheus exporters write it.
///
/// # Errors
/// Anything else, with what was expected.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    full.parse()
        .map_err(|_| format!("{text:?} is not host:port (e.g. 127.0.0.1:9464) or :port (every interface)"))
}

fn optional_listen_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| parse_listen_addr(&text).map_err(serde::de::Error::custom))
        .transpose()
}

/// A list, or one string of comma-separated items (`QX_NATS__SERVERS=a:4222,b:4222`).
fn list_or_comma_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrString::deserialize(deserializer)? {
        ListOrString::List(list) => list,
        ListOrString::Text(text) => {
            let text = text.trim();
            // A JSON list that figment left as text, e.g. with single quotes stripped by a shell.
            if text.starts_with('[') {
                serde_json::from_str(text).map_err(serde::de::Error::custom)?
            } else {
                text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
            }
        }
    })
}

#[cfg(test)]
// figment's Jail closures return figment::Error, whose size we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("relay.toml", toml).unwrap();
        Config::load(Some(Path::new("relay.toml")), &Overrides::default())
    }

    #[test]
    fn defaults_with_prefix_are_valid() {
        Jail::expect_with(|jail| {
            let config = load(jail, "[relay]\nsubject_prefix = \"orders\"\n").unwrap();
            assert_eq!(config.relay.table, "qx_outbox_events");
            assert_eq!(config.relay.max_attempts, 10);
            assert_eq!(config.nats.servers, ["nats://localhost:4222"]);
            Ok(())
        });
    }

    #[test]
    fn qx_env_names_are_read_and_foreign_ones_ignored() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_NATS__SERVERS", r#"["nats://a:4222","nats://b:4222"]"#);
            jail.set_env("QX_DB__URL", "postgresql+asyncpg://u:secret@db:5432/app");
            jail.set_env("QX_DB__POOL_SIZE", "20");
            jail.set_env("QX_APP__NAME", "orders");
            jail.set_env("QX_ENV", "prod");
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__POLL_INTERVAL", "50ms");
            jail.set_env("QX_RELAY__LOG", "debug");
            let config = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(config.nats.servers, ["nats://a:4222", "nats://b:4222"]);
            assert_eq!(config.db.sqlx_url(), "postgresql://u:secret@db:5432/app");
            assert_eq!(config.relay.poll_interval, Duration::from_millis(50));
            assert!(!config.redacted().db.url.contains("secret"));
            Ok(())
        });
    }

    #[test]
    fn comma_separated_servers() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_NATS__SERVERS", "nats://a:4222, nats://b:4222");
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            let config = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(config.nats.servers, ["nats://a:4222", "nats://b:4222"]);
            Ok(())
        });
    }

    #[test]
    fn flags_win_over_env() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__SHARD_COUNT", "2");
            let overrides =
                Overrides { shard_id: Some(ShardId::Fixed(2)), shard_count: Some(3), ..Overrides::default() };
            let config = Config::load(None, &overrides).unwrap();
            assert_eq!((config.relay.shard_id, config.relay.shard_count), (ShardId::Fixed(2), 3));
            Ok(())
        });
    }

    #[test]
    fn shard_id_auto_from_env_file_and_flag() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__LEADER", "redis");
            jail.create_file("relay.toml", "[relay]\nshard_id = \"auto\"\n")?;
            let config = Config::load(Some(Path::new("relay.toml")), &Overrides::default()).unwrap();
            assert_eq!(config.relay.shard_id, ShardId::Auto);
            jail.set_env("QX_RELAY__SHARD_ID", "auto");
            let config = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(config.relay.shard_id, ShardId::Auto);
            jail.set_env("QX_RELAY__SHARD_ID", "1");
            jail.set_env("QX_RELAY__SHARD_COUNT", "3");
            let config = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(config.relay.shard_id, ShardId::Fixed(1));
            let overrides = Overrides { shard_id: Some("auto".parse().unwrap()), ..Overrides::default() };
            assert_eq!(Config::load(None, &overrides).unwrap().relay.shard_id, ShardId::Auto);
            Ok(())
        });
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            ("[relay]\nsubject_prefix = \"o\"\nbatchsize = 5\n", "relay.batchsize"),
            ("[relay]\nsubject_prefix = \"o\"\npoll_interval = \"soon\"\n", "relay.poll_interval"),
            ("[relay]\nsubject_prefix = \"o\"\nbatch_size = -1\n", "relay.batch_size"),
            ("[relay]\nsubject_prefix = \"o\"\nbatch_size = 0\n", "relay.batch_size"),
            ("[relay]\nsubject_prefix = \"o\"\nbatch_size = 100001\n", "relay.batch_size"),
            ("[relay]\nsubject_prefix = \"o\"\nmax_in_flight = 100000\n", "relay.max_in_flight"),
            ("[relay]\nsubject_prefix = \"o\"\nshard_id = 3\nshard_count = 3\n", "relay.shard_id"),
            ("[relay]\nsubject_prefix = \"o\"\nshard_id = \"one\"\n", "relay.shard_id"),
            ("[relay]\nsubject_prefix = \"o\"\nshard_id = \"auto\"\n", "relay.shard_id"),
            ("[relay]\nsubject_prefix = \"o\"\ngive_up_after = \"1ms\"\n", "relay.give_up_after"),
            ("[relay]\nsubject_prefix = \"o\"\nack_timeout = \"40s\"\n", "relay.give_up_after"),
            ("[relay]\nsubject_prefix = \"o\"\ngive_up_after = \"500000000000y\"\n", "relay.give_up_after"),
            ("[relay]\nsubject_prefix = \"o\"\ndrain_timeout = \"500000000000y\"\n", "relay.drain_timeout"),
            ("[relay]\nsubject_prefix = \"o\"\nleader_ttl = \"2d\"\n", "relay.leader_ttl"),
            ("[relay]\nsubject_prefix = \"o\"\nretention = \"101y\"\n", "relay.retention"),
            (
                "[nats]\nconnect_timeout_seconds = 1e30\n[relay]\nsubject_prefix = \"o\"\n",
                "nats.connect_timeout_seconds",
            ),
            ("[relay]\ntable = \"t\"\n", "relay.subject_prefix"),
            ("[relay]\nsubject_prefix = \"o.*\"\n", "relay.subject_prefix"),
            ("[relay]\nsubject_prefix = \"o\"\ntable = \"x; drop\"\n", "relay.table"),
            ("[relay]\nsubject_prefix = \"o\"\nshard_key = \"payload.\"\n", "relay.shard_key"),
            ("[db]\nurl = \"mysql://x\"\n[relay]\nsubject_prefix = \"o\"\n", "db.url"),
            ("[nats]\nservers = [\"nats://a:99999\"]\n[relay]\nsubject_prefix = \"o\"\n", "nats.servers"),
            ("[unknown]\nx = 1\n", "unknown"),
        ];
        for (toml, key) in cases {
            Jail::expect_with(|jail| {
                let err = load(jail, toml).expect_err(toml);
                assert!(err.key.starts_with(key), "{toml:?}: got {err}");
                assert!(!err.to_string().contains('\n'), "one line: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn durations_at_their_limits_are_accepted() {
        Jail::expect_with(|jail| {
            let toml = "[nats]\nconnect_timeout_seconds = 86400.0\n[relay]\nsubject_prefix = \"o\"\n\
                        give_up_after = \"7d\"\nack_timeout = \"1day\"\nidle_poll_interval = \"24h\"\n\
                        retention = \"100y\"\n";
            let config = load(jail, toml).unwrap();
            assert_eq!(config.relay.give_up_after, GIVE_UP_AFTER_LIMIT);
            assert_eq!(config.relay.retention, Some(RETENTION_LIMIT));
            Ok(())
        });
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__MAX_IN_FLIGHT", "many");
            let err = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("QX_RELAY__MAX_IN_FLIGHT"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_relay_key_is_named_once_with_its_variable_and_a_suggestion() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__BATCHSIZE", "10");
            let err = Config::load(None, &Overrides::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                "relay.batchsize (from QX_RELAY__BATCHSIZE): unknown key; did you mean batch_size?"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__BATCHSIZE__BATCHSIZE", "10");
            let err = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(
                err.to_string().starts_with("relay.batchsize (from QX_RELAY__BATCHSIZE__BATCHSIZE): "),
                "{err}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            let err = load(jail, "[relay]\nsubject_prefix = \"o\"\npoll_intervall = \"1s\"\n").unwrap_err();
            assert_eq!(
                err.to_string(),
                "relay.poll_intervall (from relay.toml): unknown key; did you mean poll_interval?"
            );
            let err = load(jail, "[relay]\nsubject_prefix = \"o\"\nzzz = 1\n").unwrap_err();
            assert_eq!(err.to_string(), "relay.zzz (from relay.toml): unknown key");
            Ok(())
        });
    }

    #[test]
    fn a_toml_syntax_error_fits_on_one_line() {
        Jail::expect_with(|jail| {
            let err = load(jail, "[relay]\nsubject_prefix = \"o\"\nbatch_size = \n").unwrap_err();
            let text = err.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.contains("relay.toml") && text.contains("line 3"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn typos_under_qx_sections_are_warned_about_and_qx_settings_are_not() {
        let names = [
            "QX_NATS__SERVER",
            "QX_NATS__SERVERS",
            "QX_DB__URI",
            "QX_DB__POOL_SIZE",
            "QX_DB__POOL_SIZ",
            "QX_CACHE__MAX_CONNECTIONS",
            "QX_CACHE__TLS_CA",
            "QX_NATS__FROBNICATE",
            "QX_APP__NAME",
            "QX_RELAY__BATCHSIZE",
            "PATH",
        ];
        let warnings = unknown_env_keys(names.iter().map(|name| (*name).to_owned()));
        assert_eq!(
            warnings,
            [
                "QX_CACHE__TLS_CA is not a setting of qx-relay or Qx: ignored; did you mean QX_CACHE__TLS_CA_FILE?",
                "QX_DB__POOL_SIZ is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__POOL_SIZE?",
                "QX_DB__URI is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__URL?",
                "QX_NATS__FROBNICATE is not a setting of qx-relay or Qx: ignored",
                "QX_NATS__SERVER is not a setting of qx-relay or Qx: ignored; did you mean QX_NATS__SERVERS?",
            ]
        );
    }

    #[test]
    fn metrics_addr_takes_a_bare_port_for_every_interface() {
        assert_eq!(parse_listen_addr(":9464").unwrap(), "0.0.0.0:9464".parse().unwrap());
        assert_eq!(parse_listen_addr("127.0.0.1:9464").unwrap(), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:9464").unwrap(), "[::1]:9464".parse().unwrap());
        for bad in ["9464", ":", "localhost:9464", ":99999"] {
            assert!(parse_listen_addr(bad).is_err(), "{bad}");
        }
        Jail::expect_with(|jail| {
            jail.set_env("QX_RELAY__SUBJECT_PREFIX", "orders");
            jail.set_env("QX_RELAY__METRICS_ADDR", ":9464");
            let config = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(config.relay.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
            let overrides =
                Overrides { metrics_addr: Some("127.0.0.1:1".parse().unwrap()), ..Overrides::default() };
            let config = Config::load(None, &overrides).unwrap();
            assert_eq!(config.relay.metrics_addr, Some("127.0.0.1:1".parse().unwrap()), "the flag wins");
            Ok(())
        });
    }

    #[test]
    fn modes_are_spelled_as_in_the_config() {
        for mode in [LeaderMode::None, LeaderMode::Redis, LeaderMode::Postgres] {
            assert_eq!(toml::Value::try_from(mode).unwrap().as_str(), Some(mode.as_str()));
        }
        for mode in [OnPublish::Mark, OnPublish::Delete] {
            assert_eq!(toml::Value::try_from(mode).unwrap().as_str(), Some(mode.as_str()));
        }
    }

    #[test]
    fn the_database_is_named_without_credentials() {
        let db = |url: &str| DbConfig { url: url.into() }.server();
        assert_eq!(db("postgresql+asyncpg://u:secret@db.internal:5433/orders"), "db.internal:5433/orders");
        assert_eq!(db("postgres://relay@10.0.0.5/"), "10.0.0.5:5432/relay");
    }

    #[test]
    fn shard_keys_parse() {
        assert_eq!("id".parse::<ShardKey>().unwrap(), ShardKey::Id);
        assert_eq!(
            "payload.order_id".parse::<ShardKey>().unwrap(),
            ShardKey::Envelope(vec!["payload".into(), "order_id".into()])
        );
        assert!("payload.order-id".parse::<ShardKey>().is_err());
    }

    #[test]
    fn urls_are_redacted() {
        let user = |url| redact_url(url, LoneUserinfo::User);
        assert_eq!(user("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(user("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(user("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("nats://tok@h:4222", LoneUserinfo::Token), "nats://***@h:4222");
        assert_eq!(
            redact_url("u:pw@h:4222", LoneUserinfo::Token),
            "u:***@h:4222",
            "no scheme, as NATS allows"
        );
    }

    #[test]
    fn a_user_alone_is_no_secret_to_postgres_and_redis() {
        assert_eq!(
            redact_url("postgres://relay@db:5432/qx", LoneUserinfo::User),
            "postgres://relay@db:5432/qx"
        );
        assert_eq!(redact_url("redis://relay@h:6379/0", LoneUserinfo::User), "redis://relay@h:6379/0");
    }

    #[test]
    fn secret_query_parameters_are_redacted_and_only_those() {
        let user = |url| redact_url(url, LoneUserinfo::User);
        assert_eq!(
            user("postgres:///qx?host=/run/pg&password=pw&sslmode=verify-full"),
            "postgres:///qx?host=/run/pg&password=***&sslmode=verify-full"
        );
        assert_eq!(
            user("postgresql+asyncpg://u@h/qx?sslkey=/k.pem&sslpassword=kp&sslrootcert=/ca.pem"),
            "postgresql+asyncpg://u@h/qx?sslkey=/k.pem&sslpassword=***&sslrootcert=/ca.pem"
        );
        assert_eq!(
            user("redis://h/0?auth_token=t&Client-Secret=s&db=1"),
            "redis://h/0?auth_token=***&Client-Secret=***&db=1"
        );
        assert_eq!(
            user("postgres://h/qx?pass%77ord=pw"),
            "postgres://h/qx?pass%77ord=***",
            "decoded as sqlx reads it"
        );
        assert_eq!(user("postgres://u:pw@h/qx?password=pw2#x"), "postgres://u:***@h/qx?password=***#x");
        assert_eq!(user("postgres://h/qx?passfile=/p&user=u"), "postgres://h/qx?passfile=/p&user=u");
    }

    #[test]
    fn printed_config_hides_every_secret() {
        let mut config = Config::default();
        config.db.url = "postgres:///qx?host=127.0.0.1&user=relay&password=dbpw".into();
        config.cache.url = "redis://:cachepw@h:6379/0".into();
        config.nats.servers = vec!["nats://u:natspw@a:4222".into(), "nats://natstoken@b:4222".into()];
        config.nats.user = Some("u".into());
        config.nats.password = Some("optpw".into());
        config.nats.token = Some("opttoken".into());
        let text = toml::to_string(&config.redacted()).unwrap();
        for secret in ["dbpw", "cachepw", "natspw", "natstoken", "optpw", "opttoken"] {
            assert!(!text.contains(secret), "{secret} printed:\n{text}");
        }
        assert!(text.contains("user=relay"), "a user is no secret:\n{text}");
    }

    #[test]
    fn nats_url_credentials_are_taken_out_of_the_servers() {
        let nats = |servers: &[&str]| NatsConfig {
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            ..NatsConfig::default()
        };
        let (servers, auth) = nats(&["nats://u:p@ss@a:4222", "b:4222"]).servers_and_url_auth().unwrap();
        assert_eq!(servers, ["nats://a:4222", "b:4222"]);
        assert_eq!(auth, Some(UrlAuth::UserPassword { user: "u".into(), password: "p@ss".into() }));
        let (servers, auth) = nats(&["tls://t0k%40@a:4222/"]).servers_and_url_auth().unwrap();
        assert_eq!(servers, ["tls://a:4222/"]);
        assert_eq!(auth, Some(UrlAuth::Token("t0k%40".into())), "as written, as nats-py sends it");
        assert_eq!(nats(&["nats://a:4222"]).servers_and_url_auth().unwrap().1, None);
        assert!(nats(&["nats://x@a:4222", "nats://y@b:4222"]).servers_and_url_auth().is_err());
        assert!(!format!("{auth:?}").contains("t0k"), "Debug hides the token");
    }

    #[test]
    fn a_bad_nats_server_is_named_without_its_credentials() {
        Jail::expect_with(|jail| {
            let err =
                load(jail, "[nats]\nservers = [\"nats://u:pw@a:99999\"]\n[relay]\nsubject_prefix = \"o\"\n")
                    .unwrap_err();
            assert!(err.key.starts_with("nats.servers") && !err.to_string().contains("pw"), "{err}");
            Ok(())
        });
    }

    fn sqlx_url(url: &str) -> Result<String, ConfigError> {
        DbConfig { url: url.into() }.to_sqlx()
    }

    #[test]
    fn asyncpgs_ssl_parameter_becomes_sslmode() {
        Jail::expect_with(|_| {
            let cases = [
                ("postgresql+asyncpg://u@h/qx?ssl=verify-full", "postgresql://u@h/qx?sslmode=verify-full"),
                ("postgresql+asyncpg://u@h/qx?ssl=require&x=1", "postgresql://u@h/qx?sslmode=require&x=1"),
                ("postgresql+asyncpg://u@h/qx?ssl=verify_ca", "postgresql://u@h/qx?sslmode=verify-ca"),
                ("postgresql+asyncpg://u@h/qx?ssl=true", "postgresql://u@h/qx?sslmode=verify-full"),
                ("postgresql+asyncpg://u@h/qx?ssl=false", "postgresql://u@h/qx?sslmode=disable"),
                ("postgresql+asyncpg://u@h/qx", "postgresql://u@h/qx"),
            ];
            for (url, expected) in cases {
                assert_eq!(sqlx_url(url).unwrap(), expected);
            }
            assert_eq!(sqlx_url("postgresql+asyncpg://u@h/qx?ssl=maybe").unwrap_err().key, "db.url");
            assert!(
                sqlx_url("postgresql+asyncpg://u@h/qx?ssl=require&sslmode=disable").is_err(),
                "ambiguous"
            );
            Ok(())
        });
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_in_libpq() {
        Jail::expect_with(|jail| {
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require&sslrootcert=/ca.pem").unwrap(),
                "postgres://u@h/qx?sslrootcert=/ca.pem&sslmode=verify-ca"
            );
            assert_eq!(
                sqlx_url("postgresql+asyncpg://u@h/qx?ssl=require&sslrootcert=/ca.pem").unwrap(),
                "postgresql://u@h/qx?sslrootcert=/ca.pem&sslmode=verify-ca"
            );
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require").unwrap(),
                "postgres://u@h/qx?sslmode=require"
            );
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=verify-full&sslrootcert=/ca.pem").unwrap(),
                "postgres://u@h/qx?sslmode=verify-full&sslrootcert=/ca.pem"
            );
            jail.set_env("PGSSLROOTCERT", "/ca.pem");
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require").unwrap(),
                "postgres://u@h/qx?sslmode=verify-ca"
            );
            jail.set_env("PGSSLMODE", "require");
            assert_eq!(sqlx_url("postgres://u@h/qx").unwrap(), "postgres://u@h/qx?sslmode=verify-ca");
            Ok(())
        });
    }

    #[test]
    fn an_encrypted_key_password_is_refused_rather_than_logged() {
        assert_eq!(sqlx_url("postgres://u@h/qx?sslkey=/k&sslpassword=x").unwrap_err().key, "db.url");
    }

    #[test]
    fn redis_tls_files_need_rediss() {
        Jail::expect_with(|jail| {
            jail.create_file("ca.pem", "").unwrap();
            let base = "[relay]\nsubject_prefix = \"o\"\nleader = \"redis\"\n[cache]\n";
            let err =
                load(jail, &format!("{base}url = \"redis://h\"\ntls_ca_file = \"ca.pem\"\n")).unwrap_err();
            assert_eq!(err.key, "cache.tls_ca_file");
            let err =
                load(jail, &format!("{base}url = \"rediss://h\"\ntls_cert_file = \"ca.pem\"\n")).unwrap_err();
            assert_eq!(err.key, "cache.tls_key_file");
            load(jail, &format!("{base}url = \"rediss://h\"\ntls_ca_file = \"ca.pem\"\n")).unwrap();
            jail.set_env("QX_CACHE__TLS_CA_FILE", "missing.pem");
            let err = load(jail, &format!("{base}url = \"rediss://h\"\n")).unwrap_err();
            assert_eq!(err.key, "cache.tls_ca_file");
            Ok(())
        });
    }
}
