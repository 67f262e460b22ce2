//! `GET /anomalies/stream`: the `anomalies` stream as Server-Sent Events.
//!
//! One poller per process reads new stream entries from the store (Redis, so entries
//! appended by any replica appear on every replica; or the embedded store) while clients
//! are connected, and fans them out over a broadcast channel. Each client has its own
//! task and a small bounded buffer in front of its connection: a client that stops
//! reading fills it and is disconnected (and counted) rather than buffered without
//! bound; one that falls behind the broadcast is disconnected the same way. With
//! `Last-Event-ID` a client first replays the stream after that id from the store, then
//! continues live, skipping what it has already had: no gap, no duplicate.

use super::errors::{ApiError, Body};
use super::AppState;
use crate::auth::{Client, Mode};
use actors::store::{Store, StreamId, StreamRecord};
use bytes::Bytes;
use http_body_util::Either;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// How often the poller reads the store while clients are connected: well inside the
/// FLUSH_INTERVAL + 10 ms that an anomaly may take to reach a client.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Entries read per store call.
const READ_BATCH: usize = 512;
/// Entries the broadcast holds for the slowest client before it counts as lagging.
const FEED_CAPACITY: usize = 4096;
/// Frames waiting in front of one client's connection before it counts as not reading.
const CLIENT_BUFFER: usize = 256;

/// A response body fed frame by frame from a channel.
pub struct EventStream {
    rx: mpsc::Receiver<Bytes>,
    /// Kept for as long as the body lives (the connection's in-flight mark).
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl EventStream {
    /// Keeps `value` alive until the body is dropped.
    pub fn hold(&mut self, value: Box<dyn std::any::Any + Send + Sync>) {
        self.held = Some(value);
    }
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

/// The live feed of stream entries, shared by every client.
pub struct AnomalyFeed {
    tx: broadcast::Sender<Arc<StreamRecord>>,
    /// Wakes the poller when a client subscribes (it sleeps while nobody listens).
    subscribed: tokio::sync::Notify,
    /// Where the stream stood when the earliest client not yet seen by the poller
    /// subscribed: the poller reads on from there (or from where it was, if earlier), so
    /// an entry appended after a client subscribed is never skipped, even when the poller
    /// wakes from idle and first reads the stream's end later than the client did.
    start_hint: std::sync::Mutex<Option<StreamId>>,
    clients: AtomicUsize,
    max_clients: usize,
    heartbeat: Duration,
}

impl AnomalyFeed {
    /// A client subscribed when the stream's last entry was `at`: the poller, if idle,
    /// starts no later than there.
    fn subscribed_at(&self, at: StreamId) {
        let mut hint = self
            .start_hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *hint = Some(hint.map_or(at, |h| h.min(at)));
    }

    fn take_start_hint(&self) -> Option<StreamId> {
        self.start_hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Starts the poller over `store`; it reads only while clients are connected.
    pub fn start(
        store: Store,
        max_clients: usize,
        heartbeat: Duration,
        stopped: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(FEED_CAPACITY);
        let feed = Arc::new(Self {
            tx,
            subscribed: tokio::sync::Notify::new(),
            start_hint: std::sync::Mutex::new(None),
            clients: AtomicUsize::new(0),
            max_clients,
            heartbeat,
        });
        tokio::spawn(feed.clone().poll(store, stopped));
        feed
    }

    async fn poll(self: Arc<Self>, store: Store, mut stopped: watch::Receiver<bool>) {
        // Where the feed stands; `None` while nobody listens (a new listener starts live).
        let mut last: Option<StreamId> = None;
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let hint = self.take_start_hint();
            if self.tx.receiver_count() == 0 {
                last = None;
                // No timer work while nobody listens: sleep until a client subscribes.
                tokio::select! {
                    _ = self.subscribed.notified() => {}
                    _ = stopped.changed() => return,
                }
                continue;
            }
            // A client that subscribed before the poller's own first read, but read the
            // stream's end earlier, moves the feed back: entries in between were never sent
            // (clients skip what they already have).
            let after = match last.into_iter().chain(hint).min() {
                Some(id) => id,
                None => match store.last_anomaly_id().await {
                    Ok(id) => {
                        last = Some(id);
                        continue;
                    }
                    Err(_) => continue,
                },
            };
            // Kept even if this read fails: the next round must not start from the end.
            last = Some(after);
            match store.read_anomalies(after, READ_BATCH).await {
                Ok(records) => {
                    for record in records {
                        last = Some(record.id);
                        let _ = self.tx.send(Arc::new(record));
                    }
                }
                // An outage: the entries are read once the store answers again.
                Err(e) => tracing::debug!(error = %e, "anomaly feed: store read failed"),
            }
        }
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
    let Some(feed) = state.inner.feed.clone() else {
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            "the anomalies stream is off (ANOMALY_STREAM_MAXLEN=0)",
        ));
    };
    if state.is_shutting_down() {
        return Err(super::ingest::shutting_down());
    }
    let device_id = super::query_param(req.uri(), "device_id");
    let prefix = super::query_param(req.uri(), "prefix");
    if let Some(d) = &device_id {
        super::validate::device_id(d)?;
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
        .or_else(|| super::query_param(req.uri(), "last_event_id"))
        .map(|id| {
            StreamId::parse(id.trim()).ok_or_else(|| {
                ApiError::bad_body("Last-Event-ID must be a stream id such as 1700000000000-0")
            })
        })
        .transpose()?;
    // Subscribed before the response goes out, and the stream's end read after that: every
    // entry appended once the client has its response reaches it (the poller reads on from
    // no later than here). Unknown while the store is down: then the poller starts where it
    // first reads the stream. Nothing here needs undoing if the client leaves meanwhile.
    let live = feed.tx.subscribe();
    if let Ok(now) = state.system().store().last_anomaly_id().await {
        feed.subscribed_at(now);
    }
    feed.subscribed.notify_one();
    if feed.clients.fetch_add(1, Ordering::AcqRel) >= feed.max_clients {
        feed.clients.fetch_sub(1, Ordering::AcqRel);
        return Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "MAX_STREAM_CLIENTS ({}) stream clients are connected; retry shortly",
                feed.max_clients
            ),
        ));
    }
    state.http_metrics().stream_clients.inc();
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let filter = Filter {
        device_id,
        prefix,
        client,
    };
    tokio::spawn(serve_client(state.clone(), feed, filter, resume, tx, live));
    let mut response = Response::new(Either::Right(EventStream { rx, held: None }));
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
    shutdown: &mut watch::Receiver<bool>,
) -> Result<StreamId, End> {
    loop {
        let read = state.system().store().read_anomalies(after, READ_BATCH);
        let records = tokio::select! {
            r = read => r,
            _ = shutdown.changed() => return Err(End::Closed),
        };
        let Ok(records) = records else {
            // The store is down: try again shortly, unless the client left meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY * 50) => {}
                _ = shutdown.changed() => return Err(End::Closed),
                _ = tx.closed() => return Err(End::Closed),
            }
            continue;
        };
        let full = records.len() == READ_BATCH;
        for record in &records {
            if until.is_some_and(|u| record.id >= u) {
                return Ok(after);
            }
            after = record.id;
            if filter.admits(record) {
                tokio::select! {
                    sent = tx.send(frame(record)) => if sent.is_err() { return Err(End::Closed) },
                    _ = shutdown.changed() => return Err(End::Closed),
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
    feed.clients.fetch_sub(1, Ordering::AcqRel);
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
    let mut shutdown = state.shutdown_watch();
    // Shutdown may have begun between the request's check and this subscription.
    if *shutdown.borrow_and_update() {
        return End::Closed;
    }
    let mut sent = resume;
    // After a replay, the first live entry may not follow the replay's last one (the
    // poller may have started reading after the replay ended): the gap is read from the
    // store first.
    let mut fill_gap = false;
    if let Some(after) = resume {
        match replay(state, filter, after, None, tx, &mut shutdown).await {
            Ok(last) => sent = Some(last),
            Err(end) => return end,
        }
        fill_gap = true;
    }
    let mut heartbeat = tokio::time::interval(feed.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return End::Closed,
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
                                replay(state, filter, after, Some(record.id), tx, &mut shutdown).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use actors::analytics::Signal;
    use actors::store::{EmbeddedStore, StreamEntry};

    fn append(store: &EmbeddedStore, device: &str) {
        let entry = StreamEntry {
            device_id: device.into(),
            signal: Signal::Rps,
            analysis: Bytes::from_static(b"{}"),
            uid: device.to_string(),
        };
        store.append_anomalies(&[entry], 100);
    }

    /// A client subscribes while the poller sleeps (nobody listened), and an anomaly is
    /// appended before the poller wakes and first reads the stream: the client must still
    /// get it. (On this single-threaded runtime the poller runs only where the test awaits.)
    #[tokio::test]
    async fn an_entry_appended_before_an_idle_poller_wakes_reaches_the_new_client() {
        let store = Arc::new(EmbeddedStore::new());
        append(&store, "before");
        let (_stop, stopped) = watch::channel(false);
        let feed = AnomalyFeed::start(
            Store::Embedded(store.clone()),
            10,
            Duration::from_secs(60),
            stopped,
        );
        // The poller's first round: nobody listens, so it goes to sleep.
        tokio::time::sleep(POLL_EVERY * 5).await;
        // What `open` does for a new client, with the append in the middle.
        let mut live = feed.tx.subscribe();
        feed.subscribed_at(store.last_anomaly_id());
        append(&store, "after");
        feed.subscribed.notify_one();
        let record = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("an entry within 5 s")
            .expect("the feed is open");
        assert_eq!(record.device_id, "after");
    }
}
