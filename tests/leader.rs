//! High availability against real Postgres, NATS and Redis: relays in leader mode never publish at the same
//! time; a standby takes over after SIGTERM, kill -9, a stolen lock, a Redis outage, a partitioned leader or
//! (advisory mode) a killed leader, each within its bound; the stream then holds every event exactly once, each
//! order's events in order. A Python relay's lock keeps us waiting, and `qx-relay status` shows its holder.
//!
//! Each relay of a pair publishes under its own sub-prefix (`<prefix>.a`, `<prefix>.b`), so the stream shows
//! who published each event and when the server stored it. Relays log JSON; the leadership terms read from their
//! logs ("leader lock acquired" until "leadership lost", the lock released, or the kill) must not overlap, and
//! every event must fall in a term of its publisher. Failover times are printed: run with `--nocapture`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream;
use chrono::{DateTime, TimeDelta, Utc};
use qx_relay_testkit::handover::{
    assert_each_row_once, insert_keyed, insert_order_events, inversions, log_lines, stored, LogLine, Stored,
};
use qx_relay_testkit::proxy::Proxy;
use qx_relay_testkit::redis_keys::RedisKeys;
use qx_relay_testkit::{
    env_var, eventually, poll, run_command, RedisServer, Relay, RelayEnv, TestDb, TestStream,
};
use serde_json::Value;
use uuid::Uuid;

/// The lease the relays run with: short, so failovers take seconds.
const TTL: Duration = Duration::from_secs(3);
/// A leader renews every third of its lease.
const RENEW_INTERVAL: Duration = Duration::from_secs(1);
const DRAIN: Duration = Duration::from_secs(60);

/// The tests that assert failover bounds run one at a time, so they do not compete with each other for CPU.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A random part of the standbys' 500 ms poll period. Standbys start polling when the test sees them stand by,
/// so without it a fault injected a whole number of periods later would always land at the same phase.
fn poll_phase() -> Duration {
    Duration::from_millis(rand::random_range(0..500))
}

/// A lock key of this test's own on the shared Redis.
fn lock_key() -> String {
    format!("test:{}:leader", Uuid::new_v4().simple())
}

/// Settings of relay `name` (its sub-prefix of the stream's prefix) in leader mode `mode`.
fn leader_env(
    db: &TestDb,
    stream: &TestStream,
    name: &str,
    mode: &str,
    redis_url: &str,
    key: &str,
) -> RelayEnv {
    let ttl = format!("{}s", TTL.as_secs());
    RelayEnv::new(db, &format!("{}.{name}", stream.prefix)).with(&[
        ("QX_RELAY__LEADER", mode),
        ("QX_RELAY__LEADER_TTL", &ttl),
        ("QX_RELAY__LEADER_KEY", key),
        ("QX_CACHE__URL", redis_url),
        ("QX_RELAY__BATCH_SIZE", "200"),
        ("QX_RELAY_LOG_FORMAT", "json"),
    ])
}

/// The first line at or after `after` whose message starts with `message`.
fn find_log(relay: &Relay, message: &str, after: DateTime<Utc>) -> Option<LogLine> {
    log_lines(relay).into_iter().find(|line| line.at >= after && line.message.starts_with(message))
}

/// Waits for [`find_log`] to find a line; panics with the log after `limit`.
async fn wait_for_log(relay: &Relay, message: &str, after: DateTime<Utc>, limit: Duration) -> LogLine {
    let line = poll(limit, || async { find_log(relay, message, after) }).await;
    line.unwrap_or_else(|| panic!("no {message:?} logged within {limit:?}; log:\n{}", relay.log()))
}

/// Lines whose message starts with `message`, at or after `after`.
fn count_log(relay: &Relay, message: &str, after: DateTime<Utc>) -> usize {
    log_lines(relay).iter().filter(|line| line.at >= after && line.message.starts_with(message)).count()
}

/// From when to when a relay led.
type Term = (DateTime<Utc>, DateTime<Utc>);

/// When a relay led: from "leader lock acquired" until it stopped claiming ("leadership lost", or on SIGTERM
/// before it hands the lock over), "relay stopped", or, for a killed relay, `killed_at`: once it was killed and
/// the server had stored what it sent before.
fn terms(relay: &Relay, killed_at: Option<DateTime<Utc>>) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut start = None;
    for line in log_lines(relay) {
        match line.message.as_str() {
            message if message.starts_with("leader lock acquired") => {
                assert!(start.is_none(), "acquired twice without losing it:\n{}", relay.log());
                start = Some(line.at);
            }
            "leadership lost; stopped claiming"
            | "stopped claiming; handing the leader lock over"
            | "relay stopped" => {
                if let Some(start) = start.take() {
                    terms.push((start, line.at));
                }
            }
            _ => {}
        }
    }
    if let Some(start) = start {
        let end =
            killed_at.unwrap_or_else(|| panic!("relay still leads but was not killed:\n{}", relay.log()));
        terms.push((start, end));
    }
    terms
}

/// Consecutive messages of one relay, in stream order: `[("a", 1200), ("b", 800)]`.
fn runs(stored: &[Stored]) -> Vec<(String, usize)> {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for message in stored {
        match runs.last_mut() {
            Some((relay, count)) if *relay == message.relay => *count += 1,
            _ => runs.push((message.relay.clone(), 1)),
        }
    }
    runs
}

/// Leadership terms of different relays never overlap, and every event was stored while its publisher led.
fn assert_one_publisher_at_a_time(terms: &[(&str, Vec<Term>)], stored: &[Stored]) {
    for (i, (a, a_terms)) in terms.iter().enumerate() {
        for (b, b_terms) in &terms[i + 1..] {
            for (a_start, a_end) in a_terms {
                for (b_start, b_end) in b_terms {
                    assert!(
                        a_end <= b_start || b_end <= a_start,
                        "{a} led {a_start}..{a_end} while {b} led {b_start}..{b_end}"
                    );
                }
            }
        }
    }
    let by_relay: HashMap<&str, &Vec<Term>> = terms.iter().map(|(relay, terms)| (*relay, terms)).collect();
    for message in stored {
        let relay_terms = by_relay.get(message.relay.as_str()).expect("a known relay");
        assert!(
            relay_terms.iter().any(|(start, end)| *start <= message.at && message.at <= *end),
            "{} published {} at {} outside its terms {relay_terms:?}",
            message.relay,
            message.msg_id,
            message.at
        );
    }
}

/// `published` and `duplicates` of a relay's "relay stopped" line.
fn stop_totals(relay: &Relay) -> (u64, u64) {
    let line = log_lines(relay)
        .into_iter()
        .find(|line| line.message == "relay stopped")
        .unwrap_or_else(|| panic!("no \"relay stopped\" line:\n{}", relay.log()));
    (
        line.fields["published"].as_u64().expect("published"),
        line.fields["duplicates"].as_u64().expect("duplicates"),
    )
}

fn first_by(stored: &[Stored], relay: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    stored.iter().filter(|m| m.relay == relay && m.at >= after).map(|m| m.at).min()
}

fn last_by(stored: &[Stored], relay: &str, before: DateTime<Utc>) -> Option<DateTime<Utc>> {
    stored.iter().filter(|m| m.relay == relay && m.at < before).map(|m| m.at).max()
}

fn secs(delta: TimeDelta) -> f64 {
    delta.num_microseconds().expect("short delta") as f64 / 1e6
}

fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).expect("short duration")
}

/// Inserts `per_tick` rows every 20 ms until stopped, so a leader is always mid-drain.
struct Producer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn start(db: Arc<TestDb>, per_tick: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            while !flag.load(Ordering::Relaxed) {
                db.insert_events(per_tick, "order.placed").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("producer");
    }
}

/// Waits until the stream holds at least `count` messages.
async fn wait_for_stream(stream: &TestStream, count: u64, relay: &Relay) {
    let what = format!("{count} messages in the stream");
    relay.eventually(&what, DRAIN, || async { stream.count().await >= count }).await;
}

#[tokio::test]
async fn two_leaders_never_publish_together_and_sigterm_hands_over_within_a_second() {
    let _timed = TIMED.lock().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (redis, key) = (env_var("REDIS_URL"), lock_key());
    db.insert_events(5000, "order.placed").await;
    let producer = Producer::start(db.clone(), 20);
    let env = |name: &str| leader_env(&db, &stream, name, "redis", &redis, &key);
    let (a, b, start) = leader_then_standby(&env("a"), &env("b")).await;
    // Several renewals while both run: the standby must not publish a single row.
    tokio::time::sleep(2 * TTL + poll_phase()).await;
    assert_eq!(count_log(&b, "leader lock acquired", start), 0, "standby took the lock:\n{}", b.log());
    assert_eq!(count_log(&b, "batch published", start), 0, "standby published:\n{}", b.log());
    assert!(count_log(&a, "batch published", start) > 0, "leader published nothing:\n{}", a.log());

    let sigterm_at = Utc::now();
    a.signal("TERM");
    let acquired = wait_for_log(&b, "leader lock acquired", sigterm_at, DRAIN).await;
    a.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    producer.stop().await;
    b.stop_when_drained(&db, DRAIN).await;
    let (a_terms, b_terms) = (terms(&a, None), terms(&b, None));

    let stored = stored(&stream).await;
    let first_b = first_by(&stored, "b", start).expect("b published");
    eprintln!(
        "SIGTERM handover (redis, ttl {TTL:?}): lock taken after {:.3}s, first event after {:.3}s",
        secs(acquired.at - sigterm_at),
        secs(first_b - sigterm_at)
    );
    assert_eq!(
        runs(&stored).iter().map(|(relay, _)| relay.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "the leader, then the standby; never interleaved"
    );
    assert_one_publisher_at_a_time(&[("a", a_terms), ("b", b_terms)], &stored);
    assert!(first_b - sigterm_at <= delta(Duration::from_secs(1)), "standby took over after a second");
    // Per-instance counters agree with the stream: each relay stored exactly what it reports as new.
    for (name, relay) in [("a", &a), ("b", &b)] {
        let (published, duplicates) = stop_totals(relay);
        let in_stream = stored.iter().filter(|m| m.relay == name).count() as u64;
        assert_eq!(published - duplicates, in_stream, "relay {name}'s counters");
    }
    assert_each_row_once(&db, &stored).await;
}

/// Starts relay `a` (waiting until it leads) and relay `b` (waiting until it stands by) on a backlog with a
/// producer running, and waits until `a` has published `published` events.
async fn leader_and_standby(
    db: &Arc<TestDb>,
    stream: &TestStream,
    mode: &str,
    redis_url: &str,
    key: &str,
    published: u64,
) -> (Relay, Relay, Producer, DateTime<Utc>) {
    db.insert_events(20_000, "order.placed").await;
    let producer = Producer::start(db.clone(), 20);
    let env = |name: &str| leader_env(db, stream, name, mode, redis_url, key);
    let (a, b, start) = leader_then_standby(&env("a"), &env("b")).await;
    wait_for_stream(stream, published, &a).await;
    (a, b, producer, start)
}

/// Starts relay `a` with `a_env` and waits until it leads, then relay `b`, until it stands by; and when the
/// first started.
async fn leader_then_standby(a_env: &RelayEnv, b_env: &RelayEnv) -> (Relay, Relay, DateTime<Utc>) {
    let start = Utc::now();
    let a = Relay::spawn(a_env, &[]);
    wait_for_log(&a, "leader lock acquired", start, DRAIN).await;
    let b = Relay::spawn(b_env, &[]);
    wait_for_log(&b, "standing by for the leader lock", start, DRAIN).await;
    (a, b, start)
}

/// kill -9 of the leader mid-drain: the standby's first event comes within `bound`, and nothing is lost.
async fn kill_9_fails_over(mode: &str, bound: Duration) {
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (redis, key) = (env_var("REDIS_URL"), lock_key());
    let (a, b, producer, start) = leader_and_standby(&db, &stream, mode, &redis, &key, 3000).await;
    let killed_at = Utc::now();
    a.kill9();
    assert!(db.unpublished().await > 5000, "the leader was killed after the backlog was drained");
    let acquired = wait_for_log(&b, "leader lock acquired", killed_at, DRAIN).await;
    wait_for_log(&b, "batch published", acquired.at, DRAIN).await;
    producer.stop().await;
    b.stop_when_drained(&db, DRAIN).await;

    let stored = stored(&stream).await;
    let first_b = first_by(&stored, "b", start).expect("b published");
    // What the leader sent just before it died may be stored a moment after the kill.
    let a_last = stored.iter().filter(|m| m.relay == "a").map(|m| m.at).max().expect("a published");
    eprintln!(
        "kill -9 failover ({mode}, ttl {TTL:?}): lock taken after {:.3}s, first event after {:.3}s",
        secs(acquired.at - killed_at),
        secs(first_b - killed_at)
    );
    assert_eq!(runs(&stored).iter().map(|(relay, _)| relay.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let a_terms = terms(&a, Some(a_last.max(killed_at)));
    assert_one_publisher_at_a_time(&[("a", a_terms), ("b", terms(&b, None))], &stored);
    assert!(first_b - killed_at <= delta(bound), "standby's first event came after {bound:?}");
    assert_each_row_once(&db, &stored).await;
}

#[tokio::test]
async fn kill_9_of_the_redis_leader_mid_drain_fails_over_within_the_lease_and_loses_nothing() {
    let _timed = TIMED.lock().await;
    kill_9_fails_over("redis", TTL + Duration::from_secs(1)).await;
}

#[tokio::test]
async fn kill_9_of_the_postgres_leader_fails_over_within_two_seconds() {
    let _timed = TIMED.lock().await;
    kill_9_fails_over("postgres", Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_lock_taken_by_another_token_stops_the_old_leader_within_one_renewal_interval() {
    let _timed = TIMED.lock().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (redis_url, key) = (env_var("REDIS_URL"), lock_key());
    let mut redis = RedisKeys::connect(&redis_url).await;
    db.insert_events(5000, "order.placed").await;
    let producer = Producer::start(db.clone(), 20);
    let start = Utc::now();
    let a = Relay::spawn(&leader_env(&db, &stream, "a", "redis", &redis_url, &key), &[]);
    wait_for_log(&a, "leader lock acquired", start, DRAIN).await;
    wait_for_stream(&stream, 3000, &a).await;

    // An operator (or a confused peer) deletes the key and another token takes it.
    let thief = Uuid::new_v4().to_string();
    redis.del(&key).await;
    assert!(redis.set_nx_ex(&key, &thief, 60).await);
    let stolen_at = Utc::now();
    let noticed = wait_for_log(&a, "leader lock taken by another holder", stolen_at, DRAIN).await;
    let lost = wait_for_log(&a, "leadership lost", stolen_at, DRAIN).await;
    // It stands by: nothing published while the other token holds the key, which it leaves alone.
    let pending = db.unpublished().await;
    tokio::time::sleep(TTL).await;
    assert!(db.unpublished().await > pending, "the producer kept inserting");
    assert_eq!(redis.get(&key).await.as_deref(), Some(thief.as_str()));
    assert_eq!(count_log(&a, "leader lock acquired", stolen_at), 0);

    let freed_at = Utc::now();
    redis.del(&key).await;
    wait_for_log(&a, "leader lock acquired", freed_at, DRAIN).await;
    producer.stop().await;
    a.stop_when_drained(&db, DRAIN).await;

    let stored = stored(&stream).await;
    let last_before = last_by(&stored, "a", freed_at).expect("a published before");
    eprintln!(
        "stolen lock (ttl {TTL:?}, renewal every {RENEW_INTERVAL:?}): noticed after {:.3}s, claims stopped after \
         {:.3}s, last event {:.3}s after",
        secs(noticed.at - stolen_at),
        secs(lost.at - stolen_at),
        secs(last_before - stolen_at)
    );
    let bound = delta(RENEW_INTERVAL + Duration::from_millis(500));
    assert!(lost.at - stolen_at <= bound, "stopped claiming {:.3}s after", secs(lost.at - stolen_at));
    assert!(last_before - stolen_at <= bound, "published {:.3}s after", secs(last_before - stolen_at));
    assert_each_row_once(&db, &stored).await;
}

/// When the lease on `key` ends as Redis sees it now.
async fn lease_end(connection: &mut RedisKeys, key: &str) -> DateTime<Utc> {
    let left = connection.pttl(key).await;
    assert!(left > 0, "{key} holds a lease ({left})");
    Utc::now() + TimeDelta::milliseconds(left)
}

/// The one relay that leads after `since`, once one does; panics when none or both do within `limit`.
async fn one_leader_after(relays: [&Relay; 2], since: DateTime<Utc>, limit: Duration) -> LogLine {
    let leader = poll(limit, || async {
        relays.iter().find_map(|relay| find_log(relay, "leader lock acquired", since))
    });
    let leader = leader.await.unwrap_or_else(|| panic!("no leader within {limit:?}"));
    // Give the other relay time to (wrongly) take it too.
    tokio::time::sleep(TTL).await;
    let leaders: usize = relays.iter().map(|relay| count_log(relay, "leader lock acquired", since)).sum();
    assert_eq!(leaders, 1, "one leader after {since}");
    leader
}

/// How Redis goes away in [`redis_outage`].
#[derive(Clone, Copy)]
enum Outage {
    /// kill -9: renewals fail at once.
    Killed,
    /// SIGSTOP: renewals time out.
    Frozen,
}

/// Redis goes away for longer than any lease and comes back: `leader` must stop claiming, and publish its last
/// event, before its lease on `key` ends, and then one of `relays` must lead. Returns when Redis came back.
async fn redis_outage(
    redis: &mut RedisServer,
    key: &str,
    outage: Outage,
    leader: &Relay,
    relays: [&Relay; 2],
    stream: &TestStream,
) -> DateTime<Utc> {
    let lease_ends = lease_end(&mut RedisKeys::connect(&redis.url()).await, key).await;
    let down_at = Utc::now();
    match outage {
        Outage::Killed => redis.kill9(),
        Outage::Frozen => redis.freeze(),
    }
    let lost = wait_for_log(leader, "leadership lost", down_at, DRAIN).await;
    tokio::time::sleep(2 * TTL + poll_phase()).await; // longer than any lease
    let up_at = Utc::now();
    let (down, up) = match outage {
        Outage::Killed => {
            redis.restart().await;
            ("killed", "restarted")
        }
        Outage::Frozen => {
            redis.thaw();
            ("frozen", "thawed")
        }
    };
    let new_leader = one_leader_after(relays, up_at, DRAIN).await;
    let stored_now = stored(stream).await;
    let last_before =
        stored_now.iter().filter(|m| m.at < up_at).map(|m| m.at).max().expect("published before");
    eprintln!(
        "redis {down} (ttl {TTL:?}): leader stopped claiming after {:.3}s, last event {:.3}s after, {:.3}s before \
         its lease would have ended; {up}: lock taken {:.3}s after{}",
        secs(lost.at - down_at),
        secs(last_before - down_at),
        secs(lease_ends - lost.at),
        secs(new_leader.at - up_at),
        // A SET NX the server ran from its backlog after the thaw, whose reply the relay had given up on.
        if new_leader.fields["reclaimed"] == true { " (its own lease, set late)" } else { "" }
    );
    assert!(lost.at < lease_ends, "stepped down after its lease could have ended");
    assert!(last_before < lease_ends, "published after its lease could have ended");
    up_at
}

#[tokio::test]
async fn a_redis_outage_steps_the_leader_down_before_its_lease_ends_and_one_leader_resumes() {
    let _timed = TIMED.lock().await;
    let mut redis = RedisServer::start().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let key = lock_key();
    let (a, b, producer, _) = leader_and_standby(&db, &stream, "redis", &redis.url(), &key, 3000).await;

    // Redis killed: renewals fail at once.
    let up_at = redis_outage(&mut redis, &key, Outage::Killed, &a, [&a, &b], &stream).await;
    // Redis frozen: renewals time out instead of failing.
    let leader = if find_log(&a, "leader lock acquired", up_at).is_some() { &a } else { &b };
    redis_outage(&mut redis, &key, Outage::Frozen, leader, [&a, &b], &stream).await;

    producer.stop().await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    // No crash loop: both ran through both outages and stop cleanly.
    a.stop().await;
    b.stop().await;
    let stored = stored(&stream).await;
    assert_one_publisher_at_a_time(&[("a", terms(&a, None)), ("b", terms(&b, None))], &stored);
    assert_each_row_once(&db, &stored).await;
}

/// `(token, ttl_left_ms)` of each lock `qx-relay status --json` shows.
fn status_locks(env: &RelayEnv) -> Vec<(Option<String>, Option<i64>)> {
    let (code, stdout, stderr) = run_command(env, &["status", "--json"]);
    assert_eq!(code, Some(0), "status: {stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("status JSON");
    status["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|shard| &shard["leader_lock"])
        .map(|lock| (lock["token"].as_str().map(str::to_owned), lock["ttl_left_ms"].as_i64()))
        .collect()
}

#[tokio::test]
async fn a_python_relays_lock_keeps_us_waiting_and_status_shows_the_holder() {
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (redis_url, key) = (env_var("REDIS_URL"), lock_key());
    let mut redis = RedisKeys::connect(&redis_url).await;
    // What Qx's OutboxRelay does through DistributedLock: a uuid4 token, SET NX EX 60, never renewed.
    let python = Uuid::new_v4().to_string();
    assert!(redis.set_nx_ex(&key, &python, 60).await);
    db.insert_events(100, "order.placed").await;
    let env = leader_env(&db, &stream, "a", "redis", &redis_url, &key);
    let start = Utc::now();
    let a = Relay::spawn(&env, &[]);
    wait_for_log(&a, "standing by for the leader lock", start, DRAIN).await;
    // Longer than our own lease (theirs is what counts); ends anywhere between two of the standby's polls.
    tokio::time::sleep(TTL + RENEW_INTERVAL + poll_phase()).await;
    assert_eq!(db.unpublished().await, 100, "nothing published while Python holds the lock");
    assert_eq!(stream.count().await, 0);
    assert_eq!(redis.get(&key).await.as_deref(), Some(python.as_str()), "key untouched");

    let (code, stdout, stderr) = run_command(&env, &["status"]);
    assert_eq!(code, Some(0), "status: {stderr}");
    let line = stdout.lines().find(|l| l.trim_start().starts_with(&format!("lock {key}:"))).expect(&stdout);
    assert!(line.contains(&format!("held by {python}, ")), "{line}");
    let ttl: i64 = line.rsplit_once(", ").unwrap().1.strip_suffix(" ms left").expect(line).parse().unwrap();
    assert!((50_000..=60_000).contains(&ttl), "{line}");
    let locks = status_locks(&env);
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].0.as_deref(), Some(python.as_str()));
    assert!(locks[0].1.is_some_and(|ttl| (50_000..=60_000).contains(&ttl)), "{locks:?}");

    // The Python relay stops and releases its lock: we take over.
    let released_at = Utc::now();
    redis.del(&key).await;
    let acquired = wait_for_log(&a, "leader lock acquired", released_at, DRAIN).await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    eprintln!("python lock released: lock taken after {:.3}s", secs(acquired.at - released_at));
    let token = acquired.fields["token"].as_str().expect("token logged").to_owned();
    assert_ne!(token, python);
    let locks = status_locks(&env);
    assert_eq!(locks[0].0.as_deref(), Some(token.as_str()), "status shows our token");
    let ttl_ms = i64::try_from(TTL.as_millis()).unwrap();
    assert!(locks[0].1.is_some_and(|left| 0 < left && left <= ttl_ms), "{locks:?}");

    a.stop().await;
    assert_eq!(redis.get(&key).await, None, "released on SIGTERM");
    let (code, stdout, _) = run_command(&env, &["status"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains(&format!("lock {key}: free")), "{stdout}");
    assert_eq!(stream.count().await, 100);
}

/// The events of each order, oldest first; an audit event between placed and paid for every third order.
fn order_events(order: usize) -> Vec<&'static str> {
    if order % 3 == 1 {
        vec!["order.placed", "order.audited", "order.paid", "order.shipped"]
    } else {
        vec!["order.placed", "order.paid", "order.shipped"]
    }
}

/// Inserts the events of `orders` orders, each order's events sharing `payload.order_id`. Orders are interleaved
/// in groups of eight, so a batch holds several events of one order with other orders' events between them.
async fn insert_orders(db: &TestDb, orders: usize) {
    let ids: &Vec<Uuid> = &(0..orders).map(|_| Uuid::new_v4()).collect();
    let all: Vec<usize> = (0..orders).collect();
    let events = all.chunks(8).flat_map(|group| {
        (0..4).flat_map(move |step| {
            group.iter().filter_map(move |&order| Some((ids[order], step, *order_events(order).get(step)?)))
        })
    });
    insert_order_events(db, events).await;
}

#[tokio::test]
async fn each_orders_events_arrive_in_occurred_at_order_across_a_failing_row_and_a_handover() {
    let db = Arc::new(TestDb::create().await);
    let stream = TestStream::unattached().await;
    // At first the stream captures every event but order.audited: those rows fail ("no stream") and hold
    // their order until the stream is widened.
    let prefix = &stream.prefix;
    let captured = ["order.placed", "order.paid", "order.shipped"].map(|name| format!("{prefix}.*.{name}"));
    let config = stream::Config {
        name: stream.name.clone(),
        subjects: captured.to_vec(),
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    };
    stream.jetstream.create_stream(config.clone()).await.expect("create stream");
    let orders = 240;
    insert_orders(&db, orders).await;
    let audited = i64::try_from((0..orders).filter(|order| order % 3 == 1).count()).unwrap();
    let (redis, key) = (env_var("REDIS_URL"), lock_key());
    let env = |name: &str| {
        leader_env(&db, &stream, name, "redis", &redis, &key)
            .with(&[("QX_RELAY__SHARD_KEY", "payload.order_id"), ("QX_RELAY__BATCH_SIZE", "50")])
    };
    let (a, b, start) = leader_then_standby(&env("a"), &env("b")).await;
    // The leader meets the failing rows mid-batch and publishes around them.
    wait_for_log(&a, "no stream captures", start, DRAIN).await;
    // Other orders' events went out.
    eventually("a row published", DRAIN, || async { db.count("published_at IS NOT NULL").await >= 1 }).await;

    // Hand over while orders are held: the standby knows nothing of the holds and must keep order too.
    let sigterm_at = Utc::now();
    a.stop().await;
    wait_for_log(&b, "leader lock acquired", sigterm_at, DRAIN).await;
    wait_for_log(&b, "no stream captures", sigterm_at, DRAIN).await;
    let held = db.unpublished().await;
    assert!(held > audited, "later events of the audited orders wait too ({held} pending)");

    stream
        .jetstream
        .update_stream(stream::Config { subjects: vec![format!("{prefix}.>")], ..config })
        .await
        .expect("widen the stream");
    b.stop_when_drained(&db, DRAIN).await;

    let stored = stored(&stream).await;
    assert_each_row_once(&db, &stored).await;
    assert_eq!(
        db.count("attempts = 0").await,
        db.count("true").await,
        "no attempt burned on a missing stream"
    );
    assert!(stored.iter().any(|m| m.relay == "a") && stored.iter().any(|m| m.relay == "b"));
    assert_one_publisher_at_a_time(&[("a", terms(&a, None)), ("b", terms(&b, None))], &stored);
    // Each order's events in the stream in occurred_at order (the envelope's `step`), whoever published them.
    let mut per_order: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for message in &stored {
        let order_id = message.body["payload"]["order_id"].as_str().expect("order_id").to_owned();
        let step = message.body["payload"]["step"].as_i64().expect("step");
        per_order.entry(order_id).or_default().push((step, message.event_name.clone()));
    }
    assert_eq!(per_order.len(), orders);
    for (order_id, events) in &per_order {
        let steps: Vec<i64> = events.iter().map(|(step, _)| *step).collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "order {order_id} out of order: {events:?}");
        let names: Vec<&str> = events.iter().map(|(_, name)| name.as_str()).collect();
        assert!(names == order_events(0) || names == order_events(1), "order {order_id}: {names:?}");
    }
    let interleaved = per_order.values().filter(|events| events.len() == 4).count();
    eprintln!(
        "ordering: {orders} orders ({interleaved} with a failing audit event), {} events, {} pending at handover",
        stored.len(),
        held
    );
}

#[tokio::test]
async fn a_partitioned_leader_abandons_its_batch_before_its_lease_ends_so_order_holds() {
    let _timed = TIMED.lock().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (redis_url, key) = (env_var("REDIS_URL"), lock_key());
    let orders = 3000;
    insert_orders(&db, orders).await;
    let total = db.count("true").await;
    // The leader reaches Redis and NATS through proxies; Postgres directly.
    let redis_proxy = Proxy::start(&redis_url).await;
    let nats_proxy = Proxy::start(&env_var("NATS_URL")).await;
    let env = |name: &str, redis: &str, nats: &str| {
        leader_env(&db, &stream, name, "redis", redis, &key).with(&[
            ("QX_RELAY__SHARD_KEY", "payload.order_id"),
            ("QX_NATS__SERVERS", nats),
            // Acks that never come would otherwise keep the batch (and its row locks) for much longer than the
            // lease.
            ("QX_RELAY__ACK_TIMEOUT", "30s"),
        ])
    };
    let b_env = env("b", &redis_url, &env_var("NATS_URL"));
    let (a, b, _) =
        leader_then_standby(&env("a", &redis_proxy.url("redis"), &nats_proxy.url("nats")), &b_env).await;
    wait_for_stream(&stream, 1000, &a).await;

    // The leader is cut off from Redis and NATS mid-batch; it still reaches Postgres.
    let cut_at = Utc::now();
    redis_proxy.pause();
    nats_proxy.pause();
    // Its last renewal has landed by now, or never will: the lease ends where Redis says.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lease_ends = lease_end(&mut RedisKeys::connect(&redis_url).await, &key).await;
    let acquired = wait_for_log(&b, "leader lock acquired", cut_at, DRAIN).await;
    let lost = wait_for_log(&a, "leadership lost", cut_at, DRAIN).await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    // Healed: what the old leader sent meanwhile arrives now, all of it already in the stream.
    redis_proxy.resume();
    nats_proxy.resume();
    tokio::time::sleep(RENEW_INTERVAL).await;
    a.stop().await;
    b.stop().await;

    let stored = stored(&stream).await;
    let abandoned = find_log(&a, "lease ending with a batch in flight", cut_at).is_some();
    eprintln!(
        "partitioned leader (ttl {TTL:?}): stopped claiming after {:.3}s, {:.3}s before its lease would have \
         ended{}; standby took the lock {:.3}s after the cut",
        secs(lost.at - cut_at),
        secs(lease_ends - lost.at),
        if abandoned { ", abandoning its batch in flight" } else { "" },
        secs(acquired.at - cut_at)
    );
    assert!(lost.at < lease_ends, "stopped claiming after its lease could have ended");
    assert!(acquired.at >= lease_ends, "the standby took the lock while the lease ran");
    assert_eq!(stored.len() as i64, total);
    assert_each_row_once(&db, &stored).await;
    assert_one_publisher_at_a_time(&[("a", terms(&a, None)), ("b", terms(&b, None))], &stored);
    let mut per_order: HashMap<String, Vec<i64>> = HashMap::new();
    for message in &stored {
        let order_id = message.body["payload"]["order_id"].as_str().expect("order_id").to_owned();
        per_order.entry(order_id).or_default().push(message.body["payload"]["step"].as_i64().expect("step"));
    }
    assert_eq!(per_order.len(), orders);
    for (order_id, steps) in &per_order {
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "order {order_id} out of order: {steps:?}");
    }
}

/// A leader and a standby ordering by `payload.order_id` over `rows` events of 100 orders, both through Redis
/// at `redis_url`, the leader mid-drain when this returns.
async fn keyed_pair(db: &Arc<TestDb>, stream: &TestStream, redis_url: &str, rows: usize) -> (Relay, Relay) {
    insert_keyed(db, 100, rows).await;
    let key = lock_key();
    let env = |name: &str| {
        leader_env(db, stream, name, "redis", redis_url, &key)
            .with(&[("QX_RELAY__SHARD_KEY", "payload.order_id"), ("QX_RELAY__BATCH_SIZE", "1000")])
    };
    let (a, b, _) = leader_then_standby(&env("a"), &env("b")).await;
    wait_for_stream(stream, 3000, &a).await;
    (a, b)
}

/// Drains the rest, stops both relays and checks the stream: every row once, no order's events inverted.
/// Returns how many events each relay published.
async fn assert_drained_in_key_order(
    db: &TestDb,
    stream: &TestStream,
    a: Relay,
    b: Relay,
    what: &str,
) -> (usize, usize) {
    a.stop_when_drained(db, DRAIN).await;
    b.stop().await;
    let stored = stored(stream).await;
    let by = |relay: &str| stored.iter().filter(|m| m.relay == relay).count();
    let runs = runs(&stored).len();
    eprintln!(
        "{what}: {} events, {} by a, {} by b, {runs} runs, {} inversions",
        stored.len(),
        by("a"),
        by("b"),
        inversions(&stored)
    );
    assert_each_row_once(db, &stored).await;
    assert_eq!(inversions(&stored), 0, "per-key order across the handover");
    (by("a"), by("b"))
}

#[tokio::test]
async fn per_key_order_holds_when_the_leader_freezes_past_its_lease() {
    let _timed = TIMED.lock().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let (a, b) = keyed_pair(&db, &stream, &env_var("REDIS_URL"), 60_000).await;
    a.signal("STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    a.signal("CONT");
    let (_, by_standby) = assert_drained_in_key_order(&db, &stream, a, b, "leader frozen 8s").await;
    assert!(by_standby > 0, "the standby took over");
}

#[tokio::test]
async fn per_key_order_holds_across_a_redis_restart() {
    let _timed = TIMED.lock().await;
    let (db, stream) = (Arc::new(TestDb::create().await), TestStream::create().await);
    let mut redis = RedisServer::start().await;
    let (a, b) = keyed_pair(&db, &stream, &redis.url(), 60_000).await;
    redis.kill9();
    redis.restart().await;
    assert_drained_in_key_order(&db, &stream, a, b, "Redis restarted").await;
}
