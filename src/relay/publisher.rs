//! Everything the relay does with NATS: connecting, publishing claimed rows with many acks in flight, telling
//! a row's fault from a broker's, and the stream checks. Knows nothing about SQL.
//!
//! Subjects and headers come from the library's [`crate::wire`], so the relay and Rust producers share one
//! wire format. The acks do not go through the JetStream context: per message it makes a reply inbox, an ack
//! channel, a permit, a boxed future and a timer, about a third of the relay's CPU per row. The relay instead
//! sends every row with a reply subject under one subscription of its own, `<inbox>.<wave>.<row>`, and reads
//! the PubAcks there, with one deadline for the whole wave.

use std::collections::HashSet;
use std::error::Error as _;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::{ConnectOptions, Message, StatusCode, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;
use uuid::Uuid;

use super::config::{NatsConfig, RelayConfig, UrlAuth, MAX_IN_FLIGHT_LIMIT};
use super::refusal::{self, Refusal};
use super::store::OutboxRow;
use crate::publisher::{NatsPublishError, PublishErrorKind};
use crate::{wire, EventHeaders, PublishError, Publisher};

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
    publisher: Publisher,
    /// Opened by the first batch; batches take turns.
    acks: Arc<Mutex<Option<AckInbox>>>,
    max_in_flight: usize,
    ack_timeout: Duration,
}

/// The subscription every PubAck of this relay arrives on.
#[derive(Debug)]
struct AckInbox {
    /// `<inbox>.`; a reply subject adds `<wave>.<row index>`.
    prefix: String,
    subscriber: Subscriber,
    /// Numbers the waves, so a late ack of an abandoned wave is not taken for a row of the current one.
    wave: u64,
}

impl AckInbox {
    async fn open(client: &async_nats::Client) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(format!("{inbox}.>")).await?;
        Ok(Self { prefix: format!("{inbox}."), subscriber, wave: 0 })
    }

    fn reply_subject(&self, index: usize) -> String {
        let mut subject = String::with_capacity(self.prefix.len() + 24);
        subject.push_str(&self.prefix);
        let _ = write!(subject, "{}.{index}", self.wave);
        subject
    }

    /// The row index an ack of the current wave answers.
    fn row_of(&self, ack: &Message) -> Option<usize> {
        row_answered(&self.prefix, self.wave, &ack.subject)
    }
}

/// The row index in `reply_subject` when it is `<prefix><wave>.<row>`.
fn row_answered(prefix: &str, wave: u64, reply_subject: &str) -> Option<usize> {
    let (ack_wave, index) = reply_subject.strip_prefix(prefix)?.split_once('.')?;
    if ack_wave.parse::<u64>().ok()? != wave {
        return None;
    }
    index.parse().ok()
}

impl RelayPublisher {
    /// Connects with the configured servers, credentials and TLS.
    ///
    /// # Errors
    /// When no server can be reached within the connect timeout, one refuses our TLS settings or credentials, or
    /// the credentials file cannot be read.
    pub async fn connect(nats: &NatsConfig, relay: &RelayConfig) -> Result<Self, ConnectError> {
        let (servers, url_auth) = nats.servers_and_url_auth().expect("validate() checks nats.servers");
        let options = connect_options(nats, url_auth).await?;
        let client =
            options.connect(servers.clone()).await.map_err(|source| ConnectError::new(&servers, source))?;
        Ok(Self::new(client, relay))
    }

    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, relay: &RelayConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new().timeout(relay.ack_timeout).build(client.clone());
        Self {
            client,
            publisher: Publisher::new(jetstream, relay.subject_prefix()),
            acks: Arc::new(Mutex::new(None)),
            max_in_flight: relay.max_in_flight as usize,
            ack_timeout: relay.ack_timeout,
        }
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
        let mut acks = self.acks.lock().await;
        let inbox = match acks.as_mut() {
            Some(inbox) => inbox,
            None => match AckInbox::open(&self.client).await {
                Ok(inbox) => acks.insert(inbox),
                Err(err) => {
                    let failure = Failure {
                        kind: FailureKind::Unavailable,
                        reason: format!("subscribing to PubAcks: {err}"),
                    };
                    return vec![Outcome::Failed(failure); rows.len()];
                }
            },
        };
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
            if !self.publish_wave(inbox, rows, &wave, &mut outcomes).await {
                *acks = None; // the subscription ended: open a new one for the next batch
                break;
            }
            for &index in &wave {
                if let (Some(key), Some(Outcome::Failed(_))) =
                    (rows[index].order_key.as_deref(), &outcomes[index])
                {
                    failed_keys.insert(key);
                }
            }
            remaining = later;
        }
        let unanswered =
            || Outcome::Failed(self.classify(&NatsPublishError::new(PublishErrorKind::BrokenPipe).into()));
        outcomes.into_iter().map(|o| o.unwrap_or_else(unanswered)).collect()
    }

    /// Sends `wave` with up to `max_in_flight` acks pending and records each row's outcome. When neither a
    /// send nor an ack has gone through for `ack_timeout`, every row still waiting or not sent yet timed out:
    /// a dead connection costs one `ack_timeout` per wave, not one per message. False when the subscription
    /// ended.
    async fn publish_wave(
        &self,
        inbox: &mut AckInbox,
        rows: &[OutboxRow],
        wave: &[usize],
        outcomes: &mut [Option<Outcome>],
    ) -> bool {
        inbox.wave += 1;
        let mut awaiting = vec![false; rows.len()];
        let mut in_flight = 0;
        let mut to_send = wave.iter().copied();
        let mut progress_at = Instant::now();
        let timed_out = loop {
            if in_flight < self.max_in_flight {
                if let Some(index) = to_send.next() {
                    let sent = tokio::time::timeout_at(
                        progress_at + self.ack_timeout,
                        self.send(inbox, index, &rows[index]),
                    );
                    match sent.await {
                        Ok(Ok(())) => {
                            awaiting[index] = true;
                            in_flight += 1;
                            progress_at = Instant::now();
                        }
                        Ok(Err(err)) => outcomes[index] = Some(Outcome::Failed(self.classify(&err))),
                        Err(_) => {
                            outcomes[index] = Some(self.timed_out());
                            break true;
                        }
                    }
                    continue;
                }
            }
            if in_flight == 0 {
                break false;
            }
            let ack = match tokio::time::timeout_at(progress_at + self.ack_timeout, inbox.subscriber.next())
                .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => return false,
                Err(_) => break true,
            };
            let Some(index) = inbox.row_of(&ack).filter(|&index| awaiting.get(index) == Some(&true)) else {
                continue;
            };
            awaiting[index] = false;
            in_flight -= 1;
            progress_at = Instant::now();
            outcomes[index] = Some(match read_ack(&ack) {
                Ok(duplicate) => Outcome::Published { duplicate },
                Err(err) => Outcome::Failed(self.classify(&err.into())),
            });
        };
        if timed_out {
            for index in to_send.chain(wave.iter().copied().filter(|&index| awaiting[index])) {
                outcomes[index] = Some(self.timed_out());
            }
        }
        true
    }

    /// Sends row `index` with its reply subject; the ack arrives in `inbox`.
    async fn send(&self, inbox: &AckInbox, index: usize, row: &OutboxRow) -> Result<(), PublishError> {
        let event_id = envelope_event_id(&row.payload);
        let headers = EventHeaders {
            event_name: row.event_name.clone(),
            event_version: row.event_version,
            event_id,
            correlation_id: row.correlation_id,
            tenant_id: row.tenant_id,
        };
        let subject = wire::subject(self.publisher.subject_prefix(), &row.event_name)?;
        // The envelope's event_id identifies the event across retries and relays; the row id is the fallback.
        let msg_id = event_id.unwrap_or(row.id);
        self.client
            .publish_with_reply_and_headers(
                subject,
                inbox.reply_subject(index),
                headers.to_header_map(msg_id),
                Bytes::copy_from_slice(row.payload.as_bytes()),
            )
            .await
            .map_err(|err| PublishError::Nats(from_core(err)))
    }

    fn timed_out(&self) -> Outcome {
        Outcome::Failed(self.classify(&NatsPublishError::new(PublishErrorKind::TimedOut).into()))
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

/// A PubAck: whether the stream already had the message, or why it refused it.
fn read_ack(ack: &Message) -> Result<bool, NatsPublishError> {
    #[derive(Deserialize)]
    struct PubAck {
        #[serde(default)]
        duplicate: bool,
        error: Option<jetstream::Error>,
    }
    if ack.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(NatsPublishError::new(PublishErrorKind::StreamNotFound));
    }
    let ack: PubAck = serde_json::from_slice(&ack.payload)
        .map_err(|err| NatsPublishError::with_source(PublishErrorKind::Other, err))?;
    let Some(error) = ack.error else {
        return Ok(ack.duplicate);
    };
    let kind = match error.error_code() {
        ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => PublishErrorKind::WrongLastMessageId,
        ErrorCode::STREAM_WRONG_LAST_SEQUENCE => PublishErrorKind::WrongLastSequence,
        _ => PublishErrorKind::Other,
    };
    Err(NatsPublishError::with_source(kind, error))
}

/// A publish the client refused to send, as the JetStream error it would have been.
fn from_core(err: async_nats::PublishError) -> NatsPublishError {
    let kind = match err.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => PublishErrorKind::MaxPayloadExceeded,
        async_nats::client::PublishErrorKind::Send => PublishErrorKind::BrokenPipe,
        async_nats::client::PublishErrorKind::InvalidSubject => PublishErrorKind::Other,
    };
    match err.source() {
        Some(cause) => NatsPublishError::with_source(kind, cause.to_string()),
        None => NatsPublishError::new(kind),
    }
}

/// The envelope's `event_id`: the string value of the top-level key `"event_id"`, found by scanning the
/// body instead of parsing it (parsing was a tenth of the relay's CPU per row). The body is the JSONB
/// column as Postgres prints it, so it is valid JSON. Ids written with escapes, which Qx never writes,
/// count as no id: the row id is the dedupe id then.
fn envelope_event_id(payload: &str) -> Option<Uuid> {
    let bytes = payload.as_bytes();
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let end = closing_quote(bytes, at + 1)?;
                let after = skip_whitespace(bytes, end + 1);
                if depth == 1 && &bytes[at + 1..end] == b"event_id" && bytes.get(after) == Some(&b':') {
                    let value = skip_whitespace(bytes, after + 1);
                    if bytes.get(value) != Some(&b'"') {
                        return None;
                    }
                    return Uuid::try_parse_ascii(&bytes[value + 1..closing_quote(bytes, value + 1)?]).ok();
                }
                at = end;
            }
            _ => {}
        }
        at += 1;
    }
    None
}

/// Where the string whose text starts at `from` ends.
fn closing_quote(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'"' => return Some(at),
            _ => at += 1,
        }
    }
    None
}

fn skip_whitespace(bytes: &[u8], from: usize) -> usize {
    from + bytes.get(from..).map_or(0, |rest| rest.iter().take_while(|b| b.is_ascii_whitespace()).count())
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
        assert_eq!(envelope_event_id(r#"{"event_id""#), None, "cut short");
    }

    #[test]
    fn only_the_top_level_event_id_counts() {
        let (id, nested) = (Uuid::new_v4(), Uuid::new_v4());
        let body = format!(
            r#"{{"payload": {{"event_id": "{nested}", "note": "a \"quoted\" }}{{ [brace", "list": ["event_id"], "path": "C:\\"}}, "kind": "event_id", "event_id": "{id}"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["event_id"], id.to_string());
        assert_eq!(envelope_event_id(&body), Some(id));
        assert_eq!(envelope_event_id(&format!(r#"{{"payload": {{"event_id": "{nested}"}}}}"#)), None);
        assert_eq!(envelope_event_id(&format!(r#"[{{"event_id": "{id}"}}]"#)), None);
        assert_eq!(envelope_event_id(&format!("{{ \"event_id\"\n :\t\"{id}\" }}")), Some(id));
    }

    #[test]
    fn every_fixture_row_yields_its_envelopes_event_id() {
        let rows = include_str!("../../tests/fixtures/qx-outbox-rows.jsonl");
        assert!(rows.lines().count() >= 5);
        for row in rows.lines() {
            let row: serde_json::Value = serde_json::from_str(row).expect("a fixture row");
            let body = row["payload"].as_str().expect("payload");
            let envelope: crate::Envelope = serde_json::from_str(body).expect("an envelope");
            assert_eq!(envelope_event_id(body), Some(envelope.event_id), "{body}");
        }
    }

    fn message(subject: &str, status: Option<StatusCode>, payload: &'static str) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn pub_acks_tell_stored_duplicate_and_refused() {
        let ack = |payload| read_ack(&message("_INBOX.x.1.0", None, payload));
        assert_eq!(ack(r#"{"stream": "S", "seq": 7}"#).ok(), Some(false));
        assert_eq!(ack(r#"{"stream": "S", "seq": 7, "duplicate": true}"#).ok(), Some(true));
        let full =
            ack(r#"{"error": {"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}}"#);
        assert_eq!(classify_nats(&full.unwrap_err(), true), FailureKind::Unavailable);
        let too_big = ack(
            r#"{"error": {"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}}"#,
        );
        assert_eq!(classify_nats(&too_big.unwrap_err(), true), FailureKind::Rejected);
        assert_eq!(ack("not json").unwrap_err().kind(), PublishErrorKind::Other);
        let no_stream = read_ack(&message("_INBOX.x.1.0", Some(StatusCode::NO_RESPONDERS), ""));
        assert_eq!(no_stream.unwrap_err().kind(), PublishErrorKind::StreamNotFound);
    }

    #[test]
    fn acks_are_matched_to_rows_of_the_current_wave_only() {
        let prefix = "_INBOX.abc.";
        assert_eq!(row_answered(prefix, 3, "_INBOX.abc.3.17"), Some(17));
        assert_eq!(row_answered(prefix, 3, "_INBOX.abc.2.17"), None, "a late ack of an abandoned wave");
        assert_eq!(row_answered(prefix, 3, "_INBOX.other.3.17"), None);
        assert_eq!(row_answered(prefix, 3, "_INBOX.abc.3"), None);
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
