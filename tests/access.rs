//! Credentials and TLS against private servers (tests/common/cluster.rs) and a CA made for the test
//! (tests/common/pki.rs): credentials written in a NATS server URL are used and never logged, at any level;
//! Redis over TLS holds the leader lock.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::time::Duration;

use cluster::{NatsServer, RedisServer};
use common::{Relay, TestDb, TestStream};
use pki::{text, Pki};
use uuid::Uuid;

const DRAIN: Duration = Duration::from_secs(30);

/// `env` with `pairs` set, replacing earlier values of the same variables.
fn with(mut env: Vec<(String, String)>, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    env.retain(|(key, _)| !pairs.iter().any(|(k, _)| k == key));
    env.extend(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

/// Runs the relay until every row of `db` is published, stops it with SIGTERM; its log.
async fn drain(db: &TestDb, env: &[(String, String)]) -> String {
    let mut relay = Relay::spawn(env, &[]);
    let deadline = tokio::time::Instant::now() + DRAIN;
    while db.unpublished().await > 0 {
        if let Some(status) = relay.child.try_wait().expect("poll relay") {
            panic!("relay exited ({status}) before publishing every row; log:\n{}", relay.log());
        }
        assert!(tokio::time::Instant::now() < deadline, "rows left unpublished; log:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.signal("TERM");
    let status = relay.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "relay exit; log:\n{}", relay.log());
    relay.log()
}

#[tokio::test]
async fn nats_credentials_in_the_server_url_are_used_and_never_logged() {
    const PASSWORD: &str = "pw-9f3a7c";
    const TOKEN: &str = "tok-5e8b21";
    let by_password = NatsServer::start_with(&["--user", "relay", "--pass", PASSWORD]).await;
    let by_token = NatsServer::start_with(&["--auth", TOKEN]).await;
    let db = TestDb::create().await;
    let base = with(Relay::env(&db, "orders"), &[("QX_RELAY__ENSURE_STREAM", "true")]);
    for (server, userinfo) in [(&by_password, format!("relay:{PASSWORD}")), (&by_token, TOKEN.to_owned())] {
        db.insert_events(20, "order.placed").await;
        let url = format!("nats://{userinfo}@127.0.0.1:{}", server.port);
        // Every crate at every level: async-nats logs the server it connects to at debug.
        let log =
            drain(&db, &with(base.clone(), &[("QX_NATS__SERVERS", &url), ("QX_RELAY__LOG", "trace")])).await;
        assert!(log.contains("attempting connection"), "the client's debug line naming the server:\n{log}");
        assert!(!log.contains(PASSWORD) && !log.contains(TOKEN), "a secret was logged:\n{log}");
    }
    db.drop().await;
}

/// Settings for a relay holding a leader lock of this test's own in the Redis at `url`.
fn leader_env(db: &TestDb, stream: &TestStream, url: &str) -> Vec<(String, String)> {
    let key = format!("test:{}:leader", Uuid::new_v4().simple());
    let env = Relay::env(db, &stream.prefix);
    with(env, &[("QX_RELAY__LEADER", "redis"), ("QX_RELAY__LEADER_KEY", &key), ("QX_CACHE__URL", url)])
}

#[tokio::test]
async fn a_redis_leader_lock_over_tls() {
    let pki = Pki::create("relay");
    let (cert, key, ca) = (text(&pki.server_cert()), text(&pki.server_key()), text(&pki.ca()));
    let secured = RedisServer::start_with(|port| {
        let port = port.to_string();
        ["--port", "0", "--tls-port", &port, "--tls-cert-file", &cert, "--tls-key-file", &key]
            .into_iter()
            .chain(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "yes"])
            .map(str::to_owned)
            .collect()
    })
    .await;
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    db.insert_events(10, "order.placed").await;
    let url = format!("rediss://127.0.0.1:{}/0", secured.port);
    let (client_cert, client_key) = (text(&pki.client_cert()), text(&pki.client_key()));
    let tls = [
        ("QX_CACHE__TLS_CA_FILE", ca.as_str()),
        ("QX_CACHE__TLS_CERT_FILE", &client_cert),
        ("QX_CACHE__TLS_KEY_FILE", &client_key),
    ];
    let log = drain(&db, &with(leader_env(&db, &stream, &url), &tls)).await;
    assert!(log.contains("leader lock acquired"), "published as the leader:\n{log}");
    stream.delete().await;
    db.drop().await;
}
