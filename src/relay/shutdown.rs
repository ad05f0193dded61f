//! Turns SIGTERM, SIGINT and SIGHUP into a cancellation token: the first signal asks for a drain, the second
//! exits at once. The only `process::exit` of the relay.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::low_level::signal_name;
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::exit::ExitCode;

/// The signals that stop the relay. SIGHUP too: there is no config to reload, and its default action would
/// kill the relay mid-batch, without a drain and with its leader lock held.
const STOP_SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGHUP];

/// Cancels `shutdown` on the first SIGTERM, SIGINT or SIGHUP; exits with [`ExitCode::Interrupted`] on the
/// second.
///
/// # Errors
/// When the signal handlers cannot be registered.
pub fn listen(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new(STOP_SIGNALS)?;
    tokio::spawn(async move {
        let mut first = true;
        while let Some(number) = signals.next().await {
            let signal = signal_name(number).unwrap_or("signal");
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
