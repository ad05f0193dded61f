//! Wake-ups on insert: LISTEN on `relay.notify_channel`, so an idle relay claims at once instead of at its next
//! poll.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::store::OutboxStore;

/// Wait before listening again after LISTEN failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(2);

/// Wakes the relay loop on every NOTIFY; polling covers notifications lost while reconnecting.
pub async fn listen(
    store: OutboxStore,
    channel: String,
    wake: watch::Sender<()>,
    shutdown: CancellationToken,
) {
    loop {
        let mut listener = match store.listen(&channel).await {
            Ok(listener) => listener,
            Err(err) => {
                warn!(error = %err, %channel, "LISTEN failed; polling only for now");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RELISTEN_AFTER) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                notification = listener.recv() => match notification {
                    Ok(_) => wake.send_replace(()),
                    Err(err) => {
                        warn!(error = %err, %channel, "LISTEN connection lost");
                        break;
                    }
                },
            }
        }
    }
}
