//! `GET /anomalies/stream`: the `anomalies` stream as Server-Sent Events, live from the
//! [anomaly feed](super::feed::AnomalyFeed).
//!
//! Each client has its own task and a small bounded buffer in front of its connection: a
//! client that stops reading fills it and is disconnected (and counted) rather than
//! buffered without bound; one that falls behind the broadcast is disconnected the same
//! way. With
//! `Last-Event-ID` a client first replays the stream after that id from the store, then
//! continues live, skipping what it has already had: no gap, no duplicate.

use super::errors::{ApiError, Body};
use super::feed::AnomalyFeed;
use super::query::query_param;
use super::refusal::shutting_down;
use super::state::AppState;
use super::validate;
use crate::auth::{Client, Mode};
use crate::tuning::STREAM_CLIENT_BUFFER;
use crate::tuning::{FEED_POLL_EVERY, FEED_READ_BATCH};
use actors::store::{StreamId, StreamRecord};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// A response body fed frame by frame from a channel; it ends when the client's task
/// drops the sender.
struct EventStream {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Which entries a client gets.
struct Filter {
    device_id: Option<String>,
    prefix: Option<String>,
    client: Option<Arc<Client>>,
}

impl Filter {
    fn admits(&self, record: &StreamRecord) -> bool {
        self.device_id
            .as_ref()
            .is_none_or(|d| *d == record.device_id)
            && self
                .prefix
                .as_ref()
                .is_none_or(|p| record.device_id.starts_with(p.as_str()))
            && self
                .client
                .as_ref()
                .is_none_or(|c| c.covers(&record.device_id))
    }
}

/// One SSE frame.
fn frame(record: &StreamRecord) -> Bytes {
    let device = serde_json::to_string(&record.device_id).unwrap_or_default();
    let analysis = std::str::from_utf8(&record.analysis).unwrap_or("null");
    Bytes::from(format!(
        "id: {id}\nevent: anomaly\ndata: {{\"id\":\"{id}\",\"device_id\":{device},\"signal\":\"{signal}\",\"analysis\":{analysis}}}\n\n",
        id = record.id,
        signal = record.signal,
    ))
}

/// Handles `GET /anomalies/stream`.
pub async fn get(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    match open(state, &req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn open(state: &AppState, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let client = state.authorize(req, Mode::Read)?;
    let Some(feed) = state.feed().cloned() else {
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            "the anomalies stream is off (ANOMALY_STREAM_MAXLEN=0)",
        ));
    };
    if state.is_shutting_down() {
        return Err(shutting_down());
    }
    let device_id = query_param(req.uri(), "device_id");
    let prefix = query_param(req.uri(), "prefix");
    if let Some(d) = &device_id {
        validate::device_id(d)?;
        state.authorize_device(client.as_ref(), d, Mode::Read)?;
    }
    if let (Some(p), Some(c)) = (&prefix, &client) {
        // A prefix inside the token's: the token's must be a prefix of it.
        if !c.covers(p) {
            return Err(state.denied_device(c, p));
        }
    }
    let resume = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .or_else(|| query_param(req.uri(), "last_event_id"))
        .map(|id| {
            StreamId::parse(id.trim()).ok_or_else(|| {
                ApiError::bad_body("Last-Event-ID must be a stream id such as 1700000000000-0")
            })
        })
        .transpose()?;
    let live = feed.subscribe(state.system().store()).await;
    if let Err(max) = feed.admit_client() {
        return Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("MAX_STREAM_CLIENTS ({max}) stream clients are connected; retry shortly"),
        ));
    }
    state.http_metrics().stream_clients.inc();
    let (tx, rx) = mpsc::channel(STREAM_CLIENT_BUFFER);
    let filter = Filter {
        device_id,
        prefix,
        client,
    };
    tokio::spawn(serve_client(state.clone(), feed, filter, resume, tx, live));
    let mut response = Response::new(EventStream { rx }.boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Sends the stream's entries after `after` (and before `until`, when given) from the
/// store; answers the id of the last one read. Replay waits for a slow reader instead of
/// dropping it (it is bounded by the stream's length), but never past shutdown.
async fn replay(
    state: &AppState,
    filter: &Filter,
    mut after: StreamId,
    until: Option<StreamId>,
    tx: &mpsc::Sender<Bytes>,
    shutdown: &CancellationToken,
) -> Result<StreamId, End> {
    loop {
        let read = state
            .system()
            .store()
            .read_anomalies(after, FEED_READ_BATCH);
        let records = tokio::select! {
            r = read => r,
            _ = shutdown.cancelled() => return Err(End::Closed),
        };
        let Ok(records) = records else {
            // The store is down: try again shortly, unless the client left meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(FEED_POLL_EVERY * 50) => {}
                _ = shutdown.cancelled() => return Err(End::Closed),
                _ = tx.closed() => return Err(End::Closed),
            }
            continue;
        };
        let full = records.len() == FEED_READ_BATCH;
        for record in &records {
            if until.is_some_and(|u| record.id >= u) {
                return Ok(after);
            }
            after = record.id;
            if filter.admits(record) {
                tokio::select! {
                    sent = tx.send(frame(record)) => if sent.is_err() { return Err(End::Closed) },
                    _ = shutdown.cancelled() => return Err(End::Closed),
                }
            }
        }
        if !full {
            return Ok(after);
        }
    }
}

/// Why a client's stream ended.
enum End {
    /// The client hung up, or shutdown began.
    Closed,
    /// The client did not keep up.
    TooSlow,
}

async fn serve_client(
    state: AppState,
    feed: Arc<AnomalyFeed>,
    filter: Filter,
    resume: Option<StreamId>,
    tx: mpsc::Sender<Bytes>,
    mut live: broadcast::Receiver<Arc<StreamRecord>>,
) {
    let end = stream_to(&state, &feed, &filter, resume, &tx, &mut live).await;
    if matches!(end, End::TooSlow) {
        state.http_metrics().stream_clients_dropped.inc();
        tracing::info!("anomaly stream client dropped: it did not keep up");
    }
    feed.client_left();
    state.http_metrics().stream_clients.dec();
}

async fn stream_to(
    state: &AppState,
    feed: &AnomalyFeed,
    filter: &Filter,
    resume: Option<StreamId>,
    tx: &mpsc::Sender<Bytes>,
    live: &mut broadcast::Receiver<Arc<StreamRecord>>,
) -> End {
    let send = |bytes: Bytes| match tx.try_send(bytes) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => Err(End::TooSlow),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Closed),
    };
    // A comment first, so that the client sees the stream open at once.
    if let Err(end) = send(Bytes::from_static(b": connected\n\n")) {
        return end;
    }
    let shutdown = state.shutdown_token().clone();
    // Shutdown may have begun since the request's check.
    if shutdown.is_cancelled() {
        return End::Closed;
    }
    let mut sent = resume;
    // After a replay, the first live entry may not follow the replay's last one (the
    // poller may have started reading after the replay ended): the gap is read from the
    // store first.
    let mut fill_gap = false;
    if let Some(after) = resume {
        match replay(state, filter, after, None, tx, &shutdown).await {
            Ok(last) => sent = Some(last),
            Err(end) => return end,
        }
        fill_gap = true;
    }
    let mut heartbeat = tokio::time::interval(feed.heartbeat());
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return End::Closed,
            _ = tx.closed() => return End::Closed,
            _ = heartbeat.tick() => {
                // A token removed or narrowed in AUTH_TOKENS_FILE ends its open streams.
                if !state.still_authorized(filter.client.as_ref()) {
                    return End::Closed;
                }
                if let Err(end) = send(Bytes::from_static(b": heartbeat\n\n")) {
                    return end;
                }
            }
            received = live.recv() => match received {
                Ok(record) => {
                    if sent.is_some_and(|s| record.id <= s) {
                        continue;
                    }
                    if std::mem::take(&mut fill_gap) {
                        if let Some(after) = sent {
                            if let Err(end) =
                                replay(state, filter, after, Some(record.id), tx, &shutdown).await
                            {
                                return end;
                            }
                        }
                    }
                    if !filter.admits(&record) {
                        continue;
                    }
                    sent = Some(record.id);
                    if let Err(end) = send(frame(&record)) {
                        return end;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return End::TooSlow,
                Err(broadcast::error::RecvError::Closed) => return End::Closed,
            },
        }
    }
}
