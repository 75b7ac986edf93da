//! Graceful shutdown from one cancellation token (README, "Operations"): SIGTERM or SIGINT
//! cancels it; `/readyz` fails at once, workers stop claiming, and the server stops accepting;
//! in-flight requests and jobs then get `shutdown_timeout` to finish or be released.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = token.cancelled() => return,
        };
        tracing::info!(signal, "shutting down: no new work is taken");
        token.cancel();
    });
}
