//! qx-relay: the Rust side of Qx integration events.
//!
//! The companion library, always built and free of the daemon's dependencies:
//! - [`envelope`]: the Qx event envelope, the body of every message;
//! - [`wire`]: subjects and `qx.*` header names, written once;
//! - [`publisher`]: publish events to JetStream with the Qx headers and `Nats-Msg-Id`;
//! - [`registry`]: typed events ([`QxEvent`]) and the [`EventRegistry`] that decodes messages into them;
//! - [`consumer`]: a durable JetStream pull consumer that decodes, hands events to a handler and acks;
//! - [`dead_letter`]: what the consumer keeps of messages it gives up on, in qx-worker's `qx_dead_letters`
//!   shape (`dead_letter::PgDeadLetters` with the `dead-letters-postgres` feature);
//! - [`backoff`]: the exponential backoff with jitter used for every retry.
//!
//! With the `relay` feature (default), [`relay`] is the daemon that drains `qx_outbox_events` to JetStream.
//! Services that only need the library depend with `default-features = false`.

pub mod backoff;
pub mod consumer;
pub mod dead_letter;
pub mod envelope;
pub mod publisher;
pub mod registry;
pub mod wire;

#[cfg(feature = "relay")]
pub mod relay;

pub use consumer::{ConsumerConfig, EventConsumer, EventMessage, HandlerError, RunConfig};
pub use envelope::Envelope;
pub use publisher::{PublishError, Publisher};
pub use registry::{DecodedEvent, EventRegistry, QxEvent};
pub use wire::EventHeaders;
