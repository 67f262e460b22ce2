//! The internal listener (CLUSTER_LISTEN_ADDR): what other nodes call, and nothing else.
//!
//! Every request must carry `Authorization: Bearer <CLUSTER_TOKEN>`; without it the
//! answer is 401 and the attempt is counted (`cluster_unauthorized_total`). Routes:
//! - `POST /cluster/events?sent=MS&deadline=MS` with `X-Cluster-Batch: <incarnation>-<seq>`: a
//!   forwarded batch ([`actors::cluster::wire`]); 200 once every event is queued at its
//!   owner, with the positions of the events that were not (empty body: all were); a
//!   repeat of a key gets the first answer and queues nothing; 400 when it does not
//!   decode or has no key, 410 when it arrives after the sender's deadline (the sender
//!   has given up on it; nothing queued). A batch sent before this node renewed a lapsed
//!   lease is answered as not taken (its sender may have sent it elsewhere meanwhile).
//! - `GET /cluster/ping`: this node's id (the start-up check of CLUSTER_ADVERTISE_ADDR).
//! - `POST /cluster/kick`: the table changed for this node (a shard was passed to it):
//!   it reads the table now.
//!
//! The port is never behind the Service or the Ingress; the NetworkPolicy opens it only
//! between the app's own pods.

use super::{paths, BATCH_HEADER, TOKEN_HEADER};
use crate::http::query_param;
use actors::cluster::{wire, BatchId, Cluster};
use actors::metrics::Metrics;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Largest forwarded body: a full batch of 128-byte device ids fits many times over.
const MAX_BODY: usize = 64 * 1024 * 1024;

struct Internal {
    cluster: Arc<Cluster>,
    metrics: Metrics,
    token: Vec<u8>,
}

/// Serves the internal listener until `stop` turns true; open connections then finish
/// their request in flight.
pub async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    token: &str,
    mut stop: watch::Receiver<bool>,
) {
    let internal = Arc::new(Internal {
        cluster,
        metrics,
        token: format!("Bearer {token}").into_bytes(),
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "internal accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let internal = internal.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let internal = internal.clone();
                async move { Ok::<_, Infallible>(internal.handle(req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Internal {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let authorized = req
            .headers()
            .get(TOKEN_HEADER)
            .is_some_and(|v| same(v.as_bytes(), &self.token));
        if !authorized {
            self.metrics.cluster_unauthorized.inc();
            return answer(StatusCode::UNAUTHORIZED, "missing or wrong cluster token");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, paths::PING) => answer(StatusCode::OK, self.cluster.me().to_string()),
            (&Method::POST, paths::KICK) => {
                self.cluster.kick();
                answer(StatusCode::NO_CONTENT, "")
            }
            (&Method::POST, paths::EVENTS) => self.events(req).await,
            _ => answer(StatusCode::NOT_FOUND, "no such internal route"),
        }
    }

    async fn events(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let deadline = query_param(req.uri(), "deadline").and_then(|v| v.parse::<u64>().ok());
        let sent = query_param(req.uri(), "sent").and_then(|v| v.parse::<u64>().ok());
        let id: Option<BatchId> = req
            .headers()
            .get(BATCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (Some(id), Some(sent)) = (id, sent) else {
            return answer(
                StatusCode::BAD_REQUEST,
                "a forwarded batch needs X-Cluster-Batch and ?sent=",
            );
        };
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let events = match wire::decode(body) {
            Ok(events) => events,
            Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
        };
        // The sender stopped waiting (and its client was told so): taking the events now
        // would count them twice once the client sends them again. Clocks of pods agree
        // to well within a forward timeout.
        if deadline.is_some_and(|d| super::unix_millis() > d) {
            self.metrics.forwarded_batches_expired.inc();
            return answer(StatusCode::GONE, "the sender gave up on this batch");
        }
        // Taken to its end even if the sender hangs up: its retry (same key) gets this
        // answer.
        let cluster = self.cluster.clone();
        match tokio::spawn(async move { cluster.receive(id, sent, events).await }).await {
            Ok(refused) => answer(StatusCode::OK, wire::encode_refused(&refused)),
            Err(_) => answer(StatusCode::INTERNAL_SERVER_ERROR, "taking the batch failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"Bearer abc", b"Bearer abc"));
        assert!(!same(b"Bearer abc", b"Bearer abd"));
        assert!(!same(b"Bearer abc", b"Bearer abcd"));
        assert!(!same(b"", b"Bearer abc"));
    }
}
