//! Operator commands: `check`, `config`, `status` and `dead list/requeue`. They print to stdout; nothing here
//! deletes an unpublished row.

use std::time::Duration;

use serde::Serialize;

use super::config::{Config, LeaderMode};
use super::escape::Escaped;
use super::leader::{Holder, LockError, RedisLock};
use super::nats::RelayPublisher;
use super::preflight::{self, PreflightError};
use super::refusal::PostgresError;
use super::shard::Shard;
use super::store::{OutboxStats, OutboxStore, ParkedRow, Requeue, StoreError};
use super::{error_chain, ExitCode};

/// Runs every check, printing one line each; the exit code of the worst failure.
pub async fn check(config: &Config) -> ExitCode {
    println!("ok    config: valid");
    let mut worst = ExitCode::Ok;
    let mut fail = |code: ExitCode, line: String| {
        println!("FAIL  {line}");
        if worst == ExitCode::Ok || code == ExitCode::Unavailable {
            worst = code;
        }
    };
    let relay = &config.relay;
    match connect_store(config).await {
        Ok(store) => {
            println!("ok    postgres: connected");
            match preflight::table(&store, relay, None).await {
                Ok(()) => println!("ok    table: {} has the outbox columns", relay.table),
                Err(err) => fail((&err).into(), format!("table: {}", error_chain(&err))),
            }
        }
        Err(err) => fail(exit_code(err.is_config_error()), format!("postgres: {}", error_chain(&err))),
    }
    let prefix = relay.subject_prefix();
    match RelayPublisher::connect(&config.nats, relay).await {
        Ok(publisher) => {
            println!("ok    nats: connected");
            match preflight::stream(&publisher, relay, false).await {
                Ok(preflight::Stream::Found(info) | preflight::Stream::Created(info)) => {
                    println!("ok    stream: {} captures {prefix}.>", info.config.name);
                }
                Err(PreflightError::NoStream(_)) if relay.ensure_stream => {
                    println!(
                        "ok    stream: none captures {prefix}.> yet; the relay creates one (ensure_stream)"
                    );
                }
                Err(err) => fail((&err).into(), format!("stream: {}", error_chain(&err))),
            }
            publisher.close(Duration::from_secs(1)).await;
        }
        Err(err) => fail(exit_code(err.is_config_error()), format!("nats: {}", error_chain(&err))),
    }
    if relay.leader == LeaderMode::Redis {
        match lock_holders(config).await {
            Ok(_) => println!("ok    redis: connected"),
            Err(err) => fail(exit_code(err.is_config_error()), format!("redis: {}", error_chain(&err))),
        }
    }
    worst
}

/// `qx-relay config`: the merged settings, secrets redacted.
pub fn print_config(config: &Config) -> ExitCode {
    match toml::to_string(&config.redacted()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::Ok
        }
        Err(err) => {
            eprintln!("cannot print the config: {err}");
            ExitCode::Internal
        }
    }
}

#[derive(Serialize)]
struct ShardStatus {
    shard: u32,
    shard_count: u32,
    #[serde(flatten)]
    stats: OutboxStats,
}

#[derive(Serialize)]
struct Status {
    table: String,
    shards: Vec<ShardStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    leader_locks: Vec<Holder>,
}

/// `qx-relay status`: per-shard counts and the leader locks' holders.
pub async fn status(config: &Config, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let mut shards = Vec::new();
    for shard in Shard::all_of(config.relay.shard_count) {
        match store.stats(shard).await {
            Ok(stats) => shards.push(ShardStatus { shard: shard.id, shard_count: shard.count, stats }),
            Err(err) => return unavailable("postgres", &err),
        }
    }
    let leader_locks = if config.relay.leader == LeaderMode::Redis {
        match lock_holders(config).await {
            Ok(holders) => holders,
            Err(err) => {
                eprintln!("redis: {}", error_chain(&err));
                return exit_code(err.is_config_error());
            }
        }
    } else {
        Vec::new()
    };
    let status = Status { table: config.relay.table.clone(), shards, leader_locks };
    if json {
        println!("{}", serde_json::to_string_pretty(&status).expect("status serializes"));
        return ExitCode::Ok;
    }
    println!("table {}", status.table);
    for s in &status.shards {
        let backlog = &s.stats.backlog;
        let oldest = backlog.oldest_pending_seconds.map_or("-".to_owned(), |secs| format!("{secs:.1}s"));
        println!(
            "shard {}/{}: pending {}  oldest pending {oldest}  parked {}  published (5m) {}",
            s.shard, s.shard_count, backlog.pending, backlog.parked, s.stats.published_last_5m
        );
    }
    for lock in &status.leader_locks {
        match (&lock.token, lock.ttl_left_ms) {
            // Whoever can write the key chooses the token.
            (Some(token), Some(ttl)) => {
                println!("lock {}: held by {}, {ttl} ms left", lock.key, Escaped(token))
            }
            (Some(token), None) => println!("lock {}: held by {}, no expiry", lock.key, Escaped(token)),
            _ => println!("lock {}: free", lock.key),
        }
    }
    ExitCode::Ok
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
        println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize"));
        return ExitCode::Ok;
    }
    // One line per row, whatever the producer put in event_name (and so in last_error).
    for row in &rows {
        println!(
            "{}  {}  attempts {}  occurred {}  {}",
            row.id,
            Escaped(&row.event_name),
            row.attempts,
            row.occurred_at.to_rfc3339(),
            Escaped(row.last_error.as_deref().unwrap_or("-"))
        );
    }
    println!("{} parked row(s)", rows.len());
    ExitCode::Ok
}

/// `qx-relay dead requeue`.
pub async fn dead_requeue(config: &Config, which: &Requeue, json: bool) -> ExitCode {
    let store = match connect(config).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    match store.requeue(which).await {
        Ok(count) if json => println!("{}", serde_json::json!({ "requeued": count })),
        Ok(count) => println!("requeued {count} row(s)"),
        Err(err) => return unavailable("postgres", &err),
    }
    ExitCode::Ok
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
    match OutboxStore::connect(&url, 1, timeout).await {
        Ok(pool) => Ok(OutboxStore::new(pool, &config.relay)),
        Err(err) => Err(PostgresError::connecting(&url, err)),
    }
}

async fn lock_holders(config: &Config) -> Result<Vec<Holder>, LockError> {
    let mut holders = Vec::new();
    for shard in Shard::all_of(config.relay.shard_count) {
        let key = shard.lock_key(&config.relay.leader_key);
        holders.push(RedisLock::new(&config.cache, key, config.relay.leader_ttl)?.holder().await?);
    }
    Ok(holders)
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
        StoreError::TimedOut(_) | StoreError::Locked => false,
    };
    if undefined_table {
        ExitCode::Config
    } else {
        ExitCode::Unavailable
    }
}
