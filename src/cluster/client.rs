//! The forwarding client: [`Transport`] over pooled keep-alive HTTP/1.1 connections to
//! the peers' internal listeners, every call under CLUSTER_FORWARD_TIMEOUT and carrying
//! CLUSTER_TOKEN.

use super::{paths, BATCH_HEADER, TOKEN_HEADER};
use actors::cluster::{wire, BatchId, ForwardError, Transport};
use actors::device::BoxFuture;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;

/// Idle pooled connections per peer: enough for the forwarder's batches in flight.
const IDLE_PER_PEER: usize = 8;

/// HTTP transport to the other nodes; cheap to clone.
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
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
            token,
            timeout,
        })
    }

    /// One request; the status and body, or why there is none.
    async fn call(
        &self,
        method: Method,
        peer: SocketAddr,
        path_and_query: &str,
        batch: Option<BatchId>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ForwardError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{peer}{path_and_query}"))
            .header(TOKEN_HEADER, self.token.clone());
        if let Some(id) = batch {
            request = request.header(BATCH_HEADER, id.to_string());
        }
        let request = request
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

fn refused(status: StatusCode) -> ForwardError {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        ForwardError::Overloaded
    } else {
        ForwardError::Rejected(status.as_u16())
    }
}

impl Transport for HttpTransport {
    fn send_events(
        &self,
        peer: SocketAddr,
        id: BatchId,
        body: Bytes,
    ) -> BoxFuture<Result<Vec<u32>, ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            // Past this instant the sender has given up on the batch: a copy that reaches
            // the owner later, e.g. retransmitted after a network partition heals, must
            // not be queued. (A retry under the same key is sent with a new deadline.)
            let sent = super::unix_millis();
            let deadline = sent + this.timeout.as_millis() as u64;
            let path = format!("{}?sent={sent}&deadline={deadline}", paths::EVENTS);
            match this.call(Method::POST, peer, &path, Some(id), body).await? {
                (StatusCode::OK, body) => {
                    wire::decode_refused(body).map_err(|_| ForwardError::Rejected(200))
                }
                (status, _) => Err(refused(status)),
            }
        })
    }

    fn ping(&self, peer: SocketAddr) -> BoxFuture<Result<String, ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            match this
                .call(Method::GET, peer, paths::PING, None, Bytes::new())
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
                .call(Method::POST, peer, paths::KICK, None, Bytes::new())
                .await?
            {
                (StatusCode::NO_CONTENT, _) => Ok(()),
                (status, _) => Err(ForwardError::Rejected(status.as_u16())),
            }
        })
    }
}
