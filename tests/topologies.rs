//! The topologies platform teams run, on private servers: a 3-node JetStream cluster whose R3 stream loses its
//! leader, or the cluster its quorum, while the relay publishes. Either is an outage of NATS, said as one
//! (not ready, `give_up_after`, exit 69), never a missing stream; nothing is lost or stored twice.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::stream;
use qx_relay_testkit::{http, poll, NatsCluster, Relay, RelayEnv, TestDb, TestStream};
use tokio::time::Instant;

const DRAIN: Duration = Duration::from_secs(90);

/// An R3 stream on `cluster`, created once the cluster has elected its meta leader.
async fn replicated_stream(cluster: &NatsCluster) -> TestStream {
    let stream = TestStream::unattached_on_cluster(cluster).await;
    let config = stream::Config { num_replicas: 3, ..stream.config() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(err) = stream.jetstream.create_stream(config.clone()).await {
        assert!(Instant::now() < deadline, "an R3 stream on the cluster: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stream
}

#[tokio::test]
async fn a_stream_leader_killed_mid_drain_is_a_nats_outage_never_a_missing_stream() {
    let rows = 20_000;
    let mut cluster = NatsCluster::start(3).await;
    let stream = replicated_stream(&cluster).await;
    let db = TestDb::create().await;
    db.insert_events(rows, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_NATS__SERVERS", &serde_json::to_string(&cluster.urls()).unwrap()),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__BATCH_SIZE", "500"),
    ]);
    let relay = Relay::spawn(&env, &[]);
    relay.eventually("the relay to publish", DRAIN, || async { stream.count().await >= 2000 }).await;

    let mut info = stream.jetstream.get_stream(&stream.name).await.expect("the stream");
    let leader = info.info().await.expect("stream info").cluster.as_ref().and_then(|c| c.leader.clone());
    let leader = leader.expect("the stream has a leader");
    cluster.named(&leader).kill9();
    let killed = Instant::now();
    let published_before = db.count("published_at IS NOT NULL").await;
    relay
        .eventually("publishing to go on", DRAIN, || async {
            db.count("published_at IS NOT NULL").await > published_before + 500
        })
        .await;
    let stall = killed.elapsed();
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let log = relay.log();
    relay.stop().await;
    eprintln!("stream leader {leader} killed: publishing went on after {stall:.1?}");

    assert!(!log.contains("no stream captures"), "an election is not a missing stream:\n{log}");
    let mut ids = HashSet::new();
    let mut messages = 0;
    for message in stream.messages().await {
        messages += 1;
        ids.insert(message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|id| id.to_string()));
    }
    assert_eq!((messages, ids.len()), (rows, rows), "every row in the stream once");
    assert_eq!(db.count("attempts > 0").await, 0, "an election burns no attempts");
}

#[tokio::test]
async fn a_cluster_without_quorum_is_not_ready_then_exit_69_and_nothing_lost() {
    let rows = 20_000;
    let mut cluster = NatsCluster::start(3).await;
    let stream = replicated_stream(&cluster).await;
    let db = TestDb::create().await;
    db.insert_events(rows, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_NATS__SERVERS", &serde_json::to_string(&cluster.urls()).unwrap()),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__BATCH_SIZE", "500"),
        ("QX_RELAY__ACK_TIMEOUT", "1s"),
        ("QX_RELAY__GIVE_UP_AFTER", "5s"),
        ("QX_RELAY__DRAIN_TIMEOUT", "5s"),
    ]);
    let (relay, port) = Relay::spawn_serving(&env);
    relay.eventually("the relay to publish", DRAIN, || async { stream.count().await >= 2000 }).await;

    // Two of three gone: the survivor takes connections but no stream or cluster request has a quorum.
    cluster.servers[1].kill9();
    cluster.servers[2].kill9();
    let lost = Instant::now();
    let not_ready = poll(Duration::from_secs(10), || async {
        http(port, "GET", "/readyz").await.filter(|r| r.status == 503 && r.body.contains("nats: down"))
    });
    assert!(not_ready.await.is_some(), "/readyz says nats: down:\n{}", relay.log());
    let status = relay.wait(Duration::from_secs(5 + 5 + 5)).await;
    let log = relay.log();
    eprintln!("quorum lost: exit {:?} after {:.1?}", status.code(), lost.elapsed());
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("NATS unavailable for longer than 5s"), "{log}");
    assert!(!log.contains("no stream captures"), "a lost quorum is not a missing stream:\n{log}");

    // The cluster back, another relay finishes: every row once.
    cluster.servers[1].restart().await;
    cluster.servers[2].restart().await;
    let relay = Relay::spawn(&env.set("QX_RELAY__GIVE_UP_AFTER", "60s"), &[]);
    relay.stop_when_drained(&db, DRAIN).await;
    let ids: HashSet<_> = stream
        .messages()
        .await
        .iter()
        .map(|message| message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|id| id.to_string()))
        .collect();
    assert_eq!(ids.len(), rows, "every row in the stream");
}
