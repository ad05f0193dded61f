//! Telling a server that refuses our settings from one that is down. A TLS handshake that fails (a certificate
//! not trusted or not sent, TLS on one side only), credentials the server rejects or a database that does not
//! exist do not get better by retrying: they are configuration errors (exit 78), reported with the server.
//! Anything else is an outage.
//! Reads the errors of the three clients; connects to nothing.

use std::error::Error;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;

// The one rustls in the build: async-nats re-exports it, sqlx and redis-rs link the same crate.
use async_nats::rustls;

/// Why a server cannot be used with our settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed: a certificate not trusted or missing, or TLS on one side only.
    Tls,
    /// The server rejected the credentials, or what they allow.
    Credentials,
    /// The server has no database of the name we asked for.
    NoDatabase,
    /// `db.url` leads to a pooler that shares server sessions between transactions (PgBouncer's
    /// `pool_mode = transaction`), and a setting needs a session of its own (a Postgres lock, LISTEN).
    TransactionPooler,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls => "TLS/certificate problem",
            Self::Credentials => "credentials refused",
            Self::NoDatabase => "no such database",
            Self::TransactionPooler => "transaction pooling",
        })
    }
}

/// Whether `err` or an error under it is a failed TLS handshake or a rejected certificate.
pub fn is_tls(err: &(dyn Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        // TLS streams report a failed handshake as an io::Error, and redis-rs hands its cause out in an Arc:
        // both keep the error they wrap out of source(), so look inside.
        let wrapped: Option<&(dyn Error + 'static)> = if let Some(io) = err.downcast_ref::<io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn Error + 'static))
        } else {
            err.downcast_ref::<Arc<dyn Error + Send + Sync>>().map(|inner| &**inner as &(dyn Error + 'static))
        };
        if wrapped.is_some_and(is_tls) {
            return true;
        }
        next = err.source();
    }
    false
}

/// What a failed Postgres connection says about our settings.
pub fn of_postgres(err: &sqlx::Error) -> Option<Refusal> {
    match err {
        sqlx::Error::Tls(_) => Some(Refusal::Tls),
        // 28000 invalid_authorization_specification (no pg_hba.conf entry, an unknown role, a client certificate
        // required), 28P01 invalid_password. Postgres checks a client certificate after the handshake, as
        // authentication, so its message is the only sign of a certificate problem.
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28000" | "28P01")) => {
            Some(if db.message().contains("certificate") { Refusal::Tls } else { Refusal::Credentials })
        }
        // 3D000 invalid_catalog_name: db.url names a database the server does not have.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => Some(Refusal::NoDatabase),
        sqlx::Error::Configuration(err) if err.is::<SessionNeeded>() => Some(Refusal::TransactionPooler),
        err if is_tls(err) => Some(Refusal::Tls),
        _ => None,
    }
}

/// What a failed NATS connection says about our settings.
pub fn of_nats(err: &async_nats::ConnectError) -> Option<Refusal> {
    use async_nats::ConnectErrorKind;
    match err.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Some(Refusal::Credentials)
        }
        ConnectErrorKind::Tls => Some(Refusal::Tls),
        _ if is_tls(err) => Some(Refusal::Tls),
        _ => None,
    }
}

/// What a failed Redis connection or command says about our settings.
pub fn of_redis(err: &redis::RedisError) -> Option<Refusal> {
    use redis::ErrorKind;
    // WRONGPASS and NOAUTH come back as server errors when AUTH is not part of the connection's setup; NOPERM
    // when the user may not run the lock's commands.
    if err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        return Some(Refusal::Credentials);
    }
    // The URL is validated before any connection, so an invalid client config is its TLS settings.
    (err.kind() == ErrorKind::InvalidClientConfig || is_tls(err)).then_some(Refusal::Tls)
}

/// `db.url` leads to a transaction pooler, and a setting needs what only a session keeps.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} needs a session of its own, which a transaction pooler (PgBouncer's pool_mode = transaction) does not \
     keep: point db.url at a session-mode pool or at Postgres itself"
)]
pub struct SessionNeeded(pub &'static str);

/// The server `options` point at: `host:port`, or the socket path.
pub fn postgres_address(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None if options.get_host().contains(':') => {
            format!("[{}]:{}", options.get_host(), options.get_port())
        }
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

/// Postgres could not be used, naming the server.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The server refused our TLS settings or credentials.
    #[error("{refusal}: Postgres at {server}")]
    Refused {
        /// What was refused.
        refusal: Refusal,
        /// `host:port`, or the socket path.
        server: String,
        /// The client's error.
        #[source]
        source: sqlx::Error,
    },
    /// Unreachable or failing.
    #[error("connecting to Postgres at {server}")]
    Unavailable {
        /// `host:port`, or the socket path.
        server: String,
        /// The client's error.
        #[source]
        source: sqlx::Error,
    },
}

impl PostgresError {
    /// `source`, from connecting to `url` (a URL for sqlx).
    pub fn connecting(url: &str, source: sqlx::Error) -> Self {
        match PgConnectOptions::from_str(url) {
            Ok(options) => Self::new(&options, source),
            Err(_) => Self::with_server("the db.url server".to_owned(), source),
        }
    }

    /// `source`, from the server `options` point at.
    pub fn new(options: &PgConnectOptions, source: sqlx::Error) -> Self {
        Self::with_server(postgres_address(options), source)
    }

    fn with_server(server: String, source: sqlx::Error) -> Self {
        match of_postgres(&source) {
            Some(refusal) => Self::Refused { refusal, server, source },
            None => Self::Unavailable { server, source },
        }
    }

    /// The server refused our settings: they must change, retrying cannot help.
    pub fn is_config_error(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_found_inside_io_errors_and_arcs() {
        let tls = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls());
        assert!(is_tls(&io));
        let arc: Arc<dyn Error + Send + Sync> = Arc::new(io::Error::new(io::ErrorKind::InvalidData, tls()));
        assert!(is_tls(&arc));
        assert!(is_tls(&sqlx::Error::Io(io::Error::new(io::ErrorKind::InvalidData, tls()))));
        assert!(!is_tls(&io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(!is_tls(&io::Error::other("tls in the text only")));
    }

    #[test]
    fn refusals_are_told_from_outages() {
        assert_eq!(of_postgres(&sqlx::Error::Tls("server does not support TLS".into())), Some(Refusal::Tls));
        assert_eq!(of_postgres(&sqlx::Error::Io(io::ErrorKind::ConnectionRefused.into())), None);
        let auth: redis::RedisError =
            (redis::ErrorKind::AuthenticationFailed, "Password authentication failed").into();
        assert_eq!(of_redis(&auth), Some(Refusal::Credentials));
        let refused: redis::RedisError = io::Error::from(io::ErrorKind::ConnectionRefused).into();
        assert_eq!(of_redis(&refused), None);
        let handshake: redis::RedisError = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )
        .into();
        assert_eq!(of_redis(&handshake), Some(Refusal::Tls));
    }
}
