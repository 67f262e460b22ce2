//! The forwarding client: [`Transport`] over pooled keep-alive HTTP/1.1 connections to
//! the peers' internal listeners, every call under CLUSTER_FORWARD_TIMEOUT and carrying
//! CLUSTER_TOKEN.

use super::{paths, FROM_HEADER, TOKEN_HEADER};
use actors::cluster::{ForwardError, PeerState, Transport};
use actors::device::BoxFuture;
use actors::store::WindowSnapshot;
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

/// Idle pooled connections per peer: enough for the forwarder's batches in flight.
const IDLE_PER_PEER: usize = 8;

/// HTTP transport to the other nodes; cheap to clone.
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    token: HeaderValue,
    me: HeaderValue,
    timeout: Duration,
}

impl HttpTransport {
    /// A transport from node `me`, sending `token` with every request, each bounded by
    /// `timeout`.
    pub fn new(me: SocketAddr, token: &str, timeout: Duration) -> anyhow::Result<Self> {
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
            me: HeaderValue::from_str(&me.to_string())?,
            timeout,
        })
    }

    /// One request; the status and body, or why there is none.
    async fn call(
        &self,
        method: Method,
        peer: SocketAddr,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ForwardError> {
        self.call_within(self.timeout, method, peer, path_and_query, body)
            .await
    }

    async fn call_within(
        &self,
        timeout: Duration,
        method: Method,
        peer: SocketAddr,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ForwardError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{peer}{path_and_query}"))
            .header(TOKEN_HEADER, self.token.clone())
            .header(FROM_HEADER, self.me.clone())
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
        tokio::time::timeout(timeout, exchange)
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
    fn send_events(&self, peer: SocketAddr, body: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            // Past this instant the sender has given up on the batch (and re-routed it):
            // a copy that reaches the owner later, e.g. retransmitted after a network
            // partition heals, must not be queued a second time.
            let deadline = super::unix_millis() + this.timeout.as_millis() as u64;
            let path = format!("{}?deadline={deadline}", paths::EVENTS);
            match this.call(Method::POST, peer, &path, body).await? {
                (StatusCode::OK, _) => Ok(()),
                (status, _) => Err(refused(status)),
            }
        })
    }

    fn ping(&self, peer: SocketAddr, rejoin: bool) -> BoxFuture<Result<PeerState, ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            let path = if rejoin {
                paths::PING_REJOIN
            } else {
                paths::PING
            };
            match this.call(Method::GET, peer, path, Bytes::new()).await? {
                (StatusCode::OK, body) => std::str::from_utf8(&body)
                    .ok()
                    .and_then(PeerState::parse)
                    .ok_or(ForwardError::Rejected(200)),
                (status, _) => Err(ForwardError::Rejected(status.as_u16())),
            }
        })
    }

    fn release(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        let this = self.clone();
        Box::pin(async move {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("device_id", &device)
                .finish();
            let path = format!("{}?{query}", paths::RELEASE);
            match this
                .call_within(
                    // The holder may take up to three timeouts (the queue's drain, the
                    // actor's stop, the writer's answer), and it takes the window out of
                    // its writer at the end: giving up before it answers would drop that
                    // window (seen under CPU starvation: one event lost at a scale-in).
                    this.timeout * 4,
                    Method::POST,
                    peer,
                    &path,
                    Bytes::new(),
                )
                .await?
            {
                (StatusCode::OK, body) => WindowSnapshot::decode(&body)
                    .map(Some)
                    .map_err(|_| ForwardError::Rejected(200)),
                (StatusCode::NO_CONTENT, _) => Ok(None),
                (status, _) => Err(ForwardError::Rejected(status.as_u16())),
            }
        })
    }
}
