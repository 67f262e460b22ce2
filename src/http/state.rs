//! What every request handler can reach: the actor system and the ingest path, the
//! cluster, the client tokens, the anomaly feed, the front end's metrics, the body limits,
//! and whether shutdown has begun; and the authorisation checks over the tokens.

use super::body::Limit;
use super::errors::ApiError;
use super::feed::AnomalyFeed;
use super::metrics::HttpMetrics;
use super::request_log::RequestLog;
use crate::auth::{Auth, Client, Denied, Mode};
use actors::cluster::Cluster;
use actors::device::SubmitError;
use actors::event::{DeviceId, Event};
use actors::ingest::Ingest;
use actors::System;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

impl BodyLimits {
    /// The limit of a `POST /metric` body.
    pub(super) fn event(&self) -> Limit {
        Limit {
            bytes: self.max_body_bytes,
            setting: "MAX_BODY_BYTES",
            timeout: self.body_read_timeout,
        }
    }

    /// The limit of a `POST /metric/batch` body.
    pub(super) fn batch(&self) -> Limit {
        Limit {
            bytes: self.max_batch_bytes,
            setting: "MAX_BATCH_BYTES",
            timeout: self.body_read_timeout,
        }
    }
}

/// What every request handler can reach; cloned per connection (an `Arc` inside).
/// What the API serves from.
pub struct Parts {
    pub system: Arc<System>,
    /// Takes the events in (local or forwarded, logged or not).
    pub ingest: Ingest,
    pub cluster: Option<Arc<Cluster>>,
    /// The client tokens; `None`: the API is open.
    pub auth: Option<Arc<Auth>>,
    /// The anomaly stream; `None`: off.
    pub feed: Option<Arc<AnomalyFeed>>,
    pub http_metrics: Arc<HttpMetrics>,
    pub limits: BodyLimits,
    /// Cancelled when shutdown begins ([`AppState::begin_shutdown`]).
    pub shutdown: CancellationToken,
}

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
    limits: BodyLimits,
    shutdown_began: OnceLock<Instant>,
    /// Cancelled when shutdown begins (long-lived responses end on it).
    shutdown: CancellationToken,
}

impl AppState {
    /// State over a running actor system, taking events through `ingest`.
    pub fn new(parts: Parts) -> Self {
        let Parts {
            system,
            ingest,
            cluster,
            auth,
            feed,
            http_metrics,
            limits,
            shutdown,
        } = parts;
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
                limits,
                shutdown_began: OnceLock::new(),
                shutdown,
            }),
        }
    }

    /// The body limits (MAX_BODY_BYTES, MAX_BATCH_BYTES, MAX_BATCH_EVENTS,
    /// BODY_READ_TIMEOUT).
    pub(super) fn body_limits(&self) -> BodyLimits {
        self.inner.limits
    }

    /// The anomaly feed, unless the stream is off (ANOMALY_STREAM_MAXLEN=0).
    pub(super) fn feed(&self) -> Option<&Arc<AnomalyFeed>> {
        self.inner.feed.as_ref()
    }

    pub(super) fn system(&self) -> &System {
        &self.inner.system
    }

    pub(super) fn http_metrics(&self) -> &Arc<HttpMetrics> {
        &self.inner.http_metrics
    }

    pub(super) fn request_log(&self) -> &Arc<RequestLog> {
        &self.inner.request_log
    }

    pub(super) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// The client behind the request's token, when AUTH_TOKENS_FILE is set (`None`:
    /// open). Refusals are counted and answered 401 or 403.
    pub(super) fn authorize<B>(
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
    pub(super) fn authorize_device(
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
    pub(super) fn denied_device(&self, client: &Arc<Client>, what: &str) -> ApiError {
        self.denied(&Denied::Device(client.clone(), Mode::Read), Some(what))
    }

    /// Whether the client a long-lived response was opened for may still read (its token
    /// may have been removed or narrowed since).
    pub(super) fn still_authorized(&self, client: Option<&Arc<Client>>) -> bool {
        match (&self.inner.auth, client) {
            (Some(auth), Some(client)) => auth.tokens().still_has(client),
            _ => true,
        }
    }

    /// Counts a refusal and makes its error.
    pub(super) fn denied(&self, denied: &Denied, device: Option<&str>) -> ApiError {
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
    pub(super) async fn submit(
        &self,
        device_id: &DeviceId<impl AsRef<str> + Sync>,
        event: Event,
    ) -> Result<(), SubmitError> {
        self.inner.ingest.submit(device_id, event).await
    }

    /// Accepts the events of a batch (see [`Ingest::submit_batch`]).
    pub(super) async fn submit_batch(
        &self,
        events: Vec<super::validate::Decoded<'_>>,
    ) -> Result<Vec<usize>, SubmitError> {
        self.inner.ingest.submit_batch(events).await
    }

    pub(super) fn ingest(&self) -> &Ingest {
        &self.inner.ingest
    }

    /// From now on `/ready` answers 503, no event is accepted, and in a cluster the node
    /// leaves the ring.
    pub fn begin_shutdown(&self) {
        let _ = self.inner.shutdown_began.set(Instant::now());
        self.inner.shutdown.cancel();
        // This node hands its shards to the others; forwarded events are still taken.
        if let Some(cluster) = self.cluster() {
            cluster.leave();
        }
    }

    /// Cancelled when shutdown begins.
    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// When shutdown began, if it has.
    pub fn shutdown_began(&self) -> Option<Instant> {
        self.inner.shutdown_began.get().copied()
    }

    pub(super) fn is_shutting_down(&self) -> bool {
        self.inner.shutdown_began.get().is_some()
    }
}
