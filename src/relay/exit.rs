//! How the process ends: its exit codes, which error ends it with which, and the one-line error chain.

use super::config::ConfigError;
use super::engine::EngineError;
use super::lease::{LeaseError, LockError};
use super::nats::ConnectError;
use super::preflight::PreflightError;
use super::refusal::PostgresError;

impl From<LeaseError> for RelayError {
    fn from(err: LeaseError) -> Self {
        match err {
            LeaseError::Engine(err) => Self::Engine(err),
            LeaseError::Lock(err) => Self::Lock(err),
        }
    }
}

/// The process exit codes, documented in `--help` and the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Clean stop.
    Ok = 0,
    /// `dead show`: no row with that id.
    NotFound = 1,
    /// Bad flags.
    Usage = 64,
    /// Postgres, NATS or Redis unavailable at start or for longer than `give_up_after`.
    Unavailable = 69,
    /// A bug or an unexpected state.
    Internal = 70,
    /// Bad configuration, or a table that does not match it.
    Config = 78,
    /// Second signal: stopped without finishing.
    Interrupted = 130,
}

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A setting is wrong.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// Postgres unreachable at start, or refusing our settings.
    #[error(transparent)]
    PostgresConnect(#[from] PostgresError),
    /// NATS unreachable at start, or refusing our settings.
    #[error(transparent)]
    NatsConnect(#[from] ConnectError),
    /// A start-up check failed.
    #[error("checking the setup")]
    Preflight(#[from] PreflightError),
    /// The relay loop gave up.
    #[error("relay loop")]
    Engine(#[from] EngineError),
    /// The leader lock backend gave up.
    #[error("leader lock")]
    Lock(#[from] LockError),
    /// The metrics endpoint could not listen.
    #[error("serving /metrics on {addr}")]
    Health {
        /// `relay.metrics_addr`.
        addr: std::net::SocketAddr,
        /// Why not, e.g. the address is in use.
        #[source]
        source: std::io::Error,
    },
}

impl From<&PreflightError> for ExitCode {
    fn from(err: &PreflightError) -> Self {
        match err {
            PreflightError::Postgres(_) | PreflightError::StreamLookup(..) => Self::Unavailable,
            PreflightError::Table { .. } | PreflightError::EnsureStream(..) | PreflightError::NoStream(_) => {
                Self::Config
            }
        }
    }
}

impl From<&RelayError> for ExitCode {
    fn from(err: &RelayError) -> Self {
        match err {
            // A server refusing our TLS settings or credentials: they must change, retrying cannot help.
            RelayError::PostgresConnect(err) if err.is_config_error() => Self::Config,
            RelayError::NatsConnect(err) if err.is_config_error() => Self::Config,
            RelayError::Lock(err) if err.is_config_error() => Self::Config,
            RelayError::Config(_) | RelayError::Health { .. } => Self::Config,
            RelayError::Preflight(err) => err.into(),
            RelayError::PostgresConnect(_)
            | RelayError::NatsConnect(_)
            | RelayError::Engine(_)
            | RelayError::Lock(_) => Self::Unavailable,
        }
    }
}
