//! The anomaly feed: one poller per process reads new entries of the `anomalies` stream
//! from the store (Redis, so entries appended by any replica appear on every replica; or
//! the embedded store) while clients are connected, and fans them out over a broadcast
//! channel to every `GET /anomalies/stream` client. It also counts the clients against
//! MAX_STREAM_CLIENTS.

use crate::tuning::{FEED_CAPACITY, FEED_POLL_EVERY, FEED_READ_BATCH};
use actors::store::{Store, StreamId, StreamRecord};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

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
    /// Subscribes a new client to the live entries. Subscribed before the client's
    /// response goes out, and the stream's end read after that: every entry appended once
    /// the client has its response reaches it (the poller reads on from no later than
    /// here). Unknown while the store is down: then the poller starts where it first reads
    /// the stream. Nothing here needs undoing if the client leaves meanwhile.
    pub async fn subscribe(&self, store: &Store) -> broadcast::Receiver<Arc<StreamRecord>> {
        let live = self.tx.subscribe();
        if let Ok(now) = store.last_anomaly_id().await {
            self.subscribed_at(now);
        }
        self.subscribed.notify_one();
        live
    }

    /// Counts a new client, unless MAX_STREAM_CLIENTS are connected (then `Err` with
    /// that bound). Each admitted client is released with [`AnomalyFeed::client_left`].
    pub fn admit_client(&self) -> Result<(), usize> {
        if self.clients.fetch_add(1, Ordering::AcqRel) >= self.max_clients {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            return Err(self.max_clients);
        }
        Ok(())
    }

    /// An admitted client has gone.
    pub fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
    }

    /// STREAM_HEARTBEAT_INTERVAL.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

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
        stopped: CancellationToken,
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

    async fn poll(self: Arc<Self>, store: Store, stopped: CancellationToken) {
        // Where the feed stands; `None` while nobody listens (a new listener starts live).
        let mut last: Option<StreamId> = None;
        let mut tick = tokio::time::interval(FEED_POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.cancelled() => return,
            }
            let hint = self.take_start_hint();
            if self.tx.receiver_count() == 0 {
                last = None;
                // No timer work while nobody listens: sleep until a client subscribes.
                tokio::select! {
                    _ = self.subscribed.notified() => {}
                    _ = stopped.cancelled() => return,
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
            match store.read_anomalies(after, FEED_READ_BATCH).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use actors::analytics::Signal;
    use actors::store::{EmbeddedStore, StreamEntry};
    use bytes::Bytes;

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
        let stopped = CancellationToken::new();
        let feed = AnomalyFeed::start(
            Store::Embedded(store.clone()),
            10,
            Duration::from_secs(60),
            stopped.clone(),
        );
        // The poller's first round: nobody listens, so it goes to sleep.
        tokio::time::sleep(FEED_POLL_EVERY * 5).await;
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
