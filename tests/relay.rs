//! The relay foundation against real Postgres and NATS: what reaches the stream, byte for byte; shards;
//! SIGTERM and kill -9 mid-drain; a missing stream; bad settings; `check`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use qx_relay::wire::{
    HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_NAME, HEADER_EVENT_VERSION, HEADER_TENANT_ID,
};
use qx_relay_testkit::{http, run_command, Relay, RelayEnv, TestDb, TestStream};
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(60);

/// One row as the table holds it, for comparing with what the stream got.
#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    event_name: String,
    event_version: i32,
    payload: String,
    correlation_id: Option<Uuid>,
    tenant_id: Option<Uuid>,
    event_id: Option<String>,
}

async fn rows(db: &TestDb) -> HashMap<String, Row> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, event_name, event_version, payload::text AS payload, correlation_id, tenant_id, \
                payload->>'event_id' AS event_id FROM qx_outbox_events",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter().map(|row| (row.event_id.clone().unwrap_or_else(|| row.id.to_string()), row)).collect()
}

/// Every message matches its row exactly: subject, body, headers, and each row is in the stream once.
async fn assert_stream_matches_table(db: &TestDb, stream: &TestStream, prefix: &str) {
    let rows = rows(db).await;
    let messages = stream.messages().await;
    assert_eq!(messages.len(), rows.len(), "one message per row");
    let mut seen = HashSet::new();
    for message in &messages {
        let headers = message.headers.as_ref().expect("headers");
        let msg_id = headers.get(NATS_MESSAGE_ID).expect("Nats-Msg-Id").as_str();
        assert!(seen.insert(msg_id.to_owned()), "{msg_id} published twice");
        let row = rows.get(msg_id).unwrap_or_else(|| panic!("no row for Nats-Msg-Id {msg_id}"));
        assert_eq!(message.subject.as_str(), format!("{prefix}.{}", row.event_name));
        assert_eq!(message.payload.as_ref(), row.payload.as_bytes(), "body is payload::text unchanged");
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(header(HEADER_EVENT_NAME).as_deref(), Some(row.event_name.as_str()));
        assert_eq!(header(HEADER_EVENT_VERSION), Some(row.event_version.to_string()));
        assert_eq!(header(HEADER_EVENT_ID), row.event_id.clone());
        assert_eq!(header(HEADER_CORRELATION_ID), row.correlation_id.map(|id| id.to_string()));
        assert_eq!(header(HEADER_TENANT_ID), row.tenant_id.map(|id| id.to_string()));
    }
}

/// Runs one relay with `env` until no row is pending, stops it, and checks the stream against the table.
async fn drain_and_compare(db: &TestDb, stream: &TestStream, env: &RelayEnv) {
    let relay = Relay::spawn(env, &[]);
    relay.stop_when_drained(db, DRAIN).await;
    assert_stream_matches_table(db, stream, &stream.prefix).await;
}

#[tokio::test]
async fn drains_rows_with_exact_bodies_and_headers() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(3000, "order.placed").await;
    db.insert_events(500, "identity.user.registered").await;
    drain_and_compare(&db, &stream, &RelayEnv::new(&db, &stream.prefix)).await;
    assert_eq!(db.count("published_at IS NOT NULL AND attempts = 0 AND last_error IS NULL").await, 3500);
}

#[tokio::test]
async fn a_window_smaller_than_the_batch_publishes_every_row_once() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(250, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix)
        .set("QX_RELAY__BATCH_SIZE", "100")
        // Most acks are awaited with the window full, and the last batch is a partial one.
        .set("QX_RELAY__MAX_IN_FLIGHT", "7");
    drain_and_compare(&db, &stream, &env).await;
    assert_eq!(db.count("published_at IS NOT NULL AND attempts = 0 AND last_error IS NULL").await, 250);
}

#[tokio::test]
async fn rows_of_a_child_table_are_published_and_marked_once() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(2000, "order.placed").await;
    // Every other row moves to a child table (as in partitioning by inheritance), so each batch mixes both
    // tables and the same `ctid` names a row in each.
    db.execute(
        "CREATE TABLE qx_outbox_events_child () INHERITS (qx_outbox_events);
         WITH moved AS (
             DELETE FROM ONLY qx_outbox_events WHERE id IN (
                 SELECT id FROM (SELECT id, row_number() OVER (ORDER BY occurred_at) AS n FROM qx_outbox_events) o
                 WHERE n % 2 = 0)
             RETURNING *)
         INSERT INTO qx_outbox_events_child SELECT * FROM moved",
    )
    .await;
    assert_eq!(db.count("tableoid = 'qx_outbox_events_child'::regclass").await, 1000);
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "100");
    drain_and_compare(&db, &stream, &env).await;
}

#[tokio::test]
async fn qx_db_fixture_rows_round_trip_byte_for_byte() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let fixtures = db.insert_fixtures().await;
    drain_and_compare(&db, &stream, &RelayEnv::new(&db, &stream.prefix)).await;
    // The fixture holds the column's text exactly as Postgres returned it to qx-db: the body must equal it.
    let bodies: HashSet<Vec<u8>> = stream.messages().await.iter().map(|m| m.payload.to_vec()).collect();
    for fixture in &fixtures {
        assert!(bodies.contains(fixture.payload.as_bytes()), "fixture {} body changed", fixture.id);
    }
}

#[tokio::test]
async fn three_shards_split_the_table_like_the_python_relay() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(3000, "order.placed").await;
    // Each relay publishes under its own sub-prefix, so the subject tells which relay sent a row.
    let relays: Vec<Relay> = (0..3)
        .map(|shard| {
            let env =
                RelayEnv::new(&db, &format!("{}.s{shard}", stream.prefix)).set("QX_RELAY__SHARD_COUNT", "3");
            Relay::spawn(&env, &["--shard-id", &shard.to_string()])
        })
        .collect();
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    for relay in relays {
        relay.stop().await;
    }
    let expected: HashMap<String, i32> = sqlx::query_as::<_, (String, i32)>(
        "SELECT payload->>'event_id', (ABS(HASHTEXT(id::text)::bigint) % 3)::int FROM qx_outbox_events",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 3000, "each row published once");
    let mut per_shard = [0; 3];
    for message in &messages {
        let msg_id = message.headers.as_ref().unwrap().get(NATS_MESSAGE_ID).unwrap().as_str();
        let shard = expected[msg_id];
        assert!(
            message.subject.starts_with(&format!("{}.s{shard}.", stream.prefix)),
            "{msg_id} belongs to shard {shard} but came on {}",
            message.subject
        );
        per_shard[shard as usize] += 1;
    }
    assert!(per_shard.iter().all(|&n| n > 800), "hash split is roughly even: {per_shard:?}");
}

/// Starts a relay on a large backlog and waits until it is part-way through.
async fn relay_mid_drain(db: &TestDb, stream: &TestStream, rows: usize) -> Relay {
    db.insert_events(rows, "order.placed").await;
    let env = RelayEnv::new(db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "500");
    let relay = Relay::spawn(&env, &[]);
    relay.eventually("the relay to start publishing", DRAIN, || async { stream.count().await >= 2000 }).await;
    relay
}

/// `signal` mid-drain: the relay finishes its batch and exits 0, naming the signal; every row it marked is in
/// the stream, and a restart publishes the rest, each event once.
async fn signal_mid_drain_exits_cleanly_and_a_restart_finishes(signal: &str) {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let rows = 60_000;
    let relay = relay_mid_drain(&db, &stream, rows).await;
    relay.signal(signal);
    let status = relay.wait(Duration::from_secs(10)).await; // drain_timeout
    assert_eq!(status.code(), Some(0), "log:\n{}", relay.log());
    assert!(relay.log().contains("relay stopped"), "stop is logged with totals");
    assert!(relay.log().contains(&format!("SIG{signal}")), "the log names the signal:\n{}", relay.log());
    let left = db.unpublished().await;
    assert!(left > 0, "SIG{signal} came after the drain finished; make the backlog larger");
    // Every row marked so far is in the stream: a clean stop leaves nothing published-but-unmarked behind.
    assert!(stream.count().await >= (rows as i64 - left) as u64);

    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    assert_eq!(stream.count().await, rows as u64, "each event once");
}

#[tokio::test]
async fn sigterm_mid_drain_exits_cleanly_and_a_restart_finishes() {
    signal_mid_drain_exits_cleanly_and_a_restart_finishes("TERM").await;
}

#[tokio::test]
async fn sighup_mid_drain_exits_cleanly_and_a_restart_finishes() {
    signal_mid_drain_exits_cleanly_and_a_restart_finishes("HUP").await;
}

#[tokio::test]
async fn kill_9_mid_batch_then_restart_publishes_each_event_exactly_once() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let rows = 60_000;
    let relay = relay_mid_drain(&db, &stream, rows).await;
    relay.kill9();
    let published_before_restart = stream.count().await;
    let marked = rows as u64 - db.unpublished().await as u64;
    assert!(marked < rows as u64, "kill came after the drain finished; make the backlog larger");

    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    assert_eq!(stream.count().await, rows as u64, "JetStream dedupe absorbs the republished rows");
    assert!(published_before_restart >= marked, "no row is marked before its PubAck");
    assert_stream_matches_table(&db, &stream, &stream.prefix).await;
}

#[tokio::test]
async fn rows_wait_for_a_missing_stream_without_burning_attempts() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    db.insert_events(200, "order.placed").await;
    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &[]);
    let reason = format!("no stream captures {}.order.placed", stream.prefix);
    db.wait_for(&format!("last_error = '{reason}'"), 200, DRAIN).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a few retries
    assert_eq!(db.count("attempts = 0 AND published_at IS NULL").await, 200, "no attempts burned");
    assert!(relay.log().contains(&reason), "the log names the missing subject:\n{}", relay.log());

    stream.attach().await;
    relay.stop_when_drained(&db, DRAIN).await;
    assert_eq!(stream.count().await, 200);
    assert_eq!(db.count("attempts = 0").await, 200, "none parked");
}

#[tokio::test]
async fn notify_wakes_an_idle_relay() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.execute(include_str!("../scripts/outbox-notify.sql")).await;
    let env = RelayEnv::new(&db, &stream.prefix)
        // Polls so rare that only the notification can explain a publish within the test.
        .set("QX_RELAY__IDLE_POLL_INTERVAL", "1h")
        .set("QX_RELAY__POLL_INTERVAL", "1h")
        .set("QX_RELAY__NOTIFY_CHANNEL", "qx_outbox");
    let relay = Relay::spawn(&env, &[]);
    db.insert_events(1, "order.placed").await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await; // the first claim at start
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await; // idle now
        db.insert_events(10, "order.placed").await;
        db.wait_for("published_at IS NULL", 0, Duration::from_secs(20)).await;
    }
    relay.stop().await;
    assert_eq!(stream.count().await, 31);
}

fn config_env(extra: &[(&str, &str)]) -> RelayEnv {
    RelayEnv::default()
        .with(&[
            ("QX_RELAY__SUBJECT_PREFIX", "orders"),
            ("QX_DB__URL", "postgresql+asyncpg://u:pw@127.0.0.1:5432/app"),
        ])
        .with(extra)
}

#[test]
fn bad_settings_exit_78_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("qxr-config-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let typo = file("typo.toml", "[relay]\nbatchsize = 10\n");
    // (environment, flags, the key the error must name)
    type Case = (RelayEnv, Vec<String>, &'static str);
    let cases: Vec<Case> = vec![
        (config_env(&[]), vec!["--config".into(), typo], "relay.batchsize"),
        (config_env(&[("QX_RELAY__POLL_INTERVAL", "fast")]), vec![], "relay.poll_interval"),
        (config_env(&[("QX_RELAY__BATCH_SIZE", "lots")]), vec![], "relay.batch_size"),
        (config_env(&[("QX_DB__URL", "mysql://x/y")]), vec![], "db.url"),
        (
            config_env(&[]),
            vec!["--shard-id".into(), "3".into(), "--shard-count".into(), "3".into()],
            "relay.shard_id",
        ),
        (RelayEnv::default(), vec![], "relay.subject_prefix"),
        (config_env(&[("QX_RELAY__BATCHSIZE", "10")]), vec![], "relay.batchsize"),
        (config_env(&[("QX_RELAY__GIVE_UP_AFTER", "1ms")]), vec![], "relay.give_up_after"),
        (config_env(&[("QX_RELAY__ACK_TIMEOUT", "31s")]), vec![], "relay.give_up_after"),
        (config_env(&[("QX_RELAY__LEADER_TTL", "500000000000y")]), vec![], "relay.leader_ttl"),
        (
            config_env(&[("QX_NATS__CONNECT_TIMEOUT_SECONDS", "100000000000000000000000000000.0")]),
            vec![],
            "nats.connect_timeout_seconds",
        ),
    ];
    for (env, args, key) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).chain(["run"]).collect();
        let (code, _, stderr) = run_command(&env, &args);
        assert_eq!(code, Some(78), "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].contains(key), "names {key}: {stderr}");
    }
    let (code, _, stderr) = run_command(&config_env(&[]), &["--config", "/nonexistent/qx-relay.toml", "run"]);
    assert_eq!(code, Some(78), "{stderr}");
    let (code, _, _) = run_command(&config_env(&[]), &["--no-such-flag"]);
    assert_eq!(code, Some(64), "usage error");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn durations_too_long_to_add_up_exit_78_before_connecting() {
    let db = TestDb::create().await;
    let env = RelayEnv::new(&db, "absurd")
        // Each fits in a Duration; their sum (the republish horizon) does not.
        .set("QX_RELAY__GIVE_UP_AFTER", "500000000000y")
        .set("QX_RELAY__DRAIN_TIMEOUT", "500000000000y");
    let relay = Relay::spawn(&env, &[]);
    let status = relay.wait(Duration::from_secs(10)).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(78), "{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {log}");
    assert!(lines[0].contains("relay.drain_timeout: must be at most 1day"), "{log}");
}

#[test]
fn a_services_foreign_qx_settings_do_not_break_startup() {
    let env = config_env(&[
        ("QX_APP__NAME", "orders"),
        ("QX_ENV", "production"),
        ("QX_DB__POOL_SIZE", "20"),
        ("QX_NATS__SERVERS", r#"["nats://a:4222","nats://b:4222"]"#),
    ]);
    let (code, stdout, stderr) = run_command(&env, &["config"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(r#"servers = ["nats://a:4222", "nats://b:4222"]"#), "{stdout}");
    assert!(stdout.contains("u:***@"), "password redacted: {stdout}");
    assert!(!stdout.contains("pw"), "password redacted: {stdout}");
}

#[tokio::test]
async fn check_passes_on_a_good_setup_and_names_the_failing_check() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let env = RelayEnv::new(&db, &stream.prefix);
    let (code, stdout, _) = run_command(&env, &["check"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(stdout.lines().count(), 5, "one line per check:\n{stdout}");

    let (code, stdout, _) = run_command(&env, &["check", "--json"]);
    assert_eq!(code, Some(0), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}"));
    assert_eq!((report["ok"].as_bool(), report["exit_code"].as_i64()), (Some(true), Some(0)), "{report}");
    assert_eq!(report["checks"].as_array().map(Vec::len), Some(5), "{report}");

    let no_stream = env.clone().set("QX_RELAY__SUBJECT_PREFIX", format!("{}x", stream.prefix));
    let (code, stdout, _) = run_command(&no_stream, &["check"]);
    assert_eq!(code, Some(78), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("FAIL  stream:")).unwrap_or_else(|| panic!("{stdout}"));
    for hint in ["create a JetStream stream", "relay.ensure_stream = true"] {
        assert!(line.contains(hint), "{hint:?}: what to do, as `run` says it: {line}");
    }
    let (code, stdout, _) = run_command(&no_stream, &["check", "--json"]);
    assert_eq!(code, Some(78), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}"));
    let stream_check = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["check"] == "stream"));
    let stream_check = stream_check.unwrap_or_else(|| panic!("{report}"));
    assert_eq!(stream_check["ok"], false, "{report}");
    assert!(stream_check["hint"].as_str().is_some_and(|hint| hint.contains("ensure_stream")), "{report}");

    let no_table = env.clone().set("QX_RELAY__TABLE", "missing_outbox");
    let (code, stdout, _) = run_command(&no_table, &["check"]);
    assert_eq!(code, Some(78), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  table:")), "{stdout}");

    // A view has the outbox columns but no ctid: rows could not be claimed and settled through it.
    db.execute("CREATE VIEW outbox_view AS SELECT * FROM qx_outbox_events").await;
    let view = env.clone().set("QX_RELAY__TABLE", "outbox_view");
    let (code, stdout, _) = run_command(&view, &["check"]);
    assert_eq!(code, Some(78), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  table:") && l.contains("ctid")), "{stdout}");

    let no_postgres = env.set("QX_DB__URL", "postgres://postgres@127.0.0.1:1/x");
    let (code, stdout, _) = run_command(&no_postgres, &["check"]);
    assert_eq!(code, Some(69), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  postgres:")), "{stdout}");
}

/// Tuples read from the outbox table so far (sequential plus index fetches), as Postgres counts them.
async fn tuples_read(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables \
         WHERE relname = 'qx_outbox_events'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read table statistics")
}

#[tokio::test]
async fn an_idle_relay_with_metrics_reads_a_sliver_of_a_large_published_table() {
    let (mut db, stream) = (TestDb::create().await, TestStream::create().await);
    let rows: i64 = 300_000;
    // A table that only grows, as in mark mode: every row published an hour ago. Set up on a connection of
    // its own, closed before measuring, so its reads are counted (backends report them at exit) beforehand.
    db.insert_events(rows as usize, "order.placed").await;
    let mut setup = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.expect("connect");
    sqlx::query("UPDATE qx_outbox_events SET published_at = now() - interval '1 hour'")
        .execute(&mut setup)
        .await
        .expect("mark rows published");
    sqlx::query("VACUUM ANALYZE qx_outbox_events").execute(&mut setup).await.expect("vacuum");
    sqlx::Connection::close(setup).await.expect("close setup connection");
    db.reconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = tuples_read(&db).await;

    let (relay, port) = Relay::spawn_serving(&RelayEnv::new(&db, &stream.prefix));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let metrics = http(port, "GET", "/metrics").await.expect("metrics answer").body;
    relay.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = tuples_read(&db).await - before;
    eprintln!("idle relay with metrics, 12 s over {rows} published rows: {read} tuples read");
    assert!(metrics.contains("qx_relay_pending_rows 0"), "the gauges were sampled:\n{metrics}");
    assert!(read < rows / 10, "{read} tuples read");
}
