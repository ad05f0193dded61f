//! What makes settings usable: [`ConfigError`], the limits, and the range and cross-field rules checked
//! before anything connects.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::urls::{redact_url, LoneUserinfo};
use super::{CacheConfig, Config, LeaderMode, NatsConfig, ShardId};

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
    pub(super) fn invalid(key: &str, reason: impl fmt::Display) -> Self {
        Self { key: key.to_owned(), reason: reason.to_string() }
    }
}

/// The most rows `relay.batch_size` may claim at once: a batch is one transaction whose rows stay locked, and
/// in the relay's memory, until their marks commit.
pub const BATCH_SIZE_LIMIT: u32 = 100_000;

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

impl Config {
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
}

impl NatsConfig {
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
        existing_files(
            ("nats.tls_cert_file", &self.tls_cert_file, "nats.tls_key_file", &self.tls_key_file),
            &[("nats.creds_file", &self.creds_file), ("nats.tls_ca_file", &self.tls_ca_file)],
        )
    }
}

impl CacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.url.as_str())
            .map_err(|err| ConfigError::invalid("cache.url", format!("not a Redis URL: {err}")))?;
        let (ca, cert, key) = (&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file);
        // Certificates only mean something to a TLS connection.
        for (name, path) in
            [("cache.tls_ca_file", ca), ("cache.tls_cert_file", cert), ("cache.tls_key_file", key)]
        {
            if path.is_some() && !self.url.starts_with("rediss://") {
                return Err(ConfigError::invalid(name, "needs a rediss:// cache.url"));
            }
        }
        existing_files(("cache.tls_cert_file", cert, "cache.tls_key_file", key), &[("cache.tls_ca_file", ca)])
    }
}

/// A section's client certificate and key go together (`pair`: each setting's name and value), and every file
/// it names, theirs and `others`, exists.
fn existing_files(
    pair: (&'static str, &Option<String>, &'static str, &Option<String>),
    others: &[(&'static str, &Option<String>)],
) -> Result<(), ConfigError> {
    let (cert_key, cert, key_key, key) = pair;
    if cert.is_some() != key.is_some() {
        return Err(ConfigError::invalid(key_key, "tls_cert_file and tls_key_file go together"));
    }
    for (name, path) in others.iter().copied().chain([(cert_key, cert), (key_key, key)]) {
        if let Some(path) = path {
            if !Path::new(path).is_file() {
                return Err(ConfigError::invalid(name, format!("no such file: {path}")));
            }
        }
    }
    Ok(())
}

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

#[cfg(test)]
// figment's Jail closures return figment::Error, whose size we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::relay::config::tests::load;
    use figment::Jail;

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
    fn a_bad_nats_server_is_named_without_its_credentials() {
        Jail::expect_with(|jail| {
            let err =
                load(jail, "[nats]\nservers = [\"nats://u:pw@a:99999\"]\n[relay]\nsubject_prefix = \"o\"\n")
                    .unwrap_err();
            assert!(err.key.starts_with("nats.servers") && !err.to_string().contains("pw"), "{err}");
            Ok(())
        });
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
