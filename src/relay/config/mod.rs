//! Settings: defaults < TOML file < environment < flags, validated before anything connects.
//!
//! Env names are the Qx ones (`QX_NATS__SERVERS`, `QX_DB__URL`, `QX_CACHE__URL`) plus `QX_RELAY__*`. A sidecar
//! shares its service's environment, so only keys the relay knows are taken from `QX_NATS__`, `QX_DB__` and
//! `QX_CACHE__`; `QX_RELAY__*` is ours, so a typo there is an error, as is an unknown key in the file.
//! Its only I/O is reading the file and the environment.
//!
//! The parts:
//! - this file: the schema, its defaults, and the written forms of shard ids and keys, addresses and lists;
//! - `layers`: the flags, the merge into one [`Config`], and its errors as one line naming their source;
//! - `env`: which `QX_*` variables are read, and warnings, with a suggestion, about those nobody reads;
//! - `urls`: SQLAlchemy and asyncpg DSNs as sqlx takes them, credentials in NATS URLs, and redaction;
//! - `validate`: [`ConfigError`], the limits, and the range and cross-field rules;
//! - `reference`: docs/configuration.md, generated from this file's doc comments, types and defaults.
//!
//! The doc comments of the settings below are their documentation for operators too (`qx-relay config
//! --reference`): write them for someone setting the key, not for a reader of the code.

mod env;
mod layers;
pub mod reference;
mod urls;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use reference::{Humantime, ListenAddr};

pub use env::{unknown_env_keys, ENV_LOG_FILTER};
pub use layers::Overrides;
pub use urls::UrlAuth;
pub use validate::{
    ConfigError, BATCH_SIZE_LIMIT, DURATION_LIMIT, GIVE_UP_AFTER_LIMIT, MAX_IN_FLIGHT_LIMIT, RETENTION_LIMIT,
};

/// Everything the relay reads from its settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The NATS connection, as Qx's `QX_NATS__*` settings name it, plus the credentials and TLS a real cluster
    /// needs.
    pub nats: NatsConfig,
    /// The Postgres database holding the outbox table, as Qx's `QX_DB__URL`.
    pub db: DbConfig,
    /// Redis, for the leader locks and elastic shards when `relay.leader = "redis"`, as Qx's `QX_CACHE__URL`.
    pub cache: CacheConfig,
    /// What the relay does (`QX_RELAY__*`).
    pub relay: RelayConfig,
}

/// `[nats]`, as Qx names it, plus the credentials and TLS a real cluster needs.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs; in env a JSON list (`'["nats://a:4222","nats://b:4222"]'`, as Qx writes it) or a
    /// comma-separated list. Credentials may be written in them as nats-py reads them:
    /// `nats://user:password@host:4222`, or `nats://token@host:4222`.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub servers: Vec<String>,
    /// Reconnect attempts before the client gives up; 0 or less retries forever.
    pub max_reconnect_attempts: i64,
    /// Pause between reconnect attempts, in seconds (at most 86400).
    pub reconnect_time_wait_seconds: f64,
    /// Timeout of each connection attempt, NATS and Postgres, in seconds (at most 86400).
    pub connect_timeout_seconds: f64,
    /// Connection name shown by the server.
    pub name: Option<String>,
    /// Credentials file (JWT + NKey) for a decentralised-auth cluster.
    pub creds_file: Option<String>,
    /// User for user/password auth (with `password`).
    pub user: Option<String>,
    /// Password for user/password auth (with `user`); `qx-relay config` prints it as `***`.
    pub password: Option<String>,
    /// Token auth; `qx-relay config` prints it as `***`.
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
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// `postgres://`, `postgresql://` or SQLAlchemy's `postgresql+asyncpg://`. TLS via the URL, e.g.
    /// `?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem`, or asyncpg's `?ssl=verify-full`; `sslmode=require`
    /// with a `sslrootcert` verifies the chain, as libpq does.
    pub url: String,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self { url: "postgresql+asyncpg://postgres:postgres@localhost:5432/qx".into() }
    }
}

/// `[cache]`: Redis, as Qx's `QX_CACHE__URL`, plus the certificates a `rediss://` server may need.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` (TLS) URL.
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

/// How a relay makes sure it is the only one publishing its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema, clap::ValueEnum)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
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

impl JsonSchema for ShardKey {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ShardKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string" })
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

impl JsonSchema for ShardId {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ShardId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "anyOf": [{ "type": "integer", "minimum": 0 }, { "const": "auto" }] })
    }
}

/// `relay.statement_timeout` by default, unless `give_up_after` asks for less.
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `relay.max_batch_bytes` by default: a batch of ~1 KB rows is never cut, and the claimed, in-flight and
/// prefetched batches together stay far below the manifests' 128 MiB memory limit.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 8 << 20;

/// `[relay]`: the relay's own knobs (`QX_RELAY__*`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Subjects are `<subject_prefix>.<event_name>`. Required (no default); typically the service name.
    pub subject_prefix: Option<String>,
    /// The outbox table, optionally schema-qualified.
    pub table: String,
    /// Rows claimed per batch (at most 100000).
    pub batch_size: u32,
    /// Bytes of row bodies a batch may hold past its first row (at least 65536; a row up to NATS'
    /// `max_payload` always fits); also the bytes awaiting PubAcks at once. Bounds the relay's memory whatever
    /// the rows weigh.
    pub max_batch_bytes: u64,
    /// Publishes awaiting their PubAck at once (at most 65536).
    pub max_in_flight: u32,
    /// Wait after a short batch before claiming again (no wait while a backlog remains).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub poll_interval: Duration,
    /// Wait after an empty claim.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub idle_poll_interval: Duration,
    /// On SIGTERM, time to finish the in-flight batch (acks awaited, marks committed).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub drain_timeout: Duration,
    /// How long publishing may go without a PubAck; then the batch's unconfirmed rows wait for NATS (no
    /// attempt counted).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub ack_timeout: Duration,
    /// Longest wait for Postgres in one step (a connection, a statement, a commit); past it Postgres counts as
    /// unavailable for that step, as when it refuses connections, so a hung server is retried and given up on
    /// like a refused one. Below `give_up_after`; unset, 5s or half of `give_up_after`, whichever is shorter.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Humantime>")]
    pub statement_timeout: Option<Duration>,
    /// Failed publishes (JetStream rejections) before a row is parked.
    pub max_attempts: i32,
    /// First retry delay of a failing row; doubles per attempt, with jitter, up to `retry_backoff_max`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub retry_backoff: Duration,
    /// Longest retry delay of a failing row.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub retry_backoff_max: Duration,
    /// This relay's shard, `0..shard_count`, or `"auto"` (with a `leader`): every replica runs alike and the
    /// replicas share the shards by lease.
    pub shard_id: ShardId,
    /// Number of shards the table is split into; 1 = the whole table. Fixed while any relay runs.
    pub shard_count: u32,
    /// What rows are sharded and ordered by: `id`, `tenant_id`, `correlation_id`, `event_name`, or a path into
    /// the envelope such as `payload.order_id`. Rows with the same key go to the same shard, in
    /// `(occurred_at, id)` order.
    pub shard_key: ShardKey,
    /// Exit 69 when Postgres, NATS or Redis stays unreachable this long (at most 7 days). Also the longest a
    /// claimed batch may sit idle in its transaction before Postgres ends it, releasing the rows of a relay that
    /// stopped answering. At least 1s and at least twice `ack_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub give_up_after: Duration,
    /// Postgres channel to LISTEN on for immediate wake-up (`scripts/outbox-notify.sql` creates the trigger);
    /// polling alone when unset.
    pub notify_channel: Option<String>,
    /// Leader election: which lock keeps a shard to one publishing relay.
    pub leader: LeaderMode,
    /// Redis key of the leader lock (suffixed with `:<shard_id>` when sharded); with `shard_id = "auto"`,
    /// `<leader_key>:members` is the membership record. One key per outbox table.
    pub leader_key: String,
    /// Lease of a leader lock, in either backend: a Redis key's expiry, renewed every third of it; a Postgres
    /// lock session's `idle_session_timeout`, checked every third of it (at most every 500 ms).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Humantime")]
    pub leader_ttl: Duration,
    /// What to do with a published row.
    pub on_publish: OnPublish,
    /// Delete published rows older than this, in small batches (at most 100 years); kept forever when unset.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Humantime>")]
    pub retention: Option<Duration>,
    /// Create a stream capturing `<subject_prefix>.>` when none does (for development).
    pub ensure_stream: bool,
    /// Serve `/metrics`, `/livez` and `/readyz` on this address: `host:port`, or `:port` for every interface;
    /// off when unset.
    #[serde(deserialize_with = "optional_listen_addr")]
    #[schemars(with = "Option<ListenAddr>")]
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
    use std::path::Path;

    /// Loads `toml` as the file `relay.toml`, without flags; the other parts' tests load through it too.
    pub(super) fn load(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("relay.toml", toml).unwrap();
        Config::load(Some(Path::new("relay.toml")), &Overrides::default())
    }

    /// Loads the environment `vars`, without a file or flags.
    pub(super) fn from_env(jail: &mut Jail, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        for (name, value) in vars {
            jail.set_env(name, value);
        }
        Config::load(None, &Overrides::default())
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
    fn comma_separated_servers() {
        Jail::expect_with(|jail| {
            let config = from_env(
                jail,
                &[
                    ("QX_NATS__SERVERS", "nats://a:4222, nats://b:4222"),
                    ("QX_RELAY__SUBJECT_PREFIX", "orders"),
                ],
            )
            .unwrap();
            assert_eq!(config.nats.servers, ["nats://a:4222", "nats://b:4222"]);
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
            let config = from_env(jail, &[("QX_RELAY__SHARD_ID", "auto")]).unwrap();
            assert_eq!(config.relay.shard_id, ShardId::Auto);
            let config =
                from_env(jail, &[("QX_RELAY__SHARD_ID", "1"), ("QX_RELAY__SHARD_COUNT", "3")]).unwrap();
            assert_eq!(config.relay.shard_id, ShardId::Fixed(1));
            let overrides = Overrides { shard_id: Some("auto".parse().unwrap()), ..Overrides::default() };
            assert_eq!(Config::load(None, &overrides).unwrap().relay.shard_id, ShardId::Auto);
            Ok(())
        });
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
            let config = from_env(
                jail,
                &[("QX_RELAY__SUBJECT_PREFIX", "orders"), ("QX_RELAY__METRICS_ADDR", ":9464")],
            )
            .unwrap();
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
    fn shard_keys_parse() {
        assert_eq!("id".parse::<ShardKey>().unwrap(), ShardKey::Id);
        assert_eq!(
            "payload.order_id".parse::<ShardKey>().unwrap(),
            ShardKey::Envelope(vec!["payload".into(), "order_id".into()])
        );
        assert!("payload.order-id".parse::<ShardKey>().is_err());
    }
}
