//! Elastic shards against real Postgres, NATS and Redis: replicas started alike (`--shard-id auto`, leasing
//! through Redis, and again through Postgres advisory locks) split 12 shards evenly, take over a killed
//! replica's shards within `leader_ttl` + 1 s, give a joining replica its share within 2 × `leader_ttl`, and
//! hand shards over on SIGTERM; meanwhile no shard has two publishers, every event reaches the stream exactly
//! once, and each order's events stay in order.
//!
//! Each replica publishes under its own sub-prefix, so the stream shows who published each event and when the
//! server stored it; the shard terms read from the replicas' JSON logs ("shard acquired" until "shard
//! released", "relay stopped" or the kill) must not overlap per shard, and every event must fall in a term of
//! its publisher for its shard. A replica frozen past its leases loses its shards and gets its share back
//! once thawed, with each key still in order. Times are printed: run with `--nocapture`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use qx_relay_testkit::handover::{assert_each_row_once, insert_keyed, inversions, log_lines, stored, Stored};
use qx_relay_testkit::redis_keys::RedisKeys;
use qx_relay_testkit::{env_var, http, poll, run_command, Relay, RelayEnv, TestDb, TestStream};
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

const SHARDS: u32 = 12;
const TTL: Duration = Duration::from_secs(3);
const DRAIN: Duration = Duration::from_secs(60);

/// The tests that time takeovers run one at a time, so they do not compete with each other for CPU.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Settings of replica `name` (its sub-prefix of the stream's prefix), sharing the shards under `key` by
/// Redis leases.
fn elastic_env(db: &TestDb, stream: &TestStream, name: &str, key: &str) -> RelayEnv {
    backend_env(db, stream, name, key, "redis")
}

/// The same, with the leases in `leader` (`redis` or `postgres`).
fn backend_env(db: &TestDb, stream: &TestStream, name: &str, key: &str, leader: &str) -> RelayEnv {
    RelayEnv::new(db, &format!("{}.{name}", stream.prefix)).with(&[
        ("QX_RELAY__SHARD_ID", "auto"),
        ("QX_RELAY__SHARD_COUNT", &SHARDS.to_string()),
        ("QX_RELAY__SHARD_KEY", "payload.order_id"),
        ("QX_RELAY__LEADER", leader),
        ("QX_RELAY__LEADER_KEY", key),
        ("QX_RELAY__LEADER_TTL", &format!("{}s", TTL.as_secs())),
        ("QX_CACHE__URL", &env_var("REDIS_URL")),
        ("QX_RELAY__BATCH_SIZE", "200"),
        ("QX_RELAY_LOG_FORMAT", "json"),
    ])
}

/// Who publishes each shard, as the leases say.
enum Observer {
    /// From the Redis leases and their holder records.
    Redis(RedisKeys, String),
    /// From `qx-relay status --json` (the advisory locks' sessions).
    Postgres(RelayEnv),
}

impl Observer {
    async fn new(leader: &str, env: RelayEnv, key: &str) -> Self {
        match leader {
            "redis" => Self::Redis(RedisKeys::connect(&env_var("REDIS_URL")).await, key.to_owned()),
            _ => Self::Postgres(env),
        }
    }

    /// The pid publishing each shard; `None` while a shard is free (or its holder not recorded yet).
    async fn owners(&mut self) -> Vec<Option<u32>> {
        match self {
            Self::Redis(redis, key) => {
                let mut owners = Vec::new();
                for shard in 0..SHARDS {
                    let token = redis.get(&format!("{key}:{shard}")).await;
                    let record = redis.get(&format!("{key}:{shard}:holder")).await;
                    let record: Option<Value> = record.and_then(|text| serde_json::from_str(&text).ok());
                    owners.push(match (token, record) {
                        (Some(token), Some(record)) if record["token"] == token.as_str() => pid_of(&record),
                        _ => None,
                    });
                }
                owners
            }
            Self::Postgres(env) => {
                let (code, stdout, stderr) = run_command(env, &["status", "--json"]);
                assert_eq!(code, Some(0), "status: {stderr}");
                let status: Value = serde_json::from_str(&stdout).expect("status JSON");
                let shards = status["shards"].as_array().expect("shards");
                shards.iter().map(|shard| pid_of(&shard["leader_lock"])).collect()
            }
        }
    }
}

fn pid_of(holder: &Value) -> Option<u32> {
    holder["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok())
}

/// Shards per pid, when every shard is owned by one of `pids`.
fn shares(owners: &[Option<u32>], pids: &[u32]) -> Option<Vec<usize>> {
    let owned: Option<Vec<u32>> = owners.iter().copied().collect();
    let owned = owned?;
    owned
        .iter()
        .all(|pid| pids.contains(pid))
        .then(|| pids.iter().map(|pid| owned.iter().filter(|owner| *owner == pid).count()).collect())
}

/// Waits until every shard is owned by one of `pids`, each owning as many as `expected` says; returns how long
/// it took.
async fn wait_for_shares(observer: &mut Observer, pids: &[u32], expected: &[usize]) -> Duration {
    let started = Instant::now();
    let limit = TTL * 10;
    loop {
        let owners = observer.owners().await;
        if shares(&owners, pids).as_deref() == Some(expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "shares of {pids:?} not {expected:?} within {limit:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A database, a stream and a lock key of a test's own, for replicas leasing in `leader`.
struct Cluster {
    leader: &'static str,
    db: Arc<TestDb>,
    stream: TestStream,
    key: String,
}

/// Replicas a, b and c of a new cluster, split 4/4/4, with keyed events coming in; the replicas in order.
type ThreeReplicas = (Cluster, Observer, Producer, [Relay; 3]);

impl Cluster {
    /// A new cluster leasing in `leader`, who publishes what as the leases say, keyed events coming in, and
    /// three replicas once they split the shards 4/4/4 (after how long, to print).
    async fn with_three(leader: &'static str) -> (ThreeReplicas, Duration) {
        let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
        let cluster = Self { leader, db, stream, key: format!("test:{}:elastic", Uuid::new_v4().simple()) };
        let mut observer = Observer::new(leader, cluster.env("observer"), &cluster.key).await;
        let producer = Producer::start(&cluster.db);
        let replicas = [cluster.spawn("a"), cluster.spawn("b"), cluster.spawn("c")];
        let pids: Vec<u32> = replicas.iter().map(Relay::pid).collect();
        let split = wait_for_shares(&mut observer, &pids, &[4, 4, 4]).await;
        ((cluster, observer, producer, replicas), split)
    }

    fn env(&self, name: &str) -> RelayEnv {
        backend_env(&self.db, &self.stream, name, &self.key, self.leader)
    }

    fn spawn(&self, name: &str) -> Relay {
        Relay::spawn(&self.env(name), &[])
    }
}

/// Keyed events coming throughout: 100 orders, 5 events each, every 50 ms.
struct Producer {
    producing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn start(db: &Arc<TestDb>) -> Self {
        let producing = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let (db, producing) = (db.clone(), producing.clone());
            async move {
                while producing.load(Ordering::Relaxed) {
                    insert_keyed(&db, 100, 500).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { producing, task }
    }

    async fn stop(self) {
        self.producing.store(false, Ordering::Relaxed);
        self.task.await.expect("producer");
    }
}

/// From when to when a replica published a shard.
type Term = (DateTime<Utc>, DateTime<Utc>);

/// The shard terms of a replica, from its log: "shard acquired" until "shard released" or "relay stopped", or,
/// when it was killed, `killed_at` (it was gone once the kill returned).
fn shard_terms(relay: &Relay, killed_at: Option<DateTime<Utc>>) -> BTreeMap<u64, Vec<Term>> {
    let mut open: HashMap<u64, DateTime<Utc>> = HashMap::new();
    let mut terms: BTreeMap<u64, Vec<Term>> = BTreeMap::new();
    for line in log_lines(relay) {
        let shard = line.fields["shard"].as_u64();
        match (line.message.as_str(), shard) {
            ("shard acquired", Some(shard)) => {
                assert!(
                    open.insert(shard, line.at).is_none(),
                    "shard {shard} acquired twice:\n{}",
                    relay.log()
                );
            }
            ("shard released", Some(shard)) => {
                let start = open.remove(&shard).expect("released a shard it had acquired");
                terms.entry(shard).or_default().push((start, line.at));
            }
            ("relay stopped", _) => {
                assert!(open.is_empty(), "stopped owning shards {open:?}:\n{}", relay.log());
            }
            _ => {}
        }
    }
    for (shard, start) in open {
        let killed_at = killed_at.unwrap_or_else(|| panic!("owns shard {shard} but was not killed"));
        terms.entry(shard).or_default().push((start, killed_at));
    }
    terms
}

/// No shard was published by two replicas at once, and every event was stored while its publisher owned its
/// shard.
async fn assert_one_owner_per_shard(
    db: &TestDb,
    terms: &[(&str, BTreeMap<u64, Vec<Term>>)],
    stored: &[Stored],
) {
    for (i, (a, a_terms)) in terms.iter().enumerate() {
        for (b, b_terms) in &terms[i + 1..] {
            for (shard, a_terms) in a_terms {
                for (a_start, a_end) in a_terms {
                    for (b_start, b_end) in b_terms.get(shard).into_iter().flatten() {
                        assert!(
                            a_end <= b_start || b_end <= a_start,
                            "shard {shard}: {a} owned it {a_start}..{a_end} while {b} owned it {b_start}..{b_end}"
                        );
                    }
                }
            }
        }
    }
    let sql = format!(
        "SELECT payload->>'event_id', ABS(HASHTEXT(payload #>> '{{payload,order_id}}')::bigint) % {SHARDS} \
         FROM qx_outbox_events"
    );
    let shard_of: HashMap<String, i64> =
        sqlx::query_as(&sql).fetch_all(&db.pool).await.expect("shard of each event").into_iter().collect();
    let by_relay: HashMap<&str, &BTreeMap<u64, Vec<Term>>> =
        terms.iter().map(|(relay, terms)| (*relay, terms)).collect();
    // A message sent just before its publisher stopped may be stored a moment later.
    let in_flight = TimeDelta::milliseconds(100);
    for message in stored {
        let shard = u64::try_from(shard_of[&message.msg_id]).expect("a shard");
        let owned = by_relay[message.relay.as_str()].get(&shard).map(Vec::as_slice).unwrap_or_default();
        assert!(
            owned.iter().any(|(start, end)| *start <= message.at && message.at <= *end + in_flight),
            "{} published {} of shard {shard} at {} outside its terms {owned:?}",
            message.relay,
            message.msg_id,
            message.at
        );
    }
}

/// Runs `scenario` with Redis leases, then with Postgres advisory locks; one timed test at a time.
async fn with_each_leader<F: std::future::Future<Output = ()>>(scenario: impl Fn(&'static str) -> F) {
    let _timed = TIMED.lock().await;
    for leader in ["redis", "postgres"] {
        scenario(leader).await;
    }
}

#[tokio::test]
async fn replicas_share_the_shards_take_over_and_rebalance_keeping_each_key_in_order() {
    with_each_leader(share_take_over_and_rebalance).await;
}

/// 3 replicas leasing in `leader` split 12 shards 4/4/4; one killed, the other two own all 12 within
/// `leader_ttl` + 1 s; a fourth joins, 4/4/4 within 2 × `leader_ttl`; one stops, the others own all 12.
async fn share_take_over_and_rebalance(leader: &'static str) {
    let ((cluster, mut observer, producer, [a, b, c]), split) = Cluster::with_three(leader).await;
    let (db, stream, env) = (&cluster.db, &cluster.stream, |name: &str| cluster.env(name));
    eprintln!("{leader}: 3 replicas split 12 shards 4/4/4 {split:?} after starting");
    let (code, stdout, stderr) = run_command(&env("observer"), &["status", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(status["members"], 3, "{leader}: the live members: {status}");
    // A stable set keeps its assignment.
    let settled = observer.owners().await;
    tokio::time::sleep(TTL).await;
    assert_eq!(observer.owners().await, settled, "a stable set of replicas kept its shards");

    let killed_at = Utc::now();
    c.kill9();
    let takeover = wait_for_shares(&mut observer, &[a.pid(), b.pid()], &[6, 6]).await;
    eprintln!("{leader}: c killed: a and b own all 12 shards {takeover:?} later (bound: ttl + 1s)");
    assert!(takeover <= TTL + Duration::from_secs(1), "takeover took {takeover:?}");

    let d = Relay::spawn(&env("d"), &[]);
    let rebalance = wait_for_shares(&mut observer, &[a.pid(), b.pid(), d.pid()], &[4, 4, 4]).await;
    eprintln!("{leader}: d joined: 4/4/4 again {rebalance:?} after it started (bound: 2 x ttl)");
    assert!(rebalance <= TTL * 2, "rebalance took {rebalance:?}");

    b.stop().await;
    let handover = wait_for_shares(&mut observer, &[a.pid(), d.pid()], &[6, 6]).await;
    eprintln!("{leader}: b stopped: a and d own all 12 shards {handover:?} after it exited");

    producer.stop().await;
    a.stop_when_drained(db, DRAIN).await;
    d.stop().await;

    let stored = stored(stream).await;
    let by = |relay: &str| stored.iter().filter(|m| m.relay == relay).count();
    eprintln!(
        "{leader}: {} events: {} by a, {} by b, {} by c, {} by d; {} inversions",
        stored.len(),
        by("a"),
        by("b"),
        by("c"),
        by("d"),
        inversions(&stored)
    );
    assert_each_row_once(db, &stored).await;
    assert_eq!(inversions(&stored), 0, "per-key order across every handover");
    let terms = [
        ("a", shard_terms(&a, None)),
        ("b", shard_terms(&b, None)),
        ("c", shard_terms(&c, Some(killed_at))),
        ("d", shard_terms(&d, None)),
    ];
    assert_one_owner_per_shard(db, &terms, &stored).await;
    for (name, terms) in &terms {
        assert!(!terms.is_empty(), "{name} owned shards");
    }
}

/// The `reason` of each of `relay`'s log lines saying `message`, in order.
fn reasons(relay: &Relay, message: &str) -> Vec<String> {
    log_lines(relay)
        .iter()
        .filter(|line| line.message == message)
        .map(|line| line.fields["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `series`' value in a Prometheus text exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `(members, shards this replica owns)` from its `/metrics`, once it answers.
async fn owned_per_metrics(port: u16) -> Option<(f64, Vec<u32>)> {
    let response = http(port, "GET", "/metrics").await.filter(|response| response.status == 200)?;
    let members = sample(&response.body, "qx_relay_members")?;
    let owned: Vec<u32> = (0..SHARDS)
        .filter(|shard| {
            sample(&response.body, &format!("qx_relay_is_leader{{shard=\"{shard}\"}}")) == Some(1.0)
        })
        .collect();
    let count = sample(&response.body, "qx_relay_owned_shards")?;
    (count == owned.len() as f64).then_some((members, owned))
}

#[tokio::test]
async fn operators_see_each_shards_owner_and_the_members_and_none_refuses_auto() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let key = format!("test:{}:elastic", Uuid::new_v4().simple());
    let env = elastic_env(&db, &stream, "a", &key);

    let (a, a_port) = Relay::spawn_serving(&env);
    let alone = poll(DRAIN, || async {
        owned_per_metrics(a_port).await.filter(|(members, owned)| *members == 1.0 && owned.len() == 12)
    })
    .await;
    assert!(alone.is_some(), "one replica owns all 12 shards:\n{}", a.log());
    assert_eq!(reasons(&a, "shard acquired"), vec!["start"; 12], "one line per shard, with its reason");

    let (b, b_port) = Relay::spawn_serving(&env);
    let halves = poll(DRAIN, || async {
        let a = owned_per_metrics(a_port).await?;
        let b = owned_per_metrics(b_port).await?;
        (a.0 == 2.0 && b.0 == 2.0 && a.1.len() == 6 && b.1.len() == 6).then_some((a.1, b.1))
    })
    .await;
    let (a_owned, b_owned) = halves.unwrap_or_else(|| panic!("not 6/6:\n{}\n{}", a.log(), b.log()));
    assert!(a_owned.iter().all(|shard| !b_owned.contains(shard)), "{a_owned:?} and {b_owned:?} are disjoint");
    let released = log_lines(&a).iter().filter(|line| line.message == "shard released").count();
    assert_eq!(released, 6, "a released six shards for b:\n{}", a.log());

    let (code, stdout, stderr) = run_command(&env, &["status", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(status["shard_id"], "auto");
    assert_eq!(status["members"], 2);
    let shards = status["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 12);
    for shard in shards {
        let id = u32::try_from(shard["shard"].as_u64().expect("shard id")).unwrap();
        let lock = &shard["leader_lock"];
        let owner = if a_owned.contains(&id) { a.pid() } else { b.pid() };
        assert_eq!(lock["pid"], owner, "shard {id}: {status}");
        assert!(lock["host"].is_string() && lock["ttl_left_ms"].as_i64().is_some_and(|ms| ms > 0), "{lock}");
        assert!(shard["pending"].is_i64(), "{shard}");
    }
    let (code, stdout, _) = run_command(&env, &["status"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("table qx_outbox_events, shared by 2 live replica(s)\n"), "{stdout}");
    assert_eq!(stdout.lines().filter(|line| line.contains(": held by ")).count(), 12, "{stdout}");

    a.stop().await;
    let all = poll(DRAIN, || async {
        owned_per_metrics(b_port).await.filter(|(members, owned)| *members == 1.0 && owned.len() == 12)
    })
    .await;
    assert!(all.is_some(), "b took a's shards over:\n{}", b.log());
    b.stop().await;
    let released = reasons(&b, "shard released");
    assert_eq!(released, vec!["stop"; 12], "b owned all 12 after a stopped, and released them on SIGTERM");

    let unleased = env.set("QX_RELAY__LEADER", "none");
    let (code, _, stderr) = run_command(&unleased, &["run"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("relay.shard_id") && stderr.contains("auto needs relay.leader"), "{stderr}");
}

#[tokio::test]
async fn a_replica_frozen_past_its_leases_loses_its_shards_and_rejoins_keeping_each_key_in_order() {
    with_each_leader(freeze_and_thaw).await;
}

/// One of 3 replicas leasing in `leader` frozen (SIGSTOP) past its leases, then thawed.
async fn freeze_and_thaw(leader: &'static str) {
    let ((cluster, mut observer, producer, [a, b, c]), _) = Cluster::with_three(leader).await;
    let (db, stream) = (&cluster.db, &cluster.stream);
    let pids = [a.pid(), b.pid(), c.pid()];
    let frozen_at = Utc::now();
    c.signal("STOP");
    let takeover = wait_for_shares(&mut observer, &[a.pid(), b.pid()], &[6, 6]).await;
    eprintln!("{leader}: c frozen: a and b own all 12 shards {takeover:?} later");
    tokio::time::sleep(TTL).await;
    c.signal("CONT");
    let rejoined = wait_for_shares(&mut observer, &pids, &[4, 4, 4]).await;
    eprintln!("{leader}: c thawed: 4/4/4 again {rejoined:?} later");
    let lost = log_lines(&c).iter().filter(|line| line.fields["reason"] == "lost lease").count();
    assert_eq!(lost, 4, "c let go of the four shards whose leases ran out:\n{}", c.log());

    producer.stop().await;
    a.stop_when_drained(db, DRAIN).await;
    b.stop().await;
    c.stop().await;
    let stored = stored(stream).await;
    eprintln!("{leader}: {} events, {} inversions", stored.len(), inversions(&stored));
    assert_each_row_once(db, &stored).await;
    assert_eq!(inversions(&stored), 0, "per-key order across the freeze");
    // No shard waits for another: while c is frozen and its shards move to them, a and b keep publishing
    // (the keys whose oldest row c holds wait for it; the others go on).
    let frozen = frozen_at..frozen_at + TimeDelta::from_std(4 * TTL).expect("TTL");
    let mut healthy: Vec<DateTime<Utc>> =
        stored.iter().filter(|s| s.relay != "c" && frozen.contains(&s.at)).map(|s| s.at).collect();
    healthy.sort();
    let gap = healthy.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap_or(TimeDelta::MAX);
    eprintln!("{leader}: longest pause of a and b while c was frozen: {gap}");
    assert!(gap < TimeDelta::from_std(2 * TTL).expect("TTL"), "a and b paused {gap} while c was frozen");
}
