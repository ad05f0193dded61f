//! The environment: what a run reads from its own (the services' URLs) and what a relay starts with.

use std::path::Path;
use std::process::Command;

use crate::TestDb;

/// A variable the run needs, e.g. `DATABASE_URL` (an admin URL such as
/// `postgres://postgres@127.0.0.1:5432/postgres`), `NATS_URL` or `REDIS_URL`; panics naming it when unset.
pub fn env_var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} must be set for the live-service runs (see README)"))
}

/// The whole environment a relay starts with, each variable once: nothing of the caller's `QX_*` variables
/// leaks into a run.
#[derive(Debug, Clone, Default)]
pub struct RelayEnv {
    vars: Vec<(String, String)>,
}

impl RelayEnv {
    /// A relay on `db` and the shared NATS, publishing under `prefix`, with short poll intervals and debug logs.
    pub fn new(db: &TestDb, prefix: &str) -> Self {
        Self::default().with(&[
            ("QX_DB__URL", &db.url),
            ("QX_NATS__SERVERS", &env_var("NATS_URL")),
            ("QX_RELAY__SUBJECT_PREFIX", prefix),
            ("QX_RELAY__POLL_INTERVAL", "50ms"),
            ("QX_RELAY__IDLE_POLL_INTERVAL", "100ms"),
            ("QX_RELAY__LOG", "info,qx_relay=debug"),
        ])
    }

    /// `key` set to `value`, replacing an earlier value.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.vars.iter_mut().find(|(name, _)| name == key) {
            Some(var) => var.1 = value,
            None => self.vars.push((key.to_owned(), value)),
        }
        self
    }

    /// Each of `pairs` [set](Self::set).
    pub fn with(self, pairs: &[(&str, &str)]) -> Self {
        pairs.iter().fold(self, |env, (key, value)| env.set(key, *value))
    }

    /// `bin` with this environment and PATH only.
    pub(crate) fn command(&self, bin: &Path) -> Command {
        let mut command = Command::new(bin);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars.iter().map(|(key, value)| (key, value)));
        command
    }
}
