//! The shipped alerting rules in a real Prometheus, scraping real relays that a kubelet-like loop restarts
//! with its back-off, through real outages: each outage pages, with the alert its runbook entry names, within
//! 3 minutes, and no other relay's alert fires for it.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::stream;
use qx_relay_testkit::crash_loop::CrashLoop;
use qx_relay_testkit::prometheus::{Prometheus, Target};
use qx_relay_testkit::{
    free_port, http, poll, NatsServer, PgCluster, RedisServer, RelayEnv, TestDb, TestStream,
};
use tokio::time::Instant;
use uuid::Uuid;

const RULES: &str = "deploy/prometheus/qx-relay-rules.yaml";
/// What deploy/README.md promises for every outage class.
const PAGE_WITHIN: Duration = Duration::from_secs(180);
/// Scrapes and rule evaluations this often: the rules' windows and `for`s, not the intervals, set the pace.
const INTERVAL: Duration = Duration::from_secs(1);
/// Shorter runs than the default minute, so the crash loop turns within the test; the rules must page whatever
/// the length of a run.
const GIVE_UP_AFTER: &str = "10s";

/// How long after `since` `alert` fired for `qx_relay`, if within [`PAGE_WITHIN`].
async fn fired(prometheus: &Prometheus, alert: &str, qx_relay: &str, since: Instant) -> Option<Duration> {
    let left = PAGE_WITHIN.saturating_sub(since.elapsed());
    prometheus.wait_firing(alert, qx_relay, left).await.then(|| since.elapsed())
}

#[tokio::test]
async fn postgres_gone_under_a_crash_loop_and_nats_gone_page_within_3_minutes() {
    let postgres = PgCluster::start().await;
    let (orders_db, orders_stream) = (TestDb::create_on(&postgres).await, TestStream::create().await);
    let mut nats = NatsServer::start().await;
    let (payments_db, payments_stream) = (TestDb::create().await, TestStream::create_on(&nats).await);
    orders_db.insert_events(100, "order.placed").await;
    payments_db.insert_events(100, "payment.settled").await;

    let (orders_port, payments_port) = (free_port(), free_port());
    let orders_env =
        RelayEnv::new(&orders_db, &orders_stream.prefix).set("QX_RELAY__GIVE_UP_AFTER", GIVE_UP_AFTER);
    let payments_env = RelayEnv::new(&payments_db, &payments_stream.prefix)
        .set("QX_NATS__SERVERS", nats.url())
        .set("QX_RELAY__GIVE_UP_AFTER", GIVE_UP_AFTER);
    let orders = CrashLoop::start(&orders_env, orders_port);
    let payments = CrashLoop::start(&payments_env, payments_port);
    let targets = [
        Target { qx_relay: "orders-relay", port: orders_port },
        Target { qx_relay: "payments-relay", port: payments_port },
    ];
    let mut prometheus = Prometheus::start(Path::new(RULES), INTERVAL, INTERVAL).await;
    prometheus.scrape(&targets);

    // Healthy first: both drained their rows and were scraped; nothing fires.
    for (db, port) in [(&orders_db, orders_port), (&payments_db, payments_port)] {
        let ready = poll(Duration::from_secs(30), || async {
            let ready = http(port, "GET", "/readyz").await.is_some_and(|r| r.status == 200);
            (ready && db.unpublished().await == 0).then_some(())
        });
        assert!(
            ready.await.is_some(),
            "relays healthy before the outages:\n{}{}",
            orders.log(),
            payments.log()
        );
    }
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(prometheus.firing().await, [], "nothing fires while all is well");

    postgres.stop("immediate");
    nats.kill9();
    let outage = Instant::now();
    let (postgres_down, crash_loop, nats_down) = tokio::join!(
        fired(&prometheus, "QxRelayPostgresDown", "orders-relay", outage),
        fired(&prometheus, "QxRelayCrashLooping", "orders-relay", outage),
        fired(&prometheus, "QxRelayNatsDown", "payments-relay", outage),
    );
    eprintln!(
        "paged after (s): Postgres gone, QxRelayPostgresDown {postgres_down:.1?}, QxRelayCrashLooping \
         {crash_loop:.1?}; NATS gone, QxRelayNatsDown {nats_down:.1?}; exits: orders {:?}, payments {:?}",
        orders.exits(),
        payments.exits()
    );
    let logs = || {
        format!("orders:\n{}\npayments:\n{}\nprometheus:\n{}", orders.log(), payments.log(), prometheus.log())
    };
    assert!(postgres_down.is_some(), "QxRelayPostgresDown within {PAGE_WITHIN:?}:\n{}", logs());
    assert!(crash_loop.is_some(), "QxRelayCrashLooping within {PAGE_WITHIN:?}:\n{}", logs());
    assert!(nats_down.is_some(), "QxRelayNatsDown within {PAGE_WITHIN:?}:\n{}", logs());
    for (relay, exits) in [("orders", orders.exits()), ("payments", payments.exits())] {
        assert!(!exits.is_empty() && exits.iter().all(|code| *code == Some(69)), "{relay} exits {exits:?}");
    }
    // Each outage is told by its own cause, not the other's.
    let firing = prometheus.firing().await;
    let wrong = [("QxRelayNatsDown", "orders-relay"), ("QxRelayPostgresDown", "payments-relay")];
    for (alert, relay) in wrong {
        assert!(!firing.iter().any(|(a, r)| a == alert && r == relay), "{alert} for {relay}: {firing:?}");
    }
}

/// A deployment of the measurement below: its relays' crash loops and what it pages with.
struct Deployment {
    qx_relay: &'static str,
    outage: &'static str,
    alerts: &'static [&'static str],
    ports: Vec<u16>,
    relays: Vec<CrashLoop>,
}

impl Deployment {
    fn new(qx_relay: &'static str, outage: &'static str, alerts: &'static [&'static str]) -> Self {
        Self { qx_relay, outage, alerts, ports: Vec::new(), relays: Vec::new() }
    }

    /// A port for a relay started now or at the outage.
    fn port(&mut self) -> u16 {
        let port = free_port();
        self.ports.push(port);
        port
    }

    fn start(&mut self, env: &RelayEnv) {
        let port = self.port();
        self.start_on(port, env);
    }

    fn start_on(&mut self, port: u16, env: &RelayEnv) {
        self.relays.push(CrashLoop::start(env, port));
    }
}

/// deploy/README.md's table, measured: every outage class at once, in one Prometheus scraping every 15 s and
/// evaluating every 30 s (the PodMonitor's and the Operator's defaults), relays at their default settings under
/// a kubelet's back-off. About 5 minutes, so not part of `scripts/test`:
/// `cargo test --features integration-tests --test alerts -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "5 minutes at production intervals; run by hand for deploy/README.md's table"]
async fn every_outage_class_pages_within_3_minutes_at_production_intervals() {
    let (pg_gone, pg_hung) = (PgCluster::start().await, PgCluster::start().await);
    let mut nats = NatsServer::start().await;
    let (mut redis_leader, mut redis_elastic) = (RedisServer::start().await, RedisServer::start().await);
    let stream = TestStream::create().await;
    let key = || format!("test:{}:leader", Uuid::new_v4().simple());
    let mut deployments = Vec::new();

    let db_gone = TestDb::create_on(&pg_gone).await;
    let mut gone =
        Deployment::new("pg-gone", "Postgres gone", &["QxRelayPostgresDown", "QxRelayCrashLooping"]);
    gone.start(&RelayEnv::new(&db_gone, &stream.prefix));
    let db_hung = TestDb::create_on(&pg_hung).await;
    let mut hung = Deployment::new("pg-hung", "Postgres hung (SIGSTOP)", &["QxRelayPostgresDown"]);
    hung.start(&RelayEnv::new(&db_hung, &stream.prefix));
    let nats_stream = TestStream::create_on(&nats).await;
    let db = TestDb::create().await;
    let mut nats_gone = Deployment::new("nats-gone", "NATS gone", &["QxRelayNatsDown"]);
    nats_gone.start(&RelayEnv::new(&db, &nats_stream.prefix).set("QX_NATS__SERVERS", nats.url()));
    let mut leader = Deployment::new("redis-leader", "Redis gone, leader mode", &["QxRelayNoLeader"]);
    let leader_env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_RELAY__LEADER", "redis"),
        ("QX_CACHE__URL", &redis_leader.url()),
        ("QX_RELAY__LEADER_KEY", &key()),
    ]);
    leader.start(&leader_env);
    leader.start(&leader_env);
    let mut elastic = Deployment::new("redis-elastic", "Redis gone, elastic shards", &["QxRelayNoLeader"]);
    let elastic_env = RelayEnv::new(&db, &stream.prefix).with(&[
        ("QX_RELAY__LEADER", "redis"),
        ("QX_CACHE__URL", &redis_elastic.url()),
        ("QX_RELAY__LEADER_KEY", &key()),
        ("QX_RELAY__SHARD_ID", "auto"),
        ("QX_RELAY__SHARD_COUNT", "4"),
    ]);
    elastic.start(&elastic_env);
    elastic.start(&elastic_env);
    let mut shard = Deployment::new("static-shard", "a static shard's only pod gone", &["QxRelayNoLeader"]);
    for id in ["0", "1"] {
        shard.start(
            &RelayEnv::new(&db, &stream.prefix)
                .with(&[("QX_RELAY__SHARD_ID", id), ("QX_RELAY__SHARD_COUNT", "2")]),
        );
    }
    // Started with the outage: a missing stream, a full one, a configuration that exits at once.
    let (db_missing, missing_stream) = (TestDb::create().await, TestStream::unattached().await);
    let mut missing = Deployment::new(
        "no-stream",
        "a stream missing (rows pending)",
        &["QxRelayNoStream", "QxRelayEventsNotLeaving"],
    );
    let missing_port = missing.port();
    let (db_full, full_stream) = (TestDb::create().await, TestStream::unattached().await);
    let config =
        stream::Config { max_messages: 100, discard: stream::DiscardPolicy::New, ..full_stream.config() };
    full_stream.attach_with(config).await;
    let mut full =
        Deployment::new("stream-full", "NATS takes no messages (stream full)", &["QxRelayNatsDown"]);
    let full_port = full.port();
    let mut broken = Deployment::new("bad-config", "a crash loop of short runs (exit 78)", &["QxRelayDown"]);
    let broken_port = broken.port();

    deployments.extend([gone, hung, nats_gone, leader, elastic, shard]);
    let targets = |deployments: &[&Deployment]| -> Vec<(&'static str, u16)> {
        deployments.iter().flat_map(|d| d.ports.iter().map(|&port| (d.qx_relay, port))).collect()
    };
    let scrape = Duration::from_secs(15);
    let mut prometheus = Prometheus::start(Path::new(RULES), scrape, Duration::from_secs(30)).await;
    let running: Vec<&Deployment> = deployments.iter().collect();
    let first = targets(&running);
    prometheus.scrape(&first.iter().map(|&(qx_relay, port)| Target { qx_relay, port }).collect::<Vec<_>>());
    for deployment in &deployments {
        for &port in &deployment.ports {
            let ready = poll(Duration::from_secs(60), || async {
                http(port, "GET", "/readyz").await.filter(|r| r.status == 200)
            });
            assert!(ready.await.is_some(), "{} healthy before the outage", deployment.qx_relay);
        }
    }
    tokio::time::sleep(scrape * 3).await;
    let quiet = prometheus.firing().await;

    pg_gone.stop("immediate");
    pg_hung.freeze();
    nats.kill9();
    redis_leader.kill9();
    redis_elastic.kill9();
    let outage = Instant::now();
    deployments[5].relays.pop();
    db_missing.insert_events(10, "order.placed").await;
    db_full.insert_events(300, "order.placed").await;
    missing.start_on(missing_port, &RelayEnv::new(&db_missing, &missing_stream.prefix));
    full.start_on(full_port, &RelayEnv::new(&db_full, &full_stream.prefix));
    broken.start_on(broken_port, &RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__BATCH_SIZE", "0"));
    // Their targets appear now, as a new deployment's pods do.
    let late = targets(&[&missing, &full, &broken]);
    prometheus.scrape(&late.iter().map(|&(qx_relay, port)| Target { qx_relay, port }).collect::<Vec<_>>());
    deployments.extend([missing, full, broken]);

    let measure = Duration::from_secs(360);
    let prometheus = &prometheus;
    let waits = deployments.iter().flat_map(|deployment| {
        deployment.alerts.iter().map(move |alert| async move {
            let fired = prometheus.wait_firing(alert, deployment.qx_relay, measure).await;
            (deployment.outage, *alert, fired.then(|| outage.elapsed()))
        })
    });
    let results = futures::future::join_all(waits).await;
    pg_hung.thaw();
    println!("firing before the outages: {quiet:?}\n\n| outage | alert | fired after |\n| --- | --- | --- |");
    for (outage, alert, after) in &results {
        let after = after.map_or("not within 6m".to_owned(), |after| format!("{}s", after.as_secs()));
        println!("| {outage} | `{alert}` | {after} |");
    }
    assert_eq!(quiet, [], "nothing fires while all is well");
    for (outage, alert, after) in results {
        assert!(after.is_some_and(|after| after <= PAGE_WITHIN), "{outage}: {alert} after {after:?}");
    }
}
