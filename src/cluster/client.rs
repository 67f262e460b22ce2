//! The forwarding client: [`Transport`] to the peers' internal listeners, every call
//! under CLUSTER_FORWARD_TIMEOUT and carrying CLUSTER_TOKEN. Forwarded batches go over
//! one persistent stream per peer (`link`); the rare calls (`ping`, `kick`) are
//! plain HTTP/1.1 requests on pooled connections.

use super::link::Links;
use super::{frame, paths, TOKEN_HEADER};
use crate::tuning::IDLE_PER_PEER;
use actors::cluster::{BatchId, ForwardError, Transport};
use actors::device::BoxFuture;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// HTTP transport to the other nodes; cheap to clone.
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    links: Arc<Links>,
    token: HeaderValue,
    timeout: Duration,
}

impl HttpTransport {
    /// A transport sending `token` with every request, each bounded by `timeout`.
    pub fn new(token: &str, timeout: Duration) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_PER_PEER)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let mut token = HeaderValue::from_str(&format!("Bearer {token}"))?;
        token.set_sensitive(true);
        Ok(Self {
            client,
            links: Arc::new(Links::new(token.clone(), timeout)),
            token,
            timeout,
        })
    }

    /// One request; the status and body, or why there is none.
    async fn call(
        &self,
        method: Method,
        peer: SocketAddr,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ForwardError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{peer}{path}"))
            .header(TOKEN_HEADER, self.token.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(body))
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ForwardError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ForwardError::Timeout)?
    }
}

impl Transport for HttpTransport {
    fn send_events(
        &self,
        peer: SocketAddr,
        id: BatchId,
        body: Bytes,
    ) -> BoxFuture<Result<Vec<u32>, ForwardError>> {
        let links = self.links.clone();
        // Past the deadline the sender has given up on the batch: a copy that reaches the
        // owner later, e.g. retransmitted after a network partition heals, must not be
        // queued. (A retry under the same key is sent with a new deadline.)
        let sent = super::unix_millis();
        let frame = frame::encode_batch(id, sent, sent + self.timeout.as_millis() as u64, &body);
        Box::pin(async move { links.send(peer, id, frame).await })
    }

    fn ping(&self, peer: SocketAddr) -> BoxFuture<Result<String, ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            match this
                .call(Method::GET, peer, paths::PING, Bytes::new())
                .await?
            {
                (StatusCode::OK, body) => {
                    String::from_utf8(body.to_vec()).map_err(|_| ForwardError::Rejected(200))
                }
                (status, _) => Err(ForwardError::Rejected(status.as_u16())),
            }
        })
    }

    fn kick(&self, peer: SocketAddr) -> BoxFuture<Result<(), ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            match this
                .call(Method::POST, peer, paths::KICK, Bytes::new())
                .await?
            {
                (StatusCode::NO_CONTENT, _) => Ok(()),
                (status, _) => Err(ForwardError::Rejected(status.as_u16())),
            }
        })
    }
}
