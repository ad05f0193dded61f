//! The consumer against a real NATS (and Postgres for dead letters): what every Qx producer publishes decodes
//! into typed events with the right headers; retries, terms and `max_deliver` behave as JetStream promises;
//! cancel loses nothing; dead letters match qx-worker's and replay with `qx dlq replay`.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, consumer, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use qx_relay::consumer::{ConsumerError, Received, UndecodablePolicy};
use qx_relay::dead_letter::PgDeadLetters;
use qx_relay::registry::DecodeError;
use qx_relay::wire::{
    HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_NAME, HEADER_EVENT_VERSION, HEADER_TENANT_ID,
};
use qx_relay::{
    ConsumerConfig, Envelope, EventConsumer, EventHeaders, EventMessage, EventRegistry, HandlerError,
    Publisher, QxEvent, RunConfig,
};
use qx_relay_testkit::outbox::{fixture_rows, FixtureRow, DEAD_LETTERS_DDL};
use qx_relay_testkit::{env_var, eventually, TestDb, TestStream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Short enough to keep redelivery tests fast.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long any expected event may take to arrive.
const PATIENCE: Duration = Duration::from_secs(10);

/// `QxEvent` for a payload type: its event name and version.
macro_rules! qx_event {
    ($type:ty, $name:literal, $version:literal) => {
        impl QxEvent for $type {
            const NAME: &'static str = $name;
            const VERSION: i32 = $version;
        }
    };
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    customer_email: String,
}
qx_event!(OrderPlaced, "order.placed", 1);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct OrderPlacedV2 {
    order_id: Uuid,
    lines: Vec<OrderLine>,
    note: Option<String>,
}
qx_event!(OrderPlacedV2, "order.placed", 2);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct OrderLine {
    sku: String,
    qty: u32,
    // Kept as written: `0` and `9.99` stay distinct from `0.0` and a rounded float.
    price: serde_json::Number,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct UserRegistered {
    email: String,
    display_name: String,
    tags: Vec<String>,
}
qx_event!(UserRegistered, "identity.user.registered", 1);

fn registry() -> EventRegistry {
    let mut registry = EventRegistry::new();
    registry.register::<OrderPlaced>().unwrap().register::<OrderPlacedV2>().unwrap();
    registry.register::<UserRegistered>().unwrap();
    registry
}

/// The headers the relay sets for a row: name, version and ids from the columns, event id from the envelope.
fn relay_headers(row: &FixtureRow) -> EventHeaders {
    EventHeaders {
        event_name: row.event_name.clone(),
        event_version: row.event_version,
        event_id: Some(Envelope::from_json(row.payload.as_bytes()).unwrap().event_id),
        correlation_id: row.correlation_id,
        tenant_id: row.tenant_id,
    }
}

/// Publishes a row as the relay does: the `payload` text unchanged, deduplicated by the envelope's event id.
async fn publish_row(publisher: &Publisher, row: &FixtureRow) {
    let headers = relay_headers(row);
    let msg_id = headers.event_id.unwrap();
    let ack = publisher.send(&headers, msg_id, Bytes::from(row.payload.clone())).await.unwrap();
    ack.await.unwrap();
}

/// Publishes a fresh `order.placed` v1 (a fixture row with a new event id); returns the event id.
async fn publish_order(publisher: &Publisher) -> Uuid {
    let mut envelope = Envelope::from_json(fixture_rows()[0].payload.as_bytes()).unwrap();
    assert_eq!((envelope.event_name.as_str(), envelope.event_version), (OrderPlaced::NAME, 1));
    envelope.event_id = Uuid::new_v4();
    publisher.publish(&envelope).await.unwrap();
    envelope.event_id
}

fn config(stream: &TestStream, durable: &str) -> ConsumerConfig {
    ConsumerConfig {
        ack_wait: ACK_WAIT,
        expires: Duration::from_secs(1),
        ..ConsumerConfig::new(&stream.name, durable, format!("{}.>", stream.prefix))
    }
}

fn fast_retries() -> RunConfig {
    RunConfig {
        retry_delay: Duration::from_millis(50),
        max_retry_delay: Duration::from_millis(200),
        ..RunConfig::default()
    }
}

async fn consumer_info(stream: &TestStream, durable: &str) -> consumer::Info {
    let stream = stream.jetstream.get_stream(&stream.name).await.expect("get stream");
    stream.consumer_info(durable).await.expect("consumer info")
}

/// A consumer running a handler in a task of its own, until stopped.
struct Running {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ConsumerError>>,
}

impl Running {
    fn start<H, F>(consumer: EventConsumer, options: RunConfig, handler: H) -> Self
    where
        H: Fn(EventMessage) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { consumer.run(options, cancel, handler).await }
        });
        Self { cancel, task }
    }

    /// Cancels the run, which must end without an error.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Waits past ack_wait, when a redelivery would have come, fails with `what` if the handler saw anything
    /// more, and stops.
    async fn stop_after_quiet<T>(self, rx: &mut mpsc::UnboundedReceiver<T>, what: &str) {
        tokio::time::sleep(ACK_WAIT * 2).await;
        assert!(rx.try_recv().is_err(), "{what}");
        self.stop().await;
    }
}

/// A stream of the test's own and a publisher into it.
async fn stream_and_publisher() -> (TestStream, Publisher) {
    let stream = TestStream::create().await;
    let publisher = Publisher::new(stream.jetstream.clone(), &stream.prefix);
    (stream, publisher)
}

/// Receives one value, or fails naming `what`.
async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap_or_else(|_| panic!("no {what}")).unwrap()
}

/// The typed event must be the envelope's `payload` in the type's serde form, and no other type.
fn assert_typed<T: QxEvent + std::fmt::Debug>(received: &EventMessage) {
    let event = received.event();
    let typed = event.downcast_ref::<T>().unwrap_or_else(|| panic!("not a {}", std::any::type_name::<T>()));
    let payload = serde_json::Value::Object(event.envelope().payload.clone());
    assert_eq!(serde_json::to_value(typed).unwrap(), payload, "{typed:?}");
}

#[tokio::test]
async fn every_fixture_row_decodes_into_its_type_with_the_relay_headers() {
    let (stream, publisher) = stream_and_publisher().await;
    let rows = fixture_rows();
    for row in &rows {
        publish_row(&publisher, row).await;
    }
    let consumer =
        EventConsumer::bind(&stream.jetstream, config(&stream, "fixtures"), registry()).await.unwrap();
    let mut messages = consumer.messages().await.unwrap();

    let mut seen = HashSet::new();
    for _ in &rows {
        let next = tokio::time::timeout(PATIENCE, messages.next()).await.expect("a message").unwrap();
        let message = match next.unwrap() {
            Received::Event(message) => message,
            Received::Undecodable(message) => panic!("undecodable: {:?}", message.error()),
        };
        let envelope = message.event().envelope();
        let row = rows.iter().find(|row| row.payload.contains(&envelope.event_id.to_string())).unwrap();
        assert!(seen.insert(envelope.event_id), "{} delivered twice", envelope.event_id);
        assert_eq!(envelope, &Envelope::from_json(row.payload.as_bytes()).unwrap());
        assert_eq!(message.headers(), Some(&relay_headers(row)));
        assert_eq!(message.delivery().delivered(), 1);
        let raw = message.delivery().message();
        assert_eq!(raw.subject.as_str(), format!("{}.{}", stream.prefix, row.event_name));
        assert_eq!(raw.payload.as_ref(), row.payload.as_bytes());
        match (row.event_name.as_str(), row.event_version) {
            ("order.placed", 1) => assert_typed::<OrderPlaced>(&message),
            ("order.placed", 2) => assert_typed::<OrderPlacedV2>(&message),
            ("identity.user.registered", 1) => assert_typed::<UserRegistered>(&message),
            other => panic!("fixture event {other:?} has no type in this test"),
        }
        let event = message.event();
        let fits = [
            event.downcast_ref::<OrderPlaced>().is_some(),
            event.downcast_ref::<OrderPlacedV2>().is_some(),
            event.downcast_ref::<UserRegistered>().is_some(),
        ];
        assert_eq!(fits.iter().filter(|fits| **fits).count(), 1, "one type only: {fits:?}");
        message.delivery().ack().await.unwrap();
    }
    drop(messages);
    eventually("all acks", PATIENCE, || async {
        consumer_info(&stream, "fixtures").await.num_ack_pending == 0
    })
    .await;
    assert_eq!(consumer_info(&stream, "fixtures").await.num_pending, 0);
}

#[tokio::test]
async fn a_retryable_failure_is_redelivered_with_a_rising_count_then_acked() {
    let (stream, publisher) = stream_and_publisher().await;
    let event_id = publish_order(&publisher).await;
    let consumer =
        EventConsumer::bind(&stream.jetstream, config(&stream, "retry"), registry()).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = Running::start(consumer, fast_retries(), move |message| {
        let delivered = message.delivery().delivered();
        tx.send((message.event().envelope().event_id, delivered)).unwrap();
        async move {
            if delivered < 3 {
                return Err(HandlerError::retry("downstream unavailable"));
            }
            Ok(())
        }
    });
    for expected in 1..=3 {
        assert_eq!(recv(&mut rx, "delivery").await, (event_id, expected));
    }
    // Acked on the third delivery: nothing comes back after ack_wait.
    run.stop_after_quiet(&mut rx, "redelivered after a successful handler").await;
    let info = consumer_info(&stream, "retry").await;
    assert_eq!((info.num_ack_pending, info.num_pending, info.delivered.consumer_sequence), (0, 0, 3));
}

#[tokio::test]
async fn max_deliver_bounds_the_retries() {
    let (stream, publisher) = stream_and_publisher().await;
    publish_order(&publisher).await;
    let config = ConsumerConfig { max_deliver: 3, ..config(&stream, "bounded") };
    let consumer = EventConsumer::bind(&stream.jetstream, config, registry()).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = Running::start(consumer, fast_retries(), move |message| {
        tx.send(message.delivery().delivered()).unwrap();
        async { Err(HandlerError::retry("always failing")) }
    });
    for expected in 1..=3 {
        assert_eq!(recv(&mut rx, "delivery").await, expected);
    }
    // Retries come every 50-200 ms; without max_deliver more would arrive in this time.
    run.stop_after_quiet(&mut rx, "delivered more than max_deliver times").await;
}

#[tokio::test]
async fn undecodable_messages_are_terminated_and_never_reach_the_handler() {
    let (stream, publisher) = stream_and_publisher().await;
    let row = &fixture_rows()[0];
    let headers = relay_headers(row);
    let mut unknown = headers.clone();
    unknown.event_name = "order.shipped".into();
    let wrong_payload = row.payload.replace("\"amount_cents\"", "\"amount\"");
    assert_ne!(wrong_payload, row.payload);
    let bad: [(&EventHeaders, &str); 3] =
        [(&headers, "not json"), (&unknown, &row.payload), (&headers, &wrong_payload)];
    for (headers, body) in bad {
        let ack = publisher.send(headers, Uuid::new_v4(), Bytes::from(body.to_owned())).await.unwrap();
        ack.await.unwrap();
    }
    let good = publish_order(&publisher).await;

    let client = async_nats::connect(env_var("NATS_URL")).await.unwrap();
    let advisory = format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.bad", stream.name);
    let mut terminated = client.subscribe(advisory).await.unwrap();
    client.flush().await.unwrap();

    // The decode errors, one of each kind, as the message stream reports them; nothing is settled here.
    let consumer = EventConsumer::bind(&stream.jetstream, config(&stream, "peek"), registry()).await.unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut errors = Vec::new();
    for _ in 0..3 {
        let next = tokio::time::timeout(PATIENCE, messages.next()).await.expect("a message").unwrap();
        match next.unwrap() {
            Received::Undecodable(message) => errors.push(match message.error() {
                DecodeError::NotEnvelope(_) => "not an envelope",
                DecodeError::Unknown { .. } => "unknown",
                DecodeError::Payload { .. } => "payload",
                other => panic!("{other:?}"),
            }),
            Received::Event(message) => panic!("decoded {:?}", message.event()),
        }
    }
    assert_eq!(errors, ["not an envelope", "unknown", "payload"]);
    drop(messages);

    let consumer = EventConsumer::bind(&stream.jetstream, config(&stream, "bad"), registry()).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = RunConfig { on_undecodable: UndecodablePolicy::Term, ..fast_retries() };
    let run = Running::start(consumer, options, move |message| {
        tx.send(message.event().envelope().event_id).unwrap();
        async { Ok(()) }
    });
    assert_eq!(recv(&mut rx, "the good event").await, good);
    for _ in 0..3 {
        tokio::time::timeout(PATIENCE, terminated.next()).await.expect("a MSG_TERMINATED advisory");
    }
    // Past ack_wait: a message that was neither acked nor termed would be delivered again by now.
    run.stop_after_quiet(&mut rx, "the handler saw an undecodable message").await;
    let info = consumer_info(&stream, "bad").await;
    assert_eq!((info.num_ack_pending, info.num_redelivered, info.delivered.consumer_sequence), (0, 0, 4));
}

#[tokio::test]
async fn cancel_finishes_in_flight_handlers_and_loses_nothing() {
    const EVENTS: usize = 30;
    const MAX_IN_FLIGHT: usize = 4;
    let (stream, publisher) = stream_and_publisher().await;
    let mut published = HashSet::new();
    for _ in 0..EVENTS {
        published.insert(publish_order(&publisher).await);
    }

    // First consumer: slow handlers, cancelled after a few.
    let first_handled = Arc::new(Mutex::new(HashSet::new()));
    let (running, most_running, started) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let consumer = EventConsumer::bind(
        &stream.jetstream,
        ConsumerConfig { batch_size: 10, ..config(&stream, "workers") },
        registry(),
    )
    .await
    .unwrap();
    let options = RunConfig { max_in_flight: MAX_IN_FLIGHT, ..fast_retries() };
    let run = Running::start(consumer, options, {
        let (handled, running, most_running, started) =
            (first_handled.clone(), running.clone(), most_running.clone(), started.clone());
        move |message| {
            let (handled, running, most_running) = (handled.clone(), running.clone(), most_running.clone());
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                handled.lock().unwrap().insert(message.event().envelope().event_id);
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    eventually("a few handlers to start", PATIENCE, || async { started.load(Ordering::SeqCst) >= 10 }).await;
    run.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), run.task)
        .await
        .expect("run stops promptly")
        .unwrap()
        .unwrap();
    let first_handled = first_handled.lock().unwrap().clone();
    assert_eq!(first_handled.len(), started.load(Ordering::SeqCst), "every started handler finished");
    assert!(first_handled.len() < EVENTS, "cancelled before the end");
    assert_eq!(most_running.load(Ordering::SeqCst), MAX_IN_FLIGHT);

    // Second consumer on the same durable: gets exactly what the first did not handle.
    let consumer =
        EventConsumer::bind(&stream.jetstream, config(&stream, "workers"), registry()).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = Running::start(consumer, RunConfig::default(), move |message| {
        tx.send(message.event().envelope().event_id).unwrap();
        async { Ok(()) }
    });
    let mut second_handled = HashSet::new();
    while first_handled.len() + second_handled.len() < EVENTS {
        let event_id = recv(&mut rx, "an event the first consumer left").await;
        assert!(!first_handled.contains(&event_id), "{event_id} was handled and acked, yet came back");
        assert!(second_handled.insert(event_id), "{event_id} twice");
    }
    let all: HashSet<_> = first_handled.union(&second_handled).copied().collect();
    assert_eq!(all, published);
    eventually("all acks", PATIENCE, || async {
        consumer_info(&stream, "workers").await.num_ack_pending == 0
    })
    .await;
    run.stop().await;
}

/// Outbox rows and, in `body`, the bytes the Python relay publishes for each: it decodes the JSONB and
/// re-encodes it with `json.dumps` (`\uXXXX` escapes, Python's float repr, `", "` and `": "` separators). The
/// qx-db fixture rows, plus one with floats and characters outside the BMP.
const PYTHON_RELAY_MESSAGES: &str = include_str!("fixtures/python-relay-messages.jsonl");

#[derive(Debug, Deserialize)]
struct PythonRelayMessage {
    event_name: String,
    correlation_id: Option<Uuid>,
    tenant_id: Option<Uuid>,
    /// The `payload` column as Postgres returns it.
    payload: String,
    body: String,
}

fn python_relay_messages() -> Vec<PythonRelayMessage> {
    PYTHON_RELAY_MESSAGES
        .lines()
        .map(|line| serde_json::from_str(line).expect("python relay message"))
        .collect()
}

/// The headers the Python relay sets from a row's columns; `with_version_and_id` adds the two that Python's
/// `NatsPublisher.publish` sets too. Neither sets `Nats-Msg-Id`.
fn python_headers(message: &PythonRelayMessage, with_version_and_id: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_EVENT_NAME, message.event_name.as_str());
    for (name, id) in [(HEADER_CORRELATION_ID, message.correlation_id), (HEADER_TENANT_ID, message.tenant_id)]
    {
        if let Some(id) = id {
            headers.insert(name, id.to_string().as_str());
        }
    }
    if with_version_and_id {
        let envelope = Envelope::from_json(message.body.as_bytes()).unwrap();
        headers.insert(HEADER_EVENT_VERSION, envelope.event_version.to_string().as_str());
        headers.insert(HEADER_EVENT_ID, envelope.event_id.to_string().as_str());
    }
    headers
}

async fn publish_raw(stream: &TestStream, event_name: &str, headers: HeaderMap, body: &str) {
    let subject = format!("{}.{event_name}", stream.prefix);
    let ack =
        stream.jetstream.publish_with_headers(subject, headers, Bytes::from(body.to_owned())).await.unwrap();
    ack.await.unwrap();
}

#[tokio::test]
async fn messages_as_python_producers_publish_them_expose_tenant_and_correlation() {
    let stream = TestStream::create().await;
    let messages = python_relay_messages();
    for message in &messages {
        let (body, payload): (Value, Value) =
            (serde_json::from_str(&message.body).unwrap(), serde_json::from_str(&message.payload).unwrap());
        assert_eq!(body, payload, "the relay re-encodes the row's JSON, it does not change it");
        assert!(message.body.is_ascii(), "json.dumps escapes non-ASCII: {}", message.body);
        for with_version_and_id in [false, true] {
            let headers = python_headers(message, with_version_and_id);
            publish_raw(&stream, &message.event_name, headers, &message.body).await;
        }
    }
    assert!(messages.iter().any(|message| message.body.contains("1e-07")), "a Python float repr");
    assert!(messages.iter().any(|message| message.tenant_id.is_none()));
    assert!(messages.iter().any(|message| message.correlation_id.is_none()));

    let consumer =
        EventConsumer::bind(&stream.jetstream, config(&stream, "python"), registry()).await.unwrap();
    let mut received = consumer.messages().await.unwrap();
    let mut seen = HashSet::new();
    for _ in 0..messages.len() * 2 {
        let next = tokio::time::timeout(PATIENCE, received.next()).await.expect("a message").unwrap();
        let message = match next.unwrap() {
            Received::Event(message) => message,
            Received::Undecodable(message) => panic!("undecodable: {:?}", message.error()),
        };
        let raw = message.delivery().message();
        let sent = messages.iter().find(|sent| sent.body.as_bytes() == raw.payload.as_ref()).unwrap();
        let from_python_relay = raw.headers.as_ref().unwrap().get(HEADER_EVENT_VERSION).is_none();
        assert!(seen.insert((sent.body.as_str(), from_python_relay)), "delivered twice");
        let envelope = message.event().envelope();
        let expected = EventHeaders {
            event_name: sent.event_name.clone(),
            event_version: envelope.event_version,
            event_id: Some(envelope.event_id),
            correlation_id: sent.correlation_id,
            tenant_id: sent.tenant_id,
        };
        assert_eq!(message.headers(), Some(&expected), "{}", sent.body);
        match (sent.event_name.as_str(), envelope.event_version) {
            ("order.placed", 1) => assert_typed::<OrderPlaced>(&message),
            ("order.placed", 2) => assert_typed::<OrderPlacedV2>(&message),
            ("identity.user.registered", 1) => assert_typed::<UserRegistered>(&message),
            other => panic!("python relay event {other:?} has no type in this test"),
        }
        message.delivery().ack().await.unwrap();
    }
    assert_eq!(seen.len(), messages.len() * 2);
    drop(received);
}

/// A database of its own with qx-worker's `qx_dead_letters` table.
async fn dead_letter_db() -> TestDb {
    let db = TestDb::create().await;
    db.execute(DEAD_LETTERS_DDL).await;
    db
}

async fn dead_letter_count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM qx_dead_letters").fetch_one(&db.pool).await.unwrap()
}

async fn wait_for_dead_letters(db: &TestDb, expected: i64) {
    eventually("dead letters", PATIENCE, || async { dead_letter_count(db).await == expected }).await;
}

/// The row qx-worker 1.1.0's `DeadLetterStore.persist` writes for `message` on its `delivered`th delivery,
/// as `to_jsonb` of the row without `id`, `failed_at` and `last_error`, computed as its code does: a dict of
/// the headers, each `qx.*` value read from it, `json.loads` of the body else `{"raw": <hex>}`.
fn qx_worker_row(message: &jetstream::Message, delivered: i64) -> Value {
    let headers: serde_json::Map<String, Value> = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .map(|(name, values)| (name.to_string(), Value::from(values.last().unwrap().as_str())))
        .collect();
    let header = |name: &str| headers.get(name).cloned().unwrap_or(Value::Null);
    let payload = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
        let hex: String = message.payload.iter().map(|byte| format!("{byte:02x}")).collect();
        json!({ "raw": hex })
    });
    json!({
        "event_name": headers.get(HEADER_EVENT_NAME).cloned().unwrap_or(json!("<unknown>")),
        "event_version": header(HEADER_EVENT_VERSION).as_str().map_or(1, |version| version.parse().unwrap()),
        "payload": payload,
        "headers": headers,
        "subject": message.subject.as_str(),
        "correlation_id": header(HEADER_CORRELATION_ID),
        "tenant_id": header(HEADER_TENANT_ID),
        "delivered_count": delivered,
    })
}

struct DeadLetterRow {
    id: Uuid,
    /// The other columns.
    row: Value,
    last_error: String,
    failed_at: DateTime<Utc>,
}

async fn dead_letter_rows(db: &TestDb) -> Vec<DeadLetterRow> {
    let rows: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, (to_jsonb(d) - 'id' - 'failed_at' - 'last_error')::text, last_error, failed_at \
         FROM qx_dead_letters d",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let row = |(id, row, last_error, failed_at): (Uuid, String, String, DateTime<Utc>)| DeadLetterRow {
        id,
        row: serde_json::from_str(&row).unwrap(),
        last_error,
        failed_at,
    };
    rows.into_iter().map(row).collect()
}

#[tokio::test]
async fn a_message_failing_on_its_last_delivery_is_dead_lettered_as_qx_worker_does() {
    const MAX_DELIVER: i64 = 2;
    let ((stream, publisher), db) = (stream_and_publisher().await, dead_letter_db().await);
    // As the Python relay publishes a row, as qx-relay does (with Nats-Msg-Id), a body that is not JSON
    // without any header, and an event whose handler fails for good.
    let python = &python_relay_messages()[0];
    publish_raw(&stream, &python.event_name, python_headers(python, false), &python.body).await;
    publish_row(&publisher, &fixture_rows()[2]).await;
    let ack = stream.jetstream.publish(format!("{}.junk", stream.prefix), "not json".into()).await.unwrap();
    ack.await.unwrap();
    let cancelled = publish_order(&publisher).await;

    let client = async_nats::connect(env_var("NATS_URL")).await.unwrap();
    let mut notifications = client.subscribe("qx_dlq.>").await.unwrap();
    let advisory = format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.dlq", stream.name);
    let mut terminated = client.subscribe(advisory).await.unwrap();
    client.flush().await.unwrap();

    let config = ConsumerConfig { max_deliver: MAX_DELIVER, ..config(&stream, "dlq") };
    let consumer = EventConsumer::bind(&stream.jetstream, config, registry())
        .await
        .unwrap()
        .with_dead_letters(PgDeadLetters::new(db.pool.clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = RunConfig { on_undecodable: UndecodablePolicy::Retry, ..fast_retries() };
    let run = Running::start(consumer, options, move |message| {
        let event_id = message.event().envelope().event_id;
        tx.send(event_id).unwrap();
        async move {
            if event_id == cancelled {
                return Err(HandlerError::permanent("order was cancelled"));
            }
            Err(HandlerError::retry(std::io::Error::other("inventory service unavailable")))
        }
    });
    wait_for_dead_letters(&db, 3).await;
    let rows = dead_letter_rows(&db).await;

    // Each row is the one qx-worker writes for the same message, less the Nats-Msg-Id header.
    let mut expected: Vec<Value> = stream
        .messages()
        .await
        .iter()
        .filter(|message| {
            Envelope::from_json(&message.payload).map_or(true, |envelope| envelope.event_id != cancelled)
        })
        .map(|message| qx_worker_row(message, MAX_DELIVER))
        .collect();
    let msg_id: &str = NATS_MESSAGE_ID.as_ref();
    let with_msg_id = expected.iter_mut().filter_map(|row| row["headers"].as_object_mut()?.remove(msg_id));
    assert_eq!(with_msg_id.count(), 1, "the message qx-relay's way carried Nats-Msg-Id");
    let mut actual: Vec<Value> = rows.iter().map(|row| row.row.clone()).collect();
    for rows in [&mut expected, &mut actual] {
        rows.sort_by_key(Value::to_string);
    }
    assert_eq!(actual, expected);
    assert!(actual
        .iter()
        .any(|row| row["event_name"] == "<unknown>" && row["payload"]["raw"] == "6e6f74206a736f6e"));
    assert!(actual
        .iter()
        .any(|row| row["event_version"] == 1 && row["headers"].get(HEADER_EVENT_VERSION).is_none()));

    let mut errors: Vec<&str> = rows.iter().map(|row| row.last_error.as_str()).collect();
    errors.sort_unstable();
    assert_eq!(errors[..2], ["inventory service unavailable"; 2]);
    assert!(errors[2].starts_with("message body is not a qx envelope: "), "{}", errors[2]);

    // One notification per row, as qx-worker publishes it: no headers, its five keys.
    for _ in &rows {
        let notice = loop {
            let notice = tokio::time::timeout(PATIENCE, notifications.next()).await.expect("a notification");
            let notice = notice.unwrap();
            let body: Value = serde_json::from_slice(&notice.payload).unwrap();
            if body["subject"].as_str().is_some_and(|subject| subject.starts_with(&stream.prefix)) {
                break (notice, body);
            }
        };
        let (notice, body) = notice;
        assert!(notice.headers.is_none(), "{:?}", notice.headers);
        let row = rows.iter().find(|row| body["id"] == row.id.to_string()).expect("the notified row");
        assert_eq!(notice.subject.as_str(), format!("qx_dlq.{}", row.row["event_name"].as_str().unwrap()));
        let failed_at = body["failed_at"].as_str().unwrap();
        assert!(failed_at.ends_with("+00:00"), "Python's isoformat: {failed_at}");
        assert_eq!(DateTime::parse_from_rfc3339(failed_at).unwrap(), row.failed_at);
        let expected = json!({
            "id": row.id.to_string(),
            "event_name": row.row["event_name"],
            "subject": row.row["subject"],
            "failed_at": failed_at,
            "last_error": row.last_error,
        });
        assert_eq!(body, expected);
    }

    // Nothing comes back past ack_wait: every dead letter was acked, and so was the permanent failure
    // (qx-worker acks it; no row, no termination).
    tokio::time::sleep(ACK_WAIT * 2).await;
    run.stop().await;
    let mut deliveries = Vec::new();
    while let Ok(event_id) = rx.try_recv() {
        deliveries.push(event_id);
    }
    assert_eq!(deliveries.iter().filter(|id| **id == cancelled).count(), 1);
    assert_eq!(deliveries.len(), 1 + 2 * MAX_DELIVER as usize, "{deliveries:?}");
    assert!(terminated.next().now_or_never().is_none(), "a message was terminated");
    let info = consumer_info(&stream, "dlq").await;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    assert_eq!(info.ack_floor.stream_sequence, 4, "all four acked");
    assert_eq!(dead_letter_count(&db).await, 3);
}

/// `qx dlq replay ID` of qx-cli 1.1: the row's `payload` as Postgres prints it, to its `subject`, with its
/// stored `headers` (nulls dropped), through JetStream.
async fn qx_dlq_replay(db: &TestDb, jetstream: &jetstream::Context, id: Uuid) -> PublishAck {
    let (payload, subject, headers): (String, String, Option<String>) =
        sqlx::query_as("SELECT payload::text, subject, headers::text FROM qx_dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let stored: serde_json::Map<String, Value> =
        headers.map_or_else(Default::default, |headers| serde_json::from_str(&headers).unwrap());
    let mut map = HeaderMap::new();
    for (name, value) in &stored {
        if let Some(value) = value.as_str() {
            map.insert(name.as_str(), value);
        }
    }
    jetstream.publish_with_headers(subject, map, payload.into()).await.unwrap().await.unwrap()
}

#[tokio::test]
async fn a_replayed_dead_letter_reaches_the_consumer_even_inside_the_duplicate_window() {
    let ((stream, publisher), db) = (stream_and_publisher().await, dead_letter_db().await);
    // Published as qx-relay publishes: Nats-Msg-Id = the event id.
    let event_id = publish_order(&publisher).await;

    let config = ConsumerConfig { max_deliver: 2, ..config(&stream, "replay") };
    let consumer = EventConsumer::bind(&stream.jetstream, config, registry())
        .await
        .unwrap()
        .with_dead_letters(PgDeadLetters::new(db.pool.clone()));
    let healthy = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler_healthy = healthy.clone();
    let run = Running::start(consumer, fast_retries(), move |message| {
        let ok = handler_healthy.load(Ordering::SeqCst);
        tx.send((message.event().envelope().event_id, message.delivery().delivered(), ok)).unwrap();
        async move {
            if ok {
                Ok(())
            } else {
                Err(HandlerError::retry("payment service down"))
            }
        }
    });
    for delivered in 1..=2 {
        assert_eq!(recv(&mut rx, "a failing delivery").await, (event_id, delivered, false));
    }
    wait_for_dead_letters(&db, 1).await;
    let id: Uuid = sqlx::query_scalar("SELECT id FROM qx_dead_letters").fetch_one(&db.pool).await.unwrap();

    // The service is fixed; the operator replays well inside the stream's 5-minute duplicate window.
    healthy.store(true, Ordering::SeqCst);
    let ack = qx_dlq_replay(&db, &stream.jetstream, id).await;
    assert!(!ack.duplicate, "the replay was dropped as a duplicate");
    assert_eq!(recv(&mut rx, "the replayed event").await, (event_id, 1, true));
    eventually("the replay acked", PATIENCE, || async {
        let info = consumer_info(&stream, "replay").await;
        info.num_ack_pending == 0 && info.ack_floor.stream_sequence == 2
    })
    .await;

    // A Python worker's row of the same message keeps Nats-Msg-Id: replayed, it is stored nowhere, though the
    // CLI reports success. Removing the header first, as the README tells operators, makes it go through.
    let python_row =
        "UPDATE qx_dead_letters SET headers = headers || jsonb_build_object('Nats-Msg-Id', $2::text) \
                      WHERE id = $1";
    sqlx::query(python_row).bind(id).bind(event_id).execute(&db.pool).await.unwrap();
    assert!(qx_dlq_replay(&db, &stream.jetstream, id).await.duplicate);
    assert_eq!(stream.count().await, 2);
    let fix = "UPDATE qx_dead_letters SET headers = headers - 'Nats-Msg-Id' WHERE id = $1";
    sqlx::query(fix).bind(id).execute(&db.pool).await.unwrap();
    assert!(!qx_dlq_replay(&db, &stream.jetstream, id).await.duplicate);
    assert_eq!(recv(&mut rx, "the second replay").await, (event_id, 1, true));

    run.stop().await;
    assert_eq!(stream.count().await, 3);
    assert_eq!(dead_letter_count(&db).await, 1, "the replays succeeded: no new dead letter");
}
