//! The accept loop: a connection limit (a semaphore permit per connection, as in
//! mini-redis), accept errors backed off instead of fatal, and a graceful drain of open
//! connections on shutdown.

use super::connection::{self, Timeouts};
use super::state::AppState;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What a connection past MAX_CONNECTIONS is told before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 57\r\n\r\n\
{\"error\":\"too many open connections; retry\",\"field\":null}";

/// Limits of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// MAX_CONNECTIONS.
    pub max_connections: u32,
    /// HEADER_READ_TIMEOUT and KEEP_ALIVE_TIMEOUT.
    pub timeouts: Timeouts,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets every open
/// connection finish its request in flight, and waits up to `drain` for them to close.
/// Returns whether every connection closed in time.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> bool {
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    // Told to every open connection once `shutdown` resolves.
    let stop = CancellationToken::new();
    let mut backoff = Duration::from_millis(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    backoff = Duration::from_millis(1);
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(connection::serve(stream, state.clone(), limits.timeouts, stop.clone(), permit));
                        }
                        Err(_) => {
                            state.http_metrics().http_connections_rejected.inc();
                            tokio::spawn(refuse(stream));
                        }
                    }
                }
                Err(e) => {
                    // Usually EMFILE: keep serving the open connections, retry later.
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    stop.cancel();
    // Every connection holds a permit until it is closed: all permits back = all closed.
    tokio::time::timeout(drain, permits.acquire_many(limits.max_connections))
        .await
        .is_ok_and(|acquired| acquired.is_ok())
}

/// Tells a connection past the limit to come back later, without reading its request.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(REFUSED).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::REFUSED;

    #[test]
    fn the_refusal_is_a_complete_http_response() {
        let text = std::str::from_utf8(REFUSED).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse().ok())
            .expect("content-length");
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert!(json["field"].is_null());
    }
}
