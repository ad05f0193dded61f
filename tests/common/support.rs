//! Helpers the tests, `examples/chaos.rs` and the drain benchmark all need: starting the relay with only the
//! settings given, pointing a Postgres URL at another database, and reading back everything a stream holds.
//!
//! Stand-alone (no `common` items), so the example and the benchmark include it by path.
// Each includer uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

/// `qx-relay` at `bin` with a clean environment (PATH kept) plus `env`, so no `QX_*` variable of the
/// caller leaks into a run.
pub fn relay_command(bin: impl AsRef<Path>, env: &[(String, String)]) -> Command {
    let mut command = Command::new(bin.as_ref());
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)));
    command
}

/// Replaces the database of a `postgres://…/db` URL, keeping its query.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("the Postgres URL names a database");
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// Every message in stream `name`, in stream order, read by a consumer that acknowledges nothing.
pub async fn stream_messages(jetstream: &jetstream::Context, name: &str) -> Vec<jetstream::Message> {
    let mut stream = jetstream.get_stream(name).await.expect("get stream");
    let total = stream.info().await.expect("stream info").state.messages as usize;
    let reader = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("create reader");
    let mut messages = Vec::with_capacity(total);
    while messages.len() < total {
        let mut batch = reader
            .fetch()
            // Small enough that a fetch of 1 MB messages arrives well within its expiry.
            .max_messages(100)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let before = messages.len();
        while let Some(message) = batch.next().await {
            messages.push(message.expect("message"));
        }
        assert!(messages.len() > before, "stream reported {total} messages but delivered {}", messages.len());
    }
    messages
}
