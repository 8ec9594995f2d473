//! Signals: the first SIGTERM or SIGINT asks for a graceful stop; a second one exits at
//! once (the broker still requeues whatever was unacknowledged).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit status after a second signal cut the drain short.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Cancels `token` on the first signal and exits the process on the second.
pub fn install(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "stopping gracefully; send the signal again to exit at once"
        );
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second signal: exiting now");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(())
}
