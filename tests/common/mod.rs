//! Shared harness for the live-service tests: a fresh database, a private stream and subject prefix, and the
//! real `qx-relay` binary, per test, so tests run in parallel without seeing each other.
//!
//! Needs `DATABASE_URL` (an admin URL, e.g. postgres://postgres@127.0.0.1:5432/postgres), `NATS_URL` and
//! `REDIS_URL`; a missing one fails the test and names it.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::Deserialize;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

mod support;
pub use support::{relay_command, with_database};

/// The qx-db DDL of the outbox table.
pub const OUTBOX_DDL: &str = include_str!("../fixtures/qx_outbox_events.sql");
/// The qx-worker DDL of the dead-letter table.
pub const DEAD_LETTERS_DDL: &str = include_str!("../fixtures/qx_dead_letters.sql");
/// Real rows written by qx-db 1.1.0 (a copy of shared/fixtures/qx-outbox-rows.jsonl), every column.
pub const FIXTURE_ROWS: &str = include_str!("../fixtures/qx-outbox-rows.jsonl");

/// A required environment variable.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} must be set for the integration tests (see README)"))
}

/// A database of its own with the qx-db outbox table.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create() -> Self {
        Self::create_at(&env("DATABASE_URL")).await
    }

    /// One on the server of `admin_url`, e.g. a private cluster. Its name is unique, so even [`Self::drop`]
    /// (which talks to DATABASE_URL) cannot hit anything else.
    pub async fn create_at(admin_url: &str) -> Self {
        let name = format!("qxr_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url).await.expect("connect to create a database");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
        let url = with_database(admin_url, &name);
        let pool = PgPool::connect(&url).await.expect("connect test database");
        sqlx::raw_sql(OUTBOX_DDL).execute(&pool).await.expect("create outbox table");
        Self { name, url, pool }
    }

    /// Inserts `count` qx-db-shaped rows of `event_name`, oldest first; returns their ids in order.
    pub async fn insert_events(&self, count: usize, event_name: &str) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
        for chunk in ids.chunks(5000) {
            sqlx::query(
                "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, \
                                               causation_id, tenant_id, published_at, attempts, last_error) \
                 SELECT r.id, $2, 1, jsonb_build_object( \
                          'payload', jsonb_build_object('order_id', gen_random_uuid(), 'n', r.n), \
                          'actor_id', NULL, 'event_id', gen_random_uuid(), 'tenant_id', r.tenant, \
                          'event_name', $2::text, 'occurred_at', to_char(r.at AT TIME ZONE 'UTC', \
                          'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), 'causation_id', NULL, 'event_version', 1, \
                          'correlation_id', r.corr), \
                        r.at, r.corr, NULL, r.tenant, NULL, 0, NULL \
                 FROM (SELECT id, n, clock_timestamp() + n * interval '1 microsecond' AS at, gen_random_uuid() AS corr, \
                              CASE WHEN n % 2 = 0 THEN gen_random_uuid() END AS tenant \
                       FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u(id, n)) r",
            )
            .bind(chunk)
            .bind(event_name)
            .execute(&self.pool)
            .await
            .expect("insert events");
        }
        ids
    }

    /// Inserts one row with the given envelope text; returns its id.
    pub async fn insert_raw(&self, event_name: &str, payload: &str) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, \
                                           causation_id, tenant_id, published_at, attempts, last_error) \
             VALUES ($1, $2, 1, $3::jsonb, clock_timestamp(), NULL, NULL, NULL, NULL, 0, NULL)",
        )
        .bind(id)
        .bind(event_name)
        .bind(payload)
        .execute(&self.pool)
        .await
        .expect("insert raw row");
        id
    }

    /// Inserts the qx-db fixture rows with every column as written; returns them.
    pub async fn insert_fixtures(&self) -> Vec<FixtureRow> {
        let rows: Vec<FixtureRow> =
            FIXTURE_ROWS.lines().map(|line| serde_json::from_str(line).expect("fixture row")).collect();
        for row in &rows {
            sqlx::query(
                "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, \
                                               causation_id, tenant_id, published_at, attempts, last_error) \
                 VALUES ($1, $2, $3, $4::jsonb, $5::timestamptz, $6, $7, $8, NULL, $9, $10)",
            )
            .bind(row.id)
            .bind(&row.event_name)
            .bind(row.event_version)
            .bind(&row.payload)
            .bind(&row.occurred_at)
            .bind(row.correlation_id)
            .bind(row.causation_id)
            .bind(row.tenant_id)
            .bind(row.attempts)
            .bind(&row.last_error)
            .execute(&self.pool)
            .await
            .expect("insert fixture row");
        }
        rows
    }

    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM qx_outbox_events WHERE {condition}"))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    pub async fn unpublished(&self) -> i64 {
        self.count("published_at IS NULL").await
    }

    /// Waits until `condition` holds for `expected` rows; panics after `limit`.
    pub async fn wait_for(&self, condition: &str, expected: i64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let count = self.count(condition).await;
            if count == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {limit:?} for {expected} rows {condition}, have {count}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&env("DATABASE_URL")).await.expect("connect DATABASE_URL");
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&mut admin)
            .await;
    }
}

/// A row of shared/fixtures/qx-outbox-rows.jsonl.
#[derive(Debug, Clone, Deserialize)]
pub struct FixtureRow {
    pub id: Uuid,
    pub event_name: String,
    pub event_version: i32,
    pub payload: String,
    pub occurred_at: String,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub tenant_id: Option<Uuid>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// A stream of its own capturing `<prefix>.>`.
pub struct TestStream {
    pub name: String,
    pub prefix: String,
    pub jetstream: jetstream::Context,
}

impl TestStream {
    pub async fn create() -> Self {
        let stream = Self::unattached().await;
        stream.attach().await;
        stream
    }

    /// Names and a connection, but no stream yet.
    pub async fn unattached() -> Self {
        let client = async_nats::connect(env("NATS_URL")).await.expect("connect NATS_URL");
        let id = Uuid::new_v4().simple().to_string();
        Self { name: format!("T{id}"), prefix: format!("t{id}"), jetstream: jetstream::new(client) }
    }

    /// Creates the stream, with a dedupe window long enough for every test.
    pub async fn attach(&self) {
        self.jetstream
            .create_stream(stream::Config {
                name: self.name.clone(),
                subjects: vec![format!("{}.>", self.prefix)],
                duplicate_window: Duration::from_secs(300),
                ..Default::default()
            })
            .await
            .expect("create stream");
    }

    pub async fn count(&self) -> u64 {
        let mut stream = self.jetstream.get_stream(&self.name).await.expect("get stream");
        stream.info().await.expect("stream info").state.messages
    }

    /// Every message in the stream, in stream order.
    pub async fn messages(&self) -> Vec<jetstream::Message> {
        support::stream_messages(&self.jetstream, &self.name).await
    }

    pub async fn delete(self) {
        let _ = self.jetstream.delete_stream(&self.name).await;
    }
}

/// The `qx-relay` binary, started with a clean environment plus the given settings.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    /// Settings for `db` and `stream`, short intervals for tests.
    pub fn env(db: &TestDb, prefix: &str) -> Vec<(String, String)> {
        [
            ("QX_DB__URL", db.url.as_str()),
            ("QX_NATS__SERVERS", &env("NATS_URL")),
            ("QX_RELAY__SUBJECT_PREFIX", prefix),
            ("QX_RELAY__POLL_INTERVAL", "50ms"),
            ("QX_RELAY__IDLE_POLL_INTERVAL", "100ms"),
            ("QX_RELAY__LOG", "info,qx_relay=debug"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    pub fn spawn(env: &[(String, String)], args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("qx-relay-test-{}.log", Uuid::new_v4().simple()));
        let log_file = std::fs::File::create(&log).expect("create relay log");
        let child = relay_command(env!("CARGO_BIN_EXE_qx-relay"), env)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start qx-relay");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.expect("run kill").success(), "kill -{signal} failed");
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// The exit status within `limit`, or a panic with the log.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll relay") {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("relay did not exit within {limit:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM and expects a clean exit.
    pub async fn stop(mut self) {
        if self.child.try_wait().expect("poll relay").is_none() {
            self.signal("TERM");
        }
        let status = self.wait(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "relay exit; log:\n{}", self.log());
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Runs `qx-relay` with `args` to completion: exit code, stdout, stderr.
pub fn run_command(env: &[(String, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let output =
        relay_command(env!("CARGO_BIN_EXE_qx-relay"), env).args(args).output().expect("run qx-relay");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An HTTP/1.1 response as read off the wire.
pub struct HttpResponse {
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    pub body: String,
}

/// `method path` to 127.0.0.1:`port`, with `Connection: close`; `None` while nothing answers.
pub async fn http(port: u16, method: &str, path: &str) -> Option<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(HttpResponse { status, head: head.to_owned(), body: body.to_owned() })
}

/// The relay's peak resident memory so far (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kib * 1024
}
