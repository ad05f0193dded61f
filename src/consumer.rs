//! Consuming Qx events from JetStream: a durable pull consumer with explicit acks, each message decoded by
//! an [`EventRegistry`], and [`EventConsumer::run`] to drive a handler with bounded concurrency, retry
//! backoff, optional dead letters and a clean stop.
//!
//! Owns the consumer's JetStream settings and what happens to a message after its handler; knows nothing
//! about SQL or the relay.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesError, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, StreamError};
use async_nats::jetstream::stream::ConsumerError as NatsConsumerError;
use async_nats::jetstream::{self, AckKind};
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn, Instrument};

use crate::backoff::Backoff;
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::registry::{DecodeError, DecodedEvent, EventRegistry};
use crate::wire::EventHeaders;

/// Default [`ConsumerConfig::batch_size`].
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Default [`ConsumerConfig::expires`].
pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(30);
/// Default [`ConsumerConfig::max_deliver`].
pub const DEFAULT_MAX_DELIVER: i64 = 10;
/// Default [`ConsumerConfig::ack_wait`].
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default [`RunConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Default [`RunConfig::retry_delay`].
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Default [`RunConfig::max_retry_delay`].
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The idle heartbeat asked of the server, lowered to half of a shorter `expires` as the server requires.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(15);
/// Pause after a receive error the pull stream recovers from, so a broken connection is not spun on.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The durable JetStream consumer to create, or to bind to when it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// The stream holding the events, e.g. the one the relay publishes into.
    pub stream: String,
    /// The durable consumer's name; instances sharing it share the work.
    pub durable_name: String,
    /// Subjects to receive, e.g. `billing.>` for everything the `billing` relay publishes.
    pub filter_subject: String,
    /// Messages asked for per pull request. The next is asked for when half a batch is left, so up to one and
    /// a half batches may wait in memory for a handler while their `ack_wait` runs.
    pub batch_size: usize,
    /// How long one pull request waits on the server for messages; at least one second.
    pub expires: Duration,
    /// Deliveries of one message before JetStream gives up on it; `-1` for no limit.
    pub max_deliver: i64,
    /// How long JetStream waits for an ack before delivering the message again.
    pub ack_wait: Duration,
}

impl ConsumerConfig {
    /// A consumer with the `DEFAULT_*` settings.
    pub fn new(
        stream: impl Into<String>,
        durable_name: impl Into<String>,
        filter_subject: impl Into<String>,
    ) -> Self {
        Self {
            stream: stream.into(),
            durable_name: durable_name.into(),
            filter_subject: filter_subject.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            expires: DEFAULT_EXPIRES,
            max_deliver: DEFAULT_MAX_DELIVER,
            ack_wait: DEFAULT_ACK_WAIT,
        }
    }

    fn validate(&self) -> Result<(), ConsumerError> {
        let invalid = |key, reason| Err(ConsumerError::Invalid { key, reason });
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1");
        }
        if self.expires < Duration::from_secs(1) {
            return invalid("expires", "must be at least 1s");
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            return invalid("max_deliver", "must be at least 1, or -1 for no limit");
        }
        if self.ack_wait.is_zero() {
            return invalid("ack_wait", "must be positive");
        }
        Ok(())
    }
}

/// What [`EventConsumer::run`] does with a message that does not decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UndecodablePolicy {
    /// Terminate it: JetStream never redelivers it (and emits a `MSG_TERMINATED` advisory).
    #[default]
    Term,
    /// Nak it with the retry backoff, e.g. while a newer deployment that knows the event rolls out.
    Retry,
}

/// How [`EventConsumer::run`] drives its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunConfig {
    /// Handlers running at once; no further message is taken while all are busy.
    pub max_in_flight: usize,
    /// Redelivery delay after the first failed delivery; doubles with each further delivery.
    pub retry_delay: Duration,
    /// Ceiling of the redelivery delay.
    pub max_retry_delay: Duration,
    /// What happens to messages that do not decode.
    pub on_undecodable: UndecodablePolicy,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            retry_delay: DEFAULT_RETRY_DELAY,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            on_undecodable: UndecodablePolicy::default(),
        }
    }
}

impl RunConfig {
    /// `retry_delay`, doubled for each delivery after the first, capped at `max_retry_delay`.
    fn backoff(&self, delivered: i64) -> Duration {
        Backoff::new(self.retry_delay, self.max_retry_delay)
            .delay(u32::try_from(delivered).unwrap_or(u32::MAX))
    }
}

/// Why the consumer could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// A setting is out of range; nothing was sent to the server.
    #[error("invalid consumer setting {key}: {reason}")]
    Invalid {
        /// The field of [`ConsumerConfig`] or [`RunConfig`].
        key: &'static str,
        /// What it must be.
        reason: &'static str,
    },
    /// The server refused to create or update the consumer, or the stream does not exist.
    #[error("creating or binding consumer {durable_name} on stream {stream}")]
    Bind {
        /// [`ConsumerConfig::stream`].
        stream: String,
        /// [`ConsumerConfig::durable_name`].
        durable_name: String,
        /// The server's or the connection's error.
        #[source]
        source: NatsConsumerError,
    },
    /// The pull subscription could not start.
    #[error("starting to pull messages")]
    Subscribe(#[source] StreamError),
    /// Pulling failed. Missed heartbeats and failed pull requests pass once NATS is back; a deleted consumer,
    /// a push consumer or a request over the consumer's limits end the stream.
    #[error("receiving messages")]
    Receive(#[source] MessagesError),
    /// A message came without JetStream's ack subject, so it cannot be settled.
    #[error("reading a message's delivery info")]
    DeliveryInfo(#[source] async_nats::Error),
    /// The message stream ended: the connection was closed.
    #[error("message stream ended")]
    Closed,
}

impl ConsumerError {
    /// Whether pulling can go on after this error.
    fn is_transient(&self) -> bool {
        match self {
            Self::Receive(err) => !matches!(
                err.kind(),
                MessagesErrorKind::ConsumerDeleted
                    | MessagesErrorKind::PushBasedConsumer
                    | MessagesErrorKind::RequestLimitExceeded
            ),
            Self::DeliveryInfo(_) => true,
            Self::Invalid { .. } | Self::Bind { .. } | Self::Subscribe(_) | Self::Closed => false,
        }
    }
}

/// Why an ack, nak or term was not sent. JetStream then redelivers the message after `ack_wait`.
#[derive(Debug, thiserror::Error)]
#[error("sending {kind} to JetStream")]
pub struct AckError {
    kind: &'static str,
    #[source]
    source: async_nats::Error,
}

/// How a handler failed, which decides what happens to the message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth another try later (a dependency is down): nak with backoff, until `max_deliver` is reached (then
    /// dead-letter, with dead letters).
    #[error("handler failed, will retry")]
    Retry(#[source] Box<dyn StdError + Send + Sync>),
    /// Will fail every time (invalid data): terminate (ack, with dead letters), JetStream never redelivers it.
    #[error("handler failed permanently")]
    Permanent(#[source] Box<dyn StdError + Send + Sync>),
}

impl HandlerError {
    /// A [`HandlerError::Retry`] from any error or message.
    pub fn retry(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::Retry(cause.into())
    }

    /// A [`HandlerError::Permanent`] from any error or message.
    pub fn permanent(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::Permanent(cause.into())
    }
}

/// One delivery of a JetStream message: its delivery count, and the means to settle it.
#[derive(Debug, Clone)]
pub struct Delivery {
    message: jetstream::Message,
    delivered: i64,
}

impl Delivery {
    fn new(message: jetstream::Message) -> Result<Self, ConsumerError> {
        let delivered = message.info().map_err(ConsumerError::DeliveryInfo)?.delivered;
        Ok(Self { message, delivered })
    }

    /// How many times JetStream has delivered this message, this time included (1 on the first).
    pub fn delivered(&self) -> i64 {
        self.delivered
    }

    /// The raw message: subject, headers, body and stream metadata.
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }

    /// Marks the message handled.
    ///
    /// # Errors
    /// When the ack cannot be sent; see [`AckError`].
    pub async fn ack(&self) -> Result<(), AckError> {
        self.send("ack", AckKind::Ack).await
    }

    /// Asks for redelivery, after `delay` if given, else at once.
    ///
    /// # Errors
    /// When the nak cannot be sent; see [`AckError`].
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), AckError> {
        self.send("nak", AckKind::Nak(delay)).await
    }

    /// Stops redelivery without marking the message handled.
    ///
    /// # Errors
    /// When the term cannot be sent; see [`AckError`].
    pub async fn term(&self) -> Result<(), AckError> {
        self.send("term", AckKind::Term).await
    }

    async fn send(&self, kind: &'static str, ack: AckKind) -> Result<(), AckError> {
        self.message.ack_with(ack).await.map_err(|source| AckError { kind, source })
    }
}

/// A message decoded into its registered event type.
#[derive(Debug)]
pub struct EventMessage {
    event: DecodedEvent,
    delivery: Delivery,
}

impl EventMessage {
    /// The typed event and its envelope.
    pub fn event(&self) -> &DecodedEvent {
        &self.event
    }

    /// Takes the typed event, e.g. to [`DecodedEvent::downcast`] it.
    pub fn into_event(self) -> DecodedEvent {
        self.event
    }

    /// The `qx.*` headers, with version and event id from the envelope where the producer left them out (the
    /// Python relay sends only the name, correlation and tenant); `None` when the message has no
    /// `qx.event_name`. Tenant and correlation are the headers', as Python workers read them.
    pub fn headers(&self) -> Option<&EventHeaders> {
        self.event.headers()
    }

    /// The delivery count, ack, nak and term.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }
}

/// A message that did not decode, still to be settled.
#[derive(Debug)]
pub struct UndecodableMessage {
    error: DecodeError,
    delivery: Delivery,
}

impl UndecodableMessage {
    /// Why it did not decode.
    pub fn error(&self) -> &DecodeError {
        &self.error
    }

    /// The delivery count, ack, nak and term.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }
}

/// What [`Messages`] yields: every message must be settled, decodable or not.
#[derive(Debug)]
pub enum Received {
    /// Decoded into a registered type.
    Event(EventMessage),
    /// Unknown event, not an envelope, or a payload the registered type rejects.
    Undecodable(UndecodableMessage),
}

impl Received {
    /// The delivery of either kind of message.
    pub fn delivery(&self) -> &Delivery {
        match self {
            Self::Event(message) => &message.delivery,
            Self::Undecodable(message) => &message.delivery,
        }
    }
}

/// The messages of an [`EventConsumer`], decoded, in delivery order. Dropping it stops pulling; messages
/// pulled but not settled come back after `ack_wait`.
///
/// # Cancel safety
/// `next()` is cancel safe: a message is taken from the stream only when it is returned.
pub struct Messages {
    inner: pull::Stream,
    registry: Arc<EventRegistry>,
}

impl Stream for Messages {
    type Item = Result<Received, ConsumerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.inner
            .poll_next_unpin(cx)
            .map(|next| next.map(|message| receive(&this.registry, message.map_err(ConsumerError::Receive)?)))
    }
}

fn receive(registry: &EventRegistry, message: jetstream::Message) -> Result<Received, ConsumerError> {
    let delivery = Delivery::new(message)?;
    Ok(match registry.decode(delivery.message.headers.as_ref(), &delivery.message.payload) {
        Ok(event) => Received::Event(EventMessage { event, delivery }),
        Err(error) => Received::Undecodable(UndecodableMessage { error, delivery }),
    })
}

/// A durable JetStream pull consumer of Qx events.
///
/// ```no_run
/// use qx_relay::consumer::{ConsumerConfig, EventConsumer, HandlerError, RunConfig};
/// use qx_relay::registry::{EventRegistry, QxEvent};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { order_id: uuid::Uuid, amount_cents: i64 }
/// impl QxEvent for OrderPlaced { const NAME: &'static str = "order.placed"; const VERSION: i32 = 1; }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let mut registry = EventRegistry::new();
/// registry.register::<OrderPlaced>()?;
/// let config = ConsumerConfig::new("BILLING", "shipping", "billing.>");
/// let consumer = EventConsumer::bind(&async_nats::jetstream::new(client), config, registry).await?;
///
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// consumer
///     .run(RunConfig::default(), shutdown, |message| async move {
///         let Some(order) = message.event().downcast_ref::<OrderPlaced>() else { return Ok(()) };
///         println!("order {} for {} cents", order.order_id, order.amount_cents);
///         Ok::<(), HandlerError>(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventConsumer {
    consumer: PullConsumer,
    registry: Arc<EventRegistry>,
    config: ConsumerConfig,
    // Kept for the dead-letter notifications, which go through JetStream as qx-worker's do.
    jetstream: jetstream::Context,
    dead_letters: Option<Arc<dyn DeadLetters>>,
}

impl fmt::Debug for EventConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventConsumer")
            .field("config", &self.config)
            .field("registry", &self.registry)
            .field("dead_letters", &self.dead_letters.is_some())
            .finish_non_exhaustive()
    }
}

impl EventConsumer {
    /// Creates the durable consumer, or binds to it when it exists (updating it to `config` where JetStream
    /// allows), with explicit acks.
    ///
    /// # Errors
    /// [`ConsumerError::Invalid`] before any I/O; [`ConsumerError::Bind`] when the stream does not exist, the
    /// server refuses the settings (e.g. a change it cannot apply to an existing consumer), or NATS is down.
    pub async fn bind(
        jetstream: &jetstream::Context,
        config: ConsumerConfig,
        registry: EventRegistry,
    ) -> Result<Self, ConsumerError> {
        config.validate()?;
        let settings = pull::Config {
            durable_name: Some(config.durable_name.clone()),
            filter_subject: config.filter_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            ..Default::default()
        };
        let consumer =
            jetstream.create_consumer_on_stream(settings, &config.stream).await.map_err(|source| {
                ConsumerError::Bind {
                    stream: config.stream.clone(),
                    durable_name: config.durable_name.clone(),
                    source,
                }
            })?;
        Ok(Self {
            consumer,
            registry: Arc::new(registry),
            config,
            jetstream: jetstream.clone(),
            dead_letters: None,
        })
    }

    /// Dead-letters messages as qx-worker does, for `qx dlq list` and `qx dlq replay`.
    ///
    /// In [`EventConsumer::run`], a message that fails with [`HandlerError::Retry`] (or does not decode, under
    /// [`UndecodablePolicy::Retry`]) on its last delivery (`max_deliver`) is stored in `store` as a
    /// [`DeadLetter`], then announced on `qx_dlq.<event_name>` through JetStream (best effort: the row is the
    /// record), then acked. A [`HandlerError::Permanent`] failure is acked without a dead letter, as qx-worker
    /// drops it. A letter `store` refuses is logged and nak'd, which JetStream does not redeliver past
    /// `max_deliver`.
    ///
    /// ```no_run
    /// # use qx_relay::dead_letter::{DeadLetter, DeadLetters, StoreError};
    /// # struct MyStore;
    /// # impl DeadLetters for MyStore {
    /// #     fn store<'a>(&'a self, _: &'a DeadLetter) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// # async fn demo(jetstream: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
    /// use qx_relay::{ConsumerConfig, EventConsumer, EventRegistry};
    ///
    /// let config = ConsumerConfig::new("BILLING", "shipping", "billing.>");
    /// let consumer = EventConsumer::bind(&jetstream, config, EventRegistry::new())
    ///     .await?
    ///     .with_dead_letters(MyStore); // or PgDeadLetters (feature `dead-letters-postgres`)
    /// # Ok(()) }
    /// ```
    pub fn with_dead_letters(mut self, store: impl DeadLetters) -> Self {
        self.dead_letters = Some(Arc::new(store));
        self
    }

    /// The settings this consumer was bound with.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Starts pulling: the decoded messages, to settle one by one.
    ///
    /// # Errors
    /// [`ConsumerError::Subscribe`] when the pull subscription cannot start.
    pub async fn messages(&self) -> Result<Messages, ConsumerError> {
        let inner = self
            .consumer
            .stream()
            .max_messages_per_batch(self.config.batch_size)
            .expires(self.config.expires)
            // Heartbeats reveal a dead connection; the server refuses one over half the expiry.
            .heartbeat(IDLE_HEARTBEAT.min(self.config.expires / 2))
            .messages()
            .await
            .map_err(ConsumerError::Subscribe)?;
        Ok(Messages { inner, registry: self.registry.clone() })
    }

    /// Hands each decoded message to `handler`, at most `options.max_in_flight` at once, and settles it by
    /// the outcome: ack on `Ok`, nak with backoff on [`HandlerError::Retry`], term on
    /// [`HandlerError::Permanent`] ([`EventConsumer::with_dead_letters`] changes the last two as qx-worker
    /// does). Undecodable messages never reach the handler; `options.on_undecodable` settles them.
    ///
    /// Returns `Ok` once `cancel` fires and the handlers in flight have finished and been settled. Messages
    /// pulled but not yet handled, and those of a panicking handler, come back after `ack_wait`. Leave
    /// settling to `run`: the handler's result is the verdict.
    ///
    /// # Errors
    /// [`ConsumerError::Invalid`] for `options.max_in_flight == 0`; otherwise only errors pulling cannot
    /// recover from (the consumer was deleted, the connection closed). Transient ones are logged and waited
    /// out.
    #[tracing::instrument(
        name = "consumer",
        skip_all,
        fields(stream = %self.config.stream, durable = %self.config.durable_name)
    )]
    pub async fn run<H, F>(
        &self,
        options: RunConfig,
        cancel: CancellationToken,
        handler: H,
    ) -> Result<(), ConsumerError>
    where
        H: Fn(EventMessage) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        if options.max_in_flight == 0 {
            return Err(ConsumerError::Invalid { key: "max_in_flight", reason: "must be at least 1" });
        }
        let mut messages = self.messages().await?;
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(options.max_in_flight));
        let handlers = TaskTracker::new();
        let settler = Arc::new(Settler {
            options,
            max_deliver: self.config.max_deliver,
            dead_letters: self.dead_letters.clone().map(|store| (store, self.jetstream.clone())),
        });
        let result = loop {
            // A slot before the next message: while all handlers are busy the pull stream is not polled, so
            // it asks the server for nothing more than the batch it holds.
            let slot = tokio::select! {
                biased;
                () = cancel.cancelled() => break Ok(()),
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => break Ok(()),
                next = messages.next() => next,
            };
            match next {
                Some(Ok(Received::Event(message))) => {
                    let (handler, settler) = (handler.clone(), settler.clone());
                    let delivery = message.delivery.clone();
                    let task = async move {
                        let action = match handler(message).await {
                            Ok(()) => Action::Ack,
                            Err(err @ HandlerError::Retry(_)) => Action::Retry(Box::new(err)),
                            // With dead letters, a permanent failure is acked as qx-worker acks it.
                            Err(err @ HandlerError::Permanent(_)) if settler.dead_letters.is_some() => {
                                Action::Discard(Box::new(err))
                            }
                            Err(err @ HandlerError::Permanent(_)) => Action::Term(Box::new(err)),
                        };
                        settler.settle(&delivery, action).await;
                        drop(slot);
                    };
                    handlers.spawn(task.in_current_span());
                }
                Some(Ok(Received::Undecodable(UndecodableMessage { error, delivery }))) => {
                    let action = match options.on_undecodable {
                        UndecodablePolicy::Term => Action::Term(Box::new(error)),
                        UndecodablePolicy::Retry => Action::Retry(Box::new(error)),
                    };
                    // In a task like a handler's: on the last delivery, settling may write a dead letter.
                    let settler = settler.clone();
                    let task = async move {
                        settler.settle(&delivery, action).await;
                        drop(slot);
                    };
                    handlers.spawn(task.in_current_span());
                }
                Some(Err(err)) if err.is_transient() => {
                    let pause = RECEIVE_ERROR_PAUSE;
                    warn!(error = &err as &dyn StdError, ?pause, "receiving messages failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => break Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                Some(Err(err)) => break Err(err),
                None => break Err(ConsumerError::Closed),
            }
        };
        // Stop pulling before waiting: nothing new is taken while the handlers in flight finish.
        drop(messages);
        handlers.close();
        handlers.wait().await;
        result
    }
}

/// How a message is settled, with the error that decided it.
enum Action {
    Ack,
    Retry(Box<dyn StdError + Send + Sync>),
    Term(Box<dyn StdError + Send + Sync>),
    /// Failed for good, acked without a dead letter.
    Discard(Box<dyn StdError + Send + Sync>),
}

/// What settling a message takes, shared by the handler tasks.
struct Settler {
    options: RunConfig,
    max_deliver: i64,
    dead_letters: Option<(Arc<dyn DeadLetters>, jetstream::Context)>,
}

impl Settler {
    async fn settle(&self, delivery: &Delivery, action: Action) {
        let (subject, delivered) = (delivery.message.subject.as_str(), delivery.delivered);
        // JetStream delivers a message at most `max_deliver` times; -1 is no limit.
        let last = self.max_deliver > 0 && delivered >= self.max_deliver;
        let sent = match action {
            Action::Ack => delivery.ack().await,
            Action::Retry(err) => match &self.dead_letters {
                Some((store, jetstream)) if last => bury(delivery, &*err, &**store, jetstream).await,
                _ => {
                    let retry_in = self.options.backoff(delivered);
                    if last {
                        error!(
                            error = &*err as &dyn StdError,
                            subject,
                            delivered,
                            "failed on the last delivery; JetStream will not redeliver it"
                        );
                    } else {
                        warn!(
                            error = &*err as &dyn StdError,
                            subject,
                            delivered,
                            ?retry_in,
                            "failed; to be redelivered"
                        );
                    }
                    delivery.nak(Some(retry_in)).await
                }
            },
            Action::Term(err) => {
                error!(error = &*err as &dyn StdError, subject, delivered, "failed for good; terminated");
                delivery.term().await
            }
            Action::Discard(err) => {
                error!(
                    error = &*err as &dyn StdError,
                    subject, delivered, "failed for good; acked, no dead letter"
                );
                delivery.ack().await
            }
        };
        if let Err(err) = sent {
            warn!(
                error = &err as &dyn StdError,
                subject, "not settled; JetStream redelivers it after ack_wait"
            );
        }
    }
}

/// Moves a message that failed on its last delivery to the dead letters as qx-worker does: store, notify, ack.
async fn bury(
    delivery: &Delivery,
    err: &(dyn StdError + Send + Sync + 'static),
    store: &dyn DeadLetters,
    jetstream: &jetstream::Context,
) -> Result<(), AckError> {
    let (subject, delivered) = (delivery.message.subject.as_str(), delivery.delivered);
    let failure = failure_text(err);
    let letter = DeadLetter::new(&delivery.message, delivered, &failure);
    if let Err(store_err) = store.store(&letter).await {
        error!(
            error = &*store_err as &dyn StdError,
            failure, subject, delivered, "failed on the last delivery, and its dead letter was not stored"
        );
        // Past max_deliver JetStream does not redeliver it: it stays in the stream only.
        return delivery.nak(None).await;
    }
    error!(dead_letter = %letter.id, failure, subject, delivered, "failed on the last delivery; dead-lettered");
    // Best effort, as qx-worker: the row is the record, and only a stream capturing qx_dlq.> keeps notices.
    if let Err(notify_err) = notify(jetstream, &letter, &failure).await {
        debug!(error = &*notify_err as &dyn StdError, dead_letter = %letter.id, "dead letter not announced");
    }
    delivery.ack().await
}

async fn notify(
    jetstream: &jetstream::Context,
    letter: &DeadLetter,
    failure: &str,
) -> Result<(), Box<dyn StdError + Send + Sync>> {
    let (subject, body) = letter.notification(failure)?;
    jetstream.publish(subject, body.into()).await?.await?;
    Ok(())
}

/// The failure as qx-worker records a handler's `str(exc)`: the handler's own error, then its causes.
fn failure_text(err: &(dyn StdError + 'static)) -> String {
    // A HandlerError only says how to settle; what went wrong is its source.
    let first = match err.downcast_ref::<HandlerError>() {
        Some(handler) => handler.source(),
        None => Some(err),
    };
    let causes: Vec<String> =
        std::iter::successors(first, |&cause| cause.source()).map(ToString::to_string).collect();
    causes.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_delivery_up_to_the_cap() {
        let options = RunConfig {
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_millis(1000),
            ..RunConfig::default()
        };
        let delays: Vec<_> = [1, 2, 3, 4, 5, 1000].map(|n| options.backoff(n).as_millis()).into();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn out_of_range_settings_are_refused_before_io() {
        let valid = ConsumerConfig::new("S", "d", "s.>");
        assert!(valid.validate().is_ok());
        let cases = [
            ("batch_size", ConsumerConfig { batch_size: 0, ..valid.clone() }),
            ("expires", ConsumerConfig { expires: Duration::from_millis(999), ..valid.clone() }),
            ("max_deliver", ConsumerConfig { max_deliver: 0, ..valid.clone() }),
            ("ack_wait", ConsumerConfig { ack_wait: Duration::ZERO, ..valid.clone() }),
        ];
        for (key, config) in cases {
            assert!(
                matches!(config.validate(), Err(ConsumerError::Invalid { key: k, .. }) if k == key),
                "{key}"
            );
        }
    }
}
