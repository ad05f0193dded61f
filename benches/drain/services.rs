//! What a run stands on besides the test kit: the outbox table as each scenario wants it, the relay's
//! settings, its Postgres backends, /proc readings and the machine.

use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::stream;
use qx_relay::relay::config::OnPublish;
use qx_relay_testkit::outbox::{insert_from, OUTBOX_DDL};
use qx_relay_testkit::proc::{clock_ticks, cpu_seconds};
use qx_relay_testkit::{env_var, Relay, RelayEnv, TestDb, TestStream};
use serde::Serialize;
use sqlx::postgres::PgPool;

/// The optional LISTEN/NOTIFY trigger, shared with the README.
const NOTIFY_SQL: &str = include_str!("../../scripts/outbox-notify.sql");
/// The channel `scripts/outbox-notify.sql` notifies.
pub const NOTIFY_CHANNEL: &str = "qx_outbox";
/// Every seeded and produced row has this event name.
pub const EVENT_NAME: &str = "order.placed";
/// The per-table autovacuum settings the README recommends for the outbox table; every table here has them.
pub const AUTOVACUUM_SQL: &str = "ALTER TABLE qx_outbox_events SET (\
    autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, \
    autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 5000, \
    autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 5000, \
    autovacuum_vacuum_cost_delay = 0)";
/// The duplicate window of every bench stream: the README's recommended two minutes.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// `application_name` of the relay's connections, to find its backends in `pg_stat_activity`.
const RELAY_APPLICATION_NAME: &str = "qx-relay-bench";

/// `qx-db`-shaped rows: the envelope of shared/fixtures, about 430 bytes of JSON, `occurred_at` increasing.
const SEED_ROWS: &str = "\
SELECT gen_random_uuid(), 'order.placed', 1, \
       jsonb_build_object( \
         'payload', jsonb_build_object('seq', n, 'currency', 'EUR', 'order_id', gen_random_uuid(), \
                                       'amount_cents', 1000 + n % 5000, 'customer_email', 'user' || n || '@example.com'), \
         'actor_id', '00000000-0000-0000-0000-000000000001', 'event_id', gen_random_uuid(), 'tenant_id', tenant, \
         'event_name', 'order.placed', \
         'occurred_at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), \
         'causation_id', NULL, 'event_version', 1, 'correlation_id', corr), \
       at, corr, NULL, tenant, NULL, 0, NULL \
FROM (SELECT n, now() - interval '1 hour' + n * interval '1 microsecond' AS at, gen_random_uuid() AS corr, \
             '00000000-0000-4000-8000-00000000a11c'::uuid AS tenant \
      FROM generate_series(1, $1::bigint) AS n) AS s";

/// Distinct `payload.order_id` values of a burst's rows: a couple hundred orders, so a keyed claim has keys
/// in every shard and many rows per key.
pub const BURST_ORDERS: u32 = 200;

/// `qx-db`-shaped rows of about 1 KiB (the seed's envelope with a note), `payload.order_id` one of
/// [`BURST_ORDERS`]; when `$2`, published, and an hour older than a burst's.
const BURST_ROWS: &str = "\
SELECT gen_random_uuid(), 'order.placed', 1, \
       jsonb_build_object( \
         'payload', jsonb_build_object('seq', n, 'currency', 'EUR', \
                                       'order_id', md5('order-' || n % $3::int)::uuid, \
                                       'amount_cents', 1000 + n % 5000, 'customer_email', 'user' || n || '@example.com', \
                                       'note', repeat(md5(n::text), 16)), \
         'actor_id', '00000000-0000-0000-0000-000000000001', 'event_id', gen_random_uuid(), 'tenant_id', tenant, \
         'event_name', 'order.placed', \
         'occurred_at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), \
         'causation_id', NULL, 'event_version', 1, 'correlation_id', corr), \
       at, corr, NULL, tenant, CASE WHEN $2 THEN at + interval '1 second' END, 0, NULL \
FROM (SELECT n, now() - CASE WHEN $2 THEN interval '2 hours' ELSE interval '1 hour' END \
                + n * interval '1 microsecond' AS at, \
             gen_random_uuid() AS corr, '00000000-0000-4000-8000-00000000a11c'::uuid AS tenant \
      FROM generate_series(1, $1::bigint) AS n) AS s";

/// The run's database, holding one outbox table at a time.
pub struct BenchDb(pub TestDb);

impl Deref for BenchDb {
    type Target = TestDb;

    fn deref(&self) -> &TestDb {
        &self.0
    }
}

impl BenchDb {
    /// The URL the relay connects with, tagged so its backends can be found. `QX_BENCH_RELAY_DB_PARAMS` adds
    /// connection parameters, e.g. `options[synchronous_commit]=off` to try a server setting on the relay alone.
    pub fn relay_url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let mut url = format!("{}{separator}application_name={RELAY_APPLICATION_NAME}", self.url);
        if let Ok(params) = std::env::var("QX_BENCH_RELAY_DB_PARAMS") {
            url.push('&');
            url.push_str(&params);
        }
        url
    }

    /// A fresh, empty outbox table with the recommended autovacuum settings (and the NOTIFY trigger).
    pub async fn reset_table(&self, notify: bool) {
        self.execute("DROP TABLE IF EXISTS qx_outbox_events CASCADE").await;
        self.execute(OUTBOX_DDL).await;
        self.execute(AUTOVACUUM_SQL).await;
        if notify {
            self.execute(NOTIFY_SQL).await;
        }
    }

    /// Inserts `rows` pending rows in one statement, then vacuums, analyzes and checkpoints, so every drain
    /// starts from the state a long-lived, autovacuumed backlog would be in. Returns the seconds it took.
    pub async fn seed(&self, rows: u64) -> f64 {
        let started = std::time::Instant::now();
        sqlx::query(&insert_from(SEED_ROWS))
            .bind(i64::try_from(rows).expect("row count"))
            .execute(&self.pool)
            .await
            .expect("seed rows");
        // Not in one query string: that would run as one transaction, which VACUUM refuses.
        self.execute("VACUUM (ANALYZE) qx_outbox_events").await;
        self.checkpoint().await;
        started.elapsed().as_secs_f64()
    }

    /// A burst as the relays meet it: `rows / 10` (at least 1000) rows published an hour earlier, the table
    /// vacuumed and analyzed with them (the statistics say nothing is pending, as after a quiet spell), then
    /// `rows` pending rows of about 1 KiB committed at once, and a checkpoint. Nothing vacuums or analyzes
    /// after the burst: the drain meets the statistics of before it, as a real one does until autovacuum comes
    /// by. Returns how many rows were published before, and the seconds it took.
    pub async fn seed_burst(&self, rows: u64) -> (u64, f64) {
        let started = std::time::Instant::now();
        let published = (rows / 10).max(1000);
        self.insert_burst_rows(published, true).await;
        self.execute("VACUUM (ANALYZE) qx_outbox_events").await;
        self.insert_burst_rows(rows, false).await;
        self.checkpoint().await;
        (published, started.elapsed().as_secs_f64())
    }

    async fn insert_burst_rows(&self, rows: u64, published: bool) {
        sqlx::query(&insert_from(BURST_ROWS))
            .bind(i64::try_from(rows).expect("row count"))
            .bind(published)
            .bind(i32::try_from(BURST_ORDERS).expect("order count"))
            .execute(&self.pool)
            .await
            .expect("insert burst rows");
    }

    /// Waits until the statistics count `rows` rows marked (updated) or deleted, which they do once the
    /// relays' backends have reported (at their exit at the latest); the count they reached.
    pub async fn settled_rows(&self, on_publish: OnPublish, rows: u64) -> i64 {
        let column = match on_publish {
            OnPublish::Mark => "n_tup_upd",
            OnPublish::Delete => "n_tup_del",
        };
        let query = format!("SELECT {column} FROM pg_stat_user_tables WHERE relname = 'qx_outbox_events'");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let settled: i64 =
                sqlx::query_scalar(&query).fetch_one(&self.pool).await.expect("table statistics");
            if settled >= rows as i64 || std::time::Instant::now() > deadline {
                return settled;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Flushes dirty buffers now rather than during the next measurement.
    pub async fn checkpoint(&self) {
        self.execute("CHECKPOINT").await;
    }

    /// Whether any row is still unpublished.
    pub async fn has_pending(&self) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM qx_outbox_events WHERE published_at IS NULL)")
            .fetch_one(&self.pool)
            .await
            .expect("look for pending rows")
    }

    /// The pids of the relay's Postgres backends.
    pub async fn relay_backends(&self) -> Vec<u32> {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        )
        .bind(RELAY_APPLICATION_NAME)
        .fetch_all(&self.pool)
        .await
        .expect("list relay backends");
        pids.into_iter().filter_map(|pid| u32::try_from(pid).ok()).collect()
    }

    /// Dead and live tuples of the outbox table, and how often (auto)vacuum ran on it.
    pub async fn table_health(&self) -> TableHealth {
        let (live, dead, autovacuums, vacuums, autoanalyzes, analyzes): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count, autoanalyze_count, \
                        analyze_count \
                 FROM pg_stat_user_tables WHERE relname = 'qx_outbox_events'",
            )
            .fetch_one(&self.pool)
            .await
            .expect("table statistics");
        TableHealth { live, dead, autovacuums, vacuums, autoanalyzes, analyzes }
    }
}

/// `pg_stat_user_tables` for the outbox table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TableHealth {
    pub live: i64,
    pub dead: i64,
    pub autovacuums: i64,
    pub vacuums: i64,
    /// A burst's drain meets stale statistics as long as no autoanalyze ran.
    pub autoanalyzes: i64,
    pub analyzes: i64,
}

/// A file-backed stream of one scenario's own (as in production) with the recommended duplicate window.
pub async fn bench_stream() -> TestStream {
    let stream = TestStream::unattached().await;
    let config = stream::Config {
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        ..stream.config()
    };
    stream.attach_with(config).await;
    stream
}

/// Total CPU seconds of `pids` (those still alive).
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&pid| cpu_seconds(pid)).sum()
}

/// CPU seconds all cores together have spent working since boot (/proc/stat: user, nice, system, irq and
/// softirq; not idle, iowait or time stolen by the hypervisor).
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    Some(busy as f64 / clock_ticks())
}

/// The pid of the `nats-server` listening on `port`, found by its command line.
pub fn nats_server_pid(port: u16) -> Option<u32> {
    let port = port.to_string();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_nats = args.first().is_some_and(|a| a.ends_with(b"nats-server"));
        let default_port = port == "4222" && !args.iter().any(|a| *a == b"-p" || *a == b"--port");
        let on_port = default_port || args.contains(&port.as_bytes());
        (is_nats && on_port).then_some(pid)
    })
}

/// Settings every relay of a run shares: the bench database and `stream`, NATS, warnings only in the log.
pub fn relay_env(db: &BenchDb, stream: &TestStream) -> RelayEnv {
    // QX_BENCH_RELAY_LOG=qx_relay=debug shows each batch's timing in target/bench/relay-*.log.
    let log = std::env::var("QX_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".to_owned());
    let env = RelayEnv::default().with(&[
        ("QX_DB__URL", &db.relay_url()),
        ("QX_NATS__SERVERS", &env_var("NATS_URL")),
        ("QX_RELAY__SUBJECT_PREFIX", &stream.prefix),
        ("QX_RELAY__LOG", &log),
    ]);
    // QX_BENCH_RELAY_ENV="QX_RELAY__BATCH_SIZE=500 LD_PRELOAD=…" tries other settings on the relay alone.
    let extra = std::env::var("QX_BENCH_RELAY_ENV").unwrap_or_default();
    extra
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .fold(env, |env, (key, value)| env.set(key, value))
}

/// Starts the relay with `env`, logging to `relay-<label>.log` in `log_dir`.
pub fn spawn_relay(env: &RelayEnv, log_dir: &Path, label: &str) -> Relay {
    let log = log_dir.join(format!("relay-{label}.log"));
    // This run's log only.
    let _ = std::fs::remove_file(&log);
    Relay::spawn_with_log(env, &log)
}

/// Fails the run, with the relay's log, when the relay has exited.
pub fn assert_running(relay: &Relay) {
    if let Some(status) = relay.exited() {
        panic!("qx-relay exited early ({status}); log:\n{}", relay.log());
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Where the numbers came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub load_average_at_start: String,
    pub postgres: String,
    pub postgres_autovacuum: String,
    pub postgres_autovacuum_naptime: String,
    pub postgres_synchronous_commit: String,
    pub postgres_shared_buffers: String,
    pub nats_server: String,
}

impl Machine {
    pub async fn describe(pool: &PgPool, nats: &async_nats::Client) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim())
            })
            .unwrap_or("unknown")
            .to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
        let show = |name: &'static str| async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {name}")).fetch_one(pool).await.unwrap_or_default()
        };
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease"),
            load_average_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            postgres: show("server_version").await,
            postgres_autovacuum: show("autovacuum").await,
            postgres_autovacuum_naptime: show("autovacuum_naptime").await,
            postgres_synchronous_commit: show("synchronous_commit").await,
            postgres_shared_buffers: show("shared_buffers").await,
            nats_server: nats.server_info().version,
        }
    }
}
