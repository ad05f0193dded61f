//! What an operator reads and types: warnings for mistyped settings, one-line configuration errors, the start
//! and progress lines, the dead-row commands (`show`, `requeue --dry-run`), lock holders a person can find,
//! and the exit codes and messages of a missing database and a busy metrics port.

use std::time::Duration;

use qx_relay_testkit::{
    env_var, free_port, http, run_command, run_command_unread, NatsServer, Relay, RelayEnv, TestDb,
    TestStream,
};
use serde_json::Value;
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(30);

/// Settings that need no server: `config` and a refused start read only these.
fn offline_env(pairs: &[(&str, &str)]) -> RelayEnv {
    RelayEnv::default().set("QX_RELAY__SUBJECT_PREFIX", "orders").with(pairs)
}

/// This machine's host name, as the relay records it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").expect("read the host name").trim().to_owned()
}

/// `key=value` of a text log line; quotes around string values removed.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = line[start..].split(' ').next()?;
    Some(value.trim_matches('"'))
}

#[test]
fn a_typo_under_a_qx_section_is_warned_about_and_qx_settings_are_not() {
    let env = offline_env(&[
        ("QX_NATS__SERVER", "nats://nats.internal:4222"),
        ("QX_DB__POOL_SIZE", "20"),
        ("QX_CACHE__SOCKET_TIMEOUT_SECONDS", "2"),
    ]);
    let (code, stdout, stderr) = run_command(&env, &["config"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(r#"servers = ["nats://localhost:4222"]"#), "the typo was not read: {stdout}");
    let warnings: Vec<&str> = stderr.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning, for the typo only:\n{stderr}");
    assert!(
        warnings[0].ends_with(
            "QX_NATS__SERVER is not a setting of qx-relay or Qx: ignored; did you mean QX_NATS__SERVERS?"
        ),
        "{stderr}"
    );
}

#[test]
fn a_setting_under_another_section_name_or_with_one_underscore_is_warned_about() {
    let env = offline_env(&[
        ("QX_DATABASE__URL", "postgres://db.internal/app"),
        ("QX_RELAY_BATCH_SIZE", "50"),
        // Kubernetes' service links for a Service named qx-relay: not settings of anyone.
        ("QX_RELAY_PORT", "tcp://10.0.0.1:9090"),
        ("QX_RELAY_SERVICE_HOST", "10.0.0.1"),
    ]);
    let (code, stdout, stderr) = run_command(&env, &["config"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("batch_size = 1000"), "the slip was not read: {stdout}");
    let warnings: Vec<&str> = stderr.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 2, "one warning per slip:\n{stderr}");
    assert!(warnings[0]
        .ends_with("QX_DATABASE__URL is not a setting of qx-relay or Qx: ignored; did you mean QX_DB__URL?"));
    assert!(warnings[1].ends_with(
        "QX_RELAY_BATCH_SIZE is not a setting of qx-relay or Qx: ignored; did you mean QX_RELAY__BATCH_SIZE? (two \
         underscores after the section)"
    ));
}

#[test]
fn a_password_under_a_name_postgres_does_not_read_stops_the_relay_unprinted() {
    for parameter in ["passwd", "PASSWORD"] {
        let env =
            offline_env(&[("QX_DB__URL", &format!("postgres://relay@127.0.0.1:1/qx?{parameter}=pw-81c2"))]);
        for command in ["config", "run"] {
            let (code, stdout, stderr) = run_command(&env, &[command]);
            assert_eq!(code, Some(78), "{command}: {stdout}{stderr}");
            assert!(
                !stdout.contains("pw-81c2") && !stderr.contains("pw-81c2"),
                "{command}: {stdout}{stderr}"
            );
            assert!(
                stderr.contains(&format!("db.url: {parameter} is not a parameter Postgres reads")),
                "{stderr}"
            );
        }
    }
}

#[test]
fn a_reader_that_stops_early_ends_the_output_without_a_panic() {
    let env = offline_env(&[]);
    for args in [&["config"][..], &["config", "--json"]] {
        let (code, stderr) = run_command_unread(&env, args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn config_shows_every_key_unset_ones_too_as_toml_or_json() {
    let env = offline_env(&[("QX_NATS__USER", "relay"), ("QX_NATS__PASSWORD", "pw-4410")]);
    let (code, stdout, stderr) = run_command(&env, &["config"]);
    assert_eq!(code, Some(0), "{stderr}");
    let toml: toml::Table = stdout.parse().unwrap_or_else(|err| panic!("{err}: {stdout}"));
    assert_eq!(toml["nats"]["user"].as_str(), Some("relay"));
    for unset in ["# creds_file: unset", "# token: unset", "# tls_ca_file: unset", "# retention: unset"] {
        assert!(stdout.lines().any(|line| line == unset), "{unset:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("pw-4410"), "{stdout}");

    let (code, stdout, stderr) = run_command(&env, &["config", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("{err}: {stdout}"));
    assert_eq!(json["nats"]["user"], "relay");
    assert!(json["nats"]["creds_file"].is_null() && json["nats"].get("creds_file").is_some(), "{json}");
    assert!(json["relay"]["retention"].is_null() && json["relay"].get("retention").is_some(), "{json}");
    assert_eq!(json["relay"]["batch_size"], 1000);
    assert!(!stdout.contains("pw-4410"), "{stdout}");
}

#[test]
fn an_unknown_relay_key_is_named_once_with_its_variable_and_a_suggestion() {
    let (code, _, stderr) = run_command(&offline_env(&[("QX_RELAY__BATCHSIZE", "50")]), &["run"]);
    assert_eq!(code, Some(78), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].ends_with(
            "configuration error: relay.batchsize (from QX_RELAY__BATCHSIZE): unknown key; did you mean batch_size?"
        ),
        "{stderr}"
    );

    let path = std::env::temp_dir().join(format!("qxr-syntax-{}.toml", Uuid::new_v4().simple()));
    std::fs::write(&path, "[relay]\nsubject_prefix = \"orders\"\nbatch_size = \n").unwrap();
    let (code, _, stderr) = run_command(&offline_env(&[]), &["--config", path.to_str().unwrap(), "run"]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "a TOML syntax error on one line: {stderr}");
    assert!(stderr.contains("line 3, column 14"), "{stderr}");
}

/// Rows committed at a steady pace for a while: 20 every 250 ms.
async fn produce(db: &TestDb, for_how_long: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + for_how_long;
    let mut rows = 0;
    while tokio::time::Instant::now() < deadline {
        rows += db.insert_events(20, "order.placed").await.len();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    rows
}

#[tokio::test]
async fn a_relay_that_relays_says_so_every_30s_in_its_own_words() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    // A bare level is the relay's own: async-nats would write a line per message at debug.
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__LOG", "debug");
    let relay = Relay::spawn(&env, &[]);
    let rows = produce(&db, Duration::from_secs(38)).await;
    db.wait_for("published_at IS NULL", 0, DRAIN).await;
    let log = relay.log();
    relay.stop().await;

    let start = log.lines().find(|line| line.contains("relay starting")).expect(&log);
    assert_eq!(field(start, "db"), Some(format!("127.0.0.1:5432/{}", db.name).as_str()), "{start}");
    assert_eq!(field(start, "nats"), Some(env_var("NATS_URL").as_str()), "{start}");
    assert!(start.contains(r#" leader="none""#) && start.contains(r#" on_publish="mark""#), "{start}");
    assert!(log.lines().any(|line| line.contains("DEBUG") && line.contains("batch published")), "{log}");
    assert!(!log.lines().any(|line| line.contains("DEBUG async_nats")), "no async-nats debug:\n{log}");

    let progress: Vec<&str> =
        log.lines().filter(|line| line.contains(" INFO ") && line.contains(": relaying ")).collect();
    assert_eq!(progress.len(), 1, "one line in 38 s of flow (the next is due after 60 s):\n{log}");
    let line = progress[0];
    let number = |key: &str| -> f64 {
        field(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{key} in {line}"))
    };
    assert!((30.0..32.0).contains(&number("seconds")), "{line}");
    let published = number("published");
    assert!(published > 0.0 && published < rows as f64, "{line}");
    // The rate is over the period's exact length, of which `seconds` is the whole part.
    assert!((number("per_second") * number("seconds") - published).abs() <= published * 0.05, "{line}");
    // From the outbox sample taken every 30 s without metrics: some rows were always pending or in flight.
    assert!(number("pending") >= 0.0 && number("parked") == 0.0, "{line}");
}

/// Marks `id` parked, with a last error a producer's event name could have put there.
async fn park(db: &TestDb, id: Uuid) {
    sqlx::query(
        "UPDATE qx_outbox_events SET attempts = 10, last_error = 'refused:\nforged line' WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .expect("park a row");
}

#[tokio::test]
async fn dead_show_and_a_dry_run_requeue_tell_before_anything_changes() {
    let db = TestDb::create().await;
    let ids = db.insert_events(3, "order.placed").await;
    let (parked, pending, published, missing) = (ids[0], ids[1], ids[2], Uuid::new_v4());
    park(&db, parked).await;
    sqlx::query("UPDATE qx_outbox_events SET published_at = now() WHERE id = $1")
        .bind(published)
        .execute(&db.pool)
        .await
        .unwrap();
    let env = RelayEnv::new(&db, "orders");
    let asked: Vec<String> = [parked, pending, published, missing]
        .iter()
        .flat_map(|id| ["--id".to_owned(), id.to_string()])
        .collect();
    let args = |extra: &[&str]| -> Vec<String> {
        ["dead", "requeue"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(asked.clone())
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect()
    };

    // Dry run: the parked row listed, a warning for each id requeue would leave alone, nothing changed.
    let dry = args(&["--dry-run"]);
    let (code, stdout, stderr) = run_command(&env, &dry.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&parked.to_string()) && lines[0].contains("refused:\\nforged line"),
        "{stdout}"
    );
    assert_eq!(lines[1], "would requeue 1 row(s) (dry run: nothing changed)");
    for (id, why) in [
        (pending, "not parked (pending, 0 attempt(s))"),
        (published, "already published"),
        (missing, "no such row"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&format!("warning: {id} not requeued: {why}"))),
            "{stderr}"
        );
    }
    assert_eq!(db.count("attempts = 10").await, 1, "a dry run changes nothing");
    let dry_json = args(&["--dry-run", "--json"]);
    let (_, stdout, _) = run_command(&env, &dry_json.iter().map(String::as_str).collect::<Vec<_>>());
    let report: Value = serde_json::from_str(&stdout).expect(&stdout);
    assert_eq!(report["would_requeue"], 1, "{report}");
    assert_eq!(report["rows"][0]["id"], parked.to_string(), "{report}");

    // show: every column and the payload, control characters escaped; JSON as it is.
    let (code, stdout, stderr) = run_command(&env, &["dead", "show", &parked.to_string()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.lines().any(|l| l == "state          parked"), "{stdout}");
    assert!(stdout.lines().any(|l| l == r"last_error     refused:\nforged line"), "{stdout}");
    let payload: String = sqlx::query_scalar("SELECT payload::text FROM qx_outbox_events WHERE id = $1")
        .bind(parked)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(stdout.lines().any(|l| l == format!("payload        {payload}")), "{stdout}");
    let (code, stdout, _) = run_command(&env, &["dead", "show", &parked.to_string(), "--json"]);
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&stdout).expect(&stdout);
    assert_eq!(shown["payload"], serde_json::from_str::<Value>(&payload).unwrap(), "{shown}");
    assert_eq!(shown["last_error"], "refused:\nforged line", "{shown}");
    assert_eq!(shown["attempts"], 10, "{shown}");
    let (code, _, stderr) = run_command(&env, &["dead", "show", &missing.to_string()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("no row {missing}")), "{stderr}");

    // The real thing: the same warnings, one row requeued.
    let real = args(&[]);
    let (code, stdout, stderr) = run_command(&env, &real.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((code, stdout.as_str()), (Some(0), "requeued 1 row(s)\n"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("warning: ")).count(), 3, "{stderr}");
    assert_eq!(db.count(&format!("id = '{parked}' AND attempts = 0 AND last_error IS NULL")).await, 1);
}

/// `status --json`'s one lock, once it is held.
async fn held_lock(env: &RelayEnv, relay: &Relay) -> Value {
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        let (code, stdout, stderr) = run_command(env, &["status", "--json"]);
        assert_eq!(code, Some(0), "{stderr}");
        let status: Value = serde_json::from_str(&stdout).expect(&stdout);
        let lock = status["shards"][0]["leader_lock"].clone();
        if lock["held"] == true && lock["pid"].is_u64() {
            return lock;
        }
        assert!(tokio::time::Instant::now() < deadline, "no holder recorded: {status}\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn status_names_the_host_and_pid_holding_a_redis_or_postgres_lock() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let key = format!("test:{}:leader", Uuid::new_v4().simple());
    for mode in ["redis", "postgres"] {
        let env = RelayEnv::new(&db, &stream.prefix).with(&[
            ("QX_RELAY__LEADER", mode),
            ("QX_RELAY__LEADER_KEY", &key),
            ("QX_CACHE__URL", &env_var("REDIS_URL")),
        ]);
        let relay = Relay::spawn(&env, &[]);
        let lock = held_lock(&env, &relay).await;
        assert_eq!(lock["backend"], mode, "{lock}");
        assert_eq!(lock["host"], host_name(), "{lock}");
        assert_eq!(lock["pid"], relay.pid(), "{lock}");
        let (code, stdout, _) = run_command(&env, &["status"]);
        assert_eq!(code, Some(0));
        let line = stdout.lines().find(|l| l.trim_start().starts_with("lock ")).expect(&stdout);
        let holder = format!("{} (pid {})", host_name(), relay.pid());
        match mode {
            "redis" => {
                assert!(lock["since"].is_string(), "{lock}");
                let token = lock["token"].as_str().expect("the lock's token");
                assert!(line.contains(&format!(": held by {token} on {holder} since ")), "{line}");
                assert!(line.ends_with(" ms left"), "{line}");
            }
            _ => {
                let backend = lock["session"]["backend_pid"].as_i64().expect("the session's pid");
                assert_eq!(lock["session"]["client_addr"], "127.0.0.1", "{lock}");
                let expected =
                    format!(": held by {holder} (Postgres backend pid {backend}, client 127.0.0.1)");
                assert!(line.ends_with(&expected), "{line}");
            }
        }
        relay.stop().await;
        // Released on stop; a closed Postgres session lets go of its locks a moment later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, stdout, _) = run_command(&env, &["status"]);
            if stdout.lines().any(|l| l.trim_start().starts_with("lock ") && l.ends_with(": free")) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{mode}: still held after stop: {stdout}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_missing_database_is_a_configuration_error_and_a_refused_connection_says_so() {
    let db = TestDb::create().await;
    let missing = format!("postgres://postgres@127.0.0.1:5432/{}_gone", db.name);
    let env = RelayEnv::new(&db, "orders").set("QX_DB__URL", missing);
    let relay = Relay::spawn(&env, &[]);
    let status = relay.wait(DRAIN).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(78), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("no such database: Postgres at 127.0.0.1:5432"), "{log}");
    assert!(last.contains(&format!("{}_gone", db.name)), "the server's own words: {log}");
    for args in [&["check"][..], &["status"]] {
        let (code, stdout, stderr) = run_command(&env, args);
        assert_eq!(code, Some(78), "{args:?}: {stdout}{stderr}");
    }

    // Nothing listens: the cause, not the pool's "timed out".
    let env = RelayEnv::new(&db, "orders").set("QX_DB__URL", "postgres://postgres@127.0.0.1:1/x");
    let (code, _, stderr) = run_command(&env, &["status"]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1") && stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");
}

#[tokio::test]
async fn a_busy_metrics_port_is_named_and_a_bare_port_listens_everywhere() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let env = RelayEnv::new(&db, &stream.prefix).set("QX_RELAY__METRICS_ADDR", busy.clone());
    let relay = Relay::spawn(&env, &[]);
    let status = relay.wait(DRAIN).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.lines().last().unwrap_or_default().contains(&format!("serving /metrics on {busy}")), "{log}");
    drop(taken);

    let port = free_port();
    let relay = Relay::spawn(&RelayEnv::new(&db, &stream.prefix), &["--metrics-addr", &format!(":{port}")]);
    let deadline = tokio::time::Instant::now() + DRAIN;
    // Ready once connected to Postgres and NATS.
    while http(port, "GET", "/readyz").await.is_none_or(|response| response.status != 200) {
        assert!(tokio::time::Instant::now() < deadline, "not ready on :{port}:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(relay.log().contains(&format!("addr=0.0.0.0:{port}")), "{}", relay.log());
    relay.stop().await;
}

/// Waits until the relay's log has a line holding every one of `parts`; the line.
async fn log_line(relay: &Relay, parts: &[&str]) -> String {
    log_line_within(relay, parts, DRAIN).await
}

/// [`log_line`], waiting up to `limit`.
async fn log_line_within(relay: &Relay, parts: &[&str], limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let log = relay.log();
        if let Some(line) = log.lines().find(|line| parts.iter().all(|part| line.contains(part))) {
            return line.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no line with {parts:?}:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_lost_nats_connection_names_the_server_why_it_cannot_come_back_and_when_it_does() {
    let mut nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let server = format!("127.0.0.1:{}", nats.port);
    let env = RelayEnv::new(&db, "orders").with(&[
        ("QX_NATS__SERVERS", &format!("nats://{server}")),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__ENSURE_STREAM", "true"),
    ]);
    let relay = Relay::spawn(&env, &[]);
    log_line(&relay, &["connected to Postgres and NATS", &format!("nats={server}")]).await;

    nats.kill9();
    log_line(&relay, &[" WARN ", "NATS connection lost; reconnecting", &format!("server={server}")]).await;
    let failed = log_line(&relay, &[" WARN ", "NATS reconnect failed", &format!("server={server}")]).await;
    assert!(failed.contains("error="), "the client's reason: {failed}");
    nats.restart().await;
    log_line(&relay, &[" INFO ", "NATS connection back", &format!("server={server}")]).await;

    // And it relays again.
    db.insert_events(10, "order.placed").await;
    relay.stop_when_drained(&db, DRAIN).await;
}

/// A relay on the first of two NATS servers started with `args`, each a server of its own (no cluster); the
/// relay, the servers, and the index of the one it connected to, whose `host:port` it logged.
async fn on_one_of_two_servers(args: &[&str]) -> (Relay, [NatsServer; 2], usize, TestDb) {
    let servers = [NatsServer::start_with(args).await, NatsServer::start_with(args).await];
    let db = TestDb::create().await;
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let env = RelayEnv::new(&db, "orders").with(&[
        ("QX_NATS__SERVERS", &serde_json::to_string(&urls).unwrap()),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__ENSURE_STREAM", "true"),
    ]);
    let relay = Relay::spawn(&env, &[]);
    let connected = log_line(&relay, &["connected to Postgres and NATS"]).await;
    let first = field(&connected, "nats").expect("nats=").to_owned();
    let index = servers.iter().position(|s| first == format!("127.0.0.1:{}", s.port)).expect("one of them");
    (relay, servers, index, db)
}

#[tokio::test]
async fn a_server_in_lame_duck_mode_is_named_and_left_when_it_closes_the_connection() {
    // nats-server's shortest lame duck: 30 s to close every client, after a 1 s grace.
    let config = std::env::temp_dir().join(format!("qxr-ldm-{}.conf", Uuid::new_v4().simple()));
    std::fs::write(&config, "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"\n").unwrap();
    let (relay, servers, leaving, _db) = on_one_of_two_servers(&["-c", config.to_str().unwrap()]).await;
    servers[leaving].lame_duck();
    let first = format!("server=127.0.0.1:{}", servers[leaving].port);
    log_line(&relay, &[" WARN ", "lame duck mode", &first]).await;
    let other = format!("server=127.0.0.1:{}", servers[1 - leaving].port);
    // It closes the connection within its 30 s; the relay moves then, not before.
    log_line_within(&relay, &[" INFO ", "NATS connection back", &other], Duration::from_secs(45)).await;
    std::fs::remove_file(&config).unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn a_lost_connection_names_the_server_lost_and_the_one_reached_after() {
    let (relay, mut servers, lost, _db) = on_one_of_two_servers(&[]).await;
    servers[lost].kill9();
    let first = format!("server=127.0.0.1:{}", servers[lost].port);
    log_line(&relay, &[" WARN ", "NATS connection lost; reconnecting", &first]).await;
    let other = format!("server=127.0.0.1:{}", servers[1 - lost].port);
    log_line(&relay, &[" INFO ", "NATS connection back", &other]).await;
    relay.stop().await;
}
