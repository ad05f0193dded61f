//! The layers: defaults < TOML file < environment < flags, merged by figment into one [`Config`], and
//! figment's errors as one line naming the key, where it came from and the key it probably meant.

use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::Serialize;

use super::env::{env_variable, qx_env};
use super::{parse_listen_addr, Config, ConfigError, LeaderMode, ShardId};
use crate::relay::spelling;

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

#[cfg(test)]
// figment's Jail closures return figment::Error, whose size we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::relay::config::tests::{from_env, load};
    use figment::Jail;

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
    fn an_unknown_relay_key_is_named_once_with_its_variable_and_a_suggestion() {
        Jail::expect_with(|jail| {
            let err =
                from_env(jail, &[("QX_RELAY__SUBJECT_PREFIX", "orders"), ("QX_RELAY__BATCHSIZE", "10")])
                    .unwrap_err();
            assert_eq!(
                err.to_string(),
                "relay.batchsize (from QX_RELAY__BATCHSIZE): unknown key; did you mean batch_size?"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            let err = from_env(
                jail,
                &[("QX_RELAY__SUBJECT_PREFIX", "orders"), ("QX_RELAY__BATCHSIZE__BATCHSIZE", "10")],
            )
            .unwrap_err();
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
}
