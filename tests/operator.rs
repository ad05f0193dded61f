//! What operators see and do: `status` and `dead list/requeue` on a table with parked rows (text and JSON),
//! and what happens to rows once published: `on_publish = "delete"` and `retention` remove published rows only.

use std::time::Duration;

use async_nats::jetstream::stream;
use qx_relay_testkit::outbox::envelope_of_size;
use qx_relay_testkit::{run_command, Relay, RelayEnv, TestDb, TestStream};
use serde_json::Value;
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(30);

/// Runs a subcommand that must succeed; its stdout.
fn ok(env: &RelayEnv, args: &[&str]) -> String {
    let (code, stdout, stderr) = run_command(env, args);
    assert_eq!(code, Some(0), "qx-relay {args:?}: {stderr}");
    stdout
}

/// Runs a `--json` subcommand that must succeed; its parsed output.
fn json(env: &RelayEnv, args: &[&str]) -> Value {
    let stdout = ok(env, args);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("qx-relay {args:?} printed no JSON ({err}): {stdout}"))
}

/// `status --json` of the single shard: (pending, parked, published in the last 5 minutes).
fn status(env: &RelayEnv) -> (i64, i64, i64) {
    let status = json(env, &["status", "--json"]);
    assert_eq!(status["table"], "qx_outbox_events", "{status}");
    let shard = &status["shards"][0];
    assert_eq!((shard["shard"].as_u64(), shard["shard_count"].as_u64()), (Some(0), Some(1)), "{status}");
    let count = |key: &str| shard[key].as_i64().unwrap_or_else(|| panic!("{key} in {status}"));
    (count("pending"), count("parked"), count("published_last_5m"))
}

fn parked_ids(list: &Value) -> Vec<String> {
    let rows = list.as_array().unwrap_or_else(|| panic!("a JSON array: {list}"));
    rows.iter().map(|row| row["id"].as_str().expect("id").to_owned()).collect()
}

#[tokio::test]
async fn status_and_dead_letters_round_trip() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    // Rows over 4 kB are refused by this stream until an operator raises the limit.
    let config = stream::Config { max_message_size: 4096, ..stream.config() };
    stream.attach_with(config.clone()).await;
    db.insert_events(200, "order.placed").await;
    let big_1 = db.insert_raw("order.placed", &envelope_of_size("order.placed", 8000)).await;
    let poison = db.insert_raw("order placed", &envelope_of_size("order placed", 10)).await;
    let big_2 = db.insert_raw("order.placed", &envelope_of_size("order.placed", 8000)).await;

    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_RELAY__MAX_ATTEMPTS", "2"),
        ("QX_RELAY__RETRY_BACKOFF", "50ms"),
        ("QX_RELAY__RETRY_BACKOFF_MAX", "100ms"),
    ]);
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("published_at IS NOT NULL", 200, DRAIN).await;
    db.wait_for("attempts >= 2", 3, DRAIN).await;
    relay.stop().await;

    // status: text and JSON agree.
    assert_eq!(status(&env), (0, 3, 200));
    let text = ok(&env, &["status"]);
    assert!(text.contains("shard 0/1: pending 0"), "{text}");
    assert!(text.contains("parked 3"), "{text}");

    // dead list: oldest first, filters, reasons.
    let list = json(&env, &["dead", "list", "--json"]);
    assert_eq!(parked_ids(&list), [big_1, poison, big_2].map(|id| id.to_string()), "{list}");
    for row in list.as_array().unwrap() {
        assert_eq!(row["attempts"], 2, "{row}");
        assert!(row["occurred_at"].as_str().is_some_and(|at| !at.is_empty()), "{row}");
        let reason = row["last_error"].as_str().unwrap_or_default();
        match row["event_name"].as_str() {
            Some("order placed") => assert!(reason.starts_with("parked: "), "{row}"),
            Some("order.placed") => assert!(reason.contains("maximum"), "the stream's reason: {row}"),
            other => panic!("unexpected event name {other:?}"),
        }
    }
    let only = json(&env, &["dead", "list", "--event-name", "order placed", "--json"]);
    assert_eq!(parked_ids(&only), [poison.to_string()]);
    let first = json(&env, &["dead", "list", "--limit", "1", "--json"]);
    assert_eq!(parked_ids(&first), [big_1.to_string()]);
    let text = ok(&env, &["dead", "list"]);
    assert!(text.lines().any(|l| l.starts_with(&poison.to_string()) && l.contains("order placed")), "{text}");
    assert!(text.ends_with("3 parked row(s)\n"), "{text}");

    // dead requeue: only parked rows, only the ones asked for.
    let published: Uuid =
        sqlx::query_scalar("SELECT id FROM qx_outbox_events WHERE published_at IS NOT NULL LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let requeued = json(&env, &["dead", "requeue", "--id", &published.to_string(), "--json"]);
    assert_eq!(requeued["requeued"], 0, "a published row is not requeued");
    let requeued = json(&env, &["dead", "requeue", "--id", &poison.to_string(), "--json"]);
    assert_eq!(requeued["requeued"], 1);
    assert_eq!(db.count(&format!("id = '{poison}' AND attempts = 0 AND last_error IS NULL")).await, 1);
    assert_eq!(status(&env), (1, 2, 200));
    assert_eq!(parked_ids(&json(&env, &["dead", "list", "--json"])), [big_1, big_2].map(|id| id.to_string()));

    // The operator lifts the limit that refused the big rows and requeues them by name.
    stream
        .jetstream
        .update_stream(stream::Config { max_message_size: -1, ..config })
        .await
        .expect("raise max_message_size");
    let requeued = json(&env, &["dead", "requeue", "--event-name", "order.placed", "--json"]);
    assert_eq!(requeued["requeued"], 2);
    assert_eq!(status(&env), (3, 0, 200));
    let text = ok(&env, &["dead", "requeue", "--all"]);
    assert_eq!(text, "requeued 0 row(s)\n");

    let relay = Relay::spawn(&env, &[]);
    db.wait_for("published_at IS NOT NULL", 202, DRAIN).await;
    db.wait_for("attempts >= 2", 1, DRAIN).await; // the poison row again
    relay.stop().await;
    assert_eq!(stream.count().await, 202);
    assert_eq!(status(&env), (0, 1, 202));
    assert_eq!(json(&env, &["dead", "requeue", "--all", "--json"])["requeued"], 1);
    assert_eq!(status(&env), (1, 0, 202));

    // Usage errors and an unreachable database.
    for args in [&["dead", "requeue"][..], &["dead", "requeue", "--all", "--id", &poison.to_string()]] {
        let (code, _, stderr) = run_command(&env, args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
    }
    let down = env.clone().set("QX_DB__URL", "postgres://postgres@127.0.0.1:1/x");
    for args in [&["status"][..], &["dead", "list"], &["dead", "requeue", "--all"]] {
        let (code, _, stderr) = run_command(&down, args);
        assert_eq!(code, Some(69), "{args:?}: {stderr}");
        assert!(stderr.contains("postgres"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn control_characters_from_rows_are_escaped_in_text_output() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    // Both are parked at once (a subject token holds no whitespace), and logged, and listed.
    let (newline, escape) = ("a\nforged line", "\x1b[31mred alert");
    let forged = db.insert_raw(newline, &envelope_of_size("x", 10)).await;
    let coloured = db.insert_raw(escape, &envelope_of_size("x", 10)).await;
    let env = RelayEnv::new(&db, &stream.prefix);
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("last_error LIKE 'parked: %'", 2, DRAIN).await;
    let log = relay.log();
    relay.stop().await;

    assert!(!log.contains('\x1b'), "no escape character in the log:\n{log}");
    assert!(!log.lines().any(|line| line.starts_with("forged line")), "no forged line:\n{log}");
    for (id, shown) in [(forged, "a\\nforged line"), (coloured, "\\x1b[31mred alert")] {
        let id = id.to_string();
        let parked = log.lines().find(|line| line.contains(&id) && line.contains("row parked"));
        let parked = parked.unwrap_or_else(|| panic!("a log line parks {id}:\n{log}"));
        assert!(parked.contains(shown), "{shown} in {parked}");
    }

    let text = ok(&env, &["dead", "list"]);
    assert_eq!(text.lines().count(), 3, "one line per row, and the total:\n{text}");
    assert!(!text.contains('\x1b'), "no escape character in the list:\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&forged.to_string()) && l.contains("a\\nforged line")),
        "{text}"
    );
    // JSON carries the names as they are: serde escapes them.
    let list = json(&env, &["dead", "list", "--json"]);
    let mut names: Vec<&str> =
        list.as_array().unwrap().iter().filter_map(|row| row["event_name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, [escape, newline], "{list}");
}

#[tokio::test]
async fn on_publish_delete_removes_published_rows_only() {
    let (db, stream) = (TestDb::create().await, TestStream::unattached().await);
    // Captures order events only: audit rows have no stream and must stay pending.
    stream
        .attach_with(stream::Config {
            subjects: vec![format!("{}.order.>", stream.prefix)],
            ..stream.config()
        })
        .await;
    db.insert_events(300, "order.placed").await;
    db.insert_events(50, "audit.logged").await;
    let poison = db.insert_raw("order placed", &envelope_of_size("order placed", 10)).await;
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__ON_PUBLISH", "delete");
    let relay = Relay::spawn(&env, &[]);
    db.wait_for("event_name = 'order.placed'", 0, DRAIN).await;
    db.wait_for("last_error LIKE 'no stream captures %'", 50, DRAIN).await;
    db.wait_for("attempts >= 10", 1, DRAIN).await;
    // More rows once the failures are written: deleting these must not touch the failed rows.
    db.insert_events(100, "order.paid").await;
    db.wait_for("event_name = 'order.paid'", 0, DRAIN).await;
    relay.stop().await;

    assert_eq!(stream.count().await, 400, "every deleted row was published");
    assert_eq!(db.count("true").await, 51, "only published rows are deleted");
    assert_eq!(db.count("event_name = 'audit.logged' AND published_at IS NULL AND attempts = 0").await, 50);
    assert_eq!(db.count(&format!("id = '{poison}' AND published_at IS NULL")).await, 1, "parked row kept");
}

#[tokio::test]
async fn retention_deletes_old_published_rows_only() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    // More old rows than one retention statement deletes (1000), so a pass takes several.
    let old = db.insert_events(2500, "order.placed").await;
    let recent = db.insert_events(100, "order.placed").await;
    let parked = db.insert_events(1, "order.placed").await;
    let pending = db.insert_events(100, "order.placed").await;
    let mark = |ids: &[Uuid], sql: &str| {
        let sql = format!("UPDATE qx_outbox_events SET {sql} WHERE id = ANY($1)");
        let (pool, ids) = (db.pool.clone(), ids.to_vec());
        async move { sqlx::query(&sql).bind(ids).execute(&pool).await.expect("prepare rows") }
    };
    mark(&old, "published_at = now() - interval '2 hours', occurred_at = now() - interval '2 hours'").await;
    mark(&recent, "published_at = now() - interval '1 minute'").await;
    mark(&parked, "attempts = 10, last_error = 'parked: x', occurred_at = now() - interval '3 hours'").await;

    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__RETENTION", "1h");
    let relay = Relay::spawn(&env, &[]);
    // Housekeeping runs at start, then every 5 s.
    db.wait_for("published_at < now() - interval '1 hour'", 0, Duration::from_secs(25)).await;
    db.wait_for("published_at IS NULL AND attempts < 10", 0, DRAIN).await;
    let log = relay.log();
    relay.stop().await;

    assert!(log.contains("old published rows deleted"), "{log}");
    assert_eq!(db.count("true").await, 201, "recent, parked and newly published rows stay");
    let kept = |ids: &[Uuid]| {
        let ids = ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
        format!("id IN ({ids})")
    };
    assert_eq!(db.count(&kept(&recent)).await, 100);
    assert_eq!(db.count(&format!("{} AND published_at IS NULL", kept(&parked))).await, 1);
    assert_eq!(db.count(&format!("{} AND published_at IS NOT NULL", kept(&pending))).await, 100);
    assert_eq!(stream.count().await, 100, "only the pending rows were published");
}
