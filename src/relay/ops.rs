//! Operator commands: `check`, `config`, `status` and `dead list/requeue`. They print to stdout; nothing here
//! deletes an unpublished row.

use std::time::Duration;

use serde::Serialize;

use super::config::{Config, LeaderMode};
use super::escape::Escaped;
use super::leader::{Holder, RedisLock};
use super::publisher::RelayPublisher;
use super::shard::Shard;
use super::store::{OutboxStats, OutboxStore, ParkedRow, Requeue};
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
    let timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    match OutboxStore::connect(&config.db.sqlx_url(), 1, timeout).await {
        Ok(pool) => {
            println!("ok    postgres: connected");
            let store = OutboxStore::new(pool, &config.relay);
            match store.missing_columns().await {
                Ok(missing) if missing.is_empty() => {
                    println!("ok    table: {} has the outbox columns", config.relay.table)
                }
                Ok(missing) => {
                    fail(ExitCode::Config, format!("table: {} lacks {missing:?}", config.relay.table))
                }
                Err(sqlx::Error::RowNotFound) => {
                    fail(ExitCode::Config, format!("table: {} not found", config.relay.table))
                }
                Err(err) => fail(ExitCode::Unavailable, format!("table: {}", error_chain(&err))),
            }
        }
        Err(err) => fail(ExitCode::Unavailable, format!("postgres: {}", error_chain(&err))),
    }
    let prefix = config.relay.subject_prefix();
    match RelayPublisher::connect(&config.nats, &config.relay).await {
        Ok(publisher) => {
            println!("ok    nats: connected");
            match publisher.stream_for_prefix().await {
                Ok(Some(info)) => println!("ok    stream: {} captures {prefix}.>", info.config.name),
                Ok(None) if config.relay.ensure_stream => {
                    println!(
                        "ok    stream: none captures {prefix}.> yet; the relay creates one (ensure_stream)"
                    );
                }
                Ok(None) => {
                    fail(ExitCode::Config, format!("stream: no JetStream stream captures {prefix}.>"))
                }
                Err(err) => fail(ExitCode::Unavailable, format!("stream: {}", error_chain(&*err))),
            }
            publisher.close().await;
        }
        Err(err) => fail(ExitCode::Unavailable, format!("nats: {}", error_chain(&err))),
    }
    if config.relay.leader == LeaderMode::Redis {
        match lock_holders(config).await {
            Ok(_) => println!("ok    redis: connected"),
            Err(err) => fail(ExitCode::Unavailable, format!("redis: {err}")),
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
                eprintln!("redis: {err}");
                return ExitCode::Unavailable;
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
        let oldest = s.stats.oldest_pending_seconds.map_or("-".to_owned(), |secs| format!("{secs:.1}s"));
        println!(
            "shard {}/{}: pending {}  oldest pending {oldest}  parked {}  published (5m) {}",
            s.shard, s.shard_count, s.stats.pending, s.stats.parked, s.stats.published_last_5m
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

async fn connect(config: &Config) -> Result<OutboxStore, ExitCode> {
    let timeout = Duration::from_secs_f64(config.nats.connect_timeout_seconds);
    match OutboxStore::connect(&config.db.sqlx_url(), 1, timeout).await {
        Ok(pool) => Ok(OutboxStore::new(pool, &config.relay)),
        Err(err) => Err(unavailable("postgres", &err)),
    }
}

async fn lock_holders(config: &Config) -> Result<Vec<Holder>, String> {
    let mut holders = Vec::new();
    for shard in Shard::all_of(config.relay.shard_count) {
        let key = shard.lock_key(&config.relay.leader_key);
        let mut lock =
            RedisLock::new(&config.cache.url, key, config.relay.leader_ttl).map_err(|e| error_chain(&e))?;
        holders.push(lock.holder().await.map_err(|e| error_chain(&e))?);
    }
    Ok(holders)
}

/// Reports a database failure: a missing table is the configuration's fault (78), anything else Postgres' (69).
fn unavailable(what: &str, err: &sqlx::Error) -> ExitCode {
    eprintln!("{what}: {}", error_chain(err));
    let undefined_table = err.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "42P01");
    if undefined_table {
        ExitCode::Config
    } else {
        ExitCode::Unavailable
    }
}
