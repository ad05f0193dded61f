//! `/metrics`, `/livez` and `/readyz` of a running relay, scraped over real HTTP.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::Duration;

use cluster::{free_port, NatsServer};
use common::{http, Relay, TestDb, TestStream};

/// `GET path` → (status, body); `None` while nothing listens.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path).await.map(|response| (response.status, response.body))
}

/// The value of an unlabelled sample, 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_follow_a_drain() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(20_000, "order.placed").await;
    let port = free_port();
    let mut env = Relay::env(&db, &stream.prefix);
    env.push(("QX_RELAY__BATCH_SIZE".into(), "100".into()));
    let relay = Relay::spawn(&env, &["--metrics-addr", &format!("127.0.0.1:{port}")]);

    let mut published_seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while published_seen.last() != Some(&20_000.0) {
        assert!(tokio::time::Instant::now() < deadline, "published stuck at {published_seen:?}");
        if let Some((200, metrics)) = get(port, "/metrics").await {
            published_seen.push(sample(&metrics, "qx_relay_published_total"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(published_seen.windows(2).all(|w| w[0] <= w[1]), "the counter only rises: {published_seen:?}");
    assert!(published_seen.iter().any(|&n| n > 0.0 && n < 20_000.0), "seen mid-drain: {published_seen:?}");
    wait_until("pending to fall to 0", || async {
        let Some((200, metrics)) = get(port, "/metrics").await else { return false };
        metrics.contains("qx_relay_pending_rows 0") && sample(&metrics, "qx_relay_is_leader") == 1.0
    })
    .await;
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    assert_eq!(sample(&metrics, "qx_relay_published_total"), 20_000.0, "{metrics}");
    assert!(metrics.contains("qx_relay_batch_duration_seconds"), "{metrics}");
    assert!(metrics.contains("qx_relay_oldest_pending_age_seconds 0"), "{metrics}");
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));
    relay.stop().await;
    stream.delete().await;
    db.drop().await;
}

#[tokio::test]
async fn readiness_follows_nats() {
    let db = TestDb::create().await;
    // A nats-server of our own, so it can be stopped without touching the shared one.
    let mut nats = NatsServer::start().await;
    let port = free_port();
    let mut env = Relay::env(&db, "ready");
    env.push(("QX_NATS__SERVERS".into(), nats.url()));
    env.push(("QX_NATS__RECONNECT_TIME_WAIT_SECONDS".into(), "0.2".into()));
    env.push(("QX_RELAY__ENSURE_STREAM".into(), "true".into()));
    let relay = Relay::spawn(&env, &["--metrics-addr", &format!("127.0.0.1:{port}")]);
    wait_until("ready", || async { get(port, "/readyz").await.is_some_and(|(status, _)| status == 200) })
        .await;

    nats.kill9();
    wait_until("not ready without NATS", || async {
        get(port, "/readyz").await.is_some_and(|(status, body)| status == 503 && body.contains("nats: down"))
    })
    .await;
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200), "alive while NATS is down");

    nats.restart().await;
    wait_until("ready again", || async {
        get(port, "/readyz").await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    relay.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn livez_fails_while_the_relay_loop_is_wedged_and_recovers_after() {
    let db = TestDb::create().await;
    let port = free_port();
    let mut env = Relay::env(&db, "wedged");
    for (key, value) in [
        ("QX_RELAY__GIVE_UP_AFTER", "2s"),
        ("QX_RELAY__ACK_TIMEOUT", "1s"),
        ("QX_RELAY__DRAIN_TIMEOUT", "1s"),
        ("QX_NATS__CONNECT_TIMEOUT_SECONDS", "1"),
    ] {
        env.push((key.into(), value.into()));
    }
    // give_up_after + ack_timeout + connect timeout + idle poll (100ms) + drain_timeout + the 10 s margin.
    let stall_limit = Duration::from_millis(15_100);
    let relay = Relay::spawn(&env, &["--metrics-addr", &format!("127.0.0.1:{port}")]);
    wait_until("ready", || async { get(port, "/readyz").await.is_some_and(|(status, _)| status == 200) })
        .await;
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));

    // The claim (SELECT … FOR UPDATE) waits for this lock for as long as it is held: the loop is wedged, while
    // the process still answers. Nothing in the relay times the claim out.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE qx_outbox_events IN EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    let locked = tokio::time::Instant::now();
    let (body, failed_after) = loop {
        let since = locked.elapsed();
        assert!(since < stall_limit + Duration::from_secs(15), "/livez still 200 after {since:?}");
        match get(port, "/livez").await {
            Some((503, body)) => break (body, since),
            Some((200, _)) => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("/livez answered {other:?}"),
        }
    };
    eprintln!("/livez failed {failed_after:?} after the loop wedged: {body}");
    assert!(
        failed_after + Duration::from_secs(1) >= stall_limit,
        "failed after only {failed_after:?}: {body}"
    );
    assert!(body.contains("limit 15s 100ms"), "{body}");
    assert!(relay.log().contains("the relay loop has stalled"), "{}", relay.log());

    blocker.rollback().await.unwrap();
    wait_until("live again", || async { get(port, "/livez").await.is_some_and(|(status, _)| status == 200) })
        .await;
    relay.stop().await;
    db.drop().await;
}
