//! The internal listener (CLUSTER_LISTEN_ADDR): what other nodes call, and nothing else.
//!
//! Every request must carry `Authorization: Bearer <CLUSTER_TOKEN>`; without it the
//! answer is 401 and the attempt is counted (`cluster_unauthorized_total`). Routes:
//! - `GET /cluster/stream` with `Upgrade: iot-cluster-stream/1`: 101, and the connection
//!   becomes a stream of forwarded batches and their answers ([`super::frame`],
//!   `stream`). Each batch is answered once every event is queued at its owner,
//!   with the positions of those that were not; a repeat of a key gets the first answer
//!   and queues nothing. A batch sent before this node renewed a lapsed lease is answered
//!   as not taken (its sender may have sent it elsewhere meanwhile).
//! - `GET /cluster/ping`: this node's id (the start-up check of CLUSTER_ADVERTISE_ADDR).
//! - `POST /cluster/kick`: the table changed for this node (a shard was passed to it):
//!   it reads the table now.
//!
//! The port is never behind the Service or the Ingress; the NetworkPolicy opens it only
//! between the app's own pods.

use super::frame::{self, PROTOCOL};
use super::{paths, TOKEN_HEADER};
use actors::cluster::Cluster;
use actors::metrics::Metrics;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Internal {
    cluster: Arc<Cluster>,
    metrics: Metrics,
    token: Vec<u8>,
    stop: CancellationToken,
}

/// Serves the internal listener until `stop` is cancelled; open connections then finish
/// their request in flight, and streams the batches they have read.
pub async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    token: &str,
    stop: CancellationToken,
) {
    let internal = Arc::new(Internal {
        cluster,
        metrics,
        token: format!("Bearer {token}").into_bytes(),
        stop: stop.clone(),
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
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
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let internal = internal.clone();
                async move { Ok::<_, Infallible>(internal.handle(req)) }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
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
    fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            (&Method::GET, paths::STREAM) => self.upgrade(req),
            _ => answer(StatusCode::NOT_FOUND, "no such internal route"),
        }
    }

    /// Switches the connection to a stream of forwarded batches.
    fn upgrade(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let asked = req
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
        if !asked {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("{} needs Upgrade: {PROTOCOL}", paths::STREAM),
            );
        }
        let this = self.clone();
        tokio::spawn(async move {
            let tcp = match hyper::upgrade::on(req).await {
                Ok(upgraded) => frame::into_tcp(upgraded),
                Err(e) => Err(std::io::Error::other(e)),
            };
            match tcp {
                Ok((tcp, early)) => {
                    let (cluster, metrics) = (this.cluster.clone(), this.metrics.clone());
                    super::stream::serve(tcp, early, cluster, metrics, this.stop.clone()).await;
                }
                Err(e) => tracing::debug!(error = %e, "cluster stream upgrade failed"),
            }
        });
        let mut response = answer(StatusCode::SWITCHING_PROTOCOLS, "");
        let headers = response.headers_mut();
        headers.insert(
            CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        headers.insert(UPGRADE, hyper::header::HeaderValue::from_static(PROTOCOL));
        response
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
