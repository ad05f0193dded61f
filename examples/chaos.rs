//! The chaos check behind `scripts/chaos`: relays drain an outbox while a producer writes to it, and for a set
//! number of cycles one of the relays, NATS, Postgres or (in leader mode) Redis is killed -9 or restarted.
//! Afterwards every committed event must be in the stream exactly once and every row marked.
//!
//! ```text
//! scripts/chaos [--cycles 8] [--leader redis|postgres|none] [--relays 2] [--shards 0] [--seed N] [--rate 500]
//! ```
//! Everything runs on private servers (nats-server, redis-server, a Postgres cluster from initdb) on free
//! loopback ports, in temporary directories, so the shared services are never touched. Prints one line per
//! cycle and a summary (`cycles`, `events`, `lost`, `duplicates`, …); exits 1 when anything was lost,
//! duplicated or left unmarked, or a relay died in a way it should not. The relays are the `qx-relay` built
//! next to this example (`scripts/chaos` builds both).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, stream};
use clap::Parser;
use qx_relay_testkit::outbox::{envelope, insert_rows};
use qx_relay_testkit::{NatsServer, PgCluster, RedisServer, Relay, RelayEnv, TestDb, TestStream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::time::Instant;
use uuid::Uuid;

const EVENT_NAMES: [&str; 3] = ["order.placed", "order.paid", "identity.user.registered"];
/// Longer than any run, so every republished event is recognised as a duplicate.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// How long the relays get to drain the backlog once the chaos stops.
const FINAL_DRAIN: Duration = Duration::from_secs(90);

#[derive(Debug, Parser)]
#[command(about = "Kill and restart the relay and its services while events flow; check nothing is lost.")]
struct Args {
    /// Faults to inject.
    #[arg(long, default_value_t = 8)]
    cycles: u32,
    /// Leader mode: `redis` runs several relays on one lock and adds Redis to the faults; `postgres` runs them
    /// on advisory locks.
    #[arg(long, default_value = "redis", value_parser = ["redis", "postgres", "none"])]
    leader: String,
    /// Relay processes.
    #[arg(long, default_value_t = 2)]
    relays: usize,
    /// Elastic mode: the relays share this many shards (`--shard-id auto`); needs a leader mode. 0: off.
    #[arg(long, default_value_t = 0)]
    shards: u32,
    /// Events per second the producer commits.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seed of the fault schedule; random when unset (the summary prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// Give up (and fail) after this many seconds; default 60 + 15 per cycle.
    #[arg(long)]
    max_seconds: Option<u64>,
}

/// One relay, restarted whenever it stops; every run of it logs to `log`.
struct Slot {
    relay: Option<Relay>,
    log: PathBuf,
}

/// The relays and how they ended.
struct Relays {
    env: RelayEnv,
    procs: Vec<Slot>,
    /// Exit codes (or "signal") of relays that stopped on their own, by code.
    exits: HashMap<String, u32>,
    /// Exits that point at a bug: not 0, not 69 (a dependency down for too long or at start).
    bad_exits: Vec<String>,
}

impl Relays {
    fn start(&mut self, index: usize) {
        let slot = &mut self.procs[index];
        slot.relay = Some(Relay::spawn_with_log(&self.env, &slot.log));
    }

    /// Restarts relays that exited by themselves, noting why they exited. Relays stopped on purpose (no relay)
    /// stay down.
    fn supervise(&mut self) {
        for index in 0..self.procs.len() {
            if let Some(status) = self.procs[index].relay.as_ref().and_then(Relay::exited) {
                self.procs[index].relay = None;
                self.record_exit(index, status.code());
                self.start(index);
            }
        }
    }

    fn record_exit(&mut self, index: usize, code: Option<i32>) {
        let key = code.map_or("signal".to_owned(), |c| c.to_string());
        *self.exits.entry(key.clone()).or_default() += 1;
        if !matches!(code, Some(0 | 69)) {
            let log = fs::read_to_string(&self.procs[index].log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            self.bad_exits.push(format!("relay {index} exited with {key}:\n{}", tail.join("\n")));
        }
    }

    fn kill9(&mut self, index: usize) {
        if let Some(relay) = self.procs[index].relay.take() {
            relay.kill9();
        }
    }

    /// SIGTERM and wait: a clean stop must exit 0 within the drain timeout.
    async fn stop(&mut self, index: usize) {
        let Some(relay) = self.procs[index].relay.take() else { return };
        match relay.terminate(Duration::from_secs(20)).await {
            Some(status) if status.code() != Some(0) => self.record_exit(index, status.code()),
            Some(_) => {}
            None => self.bad_exits.push(format!("relay {index} ignored SIGTERM for 20 s")),
        }
    }
}

/// What the producer did.
#[derive(Default)]
struct Produced {
    /// event_ids whose transaction committed.
    committed: Mutex<Vec<Uuid>>,
    /// Transactions whose COMMIT failed: they may or may not have landed.
    unknown: AtomicU64,
    failed: AtomicU64,
}

/// Commits batches of 1–5 events at about `rate` events/s until `stop`.
async fn produce(url: String, rate: u32, produced: Arc<Produced>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&url)
        .expect("producer pool");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let per_tick = f64::from(rate) / 50.0;
    let mut owed = 0.0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            let count = rng.random_range(1..=5).min(owed as usize).max(1);
            owed -= count as f64;
            let events: Vec<(Uuid, Uuid, &str)> = (0..count)
                .map(|_| {
                    (Uuid::new_v4(), Uuid::new_v4(), EVENT_NAMES[rng.random_range(0..EVENT_NAMES.len())])
                })
                .collect();
            match insert(&pool, &events).await {
                Ok(()) => produced.committed.lock().expect("lock").extend(events.iter().map(|e| e.1)),
                Err(Stage::Commit) => {
                    produced.unknown.fetch_add(1, Ordering::Relaxed);
                }
                Err(Stage::Before) => {
                    produced.failed.fetch_add(1, Ordering::Relaxed);
                    owed = 0.0; // Postgres is down: do not queue a burst for when it is back
                }
            }
        }
    }
    pool.close().await;
}

enum Stage {
    Before,
    Commit,
}

/// One transaction, as qx-db's UnitOfWork writes it: the rows of `events` (row id, event_id, name).
async fn insert(pool: &PgPool, events: &[(Uuid, Uuid, &str)]) -> Result<(), Stage> {
    let rows: Vec<_> = events
        .iter()
        .map(|(id, event_id, name)| {
            let payload = json!({ "order_id": Uuid::new_v4(), "amount_cents": 1000 });
            json!({ "id": id, "event_name": name, "payload": envelope(*event_id, name, payload) })
        })
        .collect();
    let mut tx = pool.begin().await.map_err(|_| Stage::Before)?;
    insert_rows(&mut *tx, &rows).await.map_err(|_| Stage::Before)?;
    tx.commit().await.map_err(|_| Stage::Commit)
}

/// The services under test.
struct World {
    nats: NatsServer,
    postgres: PgCluster,
    redis: Option<RedisServer>,
    relays: Relays,
}

impl World {
    /// Sleeps `duration`, restarting relays that stopped on their own every 100 ms.
    async fn sleep(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.relays.supervise();
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
        self.relays.supervise();
    }

    /// One fault: what was done, e.g. `kill -9 nats, down 0.8s`.
    async fn fault(&mut self, rng: &mut StdRng) -> String {
        let targets: &[&str] = if self.redis.is_some() {
            &["relay", "nats", "postgres", "redis"]
        } else {
            &["relay", "nats", "postgres"]
        };
        let target = targets[rng.random_range(0..targets.len())];
        let kill = rng.random_bool(0.5);
        let down = Duration::from_millis(rng.random_range(200..1500));
        let action = if kill { "kill -9" } else { "restart" };
        match target {
            "relay" => {
                let index = rng.random_range(0..self.relays.procs.len());
                if kill {
                    self.relays.kill9(index);
                } else {
                    self.relays.stop(index).await;
                }
                self.sleep(down).await; // the other relays keep running (and are supervised)
                if self.relays.procs[index].relay.is_none() {
                    self.relays.start(index);
                }
                format!("{action} relay {index}, down {down:.1?}")
            }
            "nats" => {
                if kill {
                    self.nats.kill9();
                } else {
                    self.nats.stop();
                }
                self.sleep(down).await;
                self.nats.restart().await;
                format!("{action} nats, down {down:.1?}")
            }
            "postgres" => {
                if kill {
                    self.postgres.kill9();
                } else {
                    self.postgres.stop("fast");
                }
                self.sleep(down).await;
                self.postgres.restart().await;
                format!("{action} postgres, down {down:.1?}")
            }
            _ => {
                let redis = self.redis.as_mut().expect("leader mode");
                if kill {
                    redis.kill9();
                } else {
                    redis.stop();
                }
                self.sleep(down).await;
                self.redis.as_mut().expect("leader mode").restart().await;
                format!("{action} redis, down {down:.1?}")
            }
        }
    }
}

/// Every message in the stream: its `Nats-Msg-Id`s, in stream order.
async fn stream_ids(stream: &TestStream) -> Vec<String> {
    let messages = stream.messages().await;
    let id = |m: &jetstream::Message| m.headers.as_ref()?.get(NATS_MESSAGE_ID).map(ToString::to_string);
    messages.iter().map(|m| id(m).unwrap_or_default()).collect()
}

/// Republished events the stream recognised, as reported by the relays that stopped cleanly (`relay stopped`
/// lines); evidence that the faults hit rows between their PubAck and their mark.
fn reported_duplicates(log: &std::path::Path) -> u64 {
    let log = fs::read_to_string(log).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("relay stopped"))
        .filter_map(|line| {
            let count = line.split_once(" duplicates=")?.1;
            count.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline =
        started + Duration::from_secs(args.max_seconds.unwrap_or(60 + 15 * u64::from(args.cycles)));
    let leader = args.leader == "redis";
    if args.shards > 0 && args.leader == "none" {
        eprintln!("--shards needs --leader redis or postgres");
        return ExitCode::FAILURE;
    }
    println!(
        "chaos: seed {seed}, {} cycles, {} relay(s), leader {}, shards {}",
        args.cycles,
        args.relays,
        args.leader,
        if args.shards > 0 { format!("{} shared (auto)", args.shards) } else { "none".to_owned() }
    );

    let nats = NatsServer::start().await;
    let postgres = PgCluster::start().await;
    let redis = if leader { Some(RedisServer::start().await) } else { None };
    let db = TestDb::create_on(&postgres).await;
    let stream = TestStream::unattached_on(&nats).await;
    stream.attach_with(stream::Config { duplicate_window: DUPLICATE_WINDOW, ..stream.config() }).await;

    let work = std::env::temp_dir().join(format!("qxr-chaos-{}", Uuid::new_v4().simple()));
    fs::create_dir_all(&work).expect("create work dir");
    let mut env = RelayEnv::default().with(&[
        ("QX_DB__URL", &db.url),
        ("QX_NATS__SERVERS", &nats.url()),
        ("QX_NATS__MAX_RECONNECT_ATTEMPTS", "0"),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_NATS__CONNECT_TIMEOUT_SECONDS", "2"),
        ("QX_RELAY__SUBJECT_PREFIX", &stream.prefix),
        ("QX_RELAY__BATCH_SIZE", "200"),
        ("QX_RELAY__POLL_INTERVAL", "50ms"),
        ("QX_RELAY__IDLE_POLL_INTERVAL", "100ms"),
        ("QX_RELAY__ACK_TIMEOUT", "2s"),
        ("QX_RELAY__DRAIN_TIMEOUT", "3s"),
        ("QX_RELAY__GIVE_UP_AFTER", "20s"),
        ("QX_RELAY__LOG", "info"),
        ("NO_COLOR", "1"),
    ]);
    if let Some(redis) = &redis {
        env = env.with(&[
            ("QX_RELAY__LEADER", "redis"),
            ("QX_CACHE__URL", &redis.url()),
            ("QX_RELAY__LEADER_TTL", "3s"),
        ]);
    }
    if args.leader == "postgres" {
        env = env.with(&[("QX_RELAY__LEADER", "postgres"), ("QX_RELAY__LEADER_TTL", "3s")]);
    }
    if args.shards > 0 {
        env =
            env.with(&[("QX_RELAY__SHARD_ID", "auto"), ("QX_RELAY__SHARD_COUNT", &args.shards.to_string())]);
    }
    let procs = (0..args.relays.max(1))
        .map(|i| Slot { relay: None, log: work.join(format!("relay-{i}.log")) })
        .collect();
    let relays = Relays { env, procs, exits: HashMap::new(), bad_exits: Vec::new() };
    let mut world = World { nats, postgres, redis, relays };
    for index in 0..world.relays.procs.len() {
        world.relays.start(index);
    }

    let produced = Arc::new(Produced::default());
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(db.url.clone(), args.rate, produced.clone(), stop.clone(), seed ^ 1));

    let mut timed_out = false;
    world.sleep(Duration::from_secs(1)).await;
    for cycle in 1..=args.cycles {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        let what = world.fault(&mut rng).await;
        let settle = Duration::from_millis(rng.random_range(500..2500));
        world.sleep(settle).await;
        println!("cycle {cycle}: {what}");
    }

    // Stop producing, then let the relays drain everything committed.
    stop.store(true, Ordering::Relaxed);
    producer.await.expect("producer");
    let unmarked = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM qx_outbox_events WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .ok()
    };
    let drain_until =
        (Instant::now() + FINAL_DRAIN).min(deadline.max(Instant::now() + Duration::from_secs(20)));
    let mut left = unmarked(db.pool.clone()).await;
    while left != Some(0) && Instant::now() < drain_until {
        world.sleep(Duration::from_millis(200)).await;
        left = unmarked(db.pool.clone()).await;
    }
    for index in 0..world.relays.procs.len() {
        world.relays.stop(index).await;
    }

    // Verify: the table against the stream.
    let rows: Vec<(String, bool, i32)> = sqlx::query_as(
        "SELECT payload->>'event_id', published_at IS NOT NULL, attempts FROM qx_outbox_events",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read the outbox");
    let ids = stream_ids(&stream).await;
    let in_table: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let in_stream: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let committed = produced.committed.lock().expect("lock").clone();
    let commits_lost = committed.iter().filter(|id| !in_table.contains(id.to_string().as_str())).count();
    let lost = rows.iter().filter(|r| !in_stream.contains(r.0.as_str())).count();
    let duplicates = ids.len() - in_stream.len();
    let unknown = in_stream.iter().filter(|id| !in_table.contains(*id)).count();
    let not_marked = rows.iter().filter(|r| !r.1).count();
    let with_attempts = rows.iter().filter(|r| r.2 > 0).count();
    let dedupe_hits: u64 = world.relays.procs.iter().map(|p| reported_duplicates(&p.log)).sum();
    let mut exits: Vec<String> = world.relays.exits.iter().map(|(code, n)| format!("{n}×{code}")).collect();
    exits.sort();

    println!(
        "chaos: cycles {}, events {}, lost {lost}, duplicates {duplicates}, unmarked {not_marked}, \
         not-in-table {unknown}, commits-lost {commits_lost}, rows-with-attempts {with_attempts}, \
         messages {}, dedupe hits {dedupe_hits}, producer commit-unknown {} failed {}, relay exits [{}], \
         wall {:.1?}, seed {seed}",
        if timed_out { "(timed out)".to_owned() } else { args.cycles.to_string() },
        rows.len(),
        ids.len(),
        produced.unknown.load(Ordering::Relaxed),
        produced.failed.load(Ordering::Relaxed),
        exits.join(" "),
        started.elapsed(),
    );
    for bad in &world.relays.bad_exits {
        println!("{bad}");
    }
    let ok = !timed_out
        && lost == 0
        && duplicates == 0
        && not_marked == 0
        && unknown == 0
        && commits_lost == 0
        && world.relays.bad_exits.is_empty();
    if ok {
        let _ = fs::remove_dir_all(&work);
        println!("chaos: ok");
        ExitCode::SUCCESS
    } else {
        println!("chaos: FAILED (relay logs kept in {})", work.display());
        ExitCode::FAILURE
    }
}
