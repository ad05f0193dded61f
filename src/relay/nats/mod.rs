//! Everything the relay does with NATS: connecting, publishing claimed rows ([`pipeline`]), telling a row's
//! fault from a broker's ([`outcome`]), and the stream checks. Mirrors [`super::store`]; knows nothing about SQL.
//!
//! Subjects and headers come from the library's [`crate::wire`], so the relay and Rust producers share one
//! wire format.

mod events;
mod outcome;
mod pipeline;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::ConnectOptions;
use tokio::sync::Mutex;
use tracing::{debug, warn};

pub use outcome::{Failure, FailureKind, Outcome};

use super::config::{NatsConfig, RelayConfig, UrlAuth, MAX_IN_FLIGHT_LIMIT};
use super::refusal::{self, Refusal};
use events::ConnectionLog;
use pipeline::AckInbox;

/// Why NATS could not be reached at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file could not be read.
    #[error("reading nats.creds_file")]
    Credentials(#[source] std::io::Error),
    /// A server refused our TLS settings or credentials.
    #[error("{refusal}: NATS at {servers}")]
    Refused {
        /// What was refused.
        refusal: Refusal,
        /// The configured servers, `host:port` each.
        servers: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// No server answered.
    #[error("connecting to NATS at {servers}")]
    Connect {
        /// The configured servers, `host:port` each.
        servers: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
}

impl ConnectError {
    fn new(servers: &[String], source: async_nats::ConnectError) -> Self {
        let servers = servers
            .iter()
            .map(|server| match server.parse::<async_nats::ServerAddr>() {
                Ok(addr) => format!("{}:{}", addr.host(), addr.port()),
                Err(_) => server.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        match refusal::of_nats(&source) {
            Some(refusal) => Self::Refused { refusal, servers, source },
            None => Self::Connect { servers, source },
        }
    }

    /// A server refused our settings: they must change, retrying cannot help.
    pub fn is_config_error(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

/// The relay's NATS side.
#[derive(Debug, Clone)]
pub struct RelayPublisher {
    client: async_nats::Client,
    /// For the stream checks and the lookups of a duplicate's stored message.
    jetstream: jetstream::Context,
    subject_prefix: String,
    /// Opened by the first batch; batches take turns.
    acks: Arc<Mutex<Option<AckInbox>>>,
    max_in_flight: usize,
    /// Bytes of bodies awaiting PubAcks at once (past the first): the client holds each until it is written.
    max_in_flight_bytes: usize,
    ack_timeout: Duration,
    /// What happened to the connection, and which server it is on.
    connection: Arc<ConnectionLog>,
    /// Whether JetStream took the last batch that had an answer: false after one with rows it neither stored
    /// nor refused (an election, a lost quorum, JetStream missing or a full stream) until a batch goes in whole. A
    /// connected client is not enough to be up.
    storing: Arc<AtomicBool>,
}

impl RelayPublisher {
    /// Connects with the configured servers, credentials and TLS.
    ///
    /// # Errors
    /// When no server can be reached within the connect timeout, one refuses our TLS settings or credentials, or
    /// the credentials file cannot be read.
    pub async fn connect(nats: &NatsConfig, relay: &RelayConfig) -> Result<Self, ConnectError> {
        let (servers, url_auth) = nats.servers_and_url_auth().expect("validate() checks nats.servers");
        let connection = ConnectionLog::new();
        let (on_event, on_reconnect) = (connection.clone(), connection.clone());
        let options = connect_options(nats, url_auth)
            .await?
            .event_callback(move |event| {
                on_event.event(event);
                async {}
            })
            .reconnect_to_server_callback(move |pool, _info| {
                let next = on_reconnect.next_server(&pool);
                async move { next }
            });
        let client =
            options.connect(servers.clone()).await.map_err(|source| ConnectError::new(&servers, source))?;
        connection.connected(&client).await;
        Ok(Self { connection, ..Self::new(client, relay) })
    }

    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, relay: &RelayConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new().timeout(relay.ack_timeout).build(client.clone());
        Self {
            client,
            jetstream,
            subject_prefix: relay.subject_prefix().to_owned(),
            acks: Arc::new(Mutex::new(None)),
            max_in_flight: relay.max_in_flight as usize,
            max_in_flight_bytes: usize::try_from(relay.max_batch_bytes).unwrap_or(usize::MAX),
            ack_timeout: relay.ack_timeout,
            connection: Arc::default(),
            storing: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The server connected to, `host:port`.
    pub fn server(&self) -> String {
        self.connection.server()
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// While disconnected, why the last reconnect failed (the server and the client's error, such as
    /// `authorization violation` after a credential rotation); `None` when connected or not tried yet.
    pub fn why_disconnected(&self) -> Option<String> {
        (!self.is_connected()).then(|| self.connection.last_failure()).flatten()
    }

    /// Whether NATS takes messages: connected, and JetStream stored the last batch it answered (see
    /// `storing`). `/readyz` and `qx_relay_nats_up` say this.
    pub fn is_up(&self) -> bool {
        self.is_connected() && self.storing.load(Ordering::Relaxed)
    }

    /// Waits until the client reconnects, for at most `limit`.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// The stream capturing `<subject_prefix>.>`, if any.
    ///
    /// # Errors
    /// When JetStream does not answer.
    pub async fn stream_for_prefix(&self) -> Result<Option<stream::Info>, async_nats::Error> {
        let subject = format!("{}.>", self.subject_prefix);
        match self.jetstream.stream_by_subject(subject).await {
            Ok(name) => Ok(Some(self.jetstream.get_stream(name).await?.info().await?.clone())),
            Err(err) if err.kind() == GetStreamByNameErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Creates a stream named after the prefix capturing `<subject_prefix>.>` unless one exists; whether it
    /// created it.
    ///
    /// # Errors
    /// When JetStream refuses, e.g. because another stream overlaps the subjects.
    pub async fn ensure_stream(
        &self,
        duplicate_window: Duration,
    ) -> Result<(stream::Info, bool), async_nats::Error> {
        if let Some(info) = self.stream_for_prefix().await? {
            return Ok((info, false));
        }
        let prefix = &self.subject_prefix;
        let name: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let mut stream = self
            .jetstream
            .create_stream(stream::Config {
                name: name.to_uppercase(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window,
                ..Default::default()
            })
            .await?;
        Ok((stream.info().await?.clone(), true))
    }

    /// Flushes and closes the connection, for at most `limit`: with the server gone, both would wait for a
    /// reconnect that may never come. Everything that matters was acknowledged already.
    pub async fn close(self, limit: Duration) {
        let close = async {
            let _ = self.client.flush().await;
            let _ = self.client.drain().await;
        };
        if tokio::time::timeout(limit, close).await.is_err() {
            debug!("NATS connection not closed cleanly within {limit:?}; dropping it");
        }
    }
}

/// The client's options. `url_auth` are the credentials written in the server URLs, which the client never sees
/// (it would ignore them, and log them with the server address); credentials set on their own win, as in nats-py.
async fn connect_options(
    nats: &NatsConfig,
    url_auth: Option<UrlAuth>,
) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
        .subscription_capacity(MAX_IN_FLIGHT_LIMIT as usize)
        .connection_timeout(Duration::from_secs_f64(nats.connect_timeout_seconds))
        .max_reconnects(usize::try_from(nats.max_reconnect_attempts).ok().filter(|&n| n > 0))
        .require_tls(nats.tls_required);
    let wait = Duration::from_secs_f64(nats.reconnect_time_wait_seconds);
    // The first attempt after a disconnect goes at once; the wait separates the retries.
    options =
        options.reconnect_delay_callback(move |attempts| if attempts <= 1 { Duration::ZERO } else { wait });
    if let Some(name) = &nats.name {
        options = options.name(name);
    }
    if let Some(path) = &nats.creds_file {
        options = options.credentials_file(path).await.map_err(ConnectError::Credentials)?;
    }
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &nats.token {
        options = options.token(token.clone());
    }
    let explicit = nats.creds_file.is_some() || nats.user.is_some() || nats.token.is_some();
    match url_auth {
        Some(_) if explicit => {
            warn!("nats.servers carry credentials, but nats.creds_file, nats.user or nats.token is set and wins")
        }
        Some(UrlAuth::UserPassword { user, password }) => options = options.user_and_password(user, password),
        Some(UrlAuth::Token(token)) => options = options.token(token),
        None => {}
    }
    if let Some(ca) = &nats.tls_ca_file {
        options = options.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert_file, &nats.tls_key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    Ok(options)
}

/// What to do when no stream captures `prefix`; `check`, the start and the engine all say it.
pub fn no_stream_hint(prefix: &str) -> String {
    format!(
        "create a JetStream stream whose subjects include {prefix}.> (e.g. `nats stream add --subjects \
         '{prefix}.>'`), or set relay.ensure_stream = true (QX_RELAY__ENSURE_STREAM) for the relay to create one"
    )
}
