//! Publishing Qx events to JetStream: the subject and header rules of [`crate::wire`], `Nats-Msg-Id` for
//! dedupe, and acks that can be awaited later so many publishes stay in flight.
//!
//! Rust producers use it directly; the relay builds its messages from the same [`crate::wire`]. Knows nothing
//! about SQL.

use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use bytes::Bytes;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::wire::{self, EventHeaders, SubjectError};

pub use async_nats::jetstream::context::{PublishError as NatsPublishError, PublishErrorKind};

/// Why an event was not sent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event name cannot be a subject; retrying never helps.
    #[error("invalid subject")]
    Subject(#[from] SubjectError),
    /// NATS refused or did not confirm the message.
    #[error("jetstream publish")]
    Nats(#[from] NatsPublishError),
}

/// Publishes Qx events on `<subject_prefix>.<event_name>` with the Qx headers.
///
/// ```no_run
/// # async fn demo(envelope: qx_relay::Envelope) -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let publisher = qx_relay::Publisher::new(async_nats::jetstream::new(client), "billing");
/// publisher.publish(&envelope).await?; // waits for the stream's PubAck
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
    subject_prefix: String,
}

impl Publisher {
    /// A publisher for one deployment's subject prefix (typically the service name).
    pub fn new(jetstream: jetstream::Context, subject_prefix: impl Into<String>) -> Self {
        Self { jetstream, subject_prefix: subject_prefix.into() }
    }

    /// The prefix every subject starts with.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The JetStream context messages go through.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Sends `body` as the event described by `headers`, deduplicated by `msg_id`, and returns at once with a
    /// future for the PubAck, so callers can keep many publishes in flight.
    ///
    /// # Errors
    /// An invalid subject, a body over the server's `max_payload`, or a connection that cannot take the message.
    pub async fn send(
        &self,
        headers: &EventHeaders,
        msg_id: Uuid,
        body: Bytes,
    ) -> Result<PublishAckFuture, PublishError> {
        let subject = wire::subject(&self.subject_prefix, &headers.event_name)?;
        let ack = self.jetstream.publish_with_headers(subject, headers.to_header_map(msg_id), body).await?;
        Ok(ack)
    }

    /// Publishes an envelope the way the relay publishes its outbox row, and waits for the PubAck.
    ///
    /// # Errors
    /// As [`Publisher::send`], plus a missing stream, a timeout or a rejection by the stream.
    pub async fn publish(&self, envelope: &Envelope) -> Result<PublishAck, PublishError> {
        let headers = EventHeaders {
            event_name: envelope.event_name.clone(),
            event_version: envelope.event_version,
            event_id: Some(envelope.event_id),
            correlation_id: envelope.correlation_id,
            tenant_id: envelope.tenant_id,
        };
        let ack = self.send(&headers, envelope.event_id, envelope.to_json().into()).await?;
        Ok(ack.await?)
    }
}
