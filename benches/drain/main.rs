//! Drain benchmark: how fast qx-relay empties the outbox, against what Postgres and NATS allow on their own
//! and against the seed's serial algorithm, plus commit → delivery latency, memory and CPU.
//!
//! ```text
//! cargo bench --features integration-tests --bench drain -- --quick   # ≤ 90 s, proves the harness works
//! cargo bench --features integration-tests --bench drain -- --full    # the README's numbers
//! ```
//! Options: `--json PATH` (default `target/bench/drain.json`),
//! `--only pg,nats,baseline,engine,backlog,latency,elastic,scaleout,network`,
//! `--private-postgres` (an initdb'd cluster of its own, autovacuum on, instead of `DATABASE_URL`'s server),
//! `--perf` (`perf record` on the relay during the engine drains, into `target/bench/`).
//!
//! Parts besides the ceilings, the baseline and the engine drains: `backlog` (10k against 1M pending),
//! `latency` (commit → consumer), `elastic` (one replica owning 12 shards against one unsharded relay),
//! `scaleout` (a burst of ~1 KiB rows over stale statistics, drained by one relay, three static shards and
//! three elastic replicas without and with a `payload.order_id` key) and `network` (one relay and three static
//! shards on loopback and through proxies in this process adding 2 ms and 20 ms round trips to Postgres and
//! NATS).
//!
//! Needs `DATABASE_URL` (an admin URL; the run creates and drops a database of its own), `NATS_URL` (the run
//! creates and deletes streams of its own) and `REDIS_URL` (the elastic replicas' leases, under keys of their
//! own). It asserts correctness (every row stored in the stream once, marked once), never speed: the target
//! column says whether a number met the goal set for a 2-core machine.

mod claims;
mod scenarios;
mod services;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qx_relay::relay::config::OnPublish;
use qx_relay_testkit::{env_var, PgCluster, TestDb};
use serde::Serialize;

use scenarios::{settings, Backlog, Bench, Drain, Idle, Latency, Settings, Throughput};
use services::{BenchDb, Machine};

/// How much each part does.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    ceiling_rows: u64,
    nats_messages: u64,
    baseline_rows: u64,
    engine_rows: u64,
    backlog_small: u64,
    backlog_large: u64,
    latency_seconds_200: u64,
    latency_seconds_2000: u64,
    idle_seconds: u64,
    /// Alternating pairs of drains: one unsharded relay, one replica owning 12 shards.
    elastic_pairs: usize,
    /// The burst each scale-out drain empties, and the rounds of its four drains (one relay, three static
    /// shards, three elastic replicas without and with a key), alternating.
    scaleout_rows: u64,
    scaleout_rounds: usize,
    /// Rows of each drain through the delay proxies, and the rounds of its six drains (one relay and three
    /// static shards at each delay), alternating.
    network_rows: u64,
    network_rounds: usize,
    /// Rows pending while one claim's cost is measured, scope by scope and state by state.
    claims_pending: u64,
}

const QUICK: Sizes = Sizes {
    ceiling_rows: 10_000,
    nats_messages: 10_000,
    baseline_rows: 2_000,
    engine_rows: 10_000,
    backlog_small: 10_000,
    backlog_large: 50_000,
    latency_seconds_200: 2,
    latency_seconds_2000: 2,
    idle_seconds: 3,
    elastic_pairs: 1,
    scaleout_rows: 20_000,
    scaleout_rounds: 1,
    network_rows: 5_000,
    network_rounds: 1,
    claims_pending: 20_000,
};

const FULL: Sizes = Sizes {
    ceiling_rows: 200_000,
    nats_messages: 200_000,
    baseline_rows: 20_000,
    engine_rows: 200_000,
    backlog_small: 10_000,
    backlog_large: 1_000_000,
    latency_seconds_200: 30,
    latency_seconds_2000: 15,
    idle_seconds: 10,
    elastic_pairs: 3,
    scaleout_rows: 200_000,
    scaleout_rounds: 3,
    network_rows: 200_000,
    network_rounds: 3,
    claims_pending: 1_000_000,
};

const PARTS: &[&str] =
    &["pg", "nats", "baseline", "engine", "backlog", "latency", "elastic", "scaleout", "network", "claims"];

/// The ways of draining a burst the `scaleout` part compares: names and labels.
const SCALEOUT: [(&str, &str); 4] = [
    ("scaleout_1_relay", "1 relay"),
    ("scaleout_3_static", "3 static shards"),
    ("scaleout_3_elastic", "3 elastic replicas, 12 shards"),
    ("scaleout_3_elastic_keyed", "3 elastic replicas, key order_id"),
];

/// The delays of the `network` part, one way (a round trip costs twice), with their names and labels.
const NETWORK: [(Option<Duration>, &str, &str); 3] = [
    (None, "loopback", "loopback"),
    (Some(Duration::from_millis(1)), "2ms", "2 ms round trip"),
    (Some(Duration::from_millis(10)), "20ms", "20 ms round trip"),
];

#[derive(Debug)]
struct Options {
    full: bool,
    json: PathBuf,
    only: Vec<String>,
    private_postgres: bool,
    perf: bool,
}

impl Options {
    fn parse() -> Self {
        let mut options = Self {
            full: false,
            json: PathBuf::from("target/bench/drain.json"),
            only: PARTS.iter().map(|p| (*p).to_owned()).collect(),
            private_postgres: false,
            perf: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.full = false,
                "--full" => options.full = true,
                "--json" => options.json = args.next().expect("--json PATH").into(),
                "--only" => {
                    options.only = args.next().expect("--only a,b").split(',').map(str::to_owned).collect();
                    if let Some(bad) = options.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
                        panic!("--only: unknown part {bad:?}; parts: {}", PARTS.join(","));
                    }
                }
                "--private-postgres" => options.private_postgres = true,
                "--perf" => options.perf = true,
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                other => panic!(
                    "unknown argument {other:?}; use --quick | --full, --json PATH, --only {}, --private-postgres, --perf",
                    PARTS.join(",")
                ),
            }
        }
        options
    }

    fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

/// A goal of the issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
struct Target {
    name: &'static str,
    value: f64,
    goal: &'static str,
    met: bool,
    /// For the throughput ratios: the same ratio with each drain at its free relay's bound (see [`CpuBudget`]),
    /// i.e. what this run's Postgres and nats-server CPU per row allow, whatever the relay does.
    servers_allow: Option<f64>,
    /// For ratios of drains that alternate: the ratio in each round, whose two drains ran one after the other,
    /// so a swing of the machine's speed moves both.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_round: Option<Vec<f64>>,
}

/// Where a drain's CPU went, per row. A machine whose cores are all busy cannot drain faster than its cores
/// divided by the CPU one row costs; `free_relay_bound` is that rate for a relay that cost nothing, from the
/// Postgres and nats-server CPU of this very drain: the physical limit on `engine / Postgres ceiling`.
#[derive(Debug, Clone, Serialize)]
struct CpuBudget {
    scenario: String,
    label: String,
    relay_us_per_row: f64,
    postgres_us_per_row: f64,
    nats_server_us_per_row: f64,
    /// The rest of the machine's CPU during the drain: autovacuum, checkpoints, the benchmark itself.
    other_us_per_row: Option<f64>,
    cores_busy: f64,
    free_relay_bound_rows_per_second: f64,
    /// `free_relay_bound` over the best Postgres ceiling for the same write (mark or delete).
    free_relay_bound_over_ceiling: Option<f64>,
}

/// Drain rate with the large backlog over the rate with the small one, for the relay and for each server
/// alone: the relay cannot scale better than the servers it waits on.
#[derive(Debug, Clone, Serialize)]
struct BacklogScaling {
    relay: Option<f64>,
    postgres_alone: Option<f64>,
    jetstream_alone: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    started_at: String,
    seconds: f64,
    /// The services are shared: the load average says how busy the machine was besides this run.
    load_average_at_end: String,
    machine: Machine,
    postgres: &'static str,
    autovacuum_table_settings: &'static str,
    sizes: Sizes,
    throughput: Vec<Throughput>,
    idle: Option<Idle>,
    latency: Vec<Latency>,
    cpu_budget: Vec<CpuBudget>,
    targets: Vec<Target>,
    backlog_scaling: BacklogScaling,
    /// One claim's cost by scope and state of the table, with its plan.
    claims: Vec<claims::ClaimCost>,
}

fn main() {
    let options = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let sizes = if options.full { FULL } else { QUICK };
    let out_dir = options.json.parent().map_or_else(|| PathBuf::from("."), PathBuf::from);
    std::fs::create_dir_all(&out_dir).expect("create output directory");

    // A private cluster, when asked for, lives until the end of the run, after the database on it.
    let private = if options.private_postgres { Some(PgCluster::start().await) } else { None };
    let db = match &private {
        Some(cluster) => {
            // Visit the outbox table often enough for its per-table thresholds to matter.
            let pool =
                sqlx::PgPool::connect(&cluster.url("postgres")).await.expect("connect private cluster");
            for statement in ["ALTER SYSTEM SET autovacuum_naptime = '10s'", "SELECT pg_reload_conf()"] {
                sqlx::raw_sql(statement).execute(&pool).await.expect("configure private cluster");
            }
            pool.close().await;
            TestDb::create_on(cluster).await
        }
        None => TestDb::create().await,
    };
    let db = BenchDb(db);
    let nats_url = env_var("NATS_URL");
    let nats = async_nats::connect(&nats_url).await.expect("connect to NATS (NATS_URL)");
    let nats_port =
        nats_url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap_or(4222);
    let machine = Machine::describe(&db.pool, &nats).await;
    let mode = if options.full { "full" } else { "quick" };
    eprintln!(
        "drain benchmark, {mode} mode: database {}, {} × {}, PostgreSQL {} (autovacuum {}), nats-server {}",
        db.name,
        machine.cpus,
        machine.cpu_model,
        machine.postgres,
        machine.postgres_autovacuum,
        machine.nats_server
    );
    if machine.postgres_autovacuum != "on" {
        eprintln!(
            "warning: autovacuum is off on this server, so the outbox table's autovacuum settings do nothing; \
             --private-postgres measures with them"
        );
    }
    let bench =
        Bench { db, nats, out_dir, perf: options.perf, nats_pid: services::nats_server_pid(nats_port) };
    let (throughput, idle, latency) = scenarios(&bench, &options, sizes).await;
    let claims = if options.runs("claims") {
        claims::claim_costs(&bench.db, sizes.claims_pending).await
    } else {
        Vec::new()
    };

    let cpu_budget = cpu_budgets(&throughput, machine.cpus);
    let mut targets = targets(&throughput, &cpu_budget, idle.as_ref(), &latency);
    if let Some(worst) = claims.iter().map(|cost| cost.p99_ms).max_by(f64::total_cmp) {
        let met = worst <= 20.0;
        let name = "claims: worst p99 of a 1,000-row claim, ms";
        targets
            .push(Target { name, value: worst, goal: "≤ 20", met, servers_allow: None, per_round: None });
    }
    let scaling = |suffix: &str| {
        let (large, small) = (format!("backlog_large{suffix}"), format!("backlog_small{suffix}"));
        rate(&throughput, &large).zip(rate(&throughput, &small)).map(|(large, small)| large / small)
    };
    let backlog_scaling = BacklogScaling {
        relay: scaling(""),
        postgres_alone: scaling("_postgres"),
        jetstream_alone: scaling("_jetstream"),
    };
    let report = Report {
        mode,
        started_at,
        seconds: started.elapsed().as_secs_f64(),
        load_average_at_end: services::load_average(),
        machine,
        postgres: if options.private_postgres {
            "private cluster (initdb, autovacuum on, naptime 10s)"
        } else {
            "DATABASE_URL"
        },
        autovacuum_table_settings: services::AUTOVACUUM_SQL,
        sizes,
        throughput,
        idle,
        latency,
        cpu_budget,
        targets,
        backlog_scaling,
        claims,
    };
    print_report(&report);
    let json = serde_json::to_string_pretty(&report).expect("serialize report");
    std::fs::write(&options.json, json + "\n").expect("write JSON report");
    println!("\nwritten: {}", options.json.display());
}

async fn scenarios(
    bench: &Bench,
    options: &Options,
    sizes: Sizes,
) -> (Vec<Throughput>, Option<Idle>, Vec<Latency>) {
    let mut throughput = Vec::new();
    let mut idle = None;
    let mut latency = Vec::new();
    let record = |result: Throughput, list: &mut Vec<Throughput>| {
        eprintln!("  {:<58} {:>10.0} rows/s", result.label, result.rows_per_second);
        list.push(result);
    };
    if options.runs("pg") {
        for (on_publish, pipelined) in [
            (OnPublish::Mark, false),
            (OnPublish::Mark, true),
            (OnPublish::Delete, false),
            (OnPublish::Delete, true),
        ] {
            let write = if on_publish == OnPublish::Mark { "mark" } else { "delete" };
            let order = if pipelined { "pipelined" } else { "serial" };
            let name = format!("pg_ceiling_{write}_{order}");
            let label = format!("Postgres ceiling: claim + {write}, {order}");
            let result =
                scenarios::postgres_ceiling(bench, &name, &label, sizes.ceiling_rows, on_publish, pipelined)
                    .await;
            record(result, &mut throughput);
        }
    }
    if options.runs("nats") {
        for (name, label, raw) in [
            ("nats_ceiling_raw", "NATS ceiling: JetStream publish, Msg-Id, 1024 in flight", true),
            ("nats_ceiling_relay_publisher", "NATS ceiling: RelayPublisher::publish_batch", false),
        ] {
            record(
                scenarios::nats_ceiling(bench, name, label, sizes.nats_messages, raw).await,
                &mut throughput,
            );
        }
    }
    if options.runs("baseline") {
        record(scenarios::baseline(bench, sizes.baseline_rows).await, &mut throughput);
    }
    if options.runs("engine") {
        // The idle relay is measured once, after the mark-mode drain.
        let idle_for = Some(Duration::from_secs(sizes.idle_seconds));
        for (name, label, on_publish, idle_for) in [
            ("engine_mark", "qx-relay, mark mode", OnPublish::Mark, idle_for),
            ("engine_delete", "qx-relay, delete mode", OnPublish::Delete, None),
        ] {
            let drain = Drain { idle: idle_for, ..Drain::new(name, label, sizes.engine_rows, on_publish) };
            let (result, idle_result) = scenarios::relay_drain(bench, &drain).await;
            record(result, &mut throughput);
            idle = idle.or(idle_result);
        }
    }
    if options.runs("backlog") {
        // Each backlog is drained by Postgres alone (the pipelined claim + mark), by JetStream alone (the
        // relay's publisher, as many messages into an empty stream) and by the relay: how the servers' own
        // rates scale with the backlog is what the relay's can follow. A small drain lasts a fraction of a
        // second, so one run is mostly noise: each small one is the median of three.
        for (size, rows, runs) in [("small", sizes.backlog_small, 3), ("large", sizes.backlog_large, 1)] {
            let count = count_text(rows);
            let postgres = (
                format!("backlog_{size}_postgres"),
                format!("Postgres alone: claim + mark, {count} pending"),
            );
            let jetstream =
                (format!("backlog_{size}_jetstream"), format!("JetStream alone: {count} messages"));
            let relay = (format!("backlog_{size}"), format!("qx-relay, mark mode, {count} pending"));
            let (mut postgres_runs, mut jetstream_runs, mut relay_runs) =
                (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs {
                postgres_runs.push(
                    scenarios::postgres_ceiling(bench, &postgres.0, &postgres.1, rows, OnPublish::Mark, true)
                        .await,
                );
                jetstream_runs
                    .push(scenarios::nats_ceiling(bench, &jetstream.0, &jetstream.1, rows, false).await);
                let drain = Drain::new(&relay.0, &relay.1, rows, OnPublish::Mark);
                relay_runs.push(scenarios::relay_drain(bench, &drain).await.0);
            }
            for runs in [postgres_runs, jetstream_runs, relay_runs] {
                record(median(runs), &mut throughput);
            }
        }
    }
    if options.runs("elastic") {
        // One replica of `--shard-id auto` owning all 12 shards (12 shard loops, one NATS connection, one pool)
        // against one unsharded relay over the same backlog, alternating so both see the same machine.
        let key = format!("bench:{}:elastic", uuid::Uuid::new_v4().simple());
        let redis_url = env_var("REDIS_URL");
        let elastic = settings(&[
            ("QX_RELAY__SHARD_ID", "auto"),
            ("QX_RELAY__SHARD_COUNT", "12"),
            ("QX_RELAY__LEADER", "redis"),
            ("QX_RELAY__LEADER_KEY", key.as_str()),
            ("QX_CACHE__URL", redis_url.as_str()),
        ]);
        let (mut unsharded, mut sharded) = (Vec::new(), Vec::new());
        for _ in 0..sizes.elastic_pairs {
            let (name, label) = ("elastic_unsharded", "qx-relay, mark mode, unsharded");
            let drain = Drain::new(name, label, sizes.engine_rows, OnPublish::Mark);
            unsharded.push(scenarios::relay_drain(bench, &drain).await.0);
            let (name, label) = ("elastic_12_shards", "qx-relay, mark mode, 1 replica owning 12 shards");
            let drain = Drain {
                relays: vec![elastic.clone()],
                ..Drain::new(name, label, sizes.engine_rows, OnPublish::Mark)
            };
            sharded.push(scenarios::relay_drain(bench, &drain).await.0);
        }
        record(median(unsharded), &mut throughput);
        record(median(sharded), &mut throughput);
    }
    // Three relays on their own shards: `QX_RELAY__SHARD_ID=0..2` of 3, no leader lock, the default key.
    let static_shards: Vec<Settings> = (0..3)
        .map(|id| settings(&[("QX_RELAY__SHARD_ID", &id.to_string()), ("QX_RELAY__SHARD_COUNT", "3")]))
        .collect();
    if options.runs("scaleout") {
        // One burst over stale statistics, drained by one relay and by three started at once: static shards, and
        // elastic replicas (sharing the shards out as they join) with the default key and with a key of a
        // couple hundred values. Rounds alternate the four, so each sees the same machine; each is the median
        // of its rounds.
        let redis_url = env_var("REDIS_URL");
        let count = count_text(sizes.scaleout_rows);
        let mut runs: Vec<Vec<Throughput>> = vec![Vec::new(); SCALEOUT.len()];
        for _ in 0..sizes.scaleout_rounds {
            for (way, (name, label)) in SCALEOUT.iter().enumerate() {
                // A key of its own each time: no lease or member of an earlier drain is left to wait out.
                let key = format!("bench:{}:scaleout", uuid::Uuid::new_v4().simple());
                let mut elastic = settings(&[
                    ("QX_RELAY__SHARD_ID", "auto"),
                    ("QX_RELAY__SHARD_COUNT", "12"),
                    ("QX_RELAY__LEADER", "redis"),
                    ("QX_RELAY__LEADER_KEY", &key),
                    ("QX_CACHE__URL", &redis_url),
                ]);
                if *name == "scaleout_3_elastic_keyed" {
                    elastic.extend(settings(&[("QX_RELAY__SHARD_KEY", "payload.order_id")]));
                }
                let relays = match way {
                    0 => vec![Settings::new()],
                    1 => static_shards.clone(),
                    _ => vec![elastic; 3],
                };
                let label = format!("qx-relay, burst of {count}, {label}");
                let drain = Drain {
                    backlog: Backlog::Burst,
                    relays,
                    ..Drain::new(name, &label, sizes.scaleout_rows, OnPublish::Mark)
                };
                runs[way].push(scenarios::relay_drain(bench, &drain).await.0);
            }
        }
        for runs in runs {
            record(median(runs), &mut throughput);
        }
    }
    if options.runs("network") {
        // The relay through proxies in this process that delay both ways to Postgres and to NATS, against the
        // same drain on loopback; one relay and three static shards at each delay, alternating.
        let mut runs: Vec<Vec<Throughput>> = vec![Vec::new(); NETWORK.len() * 2];
        for _ in 0..sizes.network_rounds {
            for (at, (one_way, tag, text)) in NETWORK.iter().enumerate() {
                for (three, relays) in [(false, vec![Settings::new()]), (true, static_shards.clone())] {
                    let (name, label) = if three {
                        (format!("network_{tag}_3"), format!("qx-relay, {text}, 3 static shards"))
                    } else {
                        (format!("network_{tag}_1"), format!("qx-relay, {text}, 1 relay"))
                    };
                    let drain = Drain {
                        relays,
                        one_way_delay: *one_way,
                        ..Drain::new(&name, &label, sizes.network_rows, OnPublish::Mark)
                    };
                    runs[2 * at + usize::from(three)].push(scenarios::relay_drain(bench, &drain).await.0);
                }
            }
        }
        for runs in runs {
            record(median(runs), &mut throughput);
        }
    }
    if options.runs("latency") {
        for (rate, seconds) in [(200, sizes.latency_seconds_200), (2000, sizes.latency_seconds_2000)] {
            for notify in [true, false] {
                let result = scenarios::latency(bench, rate, Duration::from_secs(seconds), notify).await;
                eprintln!(
                    "  latency {:<6} {:>5}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                    result.wake_up, rate, result.p50_ms, result.p99_ms, result.p999_ms
                );
                latency.push(result);
            }
        }
    }
    (throughput, idle, latency)
}

/// The run with the median rate, carrying every run's rate when there were several.
fn median(mut runs: Vec<Throughput>) -> Throughput {
    // In the order they ran, to pair each with the run of another scenario that alternated with it.
    let rates: Vec<f64> = runs.iter().map(|r| r.rows_per_second).collect();
    runs.sort_by(|a, b| a.rows_per_second.total_cmp(&b.rows_per_second));
    let mut median = runs.swap_remove(runs.len() / 2);
    if rates.len() > 1 {
        median.runs_rows_per_second = Some(rates);
    }
    median
}

fn count_text(rows: u64) -> String {
    match rows {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn rate(throughput: &[Throughput], name: &str) -> Option<f64> {
    throughput.iter().find(|t| t.name == name).map(|t| t.rows_per_second)
}

/// The better of a Postgres ceiling's serial and pipelined runs, for `write` = `mark` or `delete`.
fn best_ceiling(throughput: &[Throughput], write: &str) -> Option<f64> {
    let serial = rate(throughput, &format!("pg_ceiling_{write}_serial"));
    let pipelined = rate(throughput, &format!("pg_ceiling_{write}_pipelined"));
    match (serial, pipelined) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn cpu_budgets(throughput: &[Throughput], cpus: usize) -> Vec<CpuBudget> {
    throughput
        .iter()
        .filter_map(|t| {
            let write = match t.name.as_str() {
                "engine_delete" => "delete",
                "engine_mark" | "backlog_small" | "backlog_large" | "elastic_unsharded"
                | "elastic_12_shards" => "mark",
                name if name.starts_with("scaleout_") || name.starts_with("network_") => "mark",
                _ => return None,
            };
            let (postgres, nats) = (t.postgres_cpu_seconds?, t.nats_server_cpu_seconds?);
            let per_row = |cpu_seconds: f64| 1e6 * cpu_seconds / t.rows as f64;
            let named = t.client_cpu_seconds + postgres + nats;
            let free_relay_bound = cpus as f64 * 1e6 / (per_row(postgres) + per_row(nats));
            Some(CpuBudget {
                scenario: t.name.clone(),
                label: t.label.clone(),
                relay_us_per_row: per_row(t.client_cpu_seconds),
                postgres_us_per_row: per_row(postgres),
                nats_server_us_per_row: per_row(nats),
                other_us_per_row: t.machine_cpu_seconds.map(|machine| per_row((machine - named).max(0.0))),
                // Over spawn → drained, the window the CPU readings cover.
                cores_busy: t.machine_cpu_seconds.unwrap_or(named) / t.wall_seconds.unwrap_or(t.seconds),
                free_relay_bound_rows_per_second: free_relay_bound,
                free_relay_bound_over_ceiling: best_ceiling(throughput, write).map(|c| free_relay_bound / c),
            })
        })
        .collect()
}

fn targets(
    throughput: &[Throughput],
    budgets: &[CpuBudget],
    idle: Option<&Idle>,
    latency: &[Latency],
) -> Vec<Target> {
    let mut targets = Vec::new();
    let mut ratio = |name, value: Option<f64>, servers_allow, goal, met: &dyn Fn(f64) -> bool| {
        if let Some(value) = value {
            targets.push(Target { name, value, goal, met: met(value), servers_allow, per_round: None });
        }
    };
    let bound =
        |name: &str| budgets.iter().find(|b| b.scenario == name).map(|b| b.free_relay_bound_rows_per_second);
    let (mark, mark_bound) = (rate(throughput, "engine_mark"), bound("engine_mark"));
    let baseline = rate(throughput, "baseline_serial");
    let div = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    // The issue's ceiling is one connection claiming, marking and committing in turn; the pipelined one
    // (claim k+1 while k is marked) is ours, and stricter: Postgres alone then keeps more than one core busy.
    for (name, ceiling) in [
        ("engine mark / Postgres claim+mark, serial", "pg_ceiling_mark_serial"),
        ("engine mark / Postgres claim+mark, pipelined", "pg_ceiling_mark_pipelined"),
    ] {
        let ceiling = rate(throughput, ceiling);
        ratio(name, div(mark, ceiling), div(mark_bound, ceiling), "≥ 0.8", &|v| v >= 0.8);
    }
    ratio("engine mark / serial baseline", div(mark, baseline), div(mark_bound, baseline), "≥ 5", &|v| {
        v >= 5.0
    });
    // One scenario's rate over another's, for the relay and for its free-relay bound; the goal is a floor.
    for (name, over, under, goal, floor) in [
        ("engine delete / engine mark", "engine_delete", "engine_mark", "≥ 1.25", 1.25),
        ("drain rate, large backlog / small backlog", "backlog_large", "backlog_small", "≥ 0.9", 0.9),
        (
            "1 replica owning 12 shards / 1 unsharded relay",
            "elastic_12_shards",
            "elastic_unsharded",
            "≥ 0.9",
            0.9,
        ),
    ] {
        let value = div(rate(throughput, over), rate(throughput, under));
        ratio(name, value, div(bound(over), bound(under)), goal, &|v| v >= floor);
    }
    // Ratios of alternating drains, and the two scenarios whose runs are paired round by round.
    let mut paired: Vec<(&'static str, String, String)> = Vec::new();
    for (name, three) in [
        ("burst: 3 static shards / 1 relay", "scaleout_3_static"),
        ("burst: 3 elastic replicas / 1 relay", "scaleout_3_elastic"),
        ("burst: 3 elastic replicas, keyed / 1 relay", "scaleout_3_elastic_keyed"),
    ] {
        let one = "scaleout_1_relay";
        let (measured, allow) =
            (div(rate(throughput, three), rate(throughput, one)), div(bound(three), bound(one)));
        ratio(name, measured, allow, "≥ 0.9", &|v| v >= 0.9);
        paired.push((name, three.to_owned(), one.to_owned()));
    }
    for (name, delayed) in [
        ("1 relay, 2 ms round trip / loopback", "network_2ms_1"),
        ("1 relay, 20 ms round trip / loopback", "network_20ms_1"),
    ] {
        let loopback = "network_loopback_1";
        let measured = div(rate(throughput, delayed), rate(throughput, loopback));
        ratio(name, measured, div(bound(delayed), bound(loopback)), "≥ 0.8", &|v| v >= 0.8);
        paired.push((name, delayed.to_owned(), loopback.to_owned()));
    }
    for (name, tag) in [
        ("loopback: 3 static shards / 1 relay", "loopback"),
        ("2 ms round trip: 3 static shards / 1 relay", "2ms"),
        ("20 ms round trip: 3 static shards / 1 relay", "20ms"),
    ] {
        let (three, one) = (format!("network_{tag}_3"), format!("network_{tag}_1"));
        let measured = div(rate(throughput, &three), rate(throughput, &one));
        ratio(name, measured, div(bound(&three), bound(&one)), "≥ 0.9", &|v| v >= 0.9);
        paired.push((name, three, one));
    }
    let p99 =
        |rate: u32| latency.iter().find(|l| l.wake_up == "listen" && l.target_rate == rate).map(|l| l.p99_ms);
    ratio("LISTEN/NOTIFY p99 at 200 ev/s, ms", p99(200), None, "≤ 2", &|v| v <= 2.0);
    ratio("LISTEN/NOTIFY p99 at 2,000 ev/s, ms", p99(2000), None, "≤ 15", &|v| v <= 15.0);
    let peak_rss = throughput.iter().filter_map(|t| t.relay_peak_rss_mib).reduce(f64::max);
    ratio("relay peak RSS over the drains, MiB", peak_rss, None, "≤ 40", &|v| v <= 40.0);
    ratio("relay idle CPU, % of a core", idle.map(|i| i.relay_cpu_percent), None, "< 1", &|v| v < 1.0);
    for target in &mut targets {
        if let Some((_, over, under)) = paired.iter().find(|(name, _, _)| *name == target.name) {
            target.per_round = per_round(throughput, over, under);
        }
    }
    targets
}

/// `over / under` round by round, when both ran once in each of several rounds.
fn per_round(throughput: &[Throughput], over: &str, under: &str) -> Option<Vec<f64>> {
    let runs = |name: &str| throughput.iter().find(|t| t.name == name)?.runs_rows_per_second.clone();
    let (over, under) = (runs(over)?, runs(under)?);
    (over.len() == under.len()).then(|| over.iter().zip(&under).map(|(a, b)| a / b).collect())
}

fn print_report(report: &Report) {
    print_claims(&report.claims);
    let m = &report.machine;
    println!(
        "\nqx-relay drain benchmark ({} mode, {:.0} s) on {} × {}, {:.1} GiB, Linux {}, load {} → {}",
        report.mode,
        report.seconds,
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.load_average_at_start,
        report.load_average_at_end
    );
    println!(
        "PostgreSQL {} ({}; autovacuum {}, naptime {}, synchronous_commit {}, shared_buffers {}), nats-server {}",
        m.postgres,
        report.postgres,
        m.postgres_autovacuum,
        m.postgres_autovacuum_naptime,
        m.postgres_synchronous_commit,
        m.postgres_shared_buffers,
        m.nats_server
    );
    if !report.throughput.is_empty() {
        println!(
            "\n{:<52} {:>9} {:>8} {:>9} {:>10} {:>8} {:>8} {:>8}",
            "throughput", "rows", "seconds", "rows/s", "client CPU", "PG CPU", "NATS CPU", "peak RSS"
        );
        for t in &report.throughput {
            let seconds_text = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}s"));
            println!(
                "{:<52} {:>9} {:>8.2} {:>9.0} {:>9.0}% {:>8} {:>8} {:>8}",
                t.label,
                t.rows,
                t.seconds,
                t.rows_per_second,
                t.client_cpu_percent(),
                seconds_text(t.postgres_cpu_seconds),
                seconds_text(t.nats_server_cpu_seconds),
                t.relay_peak_rss_mib.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}M")),
            );
            if let (Some(first), Some(last)) = (t.first_tenth_rows_per_second, t.last_tenth_rows_per_second) {
                println!("{:<52} first tenth {first:.0} rows/s, last tenth {last:.0} rows/s", "");
            }
            if let Some(one_way) = t.one_way_delay_ms {
                let measured = t.measured_one_way_delay_ms.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
                let proxies = t.bench_cpu_seconds.map_or("-".to_owned(), |v| {
                    format!("{v:.1}s, {:.1} µs per row", 1e6 * v / t.rows as f64)
                });
                println!(
                    "{:<52} delay one way {one_way:.1} ms, measured {measured}; proxies' CPU {proxies}",
                    ""
                );
            }
        }
        println!(
            "(client CPU: the relay process for qx-relay rows, the bench process otherwise; % of one core)"
        );
    }
    if !report.cpu_budget.is_empty() {
        println!(
            "\n{:<36} {:>6} {:>9} {:>12} {:>6} {:>11} {:>22}",
            "CPU per row, µs",
            "relay",
            "Postgres",
            "nats-server",
            "other",
            "cores busy",
            "free relay's bound"
        );
        for b in &report.cpu_budget {
            let over_ceiling =
                b.free_relay_bound_over_ceiling.map_or_else(String::new, |r| format!(" = {r:.2} × ceiling"));
            let other = b.other_us_per_row.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
            println!(
                "{:<36} {:>6.1} {:>9.1} {:>12.1} {other:>6} {:>6.2} of {} {:>9.0} rows/s{over_ceiling}",
                b.label,
                b.relay_us_per_row,
                b.postgres_us_per_row,
                b.nats_server_us_per_row,
                b.cores_busy,
                report.machine.cpus,
                b.free_relay_bound_rows_per_second,
            );
        }
        println!(
            "(Postgres: the relay's backends; other: the rest of the machine, e.g. autovacuum and checkpoints; free \
             relay's bound: the cores over Postgres + nats-server CPU per row, the fastest any relay could drain)"
        );
    }
    if let Some(idle) = &report.idle {
        println!(
            "\nidle relay (empty table, polling every 1 s): {:.2}% of a core over {:.0} s (CPU time counts in 10 ms \
             ticks), RSS {:.1} MiB",
            idle.relay_cpu_percent, idle.seconds, idle.relay_rss_mib
        );
    }
    if !report.latency.is_empty() {
        println!(
            "\n{:<36} {:>8} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9} {:>7}",
            "latency: commit → consumer",
            "events",
            "lost",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "relay CPU",
            "PG CPU"
        );
        for l in &report.latency {
            let label = format!(
                "{} at {}/s (got {:.0}/s)",
                if l.wake_up == "listen" { "LISTEN/NOTIFY" } else { "polling" },
                l.target_rate,
                l.achieved_rate
            );
            println!(
                "{label:<36} {:>8} {:>7} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>8.1}% {:>6.1}%",
                l.events,
                l.missing,
                l.p50_ms,
                l.p99_ms,
                l.p999_ms,
                l.max_ms,
                l.relay_cpu_percent,
                l.postgres_cpu_percent
            );
        }
    }
    if !report.targets.is_empty() {
        println!(
            "\n{:<46} {:>9} {:>7}  {:<6}  {:>13}  per round",
            "target", "measured", "goal", "", "servers allow"
        );
        for t in &report.targets {
            let servers_allow = t.servers_allow.map_or(String::new(), |v| format!("{v:.2}"));
            let per_round = t.per_round.as_ref().map_or(String::new(), |rounds| {
                rounds.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(" / ")
            });
            println!(
                "{:<46} {:>9.2} {:>7}  {:<6}  {:>13}  {per_round}",
                t.name,
                t.value,
                t.goal,
                if t.met { "met" } else { "MISSED" },
                servers_allow
            );
        }
        println!(
            "(servers allow: the ratio with each drain at its free relay's bound, what this run's Postgres and \
             nats-server CPU permit; per round: the ratio of the two drains of each round, which ran one after \
             the other; measured is the ratio of their medians)"
        );
        let b = &report.backlog_scaling;
        if let Some(relay) = b.relay {
            let text = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            println!(
                "large / small backlog: qx-relay {relay:.2}, Postgres alone {}, JetStream alone {}",
                text(b.postgres_alone),
                text(b.jetstream_alone)
            );
        }
        if report.mode == "quick" {
            println!("(quick mode: small sizes, indicative only)");
        }
    }
}

/// One claim's cost, a line per scope and state (the plans are in the JSON report).
fn print_claims(claims: &[claims::ClaimCost]) {
    if claims.is_empty() {
        return;
    }
    println!(
        "\n{:<32} {:<26} {:>8} {:>8} {:>8} {:>9}",
        "1,000-row claims: table", "scope", "p50 ms", "p99 ms", "max ms", "sweep ms"
    );
    for cost in claims {
        println!(
            "{:<32} {:<26} {:>8.1} {:>8.1} {:>8.1} {:>9.1}",
            cost.state, cost.scope, cost.p50_ms, cost.p99_ms, cost.max_ms, cost.sweep_ms
        );
    }
}
