//! Failures the relay must ride out: poison rows parked at once while the rest flow, a row the stream keeps
//! rejecting retried on a backoff curve, a full stream, a missing stream (waited for, or created), NATS or
//! Postgres killed and restarted mid-drain, and a relay frozen while it holds a batch. The last three run
//! private servers (tests/common/cluster.rs).

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, stream};
use cluster::{NatsServer, PgCluster};
use common::{Relay, TestDb, TestStream, OUTBOX_DDL};
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(40);
/// The relay's default `max_attempts`.
const MAX_ATTEMPTS: i32 = 10;

fn set(env: &mut Vec<(String, String)>, pairs: &[(&str, &str)]) {
    env.extend(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
}

/// An envelope for `event_name` whose `payload` holds `size` bytes of filler.
fn envelope_of_size(event_name: &str, size: usize) -> String {
    format!(
        r#"{{"payload": {{"blob": "{}"}}, "event_id": "{}", "event_name": "{event_name}", "event_version": 1}}"#,
        "x".repeat(size),
        Uuid::new_v4()
    )
}

/// A row's `(published_at, attempts, last_error)`.
async fn row_state(db: &TestDb, id: Uuid) -> (Option<chrono::DateTime<chrono::Utc>>, i32, Option<String>) {
    sqlx::query_as("SELECT published_at, attempts, last_error FROM qx_outbox_events WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("read row")
}

/// Messages in the stream, and how many distinct `Nats-Msg-Id`s they carry.
async fn messages_and_distinct_ids(stream: &TestStream) -> (usize, usize) {
    let messages = stream.messages().await;
    let ids: HashSet<String> = messages
        .iter()
        .map(|m| m.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).expect("Nats-Msg-Id").to_string())
        .collect();
    (messages.len(), ids.len())
}

#[tokio::test]
async fn poison_rows_are_parked_at_once_while_the_rest_flow() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let client = async_nats::connect(common::env("NATS_URL")).await.expect("connect NATS_URL");
    let max_payload = client.server_info().max_payload;
    let oversize = envelope_of_size("order.placed", max_payload + max_payload / 10);
    assert!(oversize.len() > max_payload, "the body must exceed the server's max_payload ({max_payload})");

    db.insert_events(499, "order.placed").await;
    let too_big = db.insert_raw("order.placed", &oversize).await;
    let space = db.insert_raw("order placed", &envelope_of_size("order placed", 10)).await;
    let wildcard = db.insert_raw("orders.*", &envelope_of_size("orders.*", 10)).await;
    db.insert_events(498, "order.placed").await;

    let relay = Relay::spawn(&Relay::env(&db, &stream.prefix), &[]);
    // Parked at the first attempt, not after max_attempts retries, so this does not wait on a backoff.
    db.wait_for("published_at IS NOT NULL", 997, DRAIN).await;
    db.wait_for(&format!("attempts >= {MAX_ATTEMPTS}"), 3, Duration::from_secs(5)).await;
    let log = relay.log();
    relay.stop().await;

    let (messages, distinct) = messages_and_distinct_ids(&stream).await;
    assert_eq!((messages, distinct), (997, 997), "each good row once");
    for (id, reason) in [
        (too_big, "max payload"),
        (space, "not a valid subject token"),
        (wildcard, "not a valid subject token"),
    ] {
        let (published_at, attempts, last_error) = row_state(&db, id).await;
        let last_error = last_error.unwrap_or_default();
        assert_eq!(published_at, None, "{id} stays unpublished");
        assert_eq!(attempts, MAX_ATTEMPTS, "{id} parked");
        assert!(last_error.starts_with("parked: "), "{id}: {last_error}");
        assert_eq!(last_error.matches(reason).count(), 1, "{id}: {last_error:?} should say {reason:?}, once");
        assert!(log.contains(&id.to_string()), "the log names parked row {id}:\n{log}");
    }
    assert_eq!(
        db.count("attempts > 0 AND published_at IS NOT NULL").await,
        0,
        "good rows burned no attempts"
    );
    stream.delete().await;
    db.drop().await;
}

#[tokio::test]
async fn a_row_the_stream_rejects_backs_off_while_others_flow() {
    let db = TestDb::create().await;
    let stream = TestStream::unattached().await;
    // The stream takes the ordinary rows (a few hundred bytes) but not one of 8 kB: JetStream answers that
    // publish with an error, which is the message's fault, so it costs an attempt and a backoff.
    stream
        .jetstream
        .create_stream(stream::Config {
            name: stream.name.clone(),
            subjects: vec![format!("{}.>", stream.prefix)],
            max_message_size: 4096,
            duplicate_window: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .expect("create stream");
    db.insert_events(300, "order.placed").await;
    let big = db.insert_raw("order.placed", &envelope_of_size("order.placed", 8000)).await;
    db.insert_events(300, "order.placed").await;

    let max_attempts = 8;
    let (base, cap) = (Duration::from_millis(200), Duration::from_secs(2));
    let mut env = Relay::env(&db, &stream.prefix);
    set(
        &mut env,
        &[
            ("QX_RELAY__RETRY_BACKOFF", "200ms"),
            ("QX_RELAY__RETRY_BACKOFF_MAX", "2s"),
            ("QX_RELAY__MAX_ATTEMPTS", &max_attempts.to_string()),
        ],
    );
    let relay = Relay::spawn(&env, &[]);

    // Record when each attempt lands in the table.
    let mut seen: Vec<(i32, Instant)> = Vec::new();
    let mut more_inserted = false;
    let deadline = Instant::now() + DRAIN;
    loop {
        let (published_at, attempts, _) = row_state(&db, big).await;
        assert_eq!(published_at, None, "the stream cannot take this row");
        let last = seen.last().map_or(0, |(attempts, _)| *attempts);
        assert!(attempts >= last, "attempts never go down: {attempts} after {last}");
        if attempts > last {
            seen.push((attempts, Instant::now()));
        }
        if attempts >= 1 && !more_inserted {
            // Rows arriving while the bad one waits for its retry are not held up by it.
            db.insert_events(300, "order.placed").await;
            more_inserted = true;
        }
        if attempts == max_attempts {
            break;
        }
        assert!(Instant::now() < deadline, "attempts stuck at {attempts}; log:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.wait_for("published_at IS NOT NULL", 900, Duration::from_secs(10)).await;
    // No more attempts once parked.
    tokio::time::sleep(cap + Duration::from_millis(500)).await;
    let (_, attempts, last_error) = row_state(&db, big).await;
    let log = relay.log();
    relay.stop().await;

    assert_eq!(attempts, max_attempts, "parked after max_attempts");
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.contains("maximum"), "JetStream's reason is kept: {last_error:?}");
    assert!(!last_error.starts_with("parked: "), "rejected, not poison: {last_error:?}");
    assert!(log.contains("publish failed; will retry"), "{log}");
    assert!(log.contains("row parked after max_attempts"), "{log}");
    // Rejected, not poison: the row climbs one attempt at a time (a stalled test may miss one, not more).
    let counts: Vec<i32> = seen.iter().map(|(attempts, _)| *attempts).collect();
    assert!(
        counts[0] < max_attempts && counts.len() >= max_attempts as usize - 1,
        "attempts seen: {counts:?}"
    );
    // Retry k waits retry_backoff · 2^(k-1), capped at retry_backoff_max, times a jitter in [0.5, 1].
    let gaps: Vec<(i32, Duration)> = seen
        .windows(2)
        .filter(|pair| pair[1].0 == pair[0].0 + 1)
        .map(|pair| (pair[0].0, pair[1].1 - pair[0].1))
        .collect();
    for &(k, gap) in &gaps {
        let full = base.saturating_mul(1 << (k - 1)).min(cap);
        let slack = Duration::from_millis(200);
        assert!(gap + slack >= full / 2, "retry {k} came after {gap:?}, before half of {full:?}: {gaps:?}");
        assert!(
            gap <= full + Duration::from_millis(1500),
            "retry {k} came after {gap:?}, backoff {full:?}: {gaps:?}"
        );
    }
    let (first, last) = (gaps.first().expect("gaps"), gaps.last().expect("gaps"));
    assert!(last.0 >= 5 && last.1 > first.1 * 2, "the delay grows: {gaps:?}");
    assert_eq!(stream.count().await, 900);
    stream.delete().await;
    db.drop().await;
}

#[tokio::test]
async fn a_full_stream_burns_no_attempts_and_drains_once_it_has_room() {
    let db = TestDb::create().await;
    let stream = TestStream::unattached().await;
    let config = stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}.>", stream.prefix)],
        max_messages: 100,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    };
    stream.jetstream.create_stream(config.clone()).await.expect("create stream");
    db.insert_events(300, "order.placed").await;
    let mut env = Relay::env(&db, &stream.prefix);
    // Were a full stream blamed on the rows, two refusals would park them.
    set(&mut env, &[("QX_RELAY__MAX_ATTEMPTS", "2"), ("QX_RELAY__RETRY_BACKOFF", "50ms")]);
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("published_at IS NOT NULL", 100, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a few refused rounds
    assert_eq!(db.count("published_at IS NULL AND attempts = 0").await, 200, "no attempts burned");
    assert!(relay.log().contains("maximum messages exceeded"), "the log says why:\n{}", relay.log());

    stream.jetstream.update_stream(stream::Config { max_messages: -1, ..config }).await.expect("make room");
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    relay.stop().await;
    assert_eq!(stream.count().await, 300);
    assert_eq!(db.count("attempts = 0").await, 300, "none parked");
    stream.delete().await;
    db.drop().await;
}

#[tokio::test]
async fn missing_stream_is_logged_once_per_subject_and_burns_no_attempts() {
    let db = TestDb::create().await;
    let stream = TestStream::unattached().await;
    db.insert_events(100, "order.placed").await;
    db.insert_events(100, "order.cancelled").await;
    let relay = Relay::spawn(&Relay::env(&db, &stream.prefix), &[]);
    db.wait_for("last_error LIKE 'no stream captures %'", 200, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few retries (one a second)
    let log = relay.log();
    for name in ["order.placed", "order.cancelled"] {
        let line = format!("no stream captures {}.{name}:", stream.prefix);
        assert_eq!(log.matches(&line).count(), 1, "one error line per subject per minute:\n{log}");
    }
    assert_eq!(db.count("attempts = 0 AND published_at IS NULL").await, 200, "no attempts burned");

    stream.attach().await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    relay.stop().await;
    assert_eq!(stream.count().await, 200);
    assert_eq!(db.count("attempts = 0").await, 200, "none parked");
    stream.delete().await;
    db.drop().await;
}

#[tokio::test]
async fn ensure_stream_creates_a_stream_for_the_prefix() {
    let db = TestDb::create().await;
    let stream = TestStream::unattached().await;
    db.insert_events(300, "order.placed").await;
    let mut env = Relay::env(&db, &stream.prefix);
    set(&mut env, &[("QX_RELAY__ENSURE_STREAM", "true")]);
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    relay.stop().await;

    let name = stream.jetstream.stream_by_subject(format!("{}.order.placed", stream.prefix)).await;
    let name = name.expect("a stream captures the prefix");
    let mut created = stream.jetstream.get_stream(&name).await.expect("get stream");
    let info = created.info().await.expect("stream info").clone();
    assert_eq!(info.config.subjects, [format!("{}.>", stream.prefix)]);
    assert!(info.config.duplicate_window >= Duration::from_secs(120), "{:?}", info.config.duplicate_window);
    assert_eq!(info.state.messages, 300);
    assert_eq!(db.count("attempts = 0 AND last_error IS NULL").await, 300, "never failed");
    stream.jetstream.delete_stream(&name).await.expect("delete stream");
    db.drop().await;
}

/// A database with the outbox table on a private cluster. Its name is unique, so even `TestDb::drop` (which
/// talks to DATABASE_URL) could not hit anything.
async fn private_db(cluster: &PgCluster) -> TestDb {
    let name = format!("qxr_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&cluster.url("postgres")).await.expect("connect private Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
    let url = cluster.url(&name);
    let pool = PgPool::connect(&url).await.expect("connect private database");
    sqlx::raw_sql(OUTBOX_DDL).execute(&pool).await.expect("create outbox table");
    TestDb { name, url, pool }
}

/// A stream like `TestStream::create`, on a private server.
async fn private_stream(nats: &NatsServer) -> TestStream {
    let client = async_nats::connect(nats.url()).await.expect("connect private NATS");
    let id = Uuid::new_v4().simple().to_string();
    let stream =
        TestStream { name: format!("T{id}"), prefix: format!("t{id}"), jetstream: jetstream::new(client) };
    stream.attach().await;
    stream
}

/// Waits until the stream holds at least `count` messages.
async fn wait_for_messages(stream: &TestStream, count: u64, relay: &Relay) {
    let deadline = Instant::now() + DRAIN;
    while stream.count().await < count {
        assert!(Instant::now() < deadline, "relay did not start publishing:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn nats_killed_and_restarted_mid_drain_loses_nothing() {
    let mut nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let stream = private_stream(&nats).await;
    let rows = 20_000;
    db.insert_events(rows, "order.placed").await;
    let mut env = Relay::env(&db, &stream.prefix);
    set(
        &mut env,
        &[
            ("QX_NATS__SERVERS", &nats.url()),
            ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.1"),
            ("QX_RELAY__BATCH_SIZE", "500"),
            // Shorter than the outage, so acks in flight time out rather than arrive after the reconnect.
            ("QX_RELAY__ACK_TIMEOUT", "1s"),
        ],
    );
    let relay = Relay::spawn(&env, &[]);
    wait_for_messages(&stream, 3000, &relay).await;
    nats.kill9();
    let marked_while_down = rows as i64 - db.unpublished().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(marked_while_down < rows as i64, "the kill came after the drain; make the backlog larger");
    nats.restart().await;

    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let log = relay.log();
    relay.stop().await;
    assert!(log.contains("NATS did not confirm publishes"), "the outage was noticed:\n{log}");
    let (messages, distinct) = messages_and_distinct_ids(&stream).await;
    assert_eq!(distinct, rows, "every row in the stream; server log:\n{}", nats.log());
    assert_eq!(messages, rows, "each once");
    assert_eq!(db.count("attempts = 0").await, rows as i64, "a NATS outage burns no attempts");
    db.drop().await;
}

#[tokio::test]
async fn postgres_restarted_mid_drain_the_relay_recovers_and_finishes() {
    let postgres = PgCluster::start().await;
    let db = private_db(&postgres).await;
    let stream = TestStream::create().await;
    let rows = 20_000;
    db.insert_events(rows, "order.placed").await;
    let mut env = Relay::env(&db, &stream.prefix);
    set(&mut env, &[("QX_RELAY__BATCH_SIZE", "500")]);
    let mut relay = Relay::spawn(&env, &[]);
    wait_for_messages(&stream, 3000, &relay).await;
    postgres.stop("immediate");
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.restart().await;

    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    assert!(relay.child.try_wait().expect("poll relay").is_none(), "relay still running:\n{}", relay.log());
    let log = relay.log();
    relay.stop().await;
    assert!(log.contains("Postgres unavailable"), "the outage was noticed:\n{log}");
    assert!(log.contains("Postgres available again"), "and its end:\n{log}");
    let (messages, distinct) = messages_and_distinct_ids(&stream).await;
    assert_eq!((messages, distinct), (rows, rows), "every row once");
    assert_eq!(db.count("attempts = 0").await, rows as i64, "nothing parked");
    stream.delete().await;
    db.pool.close().await;
}

#[tokio::test]
async fn a_frozen_relay_releases_its_claimed_rows_after_give_up_after() {
    let frozen_nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let frozen_stream = private_stream(&frozen_nats).await;
    let mut env = Relay::env(&db, &frozen_stream.prefix);
    set(
        &mut env,
        &[
            ("QX_NATS__SERVERS", &frozen_nats.url()),
            // Left alone, the claim would stay open this long waiting for acks: time to freeze the relay.
            ("QX_RELAY__ACK_TIMEOUT", "5s"),
            // The shortest give_up_after that ack_timeout allows.
            ("QX_RELAY__GIVE_UP_AFTER", "10s"),
        ],
    );
    let mut frozen = Relay::spawn(&env, &[]);
    let deadline = Instant::now() + DRAIN;
    while !frozen.log().contains("connected to Postgres and NATS") {
        assert!(Instant::now() < deadline, "relay did not start:\n{}", frozen.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its NATS stops answering, so the batch it claims next stays in flight; then the relay itself stops.
    frozen_nats.freeze();
    let rows = 50;
    let ids = db.insert_events(rows, "order.placed").await;
    // A row's xmax names the transaction that locked it: the relay's claim, as nothing else locks rows here.
    let claimed = "SELECT count(*) FROM qx_outbox_events WHERE xmax::text <> '0'";
    let deadline = Instant::now() + DRAIN;
    while sqlx::query_scalar::<_, i64>(claimed).fetch_one(&db.pool).await.expect("count claimed rows")
        < rows as i64
    {
        assert!(Instant::now() < deadline, "the relay never claimed the rows:\n{}", frozen.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    frozen.signal("STOP");
    let unlocked = "SELECT count(*) FROM (SELECT 1 FROM qx_outbox_events FOR UPDATE SKIP LOCKED) AS free";
    let free: i64 = sqlx::query_scalar(unlocked).fetch_one(&db.pool).await.expect("count unlocked rows");
    assert_eq!(free, 0, "the frozen relay holds every row");

    // Another relay gets every row once Postgres ends the frozen relay's idle claim.
    let stream = TestStream::create().await;
    let relay = Relay::spawn(&Relay::env(&db, &stream.prefix), &[]);
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    relay.stop().await;
    let published: HashSet<String> = stream
        .messages()
        .await
        .iter()
        .filter_map(|m| Some(m.headers.as_ref()?.get(NATS_MESSAGE_ID)?.to_string()))
        .collect();
    assert_eq!(published.len(), ids.len(), "every row reached the other relay's stream");
    frozen.kill9();
    stream.delete().await;
    db.drop().await;
}
