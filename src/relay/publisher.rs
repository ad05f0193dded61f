//! Everything the relay does with NATS: connecting, publishing claimed rows with many acks in flight, telling
//! a row's fault from a broker's, and the stream checks. Knows nothing about SQL.
//!
//! Rows go out through the library's [`Publisher`], so the relay and Rust producers share one wire format.

use std::collections::HashSet;
use std::error::Error as _;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishAckFuture};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::ConnectOptions;
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use super::config::{NatsConfig, RelayConfig};
use super::store::OutboxRow;
use crate::publisher::{NatsPublishError, PublishErrorKind};
use crate::{EventHeaders, PublishError, Publisher};

/// What happened to one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// JetStream stored it (or had it already: `duplicate`).
    Published {
        /// The stream's dedupe window already held this `Nats-Msg-Id`.
        duplicate: bool,
    },
    /// Not sent: an earlier row with the same order key failed in this batch, and order comes first.
    HeldBack,
    /// Not published.
    Failed(Failure),
}

/// Why a row was not published, and whose fault it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Decides what happens to the row.
    pub kind: FailureKind,
    /// For `last_error` and the log.
    pub reason: String,
}

/// Whose fault a failure is; decides whether attempts are burned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The row can never be published (bad subject, too large): park it now.
    Poison,
    /// JetStream refused this message: count an attempt, retry after a backoff.
    Rejected,
    /// No stream captures the subject: not the row's fault; keep it pending.
    NoStream,
    /// The connection failed or timed out: not the row's fault; pause until NATS is back.
    Unavailable,
}

/// Why NATS could not be reached at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file could not be read.
    #[error("reading nats.creds_file")]
    Credentials(#[source] std::io::Error),
    /// No server answered.
    #[error("connecting to NATS")]
    Connect(#[from] async_nats::ConnectError),
}

/// The relay's NATS side.
#[derive(Debug, Clone)]
pub struct RelayPublisher {
    client: async_nats::Client,
    publisher: Publisher,
    max_in_flight: usize,
}

impl RelayPublisher {
    /// Connects with the configured servers, credentials and TLS.
    ///
    /// # Errors
    /// When no server can be reached within the connect timeout, or credentials cannot be read.
    pub async fn connect(nats: &NatsConfig, relay: &RelayConfig) -> Result<Self, ConnectError> {
        let client = connect_options(nats).await?.connect(nats.servers.clone()).await?;
        Ok(Self::new(client, relay))
    }

    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, relay: &RelayConfig) -> Self {
        let max_in_flight = relay.max_in_flight as usize;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(relay.ack_timeout)
            .max_ack_inflight(max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self { client, publisher: Publisher::new(jetstream, relay.subject_prefix()), max_in_flight }
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Publishes `rows` in claim order, keeping up to `max_in_flight` acks pending.
    ///
    /// Rows sharing an order key go out in waves: a row is sent only after the previous row of its key was
    /// acknowledged, and not at all once that one failed. With the default key (the row id) every row is its
    /// own key, so the whole batch is one pipelined wave.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping it abandons acks, and their rows are then sent again (dedupe absorbs that).
    pub async fn publish_batch(&self, rows: &[OutboxRow]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
        let mut remaining: Vec<usize> = (0..rows.len()).collect();
        let mut failed_keys: HashSet<&str> = HashSet::new();
        while !remaining.is_empty() {
            let mut wave = Vec::with_capacity(remaining.len());
            let mut later = Vec::new();
            let mut keys_in_wave: HashSet<&str> = HashSet::new();
            for index in remaining {
                match rows[index].order_key.as_deref() {
                    None => wave.push(index),
                    Some(key) if failed_keys.contains(key) => outcomes[index] = Some(Outcome::HeldBack),
                    Some(key) if !keys_in_wave.insert(key) => later.push(index),
                    Some(_) => wave.push(index),
                }
            }
            self.publish_wave(rows, &wave, &mut outcomes).await;
            for &index in &wave {
                if let (Some(key), Some(Outcome::Failed(_))) =
                    (rows[index].order_key.as_deref(), &outcomes[index])
                {
                    failed_keys.insert(key);
                }
            }
            remaining = later;
        }
        outcomes.into_iter().map(|o| o.expect("every row gets an outcome")).collect()
    }

    async fn publish_wave(&self, rows: &[OutboxRow], wave: &[usize], outcomes: &mut [Option<Outcome>]) {
        // Polled together, so every ack's timeout runs at once: a dead connection costs one ack_timeout per
        // wave, not one per message.
        let mut in_flight = FuturesOrdered::new();
        for &index in wave {
            // The context's semaphore also bounds acks, but it would deadlock on acks we have not awaited yet.
            if in_flight.len() >= self.max_in_flight {
                let (done, acked) = in_flight.next().await.expect("window is full");
                outcomes[done] = Some(self.resolve(acked));
            }
            match self.send(&rows[index]).await {
                Ok(ack) => in_flight.push_back(async move { (index, ack.await) }),
                Err(err) => outcomes[index] = Some(Outcome::Failed(self.classify(&err))),
            }
        }
        while let Some((index, acked)) = in_flight.next().await {
            outcomes[index] = Some(self.resolve(acked));
        }
    }

    async fn send(&self, row: &OutboxRow) -> Result<PublishAckFuture, PublishError> {
        let event_id = envelope_event_id(&row.payload);
        let headers = EventHeaders {
            event_name: row.event_name.clone(),
            event_version: row.event_version,
            event_id,
            correlation_id: row.correlation_id,
            tenant_id: row.tenant_id,
        };
        // The envelope's event_id identifies the event across retries and relays; the row id is the fallback.
        let msg_id = event_id.unwrap_or(row.id);
        self.publisher.send(&headers, msg_id, Bytes::copy_from_slice(row.payload.as_bytes())).await
    }

    fn resolve(&self, acked: Result<PublishAck, NatsPublishError>) -> Outcome {
        match acked {
            Ok(ack) => Outcome::Published { duplicate: ack.duplicate },
            Err(err) => Outcome::Failed(self.classify(&PublishError::Nats(err))),
        }
    }

    fn classify(&self, err: &PublishError) -> Failure {
        let kind = match err {
            PublishError::Subject(_) => FailureKind::Poison,
            PublishError::Nats(err) => classify_nats(err, self.is_connected()),
        };
        Failure { kind, reason: reason(err) }
    }

    /// The stream capturing `<subject_prefix>.>`, if any.
    ///
    /// # Errors
    /// When JetStream does not answer.
    pub async fn stream_for_prefix(&self) -> Result<Option<stream::Info>, async_nats::Error> {
        let subject = format!("{}.>", self.publisher.subject_prefix());
        let jetstream = self.publisher.jetstream();
        match jetstream.stream_by_subject(subject).await {
            Ok(name) => Ok(Some(jetstream.get_stream(name).await?.info().await?.clone())),
            Err(err) if err.kind() == GetStreamByNameErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Creates a stream named after the prefix capturing `<subject_prefix>.>` unless one exists.
    ///
    /// # Errors
    /// When JetStream refuses, e.g. because another stream overlaps the subjects.
    pub async fn ensure_stream(&self, duplicate_window: Duration) -> Result<stream::Info, async_nats::Error> {
        if let Some(info) = self.stream_for_prefix().await? {
            return Ok(info);
        }
        let prefix = self.publisher.subject_prefix();
        let name: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let mut stream = self
            .publisher
            .jetstream()
            .create_stream(stream::Config {
                name: name.to_uppercase(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window,
                ..Default::default()
            })
            .await?;
        Ok(stream.info().await?.clone())
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

    /// Flushes and closes the connection.
    pub async fn close(self) {
        let _ = self.client.flush().await;
        let _ = self.client.drain().await;
    }
}

/// JetStream errors about the stream's state, not the message: the stream is full (discard new: maximum
/// messages or bytes exceeded) or the server is out of storage. Every row would fail alike and later succeed.
const STREAM_STATE_ERRORS: [ErrorCode; 2] =
    [ErrorCode::STREAM_STORE_FAILED, ErrorCode::INSUFFICIENT_RESOURCES];

fn classify_nats(err: &NatsPublishError, connected: bool) -> FailureKind {
    let jetstream_error = err.source().and_then(|s| s.downcast_ref::<jetstream::Error>());
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => FailureKind::Poison,
        PublishErrorKind::StreamNotFound => FailureKind::NoStream,
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
            FailureKind::Unavailable
        }
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => FailureKind::Rejected,
        // Burning attempts here would park the whole outbox while the stream is full.
        _ if jetstream_error.is_some_and(|e| STREAM_STATE_ERRORS.contains(&e.error_code())) => {
            FailureKind::Unavailable
        }
        // Any other JetStream error response is about this message; anything else is the connection's.
        _ if connected && jetstream_error.is_some() => FailureKind::Rejected,
        _ => FailureKind::Unavailable,
    }
}

/// The text for `last_error` and the log, e.g. `jetstream publish: max payload size exceeded: Payload size limit
/// of 1048576 exceeded by message size of 1153724`. An async-nats error prints its own source, so the chain ends
/// at it; following `source()` further would repeat that text.
fn reason(err: &PublishError) -> String {
    match err.source() {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// The envelope's `event_id`, read without parsing the rest of the body.
fn envelope_event_id(payload: &str) -> Option<Uuid> {
    #[derive(Deserialize)]
    struct EventId<'a> {
        #[serde(borrow)]
        event_id: Option<std::borrow::Cow<'a, str>>,
    }
    let id = serde_json::from_str::<EventId>(payload).ok()?.event_id?;
    Uuid::parse_str(&id).ok()
}

async fn connect_options(nats: &NatsConfig) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
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
    if let Some(ca) = &nats.tls_ca_file {
        options = options.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert_file, &nats.tls_key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_comes_from_the_envelope() {
        let id = Uuid::new_v4();
        assert_eq!(envelope_event_id(&format!(r#"{{"payload": {{}}, "event_id": "{id}"}}"#)), Some(id));
        assert_eq!(envelope_event_id(r#"{"event_id": null}"#), None);
        assert_eq!(envelope_event_id(r#"{"event_id": "not-a-uuid"}"#), None);
        assert_eq!(envelope_event_id(r#""just a string""#), None);
    }

    #[test]
    fn reasons_name_each_cause_once() {
        let limit = "Payload size limit of 1048576 exceeded by message size of 1153724";
        let too_big =
            PublishError::Nats(NatsPublishError::with_source(PublishErrorKind::MaxPayloadExceeded, limit));
        assert_eq!(reason(&too_big), format!("jetstream publish: max payload size exceeded: {limit}"));
        let subject = PublishError::Subject(crate::wire::validate_event_name("a b").unwrap_err());
        assert_eq!(reason(&subject).matches("a b").count(), 1, "{}", reason(&subject));
        let timeout = PublishError::Nats(NatsPublishError::new(PublishErrorKind::TimedOut));
        assert_eq!(reason(&timeout), "jetstream publish: timed out: didn't receive ack in time");
    }

    #[test]
    fn connection_failures_burn_no_attempts() {
        let timeout = NatsPublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(classify_nats(&timeout, true), FailureKind::Unavailable);
        let no_stream = NatsPublishError::new(PublishErrorKind::StreamNotFound);
        assert_eq!(classify_nats(&no_stream, true), FailureKind::NoStream);
        let too_big = NatsPublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(classify_nats(&too_big, true), FailureKind::Poison);
    }

    #[test]
    fn a_full_stream_is_not_the_rows_fault() {
        let response = |json: &str| {
            let error: jetstream::Error = serde_json::from_str(json).expect("a JetStream error response");
            NatsPublishError::with_source(PublishErrorKind::Other, error)
        };
        let full =
            response(r#"{"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}"#);
        assert_eq!(classify_nats(&full, true), FailureKind::Unavailable);
        let no_space =
            response(r#"{"code": 503, "err_code": 10023, "description": "insufficient resources"}"#);
        assert_eq!(classify_nats(&no_space, true), FailureKind::Unavailable);
        let too_big = response(
            r#"{"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}"#,
        );
        assert_eq!(classify_nats(&too_big, true), FailureKind::Rejected);
        assert_eq!(classify_nats(&too_big, false), FailureKind::Unavailable);
    }
}
