//! Turns SIGTERM/SIGINT into a cancellation token; a second signal ends the process at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Spawns the signal listener; the returned token is cancelled at the first signal.
pub fn install() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; finishing the current batch"),
            _ = int.recv() => tracing::info!("SIGINT received; finishing the current batch"),
        }
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!(
            "second signal: exiting now; uncommitted lines are read again at the next start"
        );
        // The one exit outside main: the user asked twice.
        std::process::exit(130);
    });
    token
}
