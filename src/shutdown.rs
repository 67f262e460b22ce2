//! Waiting for the signal that starts a graceful shutdown.

use std::future::Future;

/// Listens for SIGTERM (what Kubernetes sends when it stops a pod) and SIGINT (Ctrl-C)
/// from now on, and resolves on the first. The handlers are installed here, at once, not
/// when the future is first polled: a SIGTERM that arrives between start-up and the
/// server's first look at the future must start a graceful shutdown, not kill the process
/// with the default action.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received"),
                        _ = int.recv() => tracing::info!("SIGINT received"),
                    }
                }
                (term, int) => {
                    let error = term.err().or(int.err()).map(|e| e.to_string());
                    tracing::warn!(error = ?error, "cannot listen for SIGTERM/SIGINT; falling back to Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
