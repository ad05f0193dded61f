//! Credentials and TLS against private servers (tests/common/cluster.rs): credentials written in a NATS server
//! URL are used and never logged, at any level.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::Duration;

use cluster::NatsServer;
use common::{Relay, TestDb};

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
