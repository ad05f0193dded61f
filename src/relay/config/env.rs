//! The environment: which `QX_*` variables are ours, the variable a setting came from as written, and
//! warnings about those that look meant for the relay but that neither the relay nor Qx reads.
//!
//! A sidecar shares its service's environment, so only the keys listed here are taken from `QX_NATS__`,
//! `QX_DB__` and `QX_CACHE__`; `QX_RELAY__*` is ours, so a typo there is an error.

use figment::providers::Env;

use crate::relay::spelling;

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

/// `QX_*` variables that are ours; see the module docs.
pub(super) fn qx_env() -> Env {
    Env::prefixed("QX_").filter(|key| reads(key.as_str())).split("__")
}

/// Whether the variable `QX_<key>` is a setting the relay reads (`key` as figment gives it, e.g.
/// `relay__batch_size`, in any case).
fn reads(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let ours = key.starts_with("relay__") && key != ENV_LOG_FILTER[3..].to_ascii_lowercase();
    ours || SHARED_ENV_KEYS.contains(&key.as_str())
}

/// The variable that sets `section.key`, if the relay reads one (for the configuration reference).
pub(super) fn env_variable_for(section: &str, key: &str) -> Option<String> {
    let key = format!("{section}__{key}");
    reads(&key).then(|| format!("QX_{key}").to_ascii_uppercase())
}

/// Sections people reach for that Qx and the relay spell otherwise (there is no `QX_REDIS__` in Qx).
const SECTION_SLIPS: &[(&str, &str)] =
    &[("database", "db"), ("postgres", "db"), ("postgresql", "db"), ("pg", "db"), ("redis", "cache")];

/// Warnings about the variables among `names` that look meant for the relay but are not read, each of which
/// would leave a default in place without a word:
/// - under `QX_NATS__`, `QX_DB__` and `QX_CACHE__`, a key neither the relay nor Qx reads (`QX_NATS__SERVER`);
/// - a setting of the relay under a section of another name (`QX_DATABASE__URL`, `QX_REDIS__URL`) or with one
///   underscore after its section (`QX_RELAY_SUBJECT_PREFIX`).
///
/// Only warnings, as a service may keep settings of its own under these prefixes; and Kubernetes names its
/// service links `<SERVICE>_PORT` and the like, so a name is taken for a slip only when the setting it
/// points at exists.
pub fn unknown_env_keys(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let read: Vec<String> = super::reference::sections()
        .iter()
        .flat_map(|section| &section.keys)
        .filter_map(|key| key.env.as_ref())
        .map(|variable| variable.to_ascii_lowercase())
        .collect();
    let mut warnings = Vec::new();
    for name in names {
        let lower = name.to_ascii_lowercase();
        if !lower.starts_with("qx_") || read.contains(&lower) {
            continue;
        }
        let key = &lower[3..];
        let meant = |section: &str, field: &str| {
            let variable = format!("qx_{section}__{field}");
            read.contains(&variable).then(|| variable.to_ascii_uppercase())
        };
        let warning = match key.split_once("__") {
            Some((section, field)) if ["nats", "db", "cache"].contains(&section) => {
                if QX_ONLY_ENV_KEYS.contains(&key) {
                    continue;
                }
                let fields = SHARED_ENV_KEYS.iter().chain(QX_ONLY_ENV_KEYS).filter_map(|known| {
                    known
                        .split_once("__")
                        .filter(|(known_section, _)| *known_section == section)
                        .map(|(_, f)| f)
                });
                match spelling::did_you_mean(field, fields) {
                    Some(field) => {
                        format!("did you mean {}?", format!("QX_{section}__{field}").to_ascii_uppercase())
                    }
                    None => String::new(),
                }
            }
            Some((section, field)) => {
                let target =
                    SECTION_SLIPS.iter().find(|(slip, _)| *slip == section).map(|(_, target)| *target);
                match target.and_then(|target| meant(target, field)) {
                    Some(variable) => format!("did you mean {variable}?"),
                    None => continue,
                }
            }
            None => {
                let one_underscore = ["nats", "db", "cache", "relay"].iter().find_map(|section| {
                    key.strip_prefix(section)?.strip_prefix('_').and_then(|field| meant(section, field))
                });
                match one_underscore {
                    Some(variable) => format!("did you mean {variable}? (two underscores after the section)"),
                    None => continue,
                }
            }
        };
        let mut line = format!("{name} is not a setting of qx-relay or Qx: ignored");
        if !warning.is_empty() {
            line.push_str("; ");
            line.push_str(&warning);
        }
        warnings.push(line);
    }
    warnings.sort();
    warnings
}

/// The variable a setting at `path` came from, as written: `QX_RELAY__BATCH_SIZE` for `relay.batch_size`, or
/// one that nests below it (`QX_RELAY__BATCHSIZE__X` makes `relay.batchsize` a table).
pub(super) fn env_variable(path: &[String]) -> String {
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

#[cfg(test)]
// figment's Jail closures return figment::Error, whose size we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::relay::config::tests::from_env;
    use figment::Jail;
    use std::time::Duration;

    #[test]
    fn qx_env_names_are_read_and_foreign_ones_ignored() {
        Jail::expect_with(|jail| {
            jail.set_env("QX_NATS__SERVERS", r#"["nats://a:4222","nats://b:4222"]"#);
            let config = from_env(
                jail,
                &[
                    ("QX_DB__URL", "postgresql+asyncpg://u:secret@db:5432/app"),
                    ("QX_DB__POOL_SIZE", "20"),
                    ("QX_APP__NAME", "orders"),
                    ("QX_ENV", "prod"),
                    ("QX_RELAY__SUBJECT_PREFIX", "orders"),
                    ("QX_RELAY__POLL_INTERVAL", "50ms"),
                    ("QX_RELAY__LOG", "debug"),
                ],
            )
            .unwrap();
            assert_eq!(config.nats.servers, ["nats://a:4222", "nats://b:4222"]);
            assert_eq!(config.db.sqlx_url(), "postgresql://u:secret@db:5432/app");
            assert_eq!(config.relay.poll_interval, Duration::from_millis(50));
            assert!(!config.redacted().db.url.contains("secret"));
            Ok(())
        });
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        Jail::expect_with(|jail| {
            let err = from_env(
                jail,
                &[("QX_RELAY__SUBJECT_PREFIX", "orders"), ("QX_RELAY__MAX_IN_FLIGHT", "many")],
            )
            .unwrap_err();
            assert!(err.to_string().contains("QX_RELAY__MAX_IN_FLIGHT"), "{err}");
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
            "QX_DATABASE__URL",
            "QX_REDIS__URL",
            "QX_POSTGRES__POOL_SIZE",
            "QX_RELAY_SUBJECT_PREFIX",
            "QX_DB_URL",
            "QX_RELAY_PORT",
            "QX_RELAY_SERVICE_HOST",
            "QX_RELAY_CONFIG",
            "QX_RELAY_LOG_FORMAT",
            "PATH",
        ];
        let warnings = unknown_env_keys(names.iter().map(|name| (*name).to_owned()));
        assert_eq!(
            warnings,
            [
                "QX_CACHE__TLS_CA is not a setting of qx-relay or Qx: ignored; did you mean QX_CACHE__TLS_CA_FILE?",
                "QX_DATABASE__URL is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__URL?",
                "QX_DB_URL is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__URL? (two underscores \
                 after the section)",
                "QX_DB__POOL_SIZ is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__POOL_SIZE?",
                "QX_DB__URI is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__URL?",
                "QX_NATS__FROBNICATE is not a setting of qx-relay or Qx: ignored",
                "QX_NATS__SERVER is not a setting of qx-relay or Qx: ignored; did you mean QX_NATS__SERVERS?",
                "QX_REDIS__URL is not a setting of qx-relay or Qx: ignored; did you mean QX_CACHE__URL?",
                "QX_RELAY_SUBJECT_PREFIX is not a setting of qx-relay or Qx: ignored; did you mean \
                 QX_RELAY__SUBJECT_PREFIX? (two underscores after the section)",
            ]
        );
    }
}
