//! Turns SIGTERM/SIGINT into a cancellation token: the first signal asks for a drain, the second exits at once.
//! The only `process::exit` of the relay.

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ExitCode;

/// Cancels `shutdown` on the first SIGTERM or SIGINT; exits with [`ExitCode::Interrupted`] on the second.
///
/// # Errors
/// When the signal handlers cannot be registered.
pub fn listen(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    tokio::spawn(async move {
        let mut first = true;
        while let Some(signal) = signals.next().await {
            if first {
                info!(signal, "signal received: stopping claims, finishing in-flight work");
                shutdown.cancel();
                first = false;
            } else {
                warn!(signal, "second signal: exiting now; unmarked rows will be published again");
                std::process::exit(ExitCode::Interrupted as i32);
            }
        }
    });
    Ok(())
}
