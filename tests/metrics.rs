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
async fn a_claim_blocked_by_a_table_lock_does_not_wedge_the_loop() {
    let db = TestDb::create().await;
    let port = free_port();
    let env = Relay::env(&db, "blocked");
    let relay = Relay::spawn(&env, &["--metrics-addr", &format!("127.0.0.1:{port}")]);
    wait_until("ready", || async { get(port, "/readyz").await.is_some_and(|(status, _)| status == 200) })
        .await;

    // The claim (SELECT … FOR UPDATE) cannot take its lock while this is held. It gives up after its
    // lock_timeout and tries again, so the loop keeps stepping and /livez stays 200; before, the claim
    // waited for as long as the lock was held and nothing timed it out.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE qx_outbox_events IN EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    wait_until("the wait logged", || async { relay.log().contains("locked by another relay") }).await;
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));
    assert!(!relay.log().contains("the relay loop has stalled"), "{}", relay.log());

    blocker.rollback().await.unwrap();
    wait_until("claiming again", || async { relay.log().contains("free again") }).await;
    relay.stop().await;
    db.drop().await;
}
