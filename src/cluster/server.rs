//! The internal listener (CLUSTER_LISTEN_ADDR): what other nodes call, and nothing else.
//!
//! Every request must carry `Authorization: Bearer <CLUSTER_TOKEN>`; without it the
//! answer is 401 and the attempt is counted (`cluster_unauthorized_total`). Routes:
//! - `POST /cluster/events?deadline=MS`: a forwarded batch ([`actors::cluster::wire`]);
//!   200 once every event is queued here (the acknowledgement), 503 when it does not fit
//!   under MAX_PENDING_EVENTS (nothing was queued), 400 when it does not decode, 410 when
//!   it arrives after the sender's deadline (the sender has re-routed it; nothing queued).
//! - `GET /cluster/ping`: `member`, `starting` or `leaving`; `?rejoin=1` from a peer
//!   that does not count this node as a member makes it resync its device actors.
//! - `POST /cluster/release?device_id=ID` (from `X-Cluster-From: ip:port`): hand the
//!   device to the caller; 200 with its final window, 204 when there is none, 409 when
//!   its queue did not drain in time. Run to its end even when the caller hangs up: a
//!   release left half-way would leave the device's slot closed. (When this node is
//!   taking the device from the caller at the same moment and keeps it, the 200 or 204
//!   lends its newest window; see `Handoff::keeps`.)
//!
//! The port is never behind the Service or the Ingress; the NetworkPolicy opens it only
//! between the app's own pods.

use super::{paths, FROM_HEADER, TOKEN_HEADER};
use crate::http::query_param;
use actors::cluster::{wire, Cluster, ReleaseError};
use actors::device::SubmitError;
use actors::metrics::Metrics;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
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
            (&Method::GET, paths::PING) => {
                if req.uri().query() == Some("rejoin=1") {
                    self.cluster.request_resync();
                }
                answer(StatusCode::OK, self.cluster.membership().state().as_str())
            }
            (&Method::POST, paths::EVENTS) => self.events(req).await,
            (&Method::POST, paths::RELEASE) => self.release(req).await,
            _ => answer(StatusCode::NOT_FOUND, "no such internal route"),
        }
    }

    async fn events(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let deadline = query_param(req.uri(), "deadline").and_then(|v| v.parse::<u64>().ok());
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let events = match wire::decode(body) {
            Ok(events) => events,
            Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
        };
        // The sender stopped waiting (timed out, re-routed the events): taking them now
        // would count them twice. Clocks of pods agree to well within a forward timeout.
        if deadline.is_some_and(|d| super::unix_millis() > d) {
            self.metrics.forwarded_batches_expired.inc();
            return answer(StatusCode::GONE, "the sender gave up on this batch");
        }
        match self.cluster.receive(events).await {
            Ok(()) => answer(StatusCode::OK, ""),
            Err(SubmitError::Overloaded) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "MAX_PENDING_EVENTS reached",
            ),
            Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn release(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let from: Option<SocketAddr> = req
            .headers()
            .get(FROM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let device = query_param(req.uri(), "device_id");
        let (Some(from), Some(device)) = (from, device) else {
            return answer(
                StatusCode::BAD_REQUEST,
                "release needs ?device_id= and X-Cluster-From",
            );
        };
        let cluster = self.cluster.clone();
        let device: Arc<str> = Arc::from(device);
        let released =
            tokio::spawn(async move { cluster.handoff().release(device, from).await }).await;
        let Ok(released) = released else {
            return answer(StatusCode::INTERNAL_SERVER_ERROR, "the release failed");
        };
        match released {
            Ok(Some(window)) => answer(StatusCode::OK, window.to_bytes()),
            Ok(None) => answer(StatusCode::NO_CONTENT, ""),
            Err(e @ ReleaseError::Busy(_)) => answer(StatusCode::CONFLICT, e.to_string()),
            Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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
