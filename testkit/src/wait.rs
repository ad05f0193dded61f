//! Waiting for something to happen: the one polling loop every test, the benchmark and the servers use.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`poll`] looks again: short against every wait here, long enough not to load what it asks.
const EVERY: Duration = Duration::from_millis(10);

/// Asks `check` every 10 ms until it yields a value; `None` once `limit` has passed.
pub async fn poll<T, F, Fut>(limit: Duration, check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_every(EVERY, limit, check).await
}

/// [`poll`], looking again every `every`.
pub(crate) async fn poll_every<T, F, Fut>(every: Duration, limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `check` holds; panics naming `what` once `limit` has passed.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !holds_within(limit, check).await {
        panic!("waited {limit:?} for {what}");
    }
}

/// Whether `check` holds within `limit`.
pub(crate) async fn holds_within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(limit, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}
