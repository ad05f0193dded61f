//! The topologies platform teams run, on private servers:
//! - a 3-node JetStream cluster whose R3 stream loses its leader, or the cluster its quorum, while the relay
//!   publishes: an outage of NATS, said as one (not ready, `give_up_after`, exit 69), never a missing stream;
//! - a Postgres that is read-only, as a hot standby or an old primary after a failover is: refused at start by
//!   `check` and `run`, and while running an outage whose connections are dropped and made anew;
//! - Debian's PgBouncer with its stock settings, in session pooling (the relay, its commands, a Postgres leader
//!   lock) and in transaction pooling (two relays and the commands; a Postgres lock and LISTEN refused at start
//!   with one line that says why).
//!
//! Nothing is lost or stored twice.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::stream;
use qx_relay_testkit::{
    http, poll, run_command, NatsCluster, PgBouncer, PgCluster, Relay, RelayEnv, TestDb, TestStream,
};
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

/// A 3-node cluster with an R3 stream, `rows` pending rows, and a relay's settings for both: every server
/// listed, reconnecting every 200 ms.
async fn on_a_cluster(rows: usize) -> (NatsCluster, TestStream, TestDb, RelayEnv) {
    let cluster = NatsCluster::start(3).await;
    let stream = replicated_stream(&cluster).await;
    let db = TestDb::create().await;
    db.insert_events(rows, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_NATS__SERVERS", &serde_json::to_string(&cluster.urls()).unwrap()),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__BATCH_SIZE", "500"),
    ]);
    (cluster, stream, db, env)
}

/// How many messages the stream holds, and how many distinct `Nats-Msg-Id`s among them.
async fn messages_and_distinct_ids(stream: &TestStream) -> (usize, usize) {
    let messages = stream.messages().await;
    let ids: HashSet<_> = messages
        .iter()
        .map(|message| message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|id| id.to_string()))
        .collect();
    (messages.len(), ids.len())
}

#[tokio::test]
async fn a_stream_leader_killed_mid_drain_is_a_nats_outage_never_a_missing_stream() {
    let rows = 20_000;
    let (mut cluster, stream, db, env) = on_a_cluster(rows).await;
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
    // The cluster whole again before the stream is read.
    cluster.named(&leader).restart().await;
    assert_eq!(messages_and_distinct_ids(&stream).await, (rows, rows), "every row in the stream once");
    assert_eq!(db.count("attempts > 0").await, 0, "an election burns no attempts");
}

#[tokio::test]
async fn a_cluster_without_quorum_is_not_ready_then_exit_69_and_nothing_lost() {
    let rows = 20_000;
    let (mut cluster, stream, db, env) = on_a_cluster(rows).await;
    let env = env.with(&[
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
    assert_eq!(messages_and_distinct_ids(&stream).await.1, rows, "every row in the stream");
}

/// The relay's sessions on the server of `admin`, by the `application_name` it gives them.
async fn relay_sessions(admin: &sqlx::PgPool, relay: &Relay) -> Vec<i32> {
    let name = format!("qx-relay % {}", relay.pid());
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1 ORDER BY pid")
        .bind(name)
        .fetch_all(admin)
        .await
        .expect("list the relay's sessions")
}

/// Makes every session of the server read-only from its next transaction on, as a demoted primary or a hot
/// standby is; or writable again.
async fn read_only(admin: &sqlx::PgPool, on: bool) {
    let set = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    // The admin session itself stays writable whatever the server's default.
    let mut connection = admin.acquire().await.expect("an admin session");
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut *connection)
        .await
        .expect("stay writable");
    sqlx::query(set).execute(&mut *connection).await.expect("change the default");
    sqlx::query("SELECT pg_reload_conf()").execute(&mut *connection).await.expect("reload");
}

#[tokio::test]
async fn a_read_only_server_fails_check_and_run_naming_it() {
    let postgres = PgCluster::start().await;
    let (db, stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.expect("admin pool");
    read_only(&admin, true).await;
    let env = RelayEnv::new(&db, &stream.prefix)
        .with(&[("QX_RELAY__GIVE_UP_AFTER", "5s"), ("QX_RELAY__ACK_TIMEOUT", "2s")]);
    let (code, stdout, _) = run_command(&env, &["check"]);
    assert_eq!(code, Some(69), "{stdout}");
    let line =
        stdout.lines().find(|l| l.starts_with("FAIL  postgres:")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("read-only"), "{line}");
    let relay = Relay::spawn(&env, &[]);
    let status = relay.wait(Duration::from_secs(30)).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.lines().last().is_some_and(|l| l.contains("the server is read-only")), "{log}");
}

#[tokio::test]
async fn a_primary_turned_read_only_is_an_outage_whose_connections_are_replaced() {
    let rows = 20_000;
    let postgres = PgCluster::start().await;
    let (db, stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    db.insert_events(rows, "order.placed").await;
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.expect("admin pool");
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "500");
    let (relay, port) = Relay::spawn_serving(&env);
    relay.eventually("the relay to publish", DRAIN, || async { stream.count().await >= 2000 }).await;
    let before = relay_sessions(&admin, &relay).await;
    assert!(!before.is_empty(), "the relay's sessions are named");

    read_only(&admin, true).await;
    // /readyz and the gauge agree, and the log names the cause.
    let both_down = poll(Duration::from_secs(20), || async {
        let ready = http(port, "GET", "/readyz").await?;
        let metrics = http(port, "GET", "/metrics").await?;
        (ready.status == 503
            && ready.body.contains("postgres: down")
            && metrics.body.contains("qx_relay_postgres_up 0"))
        .then_some(())
    });
    assert!(both_down.await.is_some(), "/readyz and qx_relay_postgres_up say down:\n{}", relay.log());
    assert!(relay.log().contains("is read-only"), "{}", relay.log());

    // The failover completes: the relay goes on, on connections made since.
    read_only(&admin, false).await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let after = relay_sessions(&admin, &relay).await;
    relay.stop().await;
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "sessions from before: {before:?}, now: {after:?}"
    );
    assert_eq!(messages_and_distinct_ids(&stream).await.1, rows, "every row in the stream");
}

#[tokio::test]
async fn behind_a_stock_pgbouncer_in_session_pooling_the_relay_and_its_commands_work() {
    let postgres = PgCluster::start().await;
    let bouncer = PgBouncer::start(postgres.port, &["pool_mode = session"]).await;
    let (db, stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    db.insert_events(2000, "order.placed").await;
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_DB__URL", bouncer.url(&db.name));
    for args in [&["check"][..], &["status"], &["dead", "list"]] {
        let (code, stdout, stderr) = run_command(&env, args);
        assert_eq!(code, Some(0), "{args:?}: {stdout}{stderr}\n{}", bouncer.log());
    }
    let relay = Relay::spawn(&env, &[]);
    relay.stop_when_drained(&db, DRAIN).await;

    // A Postgres leader lock holds its session through the pooler, and the lease still ends it: a frozen
    // leader's lock goes to the standby after leader_ttl, not never.
    let leader = env.with(&[("QX_RELAY__LEADER", "postgres"), ("QX_RELAY__LEADER_TTL", "3s")]);
    let first = Relay::spawn(&leader, &[]);
    first.eventually("a leader", DRAIN, || async { first.log().contains("leader lock acquired") }).await;
    let standby = Relay::spawn(&leader, &[]);
    first.signal("STOP");
    let frozen = Instant::now();
    db.insert_events(2000, "order.placed").await;
    standby
        .eventually("the standby to lead", DRAIN, || async { standby.log().contains("leader lock acquired") })
        .await;
    let took_over = frozen.elapsed();
    eprintln!(
        "a frozen leader's Postgres lock, through PgBouncer, went to the standby after {took_over:.1?}"
    );
    assert!(took_over < Duration::from_secs(10), "within leader_ttl and a few checks: {took_over:?}");
    standby.stop_when_drained(&db, DRAIN).await;
    first.kill9();
    assert_eq!(stream.count().await, 4000);
}

#[tokio::test]
async fn behind_pgbouncer_in_transaction_pooling_the_relay_works_and_refuses_what_needs_a_session() {
    let postgres = PgCluster::start().await;
    let bouncer = PgBouncer::start(postgres.port, &["pool_mode = transaction"]).await;
    let (db, stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    let rows = 20_000;
    db.insert_events(rows, "order.placed").await;
    // Rows that fail for good, to see `dead` work too.
    for _ in 0..3 {
        db.insert_raw("order..bad", r#"{"event_id": null}"#).await;
    }
    let env = RelayEnv::new(&db, &stream.prefix)
        .with(&[("QX_DB__URL", &bouncer.url(&db.name)), ("QX_RELAY__BATCH_SIZE", "500")]);
    // Two relays: their connections share the pooler's sessions, as other services' would.
    let relays = [Relay::spawn(&env, &[]), Relay::spawn(&env, &[])];
    db.wait_for("published_at IS NULL AND attempts = 0", 0, DRAIN).await;
    for relay in &relays {
        let log = relay.log();
        assert!(log.contains("db.url leads to a transaction pooler"), "{log}");
        assert!(!log.contains("prepared statement"), "{log}");
        relay.stop().await;
    }
    assert_eq!(messages_and_distinct_ids(&stream).await.1, rows, "every row in the stream");
    for args in [&["check"][..], &["status"], &["dead", "list"]] {
        let (code, stdout, stderr) = run_command(&env, args);
        assert_eq!(code, Some(0), "{args:?}: {stdout}{stderr}\n{}", bouncer.log());
    }
    let (code, stdout, _) = run_command(&env, &["dead", "requeue", "--all"]);
    assert_eq!((code, stdout.trim()), (Some(0), "requeued 3 row(s)"));

    // Handing out the sessions in turn instead of the one freed last hides nothing, once the pooler has two.
    let round_robin =
        PgBouncer::start(postgres.port, &["pool_mode = transaction", "server_round_robin = 1"]).await;
    let options: sqlx::postgres::PgConnectOptions = round_robin.url(&db.name).parse().expect("a URL");
    let clients =
        sqlx::PgPool::connect_with(options.extra_float_digits(None)).await.expect("a pool through it");
    let mut holding = clients.begin().await.expect("a transaction holding one session");
    sqlx::raw_sql("SELECT 1").execute(&mut *holding).await.expect("on one session");
    sqlx::raw_sql("SELECT 1").execute(&clients).await.expect("on another");
    holding.commit().await.expect("both idle now");
    let (code, stdout, stderr) =
        run_command(&env.clone().set("QX_DB__URL", round_robin.url(&db.name)), &["check"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("db.url leads to a transaction pooler"), "{stderr}");

    // What needs a session is refused at start, with one line that says why and what to do.
    let session_settings = [
        ("QX_RELAY__LEADER", "postgres", "relay.leader"),
        ("QX_RELAY__NOTIFY_CHANNEL", "qx_outbox", "LISTEN"),
    ];
    for (key, value, named) in session_settings {
        let relay = Relay::spawn(&env.clone().set(key, value), &[]);
        let status = relay.wait(Duration::from_secs(30)).await;
        let log = relay.log();
        assert_eq!(status.code(), Some(78), "{key}: {log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "one line:\n{log}");
        for part in ["transaction pooling", named, "session-mode pool"] {
            assert!(errors[0].contains(part), "{part:?}: {}", errors[0]);
        }
    }
}
