//! The HTTP front end: the route table (`routes`), the router, one file per endpoint, the
//! JSON error type, the request and connection metrics, and the server (accept loop,
//! connection limits, graceful drain).

mod analyze;
mod batch;
mod body;
mod connection;
mod errors;
mod ingest;
mod metrics;
mod probes;
mod request_log;
mod router;
mod routes;
mod scrape;
mod server;
mod stream;
mod validate;

pub use connection::Timeouts;
pub use metrics::HttpMetrics;
pub use server::{serve, Limits};
pub use stream::AnomalyFeed;

use crate::auth::{Auth, Client, Denied, Mode};
use actors::cluster::Cluster;
use actors::device::SubmitError;
use actors::event::Event;
use actors::ingest::Ingest;
use actors::System;
use errors::ApiError;
use request_log::RequestLog;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// The (URL-decoded) value of query parameter `name`, if present. The one query parser
/// of the binary: the endpoints, the failure log and the internal listener use it.
pub fn query_param(uri: &hyper::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The limits of request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// MAX_BODY_BYTES.
    pub max_body_bytes: usize,
    /// MAX_BATCH_BYTES.
    pub max_batch_bytes: usize,
    /// MAX_BATCH_EVENTS.
    pub max_batch_events: usize,
    /// BODY_READ_TIMEOUT.
    pub body_read_timeout: Duration,
}

/// What every request handler can reach; cloned per connection (an `Arc` inside).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    system: Arc<System>,
    ingest: Ingest,
    cluster: Option<Arc<Cluster>>,
    auth: Option<Arc<Auth>>,
    feed: Option<Arc<AnomalyFeed>>,
    http_metrics: Arc<HttpMetrics>,
    request_log: Arc<RequestLog>,
    max_body_bytes: usize,
    max_batch_bytes: usize,
    max_batch_events: usize,
    body_read_timeout: Duration,
    shutdown_began: OnceLock<Instant>,
    /// Turns true when shutdown begins (long-lived responses end on it).
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// State over a running actor system, taking events through `ingest`.
    pub fn new(
        system: Arc<System>,
        ingest: Ingest,
        cluster: Option<Arc<Cluster>>,
        auth: Option<Arc<Auth>>,
        feed: Option<Arc<AnomalyFeed>>,
        http_metrics: Arc<HttpMetrics>,
        limits: BodyLimits,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                system,
                ingest,
                cluster,
                auth,
                feed,
                http_metrics,
                request_log: Arc::new(RequestLog::new(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                )),
                max_body_bytes: limits.max_body_bytes,
                max_batch_bytes: limits.max_batch_bytes,
                max_batch_events: limits.max_batch_events,
                body_read_timeout: limits.body_read_timeout,
                shutdown_began: OnceLock::new(),
                shutdown: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    fn system(&self) -> &System {
        &self.inner.system
    }

    fn http_metrics(&self) -> &Arc<HttpMetrics> {
        &self.inner.http_metrics
    }

    fn request_log(&self) -> &Arc<RequestLog> {
        &self.inner.request_log
    }

    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// The client behind the request's token, when AUTH_TOKENS_FILE is set (`None`:
    /// open). Refusals are counted and answered 401 or 403.
    fn authorize<B>(
        &self,
        req: &hyper::Request<B>,
        need: Mode,
    ) -> Result<Option<Arc<Client>>, ApiError> {
        let Some(auth) = &self.inner.auth else {
            return Ok(None);
        };
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        auth.check(header, need)
            .map(Some)
            .map_err(|denied| self.denied(&denied, None))
    }

    /// Whether `client` (from [`AppState::authorize`]) may touch `device`.
    fn authorize_device(
        &self,
        client: Option<&Arc<Client>>,
        device: &str,
        need: Mode,
    ) -> Result<(), ApiError> {
        match client {
            Some(c) if !c.covers(device) => {
                Err(self.denied(&Denied::Device(c.clone(), need), Some(device)))
            }
            _ => Ok(()),
        }
    }

    /// 403 for reading devices (`what`: an id or a prefix) outside the client's prefix.
    fn denied_device(&self, client: &Arc<Client>, what: &str) -> ApiError {
        self.denied(&Denied::Device(client.clone(), Mode::Read), Some(what))
    }

    /// Whether the client a long-lived response was opened for may still read (its token
    /// may have been removed or narrowed since).
    fn still_authorized(&self, client: Option<&Arc<Client>>) -> bool {
        match (&self.inner.auth, client) {
            (Some(auth), Some(client)) => auth.tokens().still_has(client),
            _ => true,
        }
    }

    /// Counts a refusal and makes its error.
    fn denied(&self, denied: &Denied, device: Option<&str>) -> ApiError {
        self.http_metrics().auth_failure(denied.reason());
        let status = if denied.is_unauthenticated() {
            hyper::StatusCode::UNAUTHORIZED
        } else {
            hyper::StatusCode::FORBIDDEN
        };
        let mut error = ApiError::status(status, denied.message(device));
        if matches!(denied, Denied::Device(..)) {
            error.field = Some("device_id");
        }
        error
    }

    /// Accepts an event (see [`Ingest::submit`]).
    async fn submit(&self, device_id: &str, event: Event) -> Result<(), SubmitError> {
        self.inner.ingest.submit(device_id, event).await
    }

    /// Accepts the events of a batch (see [`Ingest::submit_batch`]).
    async fn submit_batch(
        &self,
        events: Vec<(std::borrow::Cow<'_, str>, Event)>,
    ) -> Result<Vec<usize>, SubmitError> {
        self.inner.ingest.submit_batch(events).await
    }

    fn ingest(&self) -> &Ingest {
        &self.inner.ingest
    }

    /// From now on `/ready` answers 503, no event is accepted, and in a cluster the node
    /// leaves the ring.
    pub fn begin_shutdown(&self) {
        let _ = self.inner.shutdown_began.set(Instant::now());
        self.inner.shutdown.send_replace(true);
        // This node hands its shards to the others; forwarded events are still taken.
        if let Some(cluster) = self.cluster() {
            cluster.leave();
        }
    }

    /// Changes when shutdown begins.
    fn shutdown_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// When shutdown began, if it has.
    pub fn shutdown_began(&self) -> Option<Instant> {
        self.inner.shutdown_began.get().copied()
    }

    fn is_shutting_down(&self) -> bool {
        self.inner.shutdown_began.get().is_some()
    }
}
