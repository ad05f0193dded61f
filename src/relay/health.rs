//! HTTP probes and metrics: `/livez` (the process answers), `/readyz` (Postgres and NATS reachable) and
//! `/metrics` (Prometheus text, rendered by metrics-exporter-prometheus).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::metrics::Exporter;
use super::publisher::RelayPublisher;
use super::store::OutboxStore;

/// A readiness probe must answer well within Kubernetes' default 1 s timeout.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// What the probes look at; filled in as the relay connects.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    dependencies: OnceLock<(OutboxStore, RelayPublisher)>,
    leading: std::sync::atomic::AtomicBool,
}

impl Health {
    /// Called once connected; until then `/readyz` says 503.
    pub fn set_dependencies(&self, store: OutboxStore, publisher: RelayPublisher) {
        let _ = self.inner.dependencies.set((store, publisher));
    }

    /// Whether this relay currently publishes its shard (shown on `/readyz`).
    pub fn set_leading(&self, leading: bool) {
        self.inner.leading.store(leading, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this relay currently publishes its shard.
    pub fn is_leading(&self) -> bool {
        self.inner.leading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ready: Postgres answers and NATS is connected. A standby is ready too: it can take over at once.
    async fn readiness(&self) -> (StatusCode, String) {
        let Some((store, publisher)) = self.inner.dependencies.get() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
        };
        let postgres = tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(store.pool()))
            .await
            .is_ok_and(|r| r.is_ok());
        let nats = publisher.is_connected();
        let role =
            if self.inner.leading.load(std::sync::atomic::Ordering::Relaxed) { "leader" } else { "standby" };
        let status = if postgres && nats { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, format!("postgres: {}\nnats: {}\nrole: {role}\n", up(postgres), up(nats)))
    }
}

fn up(ok: bool) -> &'static str {
    if ok {
        "up"
    } else {
        "down"
    }
}

/// Installs the Prometheus recorder and serves the endpoints on `addr` until `shutdown`.
///
/// # Errors
/// When `addr` cannot be bound or a recorder is already installed.
pub async fn serve(addr: SocketAddr, health: Health, shutdown: CancellationToken) -> std::io::Result<()> {
    let metrics = super::metrics::install(shutdown.clone()).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        debug!(error = %err, "accept failed");
                        continue;
                    }
                },
            };
            let (health, metrics) = (health.clone(), metrics.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, health.clone(), metrics.clone()));
                if let Err(err) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    debug!(error = %err, "probe connection failed");
                }
            });
        }
    });
    Ok(())
}

async fn respond(
    request: Request<Incoming>,
    health: Health,
    metrics: Exporter,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body, content_type) = match request.uri().path() {
        "/livez" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" => {
            let (status, body) = health.readiness().await;
            (status, body, "text/plain")
        }
        "/metrics" => (StatusCode::OK, metrics.render(), "text/plain; version=0.0.4"),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned(), "text/plain"),
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static status and header are valid");
    Ok(response)
}
