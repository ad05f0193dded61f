//! The measurements: Postgres and NATS ceilings, the serial baseline, the real relay draining a backlog, and
//! commit → delivery latency under a steady producer.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures::StreamExt;
use qx_relay::envelope::event_id_of;
use qx_relay::relay::config::{OnPublish, RelayConfig};
use qx_relay::relay::nats::{Outcome, RelayPublisher};
use qx_relay::relay::store::{ClaimedBatch, OutboxRow, OutboxStore};
use qx_relay::{EventHeaders, Publisher};
use qx_relay_testkit::outbox::insert_rows;
use qx_relay_testkit::proc::{cpu_seconds, ProcStats};
use qx_relay_testkit::proxy::Proxy;
use qx_relay_testkit::{env_var, Relay};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::services::{
    assert_running, bench_stream, cpu_seconds_of, machine_busy_seconds, relay_env, spawn_relay, BenchDb,
    TableHealth, EVENT_NAME, NOTIFY_CHANNEL,
};

/// The relay's defaults, which every in-process scenario uses too.
const BATCH_SIZE: u32 = 1000;
const MAX_IN_FLIGHT: usize = 1024;
/// The seed (and the Python relay) claim this many rows per batch.
const BASELINE_BATCH: u32 = 100;
/// How often a drain looks at the stream's message count.
const PROGRESS_EVERY: Duration = Duration::from_millis(10);
/// A drain slower than this is a broken run, not a slow one.
const DRAIN_LIMIT: Duration = Duration::from_secs(1800);
/// How long the relay may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// What one run shares: the database, NATS, names and options.
pub struct Bench {
    pub db: BenchDb,
    pub nats: async_nats::Client,
    /// Relay logs and perf data go here.
    pub out_dir: PathBuf,
    /// Attach `perf record` to the relay during the engine drains.
    pub perf: bool,
    pub nats_pid: Option<u32>,
}

/// A throughput measurement: rows (or messages) per second, and what it cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub name: String,
    pub label: String,
    pub rows: u64,
    /// Measured interval: for the relay, from its first message in the stream to its last mark committed.
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Including the relay's start (spawn → drained).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
    /// Rate over the first and the last tenth of the rows (drains).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_tenth_rows_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_tenth_rows_per_second: Option<f64>,
    /// Every run's rate, in the order they ran, when the scenario ran several times (`rows_per_second` is their
    /// median).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_rows_per_second: Option<Vec<f64>>,
    /// Relay processes draining together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<usize>,
    /// `seeded` (vacuumed and analyzed) or `burst` (committed at once over stale statistics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<&'static str>,
    /// The delay the proxies between the relays and Postgres and NATS add each way, as set and as measured
    /// (the mean time a chunk spent in them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_way_delay_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_one_way_delay_ms: Option<f64>,
    /// CPU of the relay processes together (or of the bench process for in-process scenarios), seconds.
    pub client_cpu_seconds: f64,
    /// CPU of the bench process during a drain through proxies: mostly the proxies' copying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench_cpu_seconds: Option<f64>,
    /// CPU of the Postgres backends serving the relay (or the in-process store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_cpu_seconds: Option<f64>,
    /// CPU of the whole nats-server during the interval (shared: includes anyone else's traffic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_server_cpu_seconds: Option<f64>,
    /// CPU the whole machine spent during a relay drain (spawn → drained): with the three above, what
    /// else (autovacuum, checkpoints, this process) took the cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cpu_seconds: Option<f64>,
    /// VmHWM of the relay process (the largest of several).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_peak_rss_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_after: Option<TableHealth>,
}

impl Throughput {
    fn new(name: &str, label: &str, rows: u64, seconds: f64) -> Self {
        Self {
            name: name.to_owned(),
            label: label.to_owned(),
            rows,
            seconds,
            rows_per_second: rows as f64 / seconds,
            ..Self::default()
        }
    }

    /// Client CPU as a share of one core over the measured interval.
    pub fn client_cpu_percent(&self) -> f64 {
        100.0 * self.client_cpu_seconds / self.wall_seconds.unwrap_or(self.seconds)
    }
}

/// The relay idling on an empty table.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub seconds: f64,
    pub relay_cpu_percent: f64,
    pub relay_rss_mib: f64,
}

/// Commit → delivery latency under a producer at a fixed rate.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub name: String,
    pub wake_up: &'static str,
    pub target_rate: u32,
    pub achieved_rate: f64,
    pub events: usize,
    pub missing: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub relay_cpu_percent: f64,
    pub postgres_cpu_percent: f64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The relay's settings, as the in-process scenarios use them.
fn relay_config(prefix: &str, on_publish: OnPublish) -> RelayConfig {
    RelayConfig { subject_prefix: Some(prefix.to_owned()), on_publish, ..RelayConfig::default() }
}

/// Rows per second between the moments `from` and `to` (shares of `rows`) were reached, from `(when, done)`
/// samples.
fn rate_between(progress: &[(Instant, u64)], rows: u64, from: f64, to: f64) -> Option<f64> {
    let at = |share: f64| {
        let goal = (rows as f64 * share).ceil() as u64;
        progress.iter().find(|(_, done)| *done >= goal).copied()
    };
    let ((t0, n0), (t1, n1)) = (at(from)?, at(to)?);
    let seconds = t1.duration_since(t0).as_secs_f64();
    (seconds > 0.0).then(|| (n1 - n0) as f64 / seconds)
}

fn ids(batch: &ClaimedBatch) -> Vec<Uuid> {
    batch.rows.iter().map(|row| row.id).collect()
}

/// Postgres alone: the store's own claim and settle SQL (`OutboxStore::claim` + `settle` with every row
/// published), no NATS. Serial claims one batch, marks it, commits; pipelined claims batch k+1 while
/// batch k is marked and committed, the overlap the engine uses.
pub async fn postgres_ceiling(
    bench: &Bench,
    name: &str,
    label: &str,
    rows: u64,
    on_publish: OnPublish,
    pipelined: bool,
) -> Throughput {
    bench.db.reset_table(false).await;
    let seed_seconds = bench.db.seed(rows).await;
    let store = OutboxStore::connect(
        &bench.db.relay_url(),
        &relay_config("unused", on_publish),
        Duration::from_secs(5),
    )
    .await
    .expect("connect store");
    let backends_before = cpu_seconds_of(&bench.db.relay_backends().await);
    let cpu_before = own_cpu();
    let started = Instant::now();
    let mut done = 0u64;
    let mut progress = vec![(started, 0)];
    if pipelined {
        let mut previous: Option<(ClaimedBatch, Vec<Uuid>)> = None;
        loop {
            let after =
                previous.as_ref().and_then(|(batch, _)| batch.rows.last()).map(|r| (r.occurred_at, r.id));
            let settle = async {
                match previous.take() {
                    Some((batch, ids)) => store.settle(batch, &ids, &[]).await,
                    None => Ok(()),
                }
            };
            let claim = async {
                match after {
                    Some(after) => store.claim_after(BATCH_SIZE, &[], &[], &[], after).await,
                    None => store.claim(BATCH_SIZE, &[], &[], &[]).await,
                }
            };
            let (claimed, settled) = tokio::join!(claim, settle);
            settled.expect("settle");
            progress.push((Instant::now(), done));
            let batch = claimed.expect("claim");
            if batch.rows.is_empty() {
                break;
            }
            done += batch.rows.len() as u64;
            let ids = ids(&batch);
            previous = Some((batch, ids));
        }
    } else {
        loop {
            let batch = store.claim(BATCH_SIZE, &[], &[], &[]).await.expect("claim");
            if batch.rows.is_empty() {
                break;
            }
            done += batch.rows.len() as u64;
            let ids = ids(&batch);
            store.settle(batch, &ids, &[]).await.expect("settle");
            progress.push((Instant::now(), done));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let postgres_cpu = cpu_seconds_of(&bench.db.relay_backends().await) - backends_before;
    let client_cpu = own_cpu() - cpu_before;
    store.pool().close().await;
    assert_eq!(done, rows, "{label}: every row claimed once");
    assert!(!bench.db.has_pending().await, "{label}: rows left pending");
    Throughput {
        first_tenth_rows_per_second: rate_between(&progress, rows, 0.0, 0.1),
        last_tenth_rows_per_second: rate_between(&progress, rows, 0.9, 1.0),
        client_cpu_seconds: client_cpu,
        postgres_cpu_seconds: Some(postgres_cpu),
        seed_seconds: Some(seed_seconds),
        table_after: Some(bench.db.table_health().await),
        ..Throughput::new(name, label, rows, seconds)
    }
}

/// An envelope as qx-db writes it (about 430 bytes), with the given ids.
fn envelope(seq: u64, event_id: Uuid, correlation_id: Uuid) -> String {
    format!(
        r#"{{"payload": {{"seq": {seq}, "currency": "EUR", "order_id": "{order}", "amount_cents": 1000, "customer_email": "user{seq}@example.com"}}, "actor_id": "00000000-0000-0000-0000-000000000001", "event_id": "{event_id}", "tenant_id": "00000000-0000-4000-8000-00000000a11c", "event_name": "{EVENT_NAME}", "occurred_at": "{at}", "causation_id": null, "event_version": 1, "correlation_id": "{correlation_id}"}}"#,
        order = Uuid::new_v4(),
        at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00"),
    )
}

/// In-memory rows shaped like claimed ones.
fn synthetic_rows(start: u64, count: u64) -> Vec<OutboxRow> {
    let tenant = Uuid::parse_str("00000000-0000-4000-8000-00000000a11c").ok();
    (start..start + count)
        .map(|seq| {
            let correlation_id = Uuid::new_v4();
            OutboxRow {
                id: Uuid::new_v4(),
                event_name: EVENT_NAME.to_owned(),
                event_version: 1,
                payload: envelope(seq, Uuid::new_v4(), correlation_id),
                correlation_id: Some(correlation_id),
                tenant_id: tenant,
                occurred_at: chrono::Utc::now(),
                attempts: 0,
                order_key: None,
            }
        })
        .collect()
}

fn headers(row: &OutboxRow, event_id: Option<Uuid>) -> EventHeaders {
    EventHeaders {
        event_name: row.event_name.clone(),
        event_version: row.event_version,
        event_id,
        correlation_id: row.correlation_id,
        tenant_id: row.tenant_id,
    }
}

/// NATS alone. `raw`: async-nats JetStream publishes with the Qx headers and `Nats-Msg-Id`, 1024 acks in
/// flight. Otherwise the relay's own `RelayPublisher::publish_batch` on in-memory rows, 1000 per batch.
pub async fn nats_ceiling(bench: &Bench, name: &str, label: &str, rows: u64, raw: bool) -> Throughput {
    let stream = bench_stream().await;
    let relay = relay_config(&stream.prefix, OnPublish::Mark);
    let nats_before = bench.nats_pid.and_then(cpu_seconds);
    let mut measured = Duration::ZERO;
    let cpu_before = own_cpu();
    let mut sent = 0;
    if raw {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(relay.ack_timeout)
            .max_ack_inflight(MAX_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(bench.nats.clone());
        let subject = format!("{}.{EVENT_NAME}", stream.prefix);
        while sent < rows {
            let batch = synthetic_rows(sent, u64::from(BATCH_SIZE).min(rows - sent));
            let started = Instant::now();
            let mut in_flight: VecDeque<PublishAckFuture> = VecDeque::with_capacity(MAX_IN_FLIGHT);
            for row in &batch {
                if in_flight.len() >= MAX_IN_FLIGHT {
                    in_flight.pop_front().expect("window is full").await.expect("puback");
                }
                let event_id = event_id_of(&row.payload);
                let headers = headers(row, event_id).to_header_map(event_id.unwrap_or(row.id));
                let body = Bytes::copy_from_slice(row.payload.as_bytes());
                in_flight.push_back(
                    jetstream.publish_with_headers(subject.clone(), headers, body).await.expect("publish"),
                );
            }
            for ack in in_flight {
                ack.await.expect("puback");
            }
            measured += started.elapsed();
            sent += batch.len() as u64;
        }
    } else {
        let publisher = RelayPublisher::new(bench.nats.clone(), &relay);
        while sent < rows {
            let batch = synthetic_rows(sent, u64::from(BATCH_SIZE).min(rows - sent));
            let started = Instant::now();
            let outcomes = publisher.publish_batch(&batch).await;
            measured += started.elapsed();
            assert!(
                outcomes.iter().all(|o| matches!(o, Outcome::Published { duplicate: false })),
                "{outcomes:?}"
            );
            sent += batch.len() as u64;
        }
    }
    let client_cpu = own_cpu() - cpu_before;
    let nats_cpu =
        bench.nats_pid.and_then(cpu_seconds).zip(nats_before).map(|(after, before)| after - before);
    assert_eq!(stream.count().await, rows, "{label}: every message stored once");
    Throughput {
        // Building the rows is outside the measured time; its CPU is not, so this overstates the client a little.
        client_cpu_seconds: client_cpu,
        nats_server_cpu_seconds: nats_cpu,
        ..Throughput::new(name, label, rows, measured.as_secs_f64())
    }
}

/// The seed's algorithm with no sleeps: claim 100 rows (the store's claim SQL), publish them one at a time
/// with the library `Publisher`, awaiting each PubAck, then mark all 100 and commit.
pub async fn baseline(bench: &Bench, rows: u64) -> Throughput {
    let (name, label) = ("baseline_serial", "Baseline: batch 100, one publish at a time, then mark");
    bench.db.reset_table(false).await;
    let seed_seconds = bench.db.seed(rows).await;
    let stream = bench_stream().await;
    let store = OutboxStore::connect(
        &bench.db.relay_url(),
        &relay_config(&stream.prefix, OnPublish::Mark),
        Duration::from_secs(5),
    )
    .await
    .expect("connect store");
    let publisher = Publisher::new(jetstream::new(bench.nats.clone()), stream.prefix.clone());
    let cpu_before = own_cpu();
    let started = Instant::now();
    loop {
        let batch = store.claim(BASELINE_BATCH, &[], &[], &[]).await.expect("claim");
        if batch.rows.is_empty() {
            break;
        }
        let mut published = Vec::with_capacity(batch.rows.len());
        for row in &batch.rows {
            let event_id = event_id_of(&row.payload);
            let body = Bytes::copy_from_slice(row.payload.as_bytes());
            let ack = publisher
                .send(&headers(row, event_id), event_id.unwrap_or(row.id), body)
                .await
                .expect("publish");
            ack.await.expect("puback");
            published.push(row.id);
        }
        store.settle(batch, &published, &[]).await.expect("mark");
    }
    let seconds = started.elapsed().as_secs_f64();
    let postgres_cpu = cpu_seconds_of(&bench.db.relay_backends().await);
    let client_cpu = own_cpu() - cpu_before;
    store.pool().close().await;
    assert!(!bench.db.has_pending().await, "{label}: rows left pending");
    assert_eq!(stream.count().await, rows, "{label}: every row published once");
    Throughput {
        client_cpu_seconds: client_cpu,
        postgres_cpu_seconds: Some(postgres_cpu),
        seed_seconds: Some(seed_seconds),
        ..Throughput::new(name, label, rows, seconds)
    }
}

/// Where the rows a drain empties come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Seeded, vacuumed and analyzed before the relays start: a long-lived backlog.
    Seeded,
    /// About 1 KiB rows committed at once over statistics taken when every row was published, and none
    /// taken after ([`BenchDb::seed_burst`]); the relays start on it together.
    Burst,
}

/// Settings over the bench's, for one relay process.
pub type Settings = Vec<(String, String)>;

/// `pairs` as [`Settings`].
pub fn settings(pairs: &[(&str, &str)]) -> Settings {
    pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
}

/// One drain by the real `qx-relay` binary (default settings: batch 1000, 1024 acks in flight): by one
/// process or several at once, each with its own settings.
pub struct Drain<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub rows: u64,
    pub on_publish: OnPublish,
    pub backlog: Backlog,
    /// One relay process per entry.
    pub relays: Vec<Settings>,
    /// Left running that long on the empty table afterwards, for the idle CPU.
    pub idle: Option<Duration>,
    /// Postgres and NATS reached through proxies that delay each direction by this much.
    pub one_way_delay: Option<Duration>,
}

impl<'a> Drain<'a> {
    /// One unsharded relay on a seeded backlog.
    pub fn new(name: &'a str, label: &'a str, rows: u64, on_publish: OnPublish) -> Self {
        Self {
            name,
            label,
            rows,
            on_publish,
            backlog: Backlog::Seeded,
            relays: vec![Settings::new()],
            idle: None,
            one_way_delay: None,
        }
    }
}

/// The real relay, one process or several, draining `drain.rows` pending rows; then, when `drain.idle` is
/// set, left running that long on the empty table. Asserts that every row was stored in the stream once and
/// marked (or deleted) once.
pub async fn relay_drain(bench: &Bench, drain: &Drain<'_>) -> (Throughput, Option<Idle>) {
    let (name, label, rows) = (drain.name, drain.label, drain.rows);
    bench.db.reset_table(false).await;
    // Rows published before the drain, which stay in the table (mark mode) next to the drained ones.
    let (published_before, seed_seconds) = match drain.backlog {
        Backlog::Seeded => (0, bench.db.seed(rows).await),
        Backlog::Burst => bench.db.seed_burst(rows).await,
    };
    let stream = bench_stream().await;
    let mode = match drain.on_publish {
        OnPublish::Mark => "mark",
        OnPublish::Delete => "delete",
    };
    let (db_url, nats_url) = (bench.db.relay_url(), env_var("NATS_URL"));
    let proxies = match drain.one_way_delay {
        Some(one_way) => Some((
            Proxy::start_delayed(&db_url, one_way).await,
            Proxy::start_delayed(&nats_url, one_way).await,
        )),
        None => None,
    };
    let mut env = relay_env(&bench.db, &stream).set("QX_RELAY__ON_PUBLISH", mode);
    if let Some((db_proxy, nats_proxy)) = &proxies {
        env = env.set("QX_DB__URL", db_proxy.url_through(&db_url));
        env = env.set("QX_NATS__SERVERS", nats_proxy.url_through(&nats_url));
    }

    let nats_before = bench.nats_pid.and_then(cpu_seconds);
    let machine_before = machine_busy_seconds();
    let bench_before = own_cpu();
    let spawned = Instant::now();
    let relays: Vec<Relay> = drain
        .relays
        .iter()
        .enumerate()
        .map(|(i, settings)| {
            let env = settings.iter().fold(env.clone(), |env, (key, value)| env.set(key, value.as_str()));
            let log = if drain.relays.len() > 1 { format!("{name}-{i}") } else { name.to_owned() };
            spawn_relay(&env, &bench.out_dir, &log)
        })
        .collect();
    let pids: Vec<u32> = relays.iter().map(Relay::pid).collect();
    let perf: Vec<Perf> = if bench.perf {
        pids.iter()
            .enumerate()
            .map(|(i, pid)| {
                let file = if pids.len() > 1 {
                    format!("perf-{name}-{i}.data")
                } else {
                    format!("perf-{name}.data")
                };
                Perf::attach(*pid, &bench.out_dir.join(file))
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut first: Option<Instant> = None;
    let mut progress: Vec<(Instant, u64)> = Vec::new();
    loop {
        relays.iter().for_each(assert_running);
        let stored = stream.count().await;
        let now = Instant::now();
        if stored > 0 {
            first.get_or_insert(now);
            progress.push((now, stored));
        }
        if stored >= rows {
            break;
        }
        assert!(
            spawned.elapsed() < DRAIN_LIMIT,
            "{label}: {stored} of {rows} published after {DRAIN_LIMIT:?}"
        );
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
    // Every message is in the stream; the last marks may still be committing.
    while bench.db.has_pending().await {
        relays.iter().for_each(assert_running);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drained = Instant::now();
    let stats: Vec<ProcStats> = pids.iter().map(|&pid| ProcStats::read(pid).expect("relay /proc")).collect();
    let postgres_cpu = cpu_seconds_of(&bench.db.relay_backends().await);
    let nats_cpu =
        bench.nats_pid.and_then(cpu_seconds).zip(nats_before).map(|(after, before)| after - before);
    let machine_cpu = machine_busy_seconds().zip(machine_before).map(|(after, before)| after - before);
    let bench_cpu = own_cpu() - bench_before;
    perf.into_iter().for_each(Perf::stop);

    let idle = match drain.idle {
        Some(length) => {
            // Let the last short batch and its poll pass before measuring.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let read =
                || pids.iter().map(|&pid| ProcStats::read(pid).expect("relay /proc")).collect::<Vec<_>>();
            let idle_before = read();
            let idle_started = Instant::now();
            tokio::time::sleep(length).await;
            let after = read();
            let seconds = idle_started.elapsed().as_secs_f64();
            let cpu: f64 = after.iter().zip(&idle_before).map(|(a, b)| a.cpu_seconds - b.cpu_seconds).sum();
            Some(Idle {
                seconds,
                relay_cpu_percent: 100.0 * cpu / seconds,
                relay_rss_mib: mib(after.iter().map(|a| a.rss_kib).sum()),
            })
        }
        None => None,
    };
    let exits = futures::future::join_all(relays.iter().map(|relay| relay.terminate(STOP_LIMIT))).await;
    // The worst: a relay that had to be killed (None) or exited non-zero.
    let exit_code = exits
        .iter()
        .map(|status| status.and_then(|status| status.code()))
        .find(|code| *code != Some(0))
        .unwrap_or(Some(0));
    let published_before = published_before as i64;
    let settled = match drain.on_publish {
        OnPublish::Mark => bench.db.count("published_at IS NOT NULL").await - published_before,
        OnPublish::Delete => rows as i64 + published_before - bench.db.count("true").await,
    };
    assert_eq!(settled, rows as i64, "{label}: every row marked (or deleted)");
    // A row marked (or deleted) twice counts twice here.
    assert_eq!(
        bench.db.settled_rows(drain.on_publish, rows).await,
        rows as i64,
        "{label}: every row marked (or deleted) once"
    );
    assert_eq!(stream.count().await, rows, "{label}: every row stored once");
    let measured_delay = proxies.as_ref().and_then(|(db_proxy, nats_proxy)| {
        // Both directions of both proxies, each chunk weighted alike.
        let delays: Vec<Duration> =
            [db_proxy.mean_delay(), nats_proxy.mean_delay()].into_iter().flatten().collect();
        (!delays.is_empty())
            .then(|| delays.iter().sum::<Duration>().as_secs_f64() * 1e3 / delays.len() as f64)
    });
    let proxied = proxies.is_some();
    drop(proxies);

    let first = first.expect("at least one message");
    let throughput = Throughput {
        relays: Some(pids.len()),
        backlog: Some(match drain.backlog {
            Backlog::Seeded => "seeded",
            Backlog::Burst => "burst",
        }),
        wall_seconds: Some(drained.duration_since(spawned).as_secs_f64()),
        first_tenth_rows_per_second: rate_between(&progress, rows, 0.0, 0.1),
        last_tenth_rows_per_second: rate_between(&progress, rows, 0.9, 1.0),
        client_cpu_seconds: stats.iter().map(|s| s.cpu_seconds).sum(),
        postgres_cpu_seconds: Some(postgres_cpu),
        nats_server_cpu_seconds: nats_cpu,
        machine_cpu_seconds: machine_cpu,
        bench_cpu_seconds: proxied.then_some(bench_cpu),
        one_way_delay_ms: drain.one_way_delay.map(|d| d.as_secs_f64() * 1e3),
        measured_one_way_delay_ms: measured_delay,
        relay_peak_rss_mib: stats.iter().map(|s| mib(s.peak_rss_kib)).reduce(f64::max),
        relay_exit_code: exit_code,
        seed_seconds: Some(seed_seconds),
        table_after: Some(bench.db.table_health().await),
        ..Throughput::new(name, label, rows, drained.duration_since(first).as_secs_f64())
    };
    (throughput, idle)
}

/// A producer commits one event per transaction at `rate`/s for `duration` while the real relay runs (woken
/// by LISTEN/NOTIFY or polling with its defaults); an ordered push consumer on the stream timestamps each
/// arrival. Latency = arrival − the producer's commit returning. Arrival comes one server hop after the
/// PubAck the relay waits for, so this is slightly pessimistic for commit → PubAck.
pub async fn latency(bench: &Bench, rate: u32, duration: Duration, notify: bool) -> Latency {
    let wake_up = if notify { "listen" } else { "poll" };
    let name = format!("latency_{wake_up}_{rate}");
    bench.db.reset_table(notify).await;
    // Start from clean buffers, so an earlier scenario's writes are not flushed under this one.
    bench.db.checkpoint().await;
    let stream = bench_stream().await;

    // The event id carries the sequence number, so the consumer needs no body parsing.
    let base = u128::from(rand::random::<u64>()) << 64;
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel::<(u64, Instant)>();
    let consumer = stream
        .jetstream
        .get_stream(&stream.name)
        .await
        .expect("get stream")
        .create_consumer(push::OrderedConfig {
            deliver_subject: bench.nats.new_inbox(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .expect("create consumer");
    let mut messages = consumer.messages().await.expect("consume");
    let consuming = tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            let arrived = Instant::now();
            let seq = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .and_then(|id| Uuid::parse_str(id.as_str()).ok())
                .map(|id| id.as_u128())
                .filter(|id| id >> 64 == base >> 64);
            if let Some(id) = seq {
                let _ = arrivals_tx.send((id as u64, arrived));
            }
        }
    });

    let mut env = relay_env(&bench.db, &stream);
    if notify {
        env = env.set("QX_RELAY__NOTIFY_CHANNEL", NOTIFY_CHANNEL);
    }
    let relay = spawn_relay(&env, &bench.out_dir, &name);

    // Enough connections that commit latency never holds the producer below its rate.
    let workers = (rate / 125).clamp(1, 16);
    let pool =
        PgPoolOptions::new().max_connections(workers).connect(&bench.db.url).await.expect("connect producer");
    // Warm up: one event through the whole path, so the relay is connected and listening.
    let warm_up = u64::MAX;
    insert_rows(&pool, &[produced(base, warm_up)]).await.expect("produce");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_running(&relay);
        match tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await {
            Ok(Some((seq, _))) if seq == warm_up => break,
            _ => assert!(Instant::now() < deadline, "{name}: the warm-up event did not arrive"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The first second of events is a warm-up at the full rate, left out of the statistics, so an idle
    // relay's first (longer) sleep does not count: the numbers are the steady state.
    let warm = u64::from(rate);
    let measured = u64::from(rate) * duration.as_secs();
    let count = warm + measured;
    let backends = bench.db.relay_backends().await;
    let (relay_before, pg_before) = (cpu_seconds(relay.pid()).unwrap_or(0.0), cpu_seconds_of(&backends));
    let started = Instant::now();
    let start_at = tokio::time::Instant::now() + Duration::from_millis(20);
    let producers: Vec<_> = (0..u64::from(workers))
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut connection = pool.acquire().await.expect("producer connection");
                let mut commits = Vec::with_capacity((count / u64::from(workers) + 1) as usize);
                for seq in (worker..count).step_by(workers as usize) {
                    let due = start_at + Duration::from_secs_f64(seq as f64 / f64::from(rate));
                    tokio::time::sleep_until(due).await;
                    insert_rows(&mut *connection, &[produced(base, seq)]).await.expect("produce");
                    commits.push((seq, Instant::now()));
                }
                commits
            })
        })
        .collect();
    let mut committed: Vec<Option<Instant>> = vec![None; count as usize];
    let mut last_commit = started;
    for producer in producers {
        for (seq, at) in producer.await.expect("producer") {
            committed[seq as usize] = Some(at);
            last_commit = last_commit.max(at);
        }
    }
    let producing = last_commit.duration_since(started).as_secs_f64();
    let relay_cpu = cpu_seconds(relay.pid()).unwrap_or(0.0) - relay_before;
    let pg_cpu = cpu_seconds_of(&backends) - pg_before;

    let mut latencies_ms = Vec::with_capacity(measured as usize);
    let mut arrived = vec![false; count as usize];
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received < count && Instant::now() < deadline {
        if let Ok(Some((seq, at))) = tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await {
            let Some(slot) = arrived.get_mut(seq as usize) else { continue };
            if !std::mem::replace(slot, true) {
                received += 1;
                if seq >= warm {
                    let commit = committed[seq as usize].expect("arrived events were committed");
                    latencies_ms.push(signed_ms(at, commit));
                }
            }
        }
    }
    consuming.abort();
    pool.close().await;
    let exit_code = relay.terminate(STOP_LIMIT).await.and_then(|status| status.code());
    assert_eq!(exit_code, Some(0), "{name}: relay exit code");

    latencies_ms.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        let rank = ((q * latencies_ms.len() as f64).ceil() as usize).clamp(1, latencies_ms.len().max(1));
        latencies_ms.get(rank - 1).copied().unwrap_or(f64::NAN)
    };
    Latency {
        name,
        wake_up,
        target_rate: rate,
        achieved_rate: count as f64 / producing,
        events: latencies_ms.len(),
        missing: measured as usize - latencies_ms.len(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        max_ms: latencies_ms.last().copied().unwrap_or(f64::NAN),
        relay_cpu_percent: 100.0 * relay_cpu / producing,
        postgres_cpu_percent: 100.0 * pg_cpu / producing,
    }
}

/// The row a producer commits for event `seq`, its event id carrying `seq` under `base`.
fn produced(base: u128, seq: u64) -> Value {
    let correlation_id = Uuid::new_v4();
    let event_id = Uuid::from_u128(base | u128::from(seq));
    json!({
        "id": Uuid::new_v4(),
        "event_name": EVENT_NAME,
        "payload": envelope(seq, event_id, correlation_id),
        "correlation_id": correlation_id,
    })
}

/// `later − earlier` in milliseconds, negative when `later` is earlier.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(earlier.duration_since(later).as_secs_f64() * 1e3),
    }
}

fn own_cpu() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// `perf record` attached to one process (DWARF call graphs, 499 Hz) until stopped.
struct Perf {
    child: Child,
}

impl Perf {
    fn attach(pid: u32, output: &std::path::Path) -> Self {
        let child = Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(output)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start perf record (is perf installed?)");
        Self { child }
    }

    /// SIGINT, so perf writes its data, then wait for it.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}
