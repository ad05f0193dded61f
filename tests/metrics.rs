//! `/metrics`, `/livez` and `/readyz` of a running relay, scraped over real HTTP.
//!
//! The exposition is also checked by `promtool check metrics`: the binary `PROMTOOL` names (scripts/test sets
//! it), else `promtool` on the PATH; without either that one check is skipped, and says so.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use qx_relay_testkit::proxy::Proxy;
use qx_relay_testkit::{http, NatsServer, Relay, RelayEnv, TestDb, TestStream};

/// How long a metric or a probe may take to show a change.
const WAIT: Duration = Duration::from_secs(30);

/// `GET path` → (status, body); `None` while nothing listens.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path).await.map(|response| (response.status, response.body))
}

/// Waits until `GET path` answers with a status and body that `check` accepts.
async fn wait_for_answer(
    relay: &Relay,
    port: u16,
    what: &str,
    path: &str,
    check: &dyn Fn(u16, &str) -> bool,
) {
    let answered = || async { get(port, path).await.is_some_and(|(status, body)| check(status, &body)) };
    relay.eventually(what, WAIT, answered).await;
}

/// Waits until `/readyz` answers 200.
async fn wait_until_ready(relay: &Relay, port: u16, what: &str) {
    wait_for_answer(relay, port, what, "/readyz", &|status, _| status == 200).await;
}

/// Waits until `/metrics` shows `series` at `value`.
async fn wait_for_sample(relay: &Relay, port: u16, series: &str, value: f64) {
    let what = format!("{series} {value}");
    wait_for_answer(relay, port, &what, "/metrics", &|_, metrics| sample(metrics, series) == Some(value))
        .await;
}

/// The value of the sample `series` (name and labels as rendered), `None` when absent.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `promtool check metrics` on `text`: its complaints, or `None` when no promtool is there to ask.
fn promtool_complaints(text: &str) -> Option<String> {
    let named = std::env::var_os("PROMTOOL");
    let program = named.clone().unwrap_or_else(|| "promtool".into());
    let mut child = match Command::new(&program)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) if named.is_none() && err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => panic!("running {program:?}: {err}"),
    };
    child.stdin.take().expect("piped stdin").write_all(text.as_bytes()).expect("write to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    let said =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    Some(if output.status.success() { String::new() } else { format!("{}: {said}", output.status) })
}

#[tokio::test]
async fn metrics_follow_a_drain() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(20_000, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "100");
    let (relay, port) = Relay::spawn_serving(&env);

    let mut published_seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while published_seen.last() != Some(&20_000.0) {
        assert!(tokio::time::Instant::now() < deadline, "published stuck at {published_seen:?}");
        if let Some((200, metrics)) = get(port, "/metrics").await {
            published_seen.push(sample(&metrics, "qx_relay_published_total").expect("published exported"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(published_seen.windows(2).all(|w| w[0] <= w[1]), "the counter only rises: {published_seen:?}");
    assert!(published_seen.iter().any(|&n| n > 0.0 && n < 20_000.0), "seen mid-drain: {published_seen:?}");
    wait_for_answer(&relay, port, "pending to fall to 0", "/metrics", &|status, metrics| {
        status == 200
            && metrics.contains("qx_relay_pending_rows 0")
            && sample(metrics, r#"qx_relay_is_leader{shard="0"}"#) == Some(1.0)
            && sample(metrics, "qx_relay_owned_shards") == Some(1.0)
    })
    .await;
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    assert_eq!(sample(&metrics, "qx_relay_published_total"), Some(20_000.0), "{metrics}");
    assert_eq!(sample(&metrics, "qx_relay_publish_delay_seconds_count"), Some(20_000.0), "{metrics}");
    let batches = sample(&metrics, "qx_relay_batch_duration_seconds_count").unwrap_or(0.0);
    assert!(batches >= 200.0, "20,000 rows in batches of 100 or fewer: {batches} batches\n{metrics}");
    assert_eq!(
        sample(&metrics, r#"qx_relay_batch_duration_seconds_bucket{le="+Inf"}"#),
        Some(batches),
        "every batch lands in the +Inf bucket"
    );
    assert!(metrics.contains("qx_relay_oldest_pending_age_seconds 0"), "{metrics}");
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));
    relay.stop().await;
}

#[tokio::test]
async fn readiness_follows_nats() {
    let db = TestDb::create().await;
    // A nats-server of our own, so it can be stopped without touching the shared one.
    let mut nats = NatsServer::start().await;
    let env = RelayEnv::new(&db, "ready")
        .set("QX_NATS__SERVERS", nats.url())
        .with(&[("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"), ("QX_RELAY__ENSURE_STREAM", "true")]);
    let (relay, port) = Relay::spawn_serving(&env);
    wait_until_ready(&relay, port, "ready").await;

    nats.kill9();
    wait_for_answer(&relay, port, "not ready without NATS", "/readyz", &|status, body| {
        status == 503 && body.contains("nats: down")
    })
    .await;
    wait_for_sample(&relay, port, "qx_relay_nats_up", 0.0).await;
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200), "alive while NATS is down");

    nats.restart().await;
    wait_until_ready(&relay, port, "ready again").await;
    wait_for_sample(&relay, port, "qx_relay_nats_up", 1.0).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_claim_blocked_by_a_table_lock_does_not_wedge_the_loop() {
    let db = TestDb::create().await;
    let env = RelayEnv::new(&db, "blocked");
    let (relay, port) = Relay::spawn_serving(&env);
    wait_until_ready(&relay, port, "ready").await;

    // The claim (SELECT … FOR UPDATE) cannot take its lock on the table while this is held. It gives up
    // after its lock_timeout and tries again, so the loop keeps stepping and /livez stays 200.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE qx_outbox_events IN EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    relay
        .eventually("the wait logged", WAIT, || async { relay.log().contains("locked by another session") })
        .await;
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));
    assert!(!relay.log().contains("the relay loop has stalled"), "{}", relay.log());

    blocker.rollback().await.unwrap();
    relay.eventually("claiming again", WAIT, || async { relay.log().contains("free again") }).await;
    relay.stop().await;
}

/// Before any event: counters at 0 (so `increase()` sees the first one), histograms with buckets (so replicas
/// add up), HELP on every family, and nothing `promtool check metrics` objects to.
#[tokio::test]
async fn every_family_is_exported_before_the_first_event() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let env = RelayEnv::new(&db, &stream.prefix);
    let (relay, port) = Relay::spawn_serving(&env);
    // Connected and sampled once: the NATS gauge comes with the first housekeeping pass.
    wait_for_sample(&relay, port, "qx_relay_nats_up", 1.0).await;
    let (_, metrics) = get(port, "/metrics").await.expect("scrape");

    let mut at_zero = vec![
        "qx_relay_published_total".to_owned(),
        "qx_relay_duplicates_total".to_owned(),
        "qx_relay_parked_total".to_owned(),
        "qx_relay_lock_renewal_failures_total".to_owned(),
        "qx_relay_batch_duration_seconds_count".to_owned(),
        "qx_relay_publish_delay_seconds_count".to_owned(),
    ];
    for reason in ["poison", "rejected", "no_stream", "unavailable"] {
        at_zero.push(format!(r#"qx_relay_publish_failures_total{{reason="{reason}"}}"#));
    }
    for series in &at_zero {
        assert_eq!(sample(&metrics, series), Some(0.0), "{series} at 0 before any event:\n{metrics}");
    }
    for histogram in ["qx_relay_batch_duration_seconds", "qx_relay_publish_delay_seconds"] {
        let buckets =
            metrics.lines().filter(|line| line.starts_with(&format!("{histogram}_bucket{{le="))).count();
        assert!(buckets > 5, "{histogram} is a histogram with buckets:\n{metrics}");
    }
    assert!(!metrics.contains("quantile="), "no summaries left:\n{metrics}");
    let families: Vec<&str> =
        metrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    for family in &families {
        assert!(metrics.contains(&format!("# HELP {family} ")), "{family} has no HELP line:\n{metrics}");
    }
    for family in
        ["qx_relay_build_info", "qx_relay_postgres_up", "process_cpu_seconds_total", "process_open_fds"]
    {
        assert!(families.contains(&family), "{family} exported:\n{metrics}");
    }
    assert_eq!(sample(&metrics, r#"qx_relay_shard_info{shard="0",shard_count="1"}"#), Some(1.0), "{metrics}");
    let version = format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"));
    assert!(
        metrics.lines().any(|l| l.starts_with("qx_relay_build_info{") && l.contains(&version)),
        "{metrics}"
    );

    match promtool_complaints(&metrics) {
        Some(complaints) => assert!(complaints.is_empty(), "promtool check metrics: {complaints}\n{metrics}"),
        None => eprintln!("promtool not found (set PROMTOOL): skipped `promtool check metrics`"),
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_whose_postgres_is_down_at_start_is_seen_retrying_then_relays_or_gives_up() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(100, "order.placed").await;
    // Connections reach the proxy but nothing answers through it, as with a Postgres that is starting.
    let proxy = Proxy::start(&db.url).await;
    proxy.pause();
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_DB__URL", proxy.url_through(&db.url).as_str()),
        ("QX_NATS__CONNECT_TIMEOUT_SECONDS", "1"),
    ]);
    let (relay, port) = Relay::spawn_serving(&env);
    wait_for_sample(&relay, port, "qx_relay_postgres_up", 0.0).await;
    let (status, body) = get(port, "/readyz").await.expect("/readyz answers while Postgres is down");
    assert_eq!(status, 503, "{body}");
    relay
        .eventually("the retry said", WAIT, || async {
            relay.log().contains("Postgres unavailable at start; retrying")
        })
        .await;
    proxy.resume();
    wait_until_ready(&relay, port, "ready once Postgres answers").await;
    relay.stop_when_drained(&db, WAIT).await;
    assert_eq!(stream.count().await, 100);

    // Down for good: it keeps trying for give_up_after, then exits 69 with the cause.
    let give_up_after = Duration::from_secs(3);
    let gone = env.with(&[
        ("QX_DB__URL", "postgres://postgres@127.0.0.1:1/x"),
        ("QX_RELAY__ACK_TIMEOUT", "1s"),
        ("QX_RELAY__GIVE_UP_AFTER", "3s"),
    ]);
    let started = tokio::time::Instant::now();
    let relay = Relay::spawn(&gone, &[]);
    let status = relay.wait(WAIT).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(started.elapsed() >= give_up_after, "gave up after {:?}:\n{log}", started.elapsed());
    assert!(log.contains("Connection refused"), "the cause is named:\n{log}");
}
