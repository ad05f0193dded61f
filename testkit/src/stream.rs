//! A JetStream stream of a run's own, capturing a subject prefix of its own.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use uuid::Uuid;

use crate::servers::{NatsCluster, NatsServer};
use crate::{clean_up_blocking, env_var};

/// The dedupe window of [`TestStream::config`]: longer than any test.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);

/// Stream `T<uuid>` capturing `t<uuid>.>`; deleted on drop.
pub struct TestStream {
    pub name: String,
    pub prefix: String,
    pub jetstream: jetstream::Context,
    /// The server to delete it from on drop; `None` on a private server, whose store goes with the server.
    shared_url: Option<String>,
}

impl TestStream {
    /// One on the server of `NATS_URL`.
    pub async fn create() -> Self {
        let stream = Self::unattached().await;
        stream.attach().await;
        stream
    }

    /// Names and a connection to the server of `NATS_URL`, but no stream yet.
    pub async fn unattached() -> Self {
        let url = env_var("NATS_URL");
        Self::connect(&url, Some(url.clone())).await
    }

    /// One on a private server.
    pub async fn create_on(server: &NatsServer) -> Self {
        let stream = Self::unattached_on(server).await;
        stream.attach().await;
        stream
    }

    /// Names and a connection to a private server, but no stream yet.
    pub async fn unattached_on(server: &NatsServer) -> Self {
        Self::connect(&server.url(), None).await
    }

    /// Names and a connection to a private cluster, reconnecting to any of its servers, but no stream yet.
    pub async fn unattached_on_cluster(cluster: &NatsCluster) -> Self {
        Self::connect(&cluster.urls().join(","), None).await
    }

    /// `url` may list several servers, comma-separated.
    async fn connect(url: &str, shared_url: Option<String>) -> Self {
        let servers: Vec<async_nats::ServerAddr> =
            url.split(',').map(|server| server.parse().expect("a NATS server URL")).collect();
        let client = async_nats::connect(servers)
            .await
            .unwrap_or_else(|err| panic!("connect to NATS at {url}: {err}"));
        let id = Uuid::new_v4().simple().to_string();
        Self {
            name: format!("T{id}"),
            prefix: format!("t{id}"),
            jetstream: jetstream::new(client),
            shared_url,
        }
    }

    /// What [`Self::attach`] creates: the prefix captured, with a dedupe window longer than any test.
    pub fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        }
    }

    /// Creates the stream as [`Self::config`] says.
    pub async fn attach(&self) {
        self.attach_with(self.config()).await;
    }

    /// Creates the stream as `config` says: [`Self::config`] with changes.
    pub async fn attach_with(&self, config: stream::Config) {
        self.jetstream.create_stream(config).await.expect("create stream");
    }

    /// Messages stored.
    pub async fn count(&self) -> u64 {
        let mut stream = self.jetstream.get_stream(&self.name).await.expect("get stream");
        stream.info().await.expect("stream info").state.messages
    }

    /// Every message in the stream, in stream order, read by a consumer that acknowledges nothing.
    pub async fn messages(&self) -> Vec<jetstream::Message> {
        let mut stream = self.jetstream.get_stream(&self.name).await.expect("get stream");
        let total = stream.info().await.expect("stream info").state.messages as usize;
        let reader = stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                // One replica: a replicated stream missing a peer still gets a reader.
                num_replicas: 1,
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
            assert!(
                messages.len() > before,
                "stream reported {total} messages but delivered {}",
                messages.len()
            );
        }
        messages
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let Some(url) = self.shared_url.take() else { return };
        let name = self.name.clone();
        clean_up_blocking(async move {
            if let Ok(client) = async_nats::connect(url).await {
                let _ = jetstream::new(client).delete_stream(&name).await;
            }
        });
    }
}
