//! Credentials and TLS against private servers and a CA made for the test: credentials written in a NATS server URL are used and never logged, at any level;
//! Redis over TLS holds the leader lock; Postgres honours asyncpg's `ssl=` and, given a root certificate,
//! verifies the chain under `sslmode=require` as libpq does. A server that refuses our TLS settings, our
//! certificate or our credentials stops the relay at start with exit 78 and one error line naming it.

use std::time::Duration;

use qx_relay_testkit::pki::Pki;
use qx_relay_testkit::{
    free_port, run_command, NatsServer, PgCluster, RedisServer, Relay, RelayEnv, TestDb, TestStream,
};
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(30);
/// A relay refused at start exits within its connect timeout; give_up_after bounds one that retries instead.
const EXIT: Duration = Duration::from_secs(30);

/// Runs the relay until every row of `db` is published, stops it with SIGTERM; its log.
async fn drain(db: &TestDb, env: &RelayEnv) -> String {
    let relay = Relay::spawn(env, &[]);
    relay.stop_when_drained(db, DRAIN).await;
    relay.log()
}

/// Runs the relay until it exits by itself: its exit code and log.
async fn exit_of(env: &RelayEnv) -> (Option<i32>, String) {
    let relay = Relay::spawn(env, &[]);
    let status = relay.wait(EXIT).await;
    (status.code(), relay.log())
}

/// `env` trusting `ca` of `pki` in settings `section` (`QX_NATS`, `QX_CACHE`), with the client certificate
/// when `client_certificate`.
fn with_tls(env: RelayEnv, pki: &Pki, section: &str, ca: &str, client_certificate: bool) -> RelayEnv {
    let env = env.set(&format!("{section}__TLS_CA_FILE"), pki.text(ca));
    if !client_certificate {
        return env;
    }
    env.set(&format!("{section}__TLS_CERT_FILE"), pki.text("client"))
        .set(&format!("{section}__TLS_KEY_FILE"), pki.text("client-key"))
}

/// The relay stopped with exit 78, and its last error line holds each of `parts`.
fn assert_refused(case: &str, (code, log): (Option<i32>, String), parts: &[&str]) {
    assert_eq!(code, Some(78), "{case}: exit code; log:\n{log}");
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("ERROR"))
        .unwrap_or_else(|| panic!("{case}: no error line; log:\n{log}"));
    for part in parts {
        assert!(line.contains(part), "{case}: {part:?} missing from {line:?}");
    }
}

#[tokio::test]
async fn nats_credentials_in_the_server_url_are_used_and_never_logged() {
    const PASSWORD: &str = "pw-9f3a7c";
    const TOKEN: &str = "tok-5e8b21";
    const WRONG: &str = "wrong-41d2";
    let by_password = NatsServer::start_with(&["--user", "relay", "--pass", PASSWORD]).await;
    let by_token = NatsServer::start_with(&["--auth", TOKEN]).await;
    let db = TestDb::create().await;
    let base = RelayEnv::new(&db, "orders").set("QX_RELAY__ENSURE_STREAM", "true");
    for (server, userinfo) in [(&by_password, format!("relay:{PASSWORD}")), (&by_token, TOKEN.to_owned())] {
        db.insert_events(20, "order.placed").await;
        let url = format!("nats://{userinfo}@127.0.0.1:{}", server.port);
        // Every level, async-nats' too (a bare level is the relay's own): it logs the server it connects to at debug.
        let log = drain(
            &db,
            &base.clone().with(&[("QX_NATS__SERVERS", &url), ("QX_RELAY__LOG", "trace,async_nats=trace")]),
        )
        .await;
        assert!(log.contains("attempting connection"), "the client's debug line naming the server:\n{log}");
        assert!(!log.contains(PASSWORD) && !log.contains(TOKEN), "a secret was logged:\n{log}");
    }

    // Credentials the server refuses are a configuration error, named with the server and not logged.
    let url = format!("nats://relay:{WRONG}@127.0.0.1:{}", by_password.port);
    let (code, log) = exit_of(
        &base.clone().with(&[("QX_NATS__SERVERS", &url), ("QX_RELAY__LOG", "trace,async_nats=trace")]),
    )
    .await;
    assert!(!log.contains(WRONG), "the wrong password was logged:\n{log}");
    let server = format!("NATS at 127.0.0.1:{}", by_password.port);
    assert_refused("a wrong password", (code, log), &["credentials refused", &server]);

    // At the default log levels, said once: not again by the client library, nor twice in one line.
    let (code, log) = exit_of(&base.with(&[("QX_NATS__SERVERS", &url)])).await;
    assert_eq!(code, Some(78), "{log}");
    let said: Vec<&str> = log.lines().filter(|line| line.contains("authorization violation")).collect();
    assert_eq!(said.len(), 1, "one line:\n{log}");
    assert_eq!(said[0].matches("authorization violation").count(), 1, "{}", said[0]);
}

#[tokio::test]
async fn a_password_rotated_under_a_running_relay_is_named_as_the_cause() {
    const OLD: &str = "pw-old-7d1e";
    const NEW: &str = "pw-new-3b9a";
    let mut nats = NatsServer::start_with(&["--user", "relay", "--pass", OLD]).await;
    let db = TestDb::create().await;
    let url = format!("nats://relay:{OLD}@127.0.0.1:{}", nats.port);
    let env = RelayEnv::new(&db, "orders").with(&[
        ("QX_NATS__SERVERS", &url),
        ("QX_NATS__RECONNECT_TIME_WAIT_SECONDS", "0.2"),
        ("QX_RELAY__ENSURE_STREAM", "true"),
        ("QX_RELAY__GIVE_UP_AFTER", "5s"),
        ("QX_RELAY__ACK_TIMEOUT", "2s"),
    ]);
    let relay = Relay::spawn(&env, &[]);
    relay.eventually("the relay to run", EXIT, || async { relay.log().contains("stream created") }).await;
    // The server restarts with a new password; the relay still has the old one.
    nats.kill9();
    nats.replace_arg(OLD, NEW);
    nats.restart().await;
    let status = relay.wait(EXIT).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(69), "{log}");
    let server = format!("127.0.0.1:{}", nats.port);
    let warned = log.lines().find(|l| l.contains(" WARN ") && l.contains("authorization violation"));
    assert!(warned.is_some_and(|l| l.contains(&format!("server={server}"))), "the rejection at warn:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    for part in [
        "NATS unavailable for longer than 5s",
        &format!("reconnecting to {server} failed"),
        "authorization violation",
    ] {
        assert!(last.contains(part), "{part:?} missing from the last line: {last}");
    }
    assert!(!log.contains(OLD) && !log.contains(NEW), "a password was logged:\n{log}");
    // The client library's own line for each failed reconnect (every 200 ms here) stays off.
    assert!(!log.contains("async_nats::connector"), "{log}");
}

#[tokio::test]
async fn nats_tls_problems_stop_the_relay_with_one_line_naming_the_server() {
    let pki = Pki::create("relay");
    let (cert, key, ca) = (pki.text("server"), pki.text("server-key"), pki.text("ca"));
    let secured = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--tlscacert",
        &ca,
        "--tlsverify",
    ])
    .await;
    let plaintext = NatsServer::start().await;
    let db = TestDb::create().await;
    db.insert_events(10, "order.placed").await;
    let base = RelayEnv::new(&db, "orders").set("QX_RELAY__ENSURE_STREAM", "true");
    let url = format!("nats://127.0.0.1:{}", secured.port);
    let tls = |ca: &str, client_certificate: bool| {
        with_tls(base.clone().set("QX_NATS__SERVERS", &url), &pki, "QX_NATS", ca, client_certificate)
    };
    drain(&db, &tls("ca", true)).await;

    let server = format!("NATS at 127.0.0.1:{}", secured.port);
    let expected = ["TLS/certificate problem", server.as_str()];
    assert_refused("an untrusted server certificate", exit_of(&tls("other-ca", true)).await, &expected);
    assert_refused("no client certificate", exit_of(&tls("ca", false)).await, &expected);
    let plain_url = format!("nats://127.0.0.1:{}", plaintext.port);
    let required = base.with(&[("QX_NATS__SERVERS", &plain_url), ("QX_NATS__TLS_REQUIRED", "true")]);
    let server = format!("NATS at 127.0.0.1:{}", plaintext.port);
    assert_refused(
        "TLS required of a plaintext server",
        exit_of(&required).await,
        &["TLS/certificate problem", &server],
    );
}

/// Settings for a relay holding a leader lock of this test's own in the Redis at `url`.
fn leader_env(db: &TestDb, stream: &TestStream, url: &str) -> RelayEnv {
    let key = format!("test:{}:leader", Uuid::new_v4().simple());
    RelayEnv::new(db, &stream.prefix).with(&[
        ("QX_RELAY__LEADER", "redis"),
        ("QX_RELAY__LEADER_KEY", &key),
        ("QX_CACHE__URL", url),
        // A relay that took a refusal for an outage would exit 69 after this.
        ("QX_RELAY__GIVE_UP_AFTER", "5s"),
        ("QX_RELAY__ACK_TIMEOUT", "2s"),
    ])
}

#[tokio::test]
async fn a_redis_leader_lock_over_tls_and_its_tls_problems() {
    let pki = Pki::create("relay");
    let (cert, key, ca) = (pki.text("server"), pki.text("server-key"), pki.text("ca"));
    let secured = RedisServer::start_with(|port| {
        let port = port.to_string();
        ["--port", "0", "--tls-port", &port, "--tls-cert-file", &cert, "--tls-key-file", &key]
            .into_iter()
            .chain(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "yes"])
            .map(str::to_owned)
            .collect()
    })
    .await;
    let plaintext = RedisServer::start().await;
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(10, "order.placed").await;
    let url = format!("rediss://127.0.0.1:{}/0", secured.port);
    let tls = |ca: &str, client_certificate: bool| {
        with_tls(leader_env(&db, &stream, &url), &pki, "QX_CACHE", ca, client_certificate)
    };
    let log = drain(&db, &tls("ca", true)).await;
    assert!(log.contains("leader lock acquired"), "published as the leader:\n{log}");

    let expected = ["TLS/certificate problem", url.as_str()];
    assert_refused("an untrusted server certificate", exit_of(&tls("other-ca", true)).await, &expected);
    assert_refused("no client certificate", exit_of(&tls("ca", false)).await, &expected);
    let plain_url = format!("rediss://127.0.0.1:{}/0", plaintext.port);
    let required = leader_env(&db, &stream, &plain_url).set("QX_CACHE__TLS_CA_FILE", &ca);
    assert_refused(
        "TLS to a plaintext server",
        exit_of(&required).await,
        &["TLS/certificate problem", &plain_url],
    );
}

#[tokio::test]
async fn redis_credentials_it_refuses_are_a_configuration_error() {
    const PASSWORD: &str = "pw-7c1e90";
    const WRONG: &str = "wrong-b3a5";
    let redis = RedisServer::start_with(|_| vec!["--requirepass".into(), PASSWORD.into()]).await;
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(10, "order.placed").await;
    let url = |password: &str| format!("redis://:{password}@127.0.0.1:{}/0", redis.port);

    let wrong = leader_env(&db, &stream, &url(WRONG));
    let (code, log) = exit_of(&wrong).await;
    assert!(!log.contains(WRONG), "the password was logged:\n{log}");
    let named = format!("cache.url redis://:***@127.0.0.1:{}/0", redis.port);
    assert_refused(
        "a wrong password",
        (code, log),
        &["credentials refused", &named, "authentication failed"],
    );
    let (code, stdout, _) = run_command(&wrong, &["check"]);
    assert_eq!(code, Some(78), "check: {stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  leader locks: credentials refused")), "{stdout}");

    let none = leader_env(&db, &stream, &format!("redis://127.0.0.1:{}/0", redis.port));
    let named = format!("cache.url redis://127.0.0.1:{}/0", redis.port);
    assert_refused("no password", exit_of(&none).await, &["credentials refused", &named, "NOAUTH"]);

    let log = drain(&db, &leader_env(&db, &stream, &url(PASSWORD))).await;
    assert!(log.contains("leader lock acquired"), "published as the leader:\n{log}");
}

#[tokio::test]
async fn a_redis_that_is_down_is_named_with_its_address() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let env = leader_env(&db, &stream, &url).set("QX_RELAY__GIVE_UP_AFTER", "10s");
    let named = format!("Redis at cache.url {url}: Connection refused");
    let (code, stdout, stderr) = run_command(&env, &["status"]);
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    assert_eq!(stderr.trim_end(), format!("leader locks: {named} (os error 111)"));
    let (code, stdout, _) = run_command(&env, &["check"]);
    assert_eq!(code, Some(69), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with(&format!("FAIL  leader locks: {named}"))), "{stdout}");

    let (code, log) = exit_of(&env).await;
    assert_eq!(code, Some(69), "{log}");
    let standing_by = log.lines().find(|line| line.contains("leader lock backend unavailable; standing by"));
    assert!(standing_by.is_some_and(|line| line.contains(&named)), "{log}");
    assert!(!log.to_ascii_lowercase().contains("redis: redis"), "{log}");
}

#[tokio::test]
async fn postgres_tls_as_asyncpg_and_libpq_mean_it() {
    let pki = Pki::create("certuser");
    let cluster = PgCluster::start_with_tls(
        &pki.path("server"),
        &pki.path("server-key"),
        &pki.path("ca"),
        &["hostssl all certuser 127.0.0.1/32 cert"],
    )
    .await;
    let db = TestDb::create_on(&cluster).await;
    db.execute("CREATE ROLE certuser LOGIN SUPERUSER").await;
    let stream = TestStream::create().await;
    let server = format!("127.0.0.1:{}", cluster.port);
    let env = |url: String| RelayEnv::new(&db, &stream.prefix).set("QX_DB__URL", url);
    let (ca, other_ca) = (pki.text("ca"), pki.text("other-ca"));
    let asyncpg = |query: &str| env(format!("postgresql+asyncpg://postgres@{server}/{}?{query}", db.name));
    let libpq = |user: &str, query: &str| env(format!("postgres://{user}@{server}/{}?{query}", db.name));

    db.insert_events(10, "order.placed").await;
    drain(&db, &asyncpg(&format!("ssl=verify-full&sslrootcert={ca}"))).await;

    let expected = ["TLS/certificate problem", "Postgres at", server.as_str()];
    let untrusted = asyncpg(&format!("ssl=verify-full&sslrootcert={other_ca}"));
    assert_refused(
        "asyncpg's ssl=verify-full, an untrusted certificate",
        exit_of(&untrusted).await,
        &expected,
    );
    let untrusted = libpq("postgres", &format!("sslmode=require&sslrootcert={other_ca}"));
    assert_refused("sslmode=require with a root certificate", exit_of(&untrusted).await, &expected);
    let no_client_cert = libpq("certuser", &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_refused("no client certificate", exit_of(&no_client_cert).await, &expected);

    db.insert_events(10, "order.placed").await;
    let (client_cert, client_key) = (pki.text("client"), pki.text("client-key"));
    let query = format!("sslmode=verify-full&sslrootcert={ca}&sslcert={client_cert}&sslkey={client_key}");
    drain(&db, &libpq("certuser", &query)).await;
}

#[tokio::test]
async fn postgres_without_tls_or_the_role_stops_the_relay_with_78() {
    // initdb leaves TLS off.
    let cluster = PgCluster::start().await;
    let db = TestDb::create_on(&cluster).await;
    let server = format!("127.0.0.1:{}", cluster.port);
    let env = |url: String| RelayEnv::new(&db, "orders").set("QX_DB__URL", url);

    let required = env(format!("postgres://postgres@{server}/{}?sslmode=require", db.name));
    let expected = ["TLS/certificate problem", "Postgres at", server.as_str()];
    assert_refused("TLS required of a plaintext server", exit_of(&required).await, &expected);
    let unknown_role = env(format!("postgres://nobody@{server}/{}", db.name));
    let expected = ["credentials refused", "Postgres at", server.as_str(), "nobody"];
    assert_refused("an unknown role", exit_of(&unknown_role).await, &expected);
}
