//! What a run stands on: its own database and streams, the `qx-relay` process, /proc readings and the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::support::{relay_command, with_database};

/// The qx-db DDL of the outbox table, shared with the tests.
const OUTBOX_DDL: &str = include_str!("../../tests/fixtures/qx_outbox_events.sql");
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
const SEED_SQL: &str = "\
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, causation_id, \
                              tenant_id, published_at, attempts, last_error) \
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

/// The single-row insert a producer commits, with an explicit column list as qx-db writes it.
pub const PRODUCE_SQL: &str = "\
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, causation_id, \
                              tenant_id, published_at, attempts, last_error) \
VALUES ($1, 'order.placed', 1, $2::jsonb, now(), $3, NULL, NULL, NULL, 0, NULL)";

/// A required environment variable.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} must be set (e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres NATS_URL=nats://127.0.0.1:4222)")
    })
}

/// A database of the run's own (created and dropped by the run), holding one outbox table at a time.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl BenchDb {
    /// Creates `qxbench_<uuid>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Self {
        let name = format!("qxbench_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url).await.expect("connect to Postgres (DATABASE_URL)");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
        let url = with_database(admin_url, &name);
        let pool =
            PgPoolOptions::new().max_connections(4).connect(&url).await.expect("connect bench database");
        Self { name, url, pool, admin_url: admin_url.to_owned() }
    }

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
        sqlx::raw_sql("DROP TABLE IF EXISTS qx_outbox_events CASCADE")
            .execute(&self.pool)
            .await
            .expect("drop table");
        sqlx::raw_sql(OUTBOX_DDL).execute(&self.pool).await.expect("create outbox table");
        sqlx::raw_sql(AUTOVACUUM_SQL).execute(&self.pool).await.expect("set autovacuum options");
        if notify {
            sqlx::raw_sql(NOTIFY_SQL).execute(&self.pool).await.expect("create notify trigger");
        }
    }

    /// Inserts `rows` pending rows in one statement, then vacuums, analyzes and checkpoints, so every drain
    /// starts from the state a long-lived, autovacuumed backlog would be in. Returns the seconds it took.
    pub async fn seed(&self, rows: u64) -> f64 {
        let started = std::time::Instant::now();
        sqlx::query(SEED_SQL)
            .bind(i64::try_from(rows).expect("row count"))
            .execute(&self.pool)
            .await
            .expect("seed rows");
        // Not in one query string: that would run as one transaction, which VACUUM refuses.
        sqlx::raw_sql("VACUUM (ANALYZE) qx_outbox_events")
            .execute(&self.pool)
            .await
            .expect("vacuum after seeding");
        self.checkpoint().await;
        started.elapsed().as_secs_f64()
    }

    /// Flushes dirty buffers now rather than during the next measurement.
    pub async fn checkpoint(&self) {
        sqlx::raw_sql("CHECKPOINT").execute(&self.pool).await.expect("checkpoint");
    }

    /// Whether any row is still unpublished.
    pub async fn has_pending(&self) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM qx_outbox_events WHERE published_at IS NULL)")
            .fetch_one(&self.pool)
            .await
            .expect("look for pending rows")
    }

    /// Rows matching `condition`.
    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM qx_outbox_events WHERE {condition}"))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
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
        let (live, dead, autovacuums, vacuums): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count FROM pg_stat_user_tables \
             WHERE relname = 'qx_outbox_events'",
        )
        .fetch_one(&self.pool)
        .await
        .expect("table statistics");
        TableHealth { live, dead, autovacuums, vacuums }
    }

    /// Drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin =
            PgConnection::connect(&self.admin_url).await.expect("connect to Postgres (DATABASE_URL)");
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&mut admin)
            .await;
    }
}

/// `pg_stat_user_tables` for the outbox table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TableHealth {
    pub live: i64,
    pub dead: i64,
    pub autovacuums: i64,
    pub vacuums: i64,
}

/// A stream of one scenario's own, capturing `<prefix>.>`.
pub struct BenchStream {
    pub name: String,
    pub prefix: String,
    pub jetstream: jetstream::Context,
}

impl BenchStream {
    /// A file-backed stream (as in production) with the recommended duplicate window.
    pub async fn create(client: &async_nats::Client, run: &str, scenario: &str) -> Self {
        let tag: String = scenario.chars().filter(char::is_ascii_alphanumeric).collect();
        let (name, prefix) = (format!("QXBENCH_{run}_{tag}"), format!("qxbench{run}{tag}"));
        let jetstream = jetstream::new(client.clone());
        let _ = jetstream.delete_stream(&name).await;
        jetstream
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window: DUPLICATE_WINDOW,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("create bench stream");
        Self { name, prefix, jetstream }
    }

    /// Messages stored.
    pub async fn messages(&self) -> u64 {
        let mut stream = self.jetstream.get_stream(&self.name).await.expect("get stream");
        stream.info().await.expect("stream info").state.messages
    }

    pub async fn delete(self) {
        let _ = self.jetstream.delete_stream(&self.name).await;
    }
}

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// utime + stime, seconds.
    pub cpu_seconds: f64,
    /// VmHWM: peak resident set, KiB.
    pub peak_rss_kib: u64,
    /// VmRSS: resident set now, KiB.
    pub rss_kib: u64,
}

impl ProcStats {
    /// `None` once the process is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let cpu_seconds = cpu_seconds(pid)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Some(Self { cpu_seconds, peak_rss_kib: kib("VmHWM:"), rss_kib: kib("VmRSS:") })
    }
}

/// utime + stime of `pid` in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
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

/// `sysconf(_SC_CLK_TCK)`, via getconf (no libc binding needed); 100 on every Linux we run on.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
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

/// The real `qx-relay` binary, run with a clean environment plus the given settings; its log goes to a file.
pub struct RelayProcess {
    child: Child,
    pub log: PathBuf,
}

impl RelayProcess {
    /// Settings every run shares: the bench database and stream, NATS, warnings only in the log.
    pub fn env(db: &BenchDb, stream: &BenchStream) -> Vec<(String, String)> {
        [
            ("QX_DB__URL", db.relay_url()),
            ("QX_NATS__SERVERS", env("NATS_URL")),
            ("QX_RELAY__SUBJECT_PREFIX", stream.prefix.clone()),
            // QX_BENCH_RELAY_LOG=qx_relay=debug shows each batch's timing in target/bench/relay-*.log.
            ("QX_RELAY__LOG", std::env::var("QX_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".to_owned())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        // QX_BENCH_RELAY_ENV="QX_RELAY__BATCH_SIZE=500 LD_PRELOAD=…" tries other settings on the relay alone.
        .chain(std::env::var("QX_BENCH_RELAY_ENV").unwrap_or_default().split_whitespace().filter_map(
            |pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            },
        ))
        .collect()
    }

    pub fn spawn(env: &[(String, String)], log_dir: &Path, label: &str) -> Self {
        let log = log_dir.join(format!("relay-{label}.log"));
        let log_file = std::fs::File::create(&log).expect("create relay log");
        let child = relay_command(env!("CARGO_BIN_EXE_qx-relay"), env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start qx-relay");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the run, with the relay's log, when the relay has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll relay") {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("qx-relay exited early ({status}); log:\n{log}");
        }
    }

    /// SIGTERM, then the exit code (expected 0) within 20 s.
    pub async fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll relay") {
                return status.code();
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
