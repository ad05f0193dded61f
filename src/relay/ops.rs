//! Operator commands: `check`, `config`, `status` and `dead list/show/requeue`. They print to stdout (warnings
//! to stderr); nothing here deletes an unpublished row.

use std::time::Duration;

use serde::Serialize;

use super::causes::error_chain;
use super::config::{reference, Config, ShardId};
use super::escape::Escaped;
use super::exit::ExitCode;
use super::lease::{Backend, Holder, LockError};
use super::nats::{self, RelayPublisher};
use super::preflight::{self, PreflightError};
use super::refusal::PostgresError;
use super::shard::Shard;
use super::store::{
    OutboxStats, OutboxStore, ParkedRow, Requeue, StoreError, StoredRow, PARKED, PUBLISHED,
    PUBLISHED_COUNT_MAX, SAMPLE_ROWS,
};

/// `print!` and `println!` for the commands' output. A reader that stops early (`qx-relay status | head`)
/// closes the pipe, and what is left unprinted was not wanted: a failed write is dropped, where `println!`
/// would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// One check's result, as `check --json` prints it.
#[derive(Serialize)]
struct CheckResult {
    check: &'static str,
    ok: bool,
    detail: String,
    /// What to do about a failure, when there is something to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

/// The results of `check` so far: printed one line each as they come, or as one JSON document at the end.
struct Checks {
    json: bool,
    results: Vec<CheckResult>,
    worst: ExitCode,
}

impl Checks {
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.add(CheckResult { check, ok: true, detail: detail.into(), hint: None });
    }

    fn fail(&mut self, check: &'static str, code: ExitCode, detail: String, hint: Option<String>) {
        // An outage outranks a configuration error: fixing the settings cannot help until the server is back.
        if self.worst == ExitCode::Ok || code == ExitCode::Unavailable {
            self.worst = code;
        }
        self.add(CheckResult { check, ok: false, detail, hint });
    }

    fn add(&mut self, result: CheckResult) {
        if !self.json {
            let status = if result.ok { "ok  " } else { "FAIL" };
            match &result.hint {
                Some(hint) => outln!("{status}  {}: {}; {hint}", result.check, result.detail),
                None => outln!("{status}  {}: {}", result.check, result.detail),
            }
        }
        self.results.push(result);
    }

    fn finish(self) -> ExitCode {
        if self.json {
            let report = serde_json::json!({
                "ok": self.worst == ExitCode::Ok,
                "exit_code": self.worst as u8,
                "checks": self.results,
            });
            outln!("{}", serde_json::to_string_pretty(&report).expect("results serialize"));
        }
        self.worst
    }
}

/// Runs every check, printing one line each (or, with `json`, one document); the exit code of the worst failure.
pub async fn check(config: &Config, json: bool) -> ExitCode {
    let mut checks = Checks { json, results: Vec::new(), worst: ExitCode::Ok };
    checks.ok("config", "valid");
    let relay = &config.relay;
    let store = match connect_store(config).await {
        Ok(store) => {
            checks.ok("postgres", "connected");
            match preflight::table(&store, relay, None).await {
                Ok(()) => checks.ok("table", format!("{} has the outbox columns", relay.table)),
                Err(err) => checks.fail("table", (&err).into(), error_chain(&err), None),
            }
            Some(store)
        }
        Err(err) => {
            checks.fail("postgres", exit_code(err.is_config_error()), error_chain(&err), None);
            None
        }
    };
    let prefix = relay.subject_prefix();
    match RelayPublisher::connect(&config.nats, relay).await {
        Ok(publisher) => {
            checks.ok("nats", "connected");
            match preflight::stream(&publisher, relay, false).await {
                Ok(preflight::Stream::Found(info) | preflight::Stream::Created(info)) => {
                    checks.ok("stream", format!("{} captures {prefix}.>", info.config.name));
                }
                Err(PreflightError::NoStream(_)) if relay.ensure_stream => {
                    checks.ok(
                        "stream",
                        format!("none captures {prefix}.> yet; the relay creates one (ensure_stream)"),
                    );
                }
                Err(err @ PreflightError::NoStream(_)) => {
                    checks.fail(
                        "stream",
                        (&err).into(),
                        error_chain(&err),
                        Some(nats::no_stream_hint(prefix)),
                    );
                }
                Err(err) => checks.fail("stream", (&err).into(), error_chain(&err), None),
            }
            publisher.close(Duration::from_secs(1)).await;
        }
        Err(err) => checks.fail("nats", exit_code(err.is_config_error()), error_chain(&err), None),
    }
    // The leader locks: a lookup of who holds the first shard's.
    if let (Some(backend), Some(store)) = (Backend::of(config), &store) {
        let first = Shard { id: 0, count: relay.shard_count };
        match backend.holder(first, store.pool()).await {
            Ok(_) => checks.ok("leader locks", format!("{} reachable", backend.name())),
            Err(err) => {
                checks.fail("leader locks", exit_code(err.is_config_error()), error_chain(&err), None)
            }
        }
    }
    checks.finish()
}

/// `qx-relay config`: the merged settings, secrets redacted, every key in the reference's order; a key left
/// unset is a comment in TOML and `null` in JSON.
pub fn print_config(config: &Config, json: bool) -> ExitCode {
    let mut merged = serde_json::to_value(config.redacted()).expect("the config serializes");
    let sections = reference::sections();
    for section in &sections {
        if let Some(table) = merged.get_mut(&section.name).and_then(serde_json::Value::as_object_mut) {
            for key in &section.keys {
                table.entry(key.name.clone()).or_insert(serde_json::Value::Null);
            }
        }
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&merged).expect("JSON prints"));
        return ExitCode::Ok;
    }
    let mut text = String::new();
    for section in &sections {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!("[{}]\n", section.name));
        for key in &section.keys {
            match toml::Value::try_from(&merged[&section.name][&key.name]) {
                Ok(value) => text.push_str(&format!("{} = {value}\n", key.name)),
                // TOML has no null.
                Err(_) => text.push_str(&format!("# {}: unset\n", key.name)),
            }
        }
    }
    out!("{text}");
    ExitCode::Ok
}

#[derive(Serialize)]
struct ShardStatus {
    shard: u32,
    shard_count: u32,
    #[serde(flatten)]
    stats: OutboxStats,
    /// Who publishes the shard, when a lock decides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader_lock: Option<Holder>,
}

#[derive(Serialize)]
struct Status {
    table: String,
    shard_id: String,
    /// Live replicas sharing the shards (`shard_id = "auto"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<usize>,
    shards: Vec<ShardStatus>,
}

/// `qx-relay status`: per shard, its counts and who holds its leader lock.
pub async fn status(config: &Config, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let mut shards = Vec::new();
    for shard in Shard::all_of(config.relay.shard_count) {
        match store.stats(shard).await {
            Ok(stats) => shards.push(ShardStatus {
                shard: shard.id,
                shard_count: shard.count,
                stats,
                leader_lock: None,
            }),
            Err(err) => return unavailable("postgres", &err),
        }
    }
    let backend = Backend::of(config);
    let lock_backend_failed = |err: LockError| {
        eprintln!("leader locks: {}", error_chain(&err));
        exit_code(err.is_config_error())
    };
    let mut members = None;
    if let Some(backend) = &backend {
        for status in &mut shards {
            let shard = Shard { id: status.shard, count: status.shard_count };
            match backend.holder(shard, store.pool()).await {
                Ok(holder) => status.leader_lock = Some(holder),
                Err(err) => return lock_backend_failed(err),
            }
        }
        if config.relay.shard_id == ShardId::Auto {
            match backend.live_members(store.pool()).await {
                Ok(live) => members = Some(live),
                Err(err) => return lock_backend_failed(err),
            }
        }
    }
    let status = Status {
        table: config.relay.table.clone(),
        shard_id: config.relay.shard_id.to_string(),
        members,
        shards,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&status).expect("status serializes"));
        return ExitCode::Ok;
    }
    out!("table {}", status.table);
    if let Some(members) = status.members {
        out!(", shared by {members} live replica(s)");
    }
    outln!();
    for s in &status.shards {
        let backlog = &s.stats.backlog;
        let oldest = backlog.oldest_pending_seconds.map_or("-".to_owned(), |secs| format!("{secs:.1}s"));
        // Counts that stopped at their bound say "at least".
        let at_least =
            |count: i64, capped: bool| if capped { format!("{count}+") } else { count.to_string() };
        let recent = s.stats.published_last_5m;
        outln!(
            "shard {}/{}: pending {}  oldest pending {oldest}  parked {}  published (5m) {}",
            s.shard,
            s.shard_count,
            at_least(backlog.pending, backlog.more),
            at_least(backlog.parked, backlog.more),
            at_least(recent, recent >= PUBLISHED_COUNT_MAX)
        );
        if backlog.more {
            outln!("  counts are of the {SAMPLE_ROWS} oldest unpublished rows of the table");
        }
        if let Some(lock) = &s.leader_lock {
            outln!("  {}", lock_line(lock));
        }
    }
    ExitCode::Ok
}

/// One lock of `status`: who holds it, as far as a person needs to find that process.
fn lock_line(lock: &Holder) -> String {
    let key = Escaped(&lock.key);
    if !lock.held {
        return format!("lock {key}: free");
    }
    // Whoever can write the key chooses the token and the record, and whoever can connect its application_name.
    let who = lock.identity.as_ref().map(|identity| Escaped(&identity.to_string()).to_string());
    let mut line = format!("lock {key}: held by");
    match (&lock.token, &who) {
        (Some(token), Some(who)) => line.push_str(&format!(" {} on {who}", Escaped(token))),
        (Some(token), None) => line.push_str(&format!(" {}", Escaped(token))),
        (None, Some(who)) => line.push_str(&format!(" {who}")),
        (None, None) => {
            let name = lock.session.as_ref().and_then(|session| session.application_name.as_deref());
            line.push_str(&format!(" a session named \"{}\"", Escaped(name.unwrap_or_default())));
        }
    }
    if let Some(since) = lock.since {
        line.push_str(&format!(" since {}", since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    }
    if let Some(session) = &lock.session {
        line.push_str(&format!(" (Postgres backend pid {}", session.backend_pid));
        if let Some(addr) = &session.client_addr {
            line.push_str(&format!(", client {addr}"));
        }
        line.push(')');
    }
    match (lock.backend, lock.ttl_left_ms) {
        ("redis", Some(ttl)) => line.push_str(&format!(", {ttl} ms left")),
        ("redis", None) => line.push_str(", no expiry"),
        _ => {}
    }
    line
}

/// `qx-relay dead list`.
pub async fn dead_list(config: &Config, limit: i64, event_name: Option<&str>, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let rows: Vec<ParkedRow> = match store.parked(limit, event_name).await {
        Ok(rows) => rows,
        Err(err) => return unavailable("postgres", &err),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize"));
        return ExitCode::Ok;
    }
    for row in &rows {
        outln!("{}", parked_line(row));
    }
    outln!("{} parked row(s)", rows.len());
    ExitCode::Ok
}

/// `qx-relay dead requeue`, or with `dry_run` the rows it would requeue. Ids that are not parked are warned
/// about, with what they are instead.
pub async fn dead_requeue(config: &Config, which: &Requeue, dry_run: bool, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    if let Requeue::Ids(ids) = which {
        match store.rows(ids).await {
            Ok(rows) => warn_not_parked(ids, &rows, &config.relay.table),
            Err(err) => return unavailable("postgres", &err),
        }
    }
    if dry_run {
        let rows = match store.requeue_candidates(which).await {
            Ok(rows) => rows,
            Err(err) => return unavailable("postgres", &err),
        };
        if json {
            let report = serde_json::json!({ "dry_run": true, "would_requeue": rows.len(), "rows": rows });
            outln!("{}", serde_json::to_string_pretty(&report).expect("rows serialize"));
        } else {
            rows.iter().for_each(|row| outln!("{}", parked_line(row)));
            outln!("would requeue {} row(s) (dry run: nothing changed)", rows.len());
        }
        return ExitCode::Ok;
    }
    match store.requeue(which).await {
        Ok(count) if json => outln!("{}", serde_json::json!({ "requeued": count })),
        Ok(count) => outln!("requeued {count} row(s)"),
        Err(err) => return unavailable("postgres", &err),
    }
    ExitCode::Ok
}

/// A warning on stderr for each of `ids` that is not a parked row of `rows`: requeue leaves it as it is.
fn warn_not_parked(ids: &[uuid::Uuid], rows: &[StoredRow], table: &str) {
    for id in ids {
        let why = match rows.iter().find(|row| row.id == *id) {
            Some(row) if row.state == PARKED => continue,
            Some(row) if row.state == PUBLISHED => "already published".to_owned(),
            Some(row) => format!("not parked ({}, {} attempt(s))", row.state, row.attempts),
            None => format!("no such row in {table}"),
        };
        eprintln!("warning: {id} not requeued: {why}");
    }
}

/// `qx-relay dead show`: one row, every column and the payload; control characters escaped in text.
pub async fn dead_show(config: &Config, id: uuid::Uuid, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let row = match store.rows(&[id]).await {
        Ok(rows) => rows.into_iter().next(),
        Err(err) => return unavailable("postgres", &err),
    };
    let Some(row) = row else {
        eprintln!("no row {id} in {}", config.relay.table);
        return ExitCode::NotFound;
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&shown_json(&row)).expect("a row serializes"));
    } else {
        out!("{}", shown_text(&row));
    }
    ExitCode::Ok
}

/// The row as JSON, the payload as the JSON it holds (as the message body would be read).
fn shown_json(row: &StoredRow) -> serde_json::Value {
    let mut value = serde_json::to_value(row).expect("a row serializes");
    if let Ok(payload) = serde_json::from_str::<serde_json::Value>(&row.payload) {
        value["payload"] = payload;
    }
    value
}

/// The row as `name  value` lines, the payload last.
fn shown_text(row: &StoredRow) -> String {
    let time = |at: Option<chrono::DateTime<chrono::Utc>>| at.map_or("-".to_owned(), |at| at.to_rfc3339());
    let uuid = |id: Option<uuid::Uuid>| id.map_or("-".to_owned(), |id| id.to_string());
    let fields = [
        ("id", row.id.to_string()),
        ("state", row.state.clone()),
        ("event_name", row.event_name.clone()),
        ("event_version", row.event_version.to_string()),
        ("occurred_at", row.occurred_at.to_rfc3339()),
        ("published_at", time(row.published_at)),
        ("attempts", row.attempts.to_string()),
        ("last_error", row.last_error.clone().unwrap_or_else(|| "-".to_owned())),
        ("correlation_id", uuid(row.correlation_id)),
        ("tenant_id", uuid(row.tenant_id)),
        ("payload", row.payload.clone()),
    ];
    fields.iter().map(|(name, value)| format!("{name:<15}{}\n", Escaped(value))).collect()
}

/// A parked row on one line, whatever the producer put in event_name (and so in last_error).
fn parked_line(row: &ParkedRow) -> String {
    format!(
        "{}  {}  attempts {}  occurred {}  {}",
        row.id,
        Escaped(&row.event_name),
        row.attempts,
        row.occurred_at.to_rfc3339(),
        Escaped(row.last_error.as_deref().unwrap_or("-"))
    )
}

/// The store, or the exit code after reporting why Postgres could not be used.
async fn connect(config: &Config) -> Result<OutboxStore, ExitCode> {
    connect_store(config).await.map_err(|err| {
        eprintln!("postgres: {}", error_chain(&err));
        exit_code(err.is_config_error())
    })
}

async fn connect_store(config: &Config) -> Result<OutboxStore, PostgresError> {
    let timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    let url = config.db.sqlx_url();
    OutboxStore::connect(&url, &config.relay, timeout)
        .await
        .map_err(|err| PostgresError::connecting(&url, err))
}

/// A server that refuses our settings is a configuration error (78); one that fails, an outage (69).
fn exit_code(config_error: bool) -> ExitCode {
    if config_error {
        ExitCode::Config
    } else {
        ExitCode::Unavailable
    }
}

/// Reports a database failure: a missing table is the configuration's fault (78), anything else Postgres' (69).
fn unavailable(what: &str, err: &StoreError) -> ExitCode {
    eprintln!("{what}: {}", error_chain(err));
    let undefined_table = match err {
        StoreError::Database(err) => {
            err.as_database_error().and_then(|e| e.code()).is_some_and(|c| c == "42P01")
        }
        StoreError::TimedOut(_)
        | StoreError::TableLocked
        | StoreError::Unreachable { .. }
        | StoreError::ReadOnly { .. } => false,
    };
    if undefined_table {
        ExitCode::Config
    } else {
        ExitCode::Unavailable
    }
}
