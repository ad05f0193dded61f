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

/// The env variable naming the log filter; a process setting, not part of the relay's config.
pub const ENV_LOG_FILTER: &str = "QX_RELAY__LOG";

/// Keys Qx's own settings share with us; other `QX_NATS__*`, `QX_DB__*`, `QX_CACHE__*` belong to the service.
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
    /// The URL with SQLAlchemy's `+driver` suffix removed, as sqlx expects it.
    pub fn sqlx_url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match scheme.split_once('+') {
                Some((base, _driver)) => format!("{base}://{rest}"),
                None => self.url.clone(),
            },
            None => self.url.clone(),
        }
    }
}

/// `[cache]`: Redis, as Qx's `QX_CACHE__URL`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { url: "redis://localhost:6379/0".into() }
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
    /// Failed publishes before a row is parked.
    pub max_attempts: i32,
    /// First retry delay of a failing row; doubles per attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest retry delay of a failing row.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// This relay's shard, `0..shard_count`.
    pub shard_id: u32,
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
    /// Redis key of the leader lock (suffixed with `:<shard_id>` when sharded).
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
    /// Serve `/metrics`, `/livez` and `/readyz` on this address; off when unset.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            subject_prefix: None,
            table: "qx_outbox_events".into(),
            batch_size: 1000,
            max_in_flight: 1024,
            poll_interval: Duration::from_millis(250),
            idle_poll_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(5),
            max_attempts: 10,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            shard_id: 0,
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

    /// Whether the table is split across relays.
    pub fn is_sharded(&self) -> bool {
        self.shard_count > 1
    }
}

/// Settings given as flags; they win over the file and the environment.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderMode>,
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
        if relay.shard_id >= relay.shard_count {
            return Err(ConfigError::invalid(
                "relay.shard_id",
                format!("must be below shard_count ({}), got {}", relay.shard_count, relay.shard_id),
            ));
        }
        let retention = relay.retention.map(|retention| ("relay.retention", retention, RETENTION_LIMIT));
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
        if relay.leader_key.is_empty() {
            return Err(ConfigError::invalid("relay.leader_key", "must not be empty"));
        }
        let db_url = self.db.sqlx_url();
        if !(db_url.starts_with("postgres://") || db_url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "db.url",
                "must start with postgres://, postgresql:// or postgresql+<driver>://",
            ));
        }
        sqlx::postgres::PgConnectOptions::from_str(&db_url)
            .map_err(|err| ConfigError::invalid("db.url", format!("not a Postgres URL: {err}")))?;
        if relay.leader == LeaderMode::Redis {
            redis::Client::open(self.cache.url.as_str())
                .map_err(|err| ConfigError::invalid("cache.url", format!("not a Redis URL: {err}")))?;
        }
        self.nats.validate()
    }

    /// A copy fit to print: passwords and tokens replaced.
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.db.url = redact_url(&copy.db.url);
        copy.cache.url = redact_url(&copy.cache.url);
        copy.nats.servers = copy.nats.servers.iter().map(|s| redact_url(s)).collect();
        for secret in [&mut copy.nats.password, &mut copy.nats.token] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        copy
    }
}

impl NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::invalid("nats.servers", "must list at least one server"));
        }
        for server in &self.servers {
            async_nats::ServerAddr::from_str(server)
                .map_err(|err| ConfigError::invalid("nats.servers", format!("{server:?}: {err}")))?;
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

const REDACTED: &str = "***";

/// Hides the password of `scheme://user:password@host/...`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(a, t)| (a, Some(t)));
    let Some((userinfo, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let userinfo = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:{REDACTED}"),
        None => REDACTED.to_owned(), // a lone userinfo is a token
    };
    match tail {
        Some(tail) => format!("{scheme}://{userinfo}@{host}/{tail}"),
        None => format!("{scheme}://{userinfo}@{host}"),
    }
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

/// The most rows `relay.batch_size` may claim at once: a batch is one transaction whose rows stay locked, and
/// in the relay's memory, until their marks commit.
pub const BATCH_SIZE_LIMIT: u32 = 100_000;

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

/// One line naming the key (and where it came from) and why it is wrong.
fn from_figment(err: &figment::Error) -> ConfigError {
    let mut path = err.path.clone();
    let reason = match &err.kind {
        figment::error::Kind::UnknownField(field, _) => {
            path.push(field.clone());
            "unknown key".to_owned()
        }
        figment::error::Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing".to_owned()
        }
        kind => kind.to_string(),
    };
    let mut key = if path.is_empty() { "config".to_owned() } else { path.join(".") };
    if let Some(metadata) = &err.metadata {
        let source = match &metadata.source {
            Some(source) => source.to_string(),
            // Name the variable as the user wrote it, not figment's dotted path.
            None if metadata.name.contains("environment") => format!("QX_{}", path.join("__").to_uppercase()),
            None => metadata.name.to_string(),
        };
        key = format!("{key} (from {source})");
    }
    ConfigError { key, reason }
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
            let overrides = Overrides { shard_id: Some(2), shard_count: Some(3), ..Overrides::default() };
            let config = Config::load(None, &overrides).unwrap();
            assert_eq!((config.relay.shard_id, config.relay.shard_count), (2, 3));
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
        assert_eq!(redact_url("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
    }
}
