//! The HTTP endpoint at `relay.metrics_addr`: `/livez`, `/readyz` (judged by [`Health`]) and `/metrics`
//! (rendered by metrics-exporter-prometheus), for GET and HEAD.
//!
//! Whoever reaches the port must not be able to take the relay down with it: headers must arrive within a few
//! seconds, connections are capped, and a failing accept (no file descriptor left) pauses the accept loop
//! instead of spinning it.

use std::convert::Infallible;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::health::Health;
use super::metrics::Exporter;

/// How long a client may take to send a request's headers, on a new or a kept-alive connection; then the
/// connection is closed. Probes and scrapers send theirs at once.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection stays open: a client that stops reading its response would otherwise keep it.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once; one beyond them is closed at once. Probes and scrapers need a few; the cap
/// keeps clients from taking the file descriptors that the relay's Postgres and NATS connections need.
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed accept. Out of file descriptors, accept fails at once for as long as a connection
/// waits in the backlog: without a pause the loop would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);
/// Repeat a warning about the endpoint at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Installs the Prometheus recorder and serves the endpoints on `addr` until `shutdown`.
///
/// # Errors
/// When `addr` cannot be bound or a recorder is already installed.
pub async fn serve(addr: SocketAddr, health: Health, shutdown: CancellationToken) -> std::io::Result<()> {
    let metrics = super::metrics::install(shutdown.clone()).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(accept_loop(listener, health, metrics, shutdown));
    Ok(())
}

async fn accept_loop(listener: TcpListener, health: Health, metrics: Exporter, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (mut accept_warned, mut full_warned) = (None, None);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // That connection is gone; the listener is fine.
            Err(err) if is_connection_error(err.kind()) => continue,
            Err(err) => {
                if warn_due(&mut accept_warned) {
                    warn!(error = %err, pause = ?ACCEPT_BACKOFF,
                          "metrics endpoint cannot accept connections; pausing");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if warn_due(&mut full_warned) {
                warn!(
                    max = MAX_CONNECTIONS,
                    "metrics endpoint has all the connections it serves; closing new ones"
                );
            }
            continue; // dropping the stream closes it
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            serve_connection(stream, health, metrics).await;
            drop(slot);
        });
    }
}

async fn serve_connection(stream: TcpStream, health: Health, metrics: Exporter) {
    let service = service_fn(move |request| respond(request, health.clone(), metrics.clone()));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(error = %err, "probe connection failed"),
        Err(_) => debug!(lifetime = ?CONNECTION_LIFETIME, "probe connection open too long; closed"),
    }
}

async fn respond(
    request: Request<Incoming>,
    health: Health,
    metrics: Exporter,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".to_owned());
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    Ok(match request.uri().path() {
        "/livez" => {
            let (status, body) = health.liveness(Instant::now());
            text(status, body)
        }
        "/readyz" => {
            let (status, body) = health.readiness().await;
            text(status, body)
        }
        "/metrics" => response(StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain", body)
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static status and header are valid")
}

/// Accept errors that concern one connection (it was reset before we took it), not the listener.
fn is_connection_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused)
}

/// Whether a warning last given at `last` may be repeated now; if so, now becomes its last time.
fn warn_due(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
        return false;
    }
    *last = Some(Instant::now());
    true
}
