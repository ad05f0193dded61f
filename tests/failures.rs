//! Failures the relay must ride out: poison rows parked at once while the rest flow, a row the stream keeps
//! rejecting retried on a backoff curve, a full stream, a missing stream (waited for, or created), NATS or
//! Postgres killed and restarted mid-drain, and a relay frozen while it holds a batch. The last three run
//! private servers.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::stream;
use qx_relay_testkit::outbox::{envelope, envelope_of_size};
use qx_relay_testkit::proc::ProcStats;
use qx_relay_testkit::{
    env_var, http, poll, run_command, NatsServer, PgCluster, Relay, RelayEnv, TestDb, TestStream,
};
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(40);
/// The relay's default `max_attempts`.
const MAX_ATTEMPTS: i32 = 10;

/// A row's `(published_at, attempts, last_error)`.
async fn row_state(db: &TestDb, id: Uuid) -> (Option<chrono::DateTime<chrono::Utc>>, i32, Option<String>) {
    sqlx::query_as("SELECT published_at, attempts, last_error FROM qx_outbox_events WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("read row")
}

/// Once the relay drains `db`, the stream holds its `rows`, and none of them burned an attempt.
async fn assert_drained_unparked(relay: &Relay, db: &TestDb, stream: &TestStream, rows: i64) {
    relay.stop_when_drained(db, DRAIN).await;
    assert_eq!(stream.count().await, rows as u64);
    assert_eq!(db.count("attempts = 0").await, rows, "none parked");
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
    let client = async_nats::connect(env_var("NATS_URL")).await.expect("connect NATS_URL");
    let max_payload = client.server_info().max_payload;
    let oversize = envelope_of_size("order.placed", max_payload + max_payload / 10);
    assert!(oversize.len() > max_payload, "the body must exceed the server's max_payload ({max_payload})");

    db.insert_events(499, "order.placed").await;
    let too_big = db.insert_raw("order.placed", &oversize).await;
    let space = db.insert_raw("order placed", &envelope_of_size("order placed", 10)).await;
    let wildcard = db.insert_raw("orders.*", &envelope_of_size("orders.*", 10)).await;
    // Not poison: `*` inside a token is literal to NATS, and the Python relay publishes it.
    let literal = db.insert_raw("order.bad*name", &envelope_of_size("order.bad*name", 10)).await;
    db.insert_events(498, "order.placed").await;

    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    // Parked at the first attempt, not after max_attempts retries, so this does not wait on a backoff.
    db.wait_for("published_at IS NOT NULL", 998, DRAIN).await;
    db.wait_for(&format!("attempts >= {MAX_ATTEMPTS}"), 3, Duration::from_secs(5)).await;
    let log = relay.log();
    relay.stop().await;

    let (messages, distinct) = messages_and_distinct_ids(&stream).await;
    assert_eq!((messages, distinct), (998, 998), "each good row once");
    assert_eq!(row_state(&db, literal).await.1, 0, "order.bad*name published at once");
    let literal_subject = format!("{}.order.bad*name", stream.prefix);
    assert!(stream.messages().await.iter().any(|message| message.subject.as_str() == literal_subject));
    for (id, reason) in [(too_big, "max payload"), (space, "whitespace or NUL"), (wildcard, "wildcard token")]
    {
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
}

#[tokio::test]
async fn a_row_the_stream_rejects_backs_off_while_others_flow() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    // The stream takes the ordinary rows (a few hundred bytes) but not one of 8 kB: JetStream answers that
    // publish with an error, which is the message's fault, so it costs an attempt and a backoff.
    stream.attach_with(stream::Config { max_message_size: 4096, ..stream.config() }).await;
    db.insert_events(300, "order.placed").await;
    let big = db.insert_raw("order.placed", &envelope_of_size("order.placed", 8000)).await;
    db.insert_events(300, "order.placed").await;

    let max_attempts = 8;
    let (base, cap) = (Duration::from_millis(200), Duration::from_secs(2));
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_RELAY__RETRY_BACKOFF", "200ms"),
        ("QX_RELAY__RETRY_BACKOFF_MAX", "2s"),
        ("QX_RELAY__MAX_ATTEMPTS", &max_attempts.to_string()),
    ]);
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
}

#[tokio::test]
async fn a_full_stream_burns_no_attempts_and_drains_once_it_has_room() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    let config = stream::Config { max_messages: 100, discard: stream::DiscardPolicy::New, ..stream.config() };
    stream.attach_with(config.clone()).await;
    db.insert_events(300, "order.placed").await;
    // Were a full stream blamed on the rows, two refusals would park them.
    let env = RelayEnv::new(&db, &stream.prefix)
        .with(&[("QX_RELAY__MAX_ATTEMPTS", "2"), ("QX_RELAY__RETRY_BACKOFF", "50ms")]);
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("published_at IS NOT NULL", 100, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a few refused rounds
    assert_eq!(db.count("published_at IS NULL AND attempts = 0").await, 200, "no attempts burned");
    assert!(relay.log().contains("maximum messages exceeded"), "the log says why:\n{}", relay.log());

    stream.jetstream.update_stream(stream::Config { max_messages: -1, ..config }).await.expect("make room");
    assert_drained_unparked(&relay, &db, &stream, 300).await;
}

#[tokio::test]
async fn missing_stream_is_logged_once_per_subject_and_burns_no_attempts() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    db.insert_events(100, "order.placed").await;
    db.insert_events(100, "order.cancelled").await;
    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    db.wait_for("last_error LIKE 'no stream captures %'", 200, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few retries (one a second)
    let log = relay.log();
    for name in ["order.placed", "order.cancelled"] {
        let line = format!("no stream captures {}.{name}:", stream.prefix);
        assert_eq!(log.matches(&line).count(), 1, "one error line per subject per minute:\n{log}");
    }
    assert_eq!(db.count("attempts = 0 AND published_at IS NULL").await, 200, "no attempts burned");

    stream.attach().await;
    assert_drained_unparked(&relay, &db, &stream, 200).await;
}

#[tokio::test]
async fn ensure_stream_creates_a_stream_for_the_prefix() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    db.insert_events(300, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__ENSURE_STREAM", "true");
    let relay = Relay::spawn(&env, &[]);
    relay.stop_when_drained(&db, DRAIN).await;

    let name = stream.jetstream.stream_by_subject(format!("{}.order.placed", stream.prefix)).await;
    let name = name.expect("a stream captures the prefix");
    let mut created = stream.jetstream.get_stream(&name).await.expect("get stream");
    let info = created.info().await.expect("stream info").clone();
    assert_eq!(info.config.subjects, [format!("{}.>", stream.prefix)]);
    assert!(info.config.duplicate_window >= Duration::from_secs(120), "{:?}", info.config.duplicate_window);
    assert_eq!(info.state.messages, 300);
    assert_eq!(db.count("attempts = 0 AND last_error IS NULL").await, 300, "never failed");
    stream.jetstream.delete_stream(&name).await.expect("delete stream");
}

/// A NATS server of the test's own with a stream on it, and a database holding `rows` pending rows.
async fn on_private_nats(rows: usize) -> (NatsServer, TestDb, TestStream) {
    let nats = NatsServer::start().await;
    let (db, stream) = (TestDb::create().await, TestStream::create_on(&nats).await);
    db.insert_events(rows, "order.placed").await;
    (nats, db, stream)
}

/// A Postgres cluster of the test's own with a database on it holding `rows` pending rows, and a stream.
async fn on_private_postgres(rows: usize) -> (PgCluster, TestDb, TestStream) {
    let postgres = PgCluster::start().await;
    let (db, stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    db.insert_events(rows, "order.placed").await;
    (postgres, db, stream)
}

/// Waits until the stream holds at least `count` messages.
async fn wait_for_messages(stream: &TestStream, count: u64, relay: &Relay) {
    relay
        .eventually("the relay to start publishing", DRAIN, || async { stream.count().await >= count })
        .await;
}

#[tokio::test]
async fn nats_killed_and_restarted_mid_drain_loses_nothing() {
    let rows = 20_000;
    let (mut nats, db, stream) = on_private_nats(rows).await;
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_NATS__SERVERS", &nats.url()),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.1"),
        ("QX_RELAY__BATCH_SIZE", "500"),
        // Shorter than the outage, so acks in flight time out rather than arrive after the reconnect.
        ("QX_RELAY__ACK_TIMEOUT", "1s"),
    ]);
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
}

#[tokio::test]
async fn postgres_restarted_mid_drain_the_relay_recovers_and_finishes() {
    let rows = 20_000;
    let (postgres, db, stream) = on_private_postgres(rows).await;
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "500");
    let relay = Relay::spawn(&env, &[]);
    wait_for_messages(&stream, 3000, &relay).await;
    postgres.stop("immediate");
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.restart().await;

    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    assert!(relay.exited().is_none(), "relay still running:\n{}", relay.log());
    let log = relay.log();
    relay.stop().await;
    assert!(log.contains("Postgres unavailable"), "the outage was noticed:\n{log}");
    assert!(log.contains("Postgres available again"), "and its end:\n{log}");
    let (messages, distinct) = messages_and_distinct_ids(&stream).await;
    assert_eq!((messages, distinct), (rows, rows), "every row once");
    assert_eq!(db.count("attempts = 0").await, rows as i64, "nothing parked");
}

#[tokio::test]
async fn a_frozen_relay_releases_its_claimed_rows_after_give_up_after() {
    let frozen_nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let frozen_stream = TestStream::create_on(&frozen_nats).await;
    let env = RelayEnv::new(&db, &frozen_stream.prefix).with(&[
        ("QX_NATS__SERVERS", &frozen_nats.url()),
        // Left alone, the claim would stay open this long waiting for acks: time to freeze the relay.
        ("QX_RELAY__ACK_TIMEOUT", "5s"),
        // The shortest give_up_after that ack_timeout allows.
        ("QX_RELAY__GIVE_UP_AFTER", "10s"),
    ]);
    let frozen = Relay::spawn(&env, &[]);
    frozen
        .eventually("the relay to start", DRAIN, || async {
            frozen.log().contains("connected to Postgres and NATS")
        })
        .await;
    // Its NATS stops answering, so the batch it claims next stays in flight; then the relay itself stops.
    frozen_nats.freeze();
    let rows = 50;
    let ids = db.insert_events(rows, "order.placed").await;
    // A row's xmax names the transaction that locked it: the relay's claim, as nothing else locks rows here.
    let claimed = "SELECT count(*) FROM qx_outbox_events WHERE xmax::text <> '0'";
    frozen
        .eventually("the relay to claim the rows", DRAIN, || async {
            let count = sqlx::query_scalar::<_, i64>(claimed).fetch_one(&db.pool).await;
            count.expect("count claimed rows") == rows as i64
        })
        .await;
    frozen.signal("STOP");
    let unlocked = "SELECT count(*) FROM (SELECT 1 FROM qx_outbox_events FOR UPDATE SKIP LOCKED) AS free";
    let free: i64 = sqlx::query_scalar(unlocked).fetch_one(&db.pool).await.expect("count unlocked rows");
    assert_eq!(free, 0, "the frozen relay holds every row");

    // Another relay gets every row once Postgres ends the frozen relay's idle claim.
    let stream = TestStream::create().await;
    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    let published: HashSet<String> = stream
        .messages()
        .await
        .iter()
        .filter_map(|m| Some(m.headers.as_ref()?.get(NATS_MESSAGE_ID)?.to_string()))
        .collect();
    assert_eq!(published.len(), ids.len(), "every row reached the other relay's stream");
    frozen.kill9();
}

/// Outage bounds the tests below use: short, so each bound is seconds.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What the README allows past `give_up_after + drain_timeout` (or `drain_timeout` alone on SIGTERM).
const EXIT_SLACK: Duration = Duration::from_secs(1);

/// Relay settings with the bounds above, NATS at `nats` and reconnecting forever.
fn bounded_env(db: &TestDb, stream: &TestStream, nats: &str) -> RelayEnv {
    RelayEnv::new(db, &stream.prefix).with(&[
        ("QX_NATS__SERVERS", nats),
        // "Forever", as documented: the relay's own bound must end the outage, not the client's.
        ("QX_NATS__MAX_RECONNECT_ATTEMPTS", "0"),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__BATCH_SIZE", "500"),
        ("QX_RELAY__ACK_TIMEOUT", "1s"),
        ("QX_RELAY__STATEMENT_TIMEOUT", "1s"),
        ("QX_RELAY__GIVE_UP_AFTER", "5s"),
        ("QX_RELAY__DRAIN_TIMEOUT", "5s"),
    ])
}

#[tokio::test]
async fn nats_gone_for_good_ends_in_exit_69_within_give_up_after_and_drain_timeout() {
    let (mut nats, db, stream) = on_private_nats(50_000).await;
    let relay = Relay::spawn(&bounded_env(&db, &stream, &nats.url()), &[]);
    wait_for_messages(&stream, 1000, &relay).await;
    nats.kill9();
    let killed = Instant::now();
    let status = relay.wait(GIVE_UP_AFTER + DRAIN_TIMEOUT + EXIT_SLACK).await;
    let took = killed.elapsed();
    let log = relay.log();
    eprintln!("NATS killed for good: exit {:?} after {took:.1?}", status.code());
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("NATS unavailable for longer than 5s"), "{log}");
    assert!(db.unpublished().await > 0, "the kill came after the drain; make the backlog larger");
}

#[tokio::test]
async fn sigterm_while_nats_is_gone_exits_0_within_drain_timeout_and_loses_nothing() {
    let rows = 50_000;
    let (mut nats, db, stream) = on_private_nats(rows).await;
    let relay = Relay::spawn(&bounded_env(&db, &stream, &nats.url()), &[]);
    wait_for_messages(&stream, 1000, &relay).await;
    nats.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the relay is waiting for NATS now
    relay.signal("TERM");
    let signalled = Instant::now();
    let status = relay.wait(DRAIN_TIMEOUT + EXIT_SLACK).await;
    eprintln!("SIGTERM with NATS gone: exit {:?} after {:.1?}", status.code(), signalled.elapsed());
    assert_eq!(status.code(), Some(0), "{}", relay.log());

    // What it had not marked goes out once NATS is back, each event once.
    nats.restart().await;
    let relay = Relay::spawn(&bounded_env(&db, &stream, &nats.url()), &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    assert_eq!(messages_and_distinct_ids(&stream).await, (rows, rows), "every row once");
}

#[tokio::test]
async fn a_hung_postgres_is_an_outage_not_ready_then_exit_69_and_nothing_lost() {
    let rows = 50_000;
    let (postgres, db, stream) = on_private_postgres(rows).await;
    let env = bounded_env(&db, &stream, &env_var("NATS_URL"));
    let (relay, port) = Relay::spawn_serving(&env);
    wait_for_messages(&stream, 2000, &relay).await;
    postgres.freeze();
    let frozen = Instant::now();

    // Not ready while frozen: the probe's query cannot answer.
    let not_ready =
        poll(GIVE_UP_AFTER, || async { http(port, "GET", "/readyz").await.filter(|r| r.status == 503) })
            .await;
    let ready_seen_down = not_ready.is_some_and(|response| response.body.contains("postgres: down"));
    let status = relay.wait(GIVE_UP_AFTER + DRAIN_TIMEOUT + EXIT_SLACK).await;
    let took = frozen.elapsed();
    let log = relay.log();
    postgres.thaw();
    eprintln!("Postgres frozen: exit {:?} after {took:.1?}", status.code());
    assert!(ready_seen_down, "/readyz said 503 with postgres down while frozen");
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("Postgres did not answer within 1s"), "the hang is named:\n{log}");
    assert!(log.contains("Postgres unavailable for longer than 5s"), "{log}");

    // Thawed, another relay finishes: every row in the stream, each once.
    let relay = Relay::spawn(&env, &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    assert_eq!(messages_and_distinct_ids(&stream).await, (rows, rows), "every row once");
}

#[tokio::test]
async fn postgres_gone_for_good_is_named_with_its_server_and_why_then_exit_69() {
    let (postgres, db, stream) = on_private_postgres(50_000).await;
    let relay = Relay::spawn(&bounded_env(&db, &stream, &env_var("NATS_URL")), &[]);
    wait_for_messages(&stream, 2000, &relay).await;
    postgres.stop("immediate");
    let status = relay.wait(GIVE_UP_AFTER + DRAIN_TIMEOUT + EXIT_SLACK).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(69), "{log}");
    let server = format!("127.0.0.1:{}", postgres.port);
    let outage: Vec<&str> =
        log.lines().filter(|line| line.contains("Postgres unavailable; retrying")).collect();
    assert!(!outage.is_empty(), "{log}");
    for line in outage {
        assert!(line.contains(&format!("server={server}")), "each outage line names the server: {line}");
    }
    let last = log.lines().last().unwrap_or_default();
    for part in
        ["Postgres unavailable for longer than 5s", &format!("Postgres at {server} unreachable"), "refused"]
    {
        assert!(last.contains(part), "{part:?} missing from the last line: {last}");
    }
    assert!(!log.contains("pool timed out"), "a timeout without its cause:\n{log}");
}

/// Inserts `sizes.len()` rows whose envelopes carry that many filler bytes each.
async fn insert_sized(db: &TestDb, sizes: &[usize]) {
    for &size in sizes {
        db.insert_raw("order.placed", &envelope_of_size("order.placed", size)).await;
    }
}

/// Drains what `db` holds with the default budget and returns the relay's peak RSS in MiB.
async fn drain_peak_rss_mib(db: &TestDb, stream: &TestStream) -> f64 {
    let relay = Relay::spawn(&RelayEnv::new(db, &stream.prefix), &[]);
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let peak = ProcStats::read(relay.pid()).expect("the relay's /proc").peak_rss_kib as f64 / 1024.0;
    relay.signal("TERM");
    assert_eq!(relay.wait(Duration::from_secs(15)).await.code(), Some(0), "{}", relay.log());
    peak
}

#[tokio::test]
async fn large_rows_keep_the_relay_within_100_mib_with_the_defaults() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    insert_sized(&db, &[500_000; 300]).await;
    let peak = drain_peak_rss_mib(&db, &stream).await;
    eprintln!("300 rows of 500 KB: peak RSS {peak:.1} MiB");
    assert!(peak <= 100.0, "peak RSS {peak:.1} MiB");
    assert_eq!(messages_and_distinct_ids(&stream).await, (300, 300));

    // Any mix up to the server's 1 MiB max_payload, the largest rows included.
    let (db2, stream2) = (TestDb::create().await, TestStream::create().await);
    let sizes: Vec<usize> = (0..300).map(|i| [1_000, 50_000, 300_000, 1_000_000][i % 4]).collect();
    insert_sized(&db2, &sizes).await;
    let peak = drain_peak_rss_mib(&db2, &stream2).await;
    eprintln!("300 rows of 1 KB to 1 MB: peak RSS {peak:.1} MiB");
    assert!(peak <= 100.0, "peak RSS {peak:.1} MiB");
    assert_eq!(messages_and_distinct_ids(&stream2).await, (300, 300));
}

#[tokio::test]
async fn a_server_without_jetstream_is_named_and_ends_in_exit_69() {
    let nats = NatsServer::start_without_jetstream().await;
    let db = TestDb::create().await;
    db.insert_events(10, "order.placed").await;
    let stream = TestStream::unattached().await; // names only: the server has nowhere to put a stream
    let relay = Relay::spawn(&bounded_env(&db, &stream, &nats.url()), &[]);
    let status = relay.wait(GIVE_UP_AFTER + DRAIN_TIMEOUT + EXIT_SLACK).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("JetStream is not running on the server"), "the cause is named:\n{log}");
    assert!(!log.contains("no stream captures"), "not blamed on a missing stream:\n{log}");
    assert_eq!(db.count("attempts = 0 AND published_at IS NULL").await, 10, "rows untouched");
}

#[tokio::test]
async fn two_rows_sharing_an_event_id_are_reported_by_row_id() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let event_id = Uuid::new_v4();
    let body = |n: u32| envelope(event_id, "order.placed", json!({ "n": n }));
    let first = db.insert_raw("order.placed", &body(1)).await;
    let second = db.insert_raw("order.placed", &body(2)).await;
    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let log = relay.log();
    relay.stop().await;
    assert_eq!(stream.count().await, 1, "JetStream kept one of them");
    let warned =
        |id: Uuid| log.lines().any(|l| l.contains("two rows share it") && l.contains(&id.to_string()));
    assert!(warned(first) ^ warned(second), "the dropped row, and only it, is named:\n{log}");
}

#[tokio::test]
async fn a_table_allowing_null_where_qx_db_does_not_is_refused_naming_the_column() {
    let db = TestDb::create().await;
    db.execute("ALTER TABLE qx_outbox_events ALTER COLUMN event_version DROP NOT NULL").await;
    let env = RelayEnv::new(&db, "orders");
    for args in [&["run"][..], &["check"][..]] {
        let (code, stdout, stderr) = run_command(&env, args);
        assert_eq!(code, Some(78), "{args:?}: {stdout}{stderr}");
        assert!(
            format!("{stdout}{stderr}").contains("allows NULL in [\"event_version\"]"),
            "{stdout}{stderr}"
        );
    }
}
