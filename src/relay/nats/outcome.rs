//! What became of each row sent to JetStream, and whose fault a failure is: read from PubAcks and client
//! errors, with no I/O. The engine decides what each verdict means for the row.

use std::borrow::Cow;

use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Message, StatusCode};
use serde::Deserialize;

use crate::wire::SubjectError;

/// What happened to one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// JetStream stored it (or had it already: `duplicate`).
    Published {
        /// The stream's dedupe window already held this `Nats-Msg-Id`.
        duplicate: bool,
    },
    /// JetStream answered "duplicate", but the message it holds under this `Nats-Msg-Id` has other content:
    /// another row carries the same `event_id` (a producer bug), and this row's content is not in the stream.
    IdTaken,
    /// Not sent: an earlier row with the same order key failed in this batch, and order comes first.
    Deferred,
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
    /// The connection failed or timed out, or the stream has no room: not the row's fault; pause until NATS
    /// takes messages again.
    Unavailable,
}

/// JetStream errors about the stream's state, not the message: the stream is full (discard new: maximum
/// messages or bytes exceeded) or the server is out of storage. Every row would fail alike and later succeed.
const STREAM_STATE_ERRORS: [ErrorCode; 2] =
    [ErrorCode::STREAM_STORE_FAILED, ErrorCode::INSUFFICIENT_RESOURCES];

impl Failure {
    fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self { kind, reason: reason.into() }
    }

    /// The event name cannot be a subject.
    pub(super) fn invalid_subject(err: &SubjectError) -> Self {
        Self::new(FailureKind::Poison, format!("invalid subject: {err}"))
    }

    /// The client refused to send the message.
    pub(super) fn not_sent(err: &async_nats::PublishError) -> Self {
        use async_nats::client::PublishErrorKind;
        match err.kind() {
            PublishErrorKind::MaxPayloadExceeded => {
                Self::new(FailureKind::Poison, format!("larger than the server's max_payload: {err}"))
            }
            PublishErrorKind::InvalidSubject => {
                Self::new(FailureKind::Poison, format!("invalid subject: {err}"))
            }
            PublishErrorKind::Send => Self::new(FailureKind::Unavailable, format!("not sent: {err}")),
        }
    }

    /// Neither a send nor a PubAck went through for `ack_timeout`.
    pub(super) fn timed_out() -> Self {
        Self::new(FailureKind::Unavailable, "no PubAck within ack_timeout")
    }

    /// The connection's PubAck subscription ended before the row's PubAck came.
    pub(super) fn unanswered() -> Self {
        Self::new(FailureKind::Unavailable, "the connection was lost before the PubAck")
    }

    /// The PubAck subscription could not be opened.
    pub(super) fn no_ack_inbox(err: &async_nats::SubscribeError) -> Self {
        Self::new(FailureKind::Unavailable, format!("subscribing to PubAcks: {err}"))
    }

    /// Publishes got no responder for a reason other than a missing stream: JetStream missing or not
    /// answering, or the stream without a leader.
    pub(super) fn unanswered_by_jetstream(reason: impl Into<String>) -> Self {
        Self::new(FailureKind::Unavailable, reason)
    }

    /// An error answer of JetStream for this message; `connected` tells a refusal from a connection's end.
    fn refused(error: &jetstream::Error, connected: bool) -> Self {
        let code = error.error_code();
        if STREAM_STATE_ERRORS.contains(&code) {
            // Burning attempts here would park the whole outbox while the stream is full.
            return Self::new(FailureKind::Unavailable, format!("the stream has no room: {error}"));
        }
        let kind = if connected { FailureKind::Rejected } else { FailureKind::Unavailable };
        Self::new(kind, format!("JetStream refused it: {error}"))
    }
}

/// Where a stream holds a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredAt {
    pub(super) stream: String,
    pub(super) seq: u64,
}

/// A PubAck, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ack {
    /// Stored now.
    Stored,
    /// Already held (a `Nats-Msg-Id` within the duplicate window), where.
    Duplicate(StoredAt),
    /// Not stored.
    Failed(Failure),
}

/// Reads a PubAck (or the server's "no responders" status in its place); `connected` is asked only of a
/// refusal.
pub(super) fn read_ack(ack: &Message, connected: impl FnOnce() -> bool) -> Ack {
    #[derive(Deserialize)]
    struct PubAck<'a> {
        #[serde(default)]
        duplicate: bool,
        /// Borrowed: only a duplicate's is kept.
        #[serde(default, borrow)]
        stream: Cow<'a, str>,
        #[serde(default)]
        seq: u64,
        error: Option<jetstream::Error>,
    }
    if ack.status == Some(StatusCode::NO_RESPONDERS) {
        return Ack::Failed(Failure::new(FailureKind::NoStream, "no stream captures the subject"));
    }
    if plainly_stored(&ack.payload) {
        return Ack::Stored;
    }
    match serde_json::from_slice::<PubAck>(&ack.payload) {
        Ok(PubAck { error: Some(error), .. }) => Ack::Failed(Failure::refused(&error, connected())),
        Ok(PubAck { duplicate: true, stream, seq, .. }) => {
            Ack::Duplicate(StoredAt { stream: stream.into_owned(), seq })
        }
        Ok(_) => Ack::Stored,
        Err(err) => {
            Ack::Failed(Failure::new(FailureKind::Unavailable, format!("an unreadable PubAck: {err}")))
        }
    }
}

/// Whether `payload` is the PubAck of a newly stored message exactly as nats-server writes it,
/// `{"stream":"S", "seq":7}`: nearly every ack is one, and serde took six times as long to read it. Anything
/// else (a duplicate, an error, a domain, other spacing or key order) is left to serde.
fn plainly_stored(payload: &[u8]) -> bool {
    let Some(rest) = payload.strip_prefix(br#"{"stream":""#) else { return false };
    let Some(end) = memchr::memchr2(b'"', b'\\', rest) else { return false };
    if rest[end] != b'"' {
        return false;
    }
    let rest = &rest[end + 1..];
    let rest = rest.strip_prefix(b",").map(|rest| rest.strip_prefix(b" ").unwrap_or(rest));
    let seq = rest.and_then(|rest| rest.strip_prefix(br#""seq":"#)?.strip_suffix(b"}"));
    seq.is_some_and(|seq| !seq.is_empty() && seq.iter().all(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn message(status: Option<StatusCode>, payload: &'static str) -> Message {
        Message {
            subject: "_INBOX.x.1.0".into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    fn kind(ack: Ack) -> Option<FailureKind> {
        match ack {
            Ack::Failed(failure) => Some(failure.kind),
            _ => None,
        }
    }

    #[test]
    fn pub_acks_tell_stored_duplicate_and_refused() {
        let ack = |payload| read_ack(&message(None, payload), || true);
        assert_eq!(ack(r#"{"stream": "S", "seq": 7}"#), Ack::Stored);
        let duplicate = ack(r#"{"stream": "S", "seq": 7, "duplicate": true}"#);
        assert_eq!(duplicate, Ack::Duplicate(StoredAt { stream: "S".into(), seq: 7 }));
        let too_big = ack(
            r#"{"error": {"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}}"#,
        );
        assert_eq!(kind(too_big), Some(FailureKind::Rejected));
        assert_eq!(kind(ack("not json")), Some(FailureKind::Unavailable));
        assert_eq!(
            kind(read_ack(&message(Some(StatusCode::NO_RESPONDERS), ""), || true)),
            Some(FailureKind::NoStream)
        );
    }

    #[test]
    fn pub_acks_as_nats_server_writes_them() {
        let ack = |payload| read_ack(&message(None, payload), || true);
        for stored in [r#"{"stream":"CGBENCH", "seq":20001}"#, r#"{"stream":"S","seq":7}"#] {
            assert!(plainly_stored(stored.as_bytes()), "{stored}");
            assert_eq!(ack(stored), Ack::Stored);
        }
        let duplicate = r#"{"stream":"CGBENCH", "seq":20001,"duplicate": true}"#;
        assert!(!plainly_stored(duplicate.as_bytes()));
        assert_eq!(ack(duplicate), Ack::Duplicate(StoredAt { stream: "CGBENCH".into(), seq: 20001 }));
        let domain = r#"{"stream":"S", "domain":"hub", "seq":7}"#;
        assert!(!plainly_stored(domain.as_bytes()));
        assert_eq!(ack(domain), Ack::Stored);
        let escaped = r#"{"stream":"S\"x", "seq":7}"#;
        assert!(!plainly_stored(escaped.as_bytes()));
        assert_eq!(ack(escaped), Ack::Stored);
        for other in [r#"{"stream":"S", "seq":}"#, r#"{"stream":"S"", "seq":7}"#, r#"{"stream":"S", "seq":7"#]
        {
            assert!(!plainly_stored(other.as_bytes()), "{other}");
            assert_eq!(kind(ack(other)), Some(FailureKind::Unavailable), "{other}");
        }
    }

    #[test]
    fn a_full_stream_is_not_the_rows_fault_and_says_so() {
        let full = |connected| {
            let ack =
                r#"{"error": {"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}}"#;
            read_ack(&message(None, ack), || connected)
        };
        let Ack::Failed(failure) = full(true) else { panic!("a refusal") };
        assert_eq!(failure.kind, FailureKind::Unavailable);
        assert!(
            failure.reason.starts_with("the stream has no room: maximum messages exceeded"),
            "{}",
            failure.reason
        );
        let no_space =
            r#"{"error": {"code": 503, "err_code": 10023, "description": "insufficient resources"}}"#;
        assert_eq!(kind(read_ack(&message(None, no_space), || true)), Some(FailureKind::Unavailable));
    }

    #[test]
    fn a_refusal_after_the_connection_ended_burns_no_attempt() {
        let refusal = r#"{"error": {"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}}"#;
        assert_eq!(kind(read_ack(&message(None, refusal), || false)), Some(FailureKind::Unavailable));
    }

    #[test]
    fn connection_failures_burn_no_attempts() {
        assert_eq!(Failure::timed_out().kind, FailureKind::Unavailable);
        assert_eq!(Failure::unanswered().kind, FailureKind::Unavailable);
        let subject = Failure::invalid_subject(&crate::wire::validate_event_name("a b").unwrap_err());
        assert_eq!(subject.kind, FailureKind::Poison);
        assert_eq!(subject.reason.matches("a b").count(), 1, "{}", subject.reason);
    }
}
