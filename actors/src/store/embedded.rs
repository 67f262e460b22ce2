//! The embedded store: an in-process key-value map with per-key expiry, standing in for
//! Redis on a single machine with the same semantics (expired keys read as absent).
//!
//! A `DashMap` rather than a `Mutex<HashMap>`: `/analyze` readers on many connections and
//! the writer's flushes touch different shards, and nothing is held across `.await`.

use super::{StreamEntry, StreamId, StreamRecord};
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// In-process key-value store with TTL, and the anomaly stream.
#[derive(Debug, Default)]
pub struct EmbeddedStore {
    entries: DashMap<String, (Bytes, Instant)>,
    stream: Mutex<Stream>,
}

/// The in-memory `anomalies` stream: ids as Redis makes them, trimmed to the bound.
#[derive(Debug, Default)]
struct Stream {
    entries: VecDeque<StreamRecord>,
    last: StreamId,
}

impl EmbeddedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets every entry, each expiring `ttl` from now.
    pub fn set_many(&self, entries: impl IntoIterator<Item = (String, Bytes)>, ttl: Duration) {
        let expires = Instant::now() + ttl;
        for (key, value) in entries {
            self.entries.insert(key, (value, expires));
        }
    }

    /// The value of `key` unless absent or expired.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        let entry = self.entries.get(key)?;
        let (value, expires) = entry.value();
        (*expires > now).then(|| value.clone())
    }

    /// Removes expired entries, so that memory follows the live key set.
    pub fn purge_expired(&self) {
        let now = Instant::now();
        self.entries.retain(|_, (_, expires)| *expires > now);
    }

    /// Appends to the stream (ids `<ms>-<seq>`, never going back), keeping the newest
    /// `maxlen`.
    pub fn append_anomalies(&self, entries: &[StreamEntry], maxlen: usize) {
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for entry in entries {
            let id = if now > stream.last.0 {
                StreamId(now, 0)
            } else {
                StreamId(stream.last.0, stream.last.1 + 1)
            };
            stream.last = id;
            stream.entries.push_back(StreamRecord {
                id,
                device_id: entry.device_id.to_string(),
                signal: entry.signal.as_str().to_string(),
                analysis: entry.analysis.clone(),
            });
        }
        while stream.entries.len() > maxlen {
            stream.entries.pop_front();
        }
    }

    /// Up to `count` stream entries after `after`.
    pub fn read_anomalies(&self, after: StreamId, count: usize) -> Vec<StreamRecord> {
        let stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let start = stream.entries.partition_point(|e| e.id <= after);
        stream.entries.range(start..).take(count).cloned().collect()
    }

    /// The newest stream id (`0-0` when nothing was appended).
    pub fn last_anomaly_id(&self) -> StreamId {
        self.stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last
    }

    /// Test only: number of entries, expired ones not yet purged included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Test only: true when no entry is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_ttl() {
        let store = EmbeddedStore::new();
        store.set_many(
            vec![("k".into(), Bytes::from_static(b"v"))],
            Duration::from_secs(5),
        );
        assert_eq!(store.get("k").as_deref(), Some(&b"v"[..]));
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(store.get("k").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(store.get("k").is_none());
        assert_eq!(store.len(), 1, "expired, not yet purged");
        assert!(!store.is_empty());
        store.purge_expired();
        assert!(store.is_empty());
        assert_eq!(store.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rewrite_extends_expiry() {
        let store = EmbeddedStore::new();
        let ttl = Duration::from_secs(5);
        store.set_many(vec![("k".into(), Bytes::from_static(b"1"))], ttl);
        tokio::time::advance(Duration::from_secs(4)).await;
        store.set_many(vec![("k".into(), Bytes::from_static(b"2"))], ttl);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(store.get("k").as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn stream_ids_are_the_append_time_and_never_go_back() {
        let store = EmbeddedStore::new();
        let entry = StreamEntry {
            device_id: "d".into(),
            signal: crate::analytics::Signal::Rps,
            analysis: Bytes::from_static(b"{}"),
            uid: "u".into(),
        };
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        // Many within one millisecond: the sequence number tells them apart.
        for _ in 0..50 {
            store.append_anomalies(&vec![entry.clone(); 20], 10_000);
        }
        let ids: Vec<StreamId> = store
            .read_anomalies(StreamId(0, 0), 10_000)
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert!(ids[0].0 >= before, "{:?} is before {before}", ids[0]);
        assert_eq!(store.last_anomaly_id(), ids[999]);
        assert_eq!(
            store.read_anomalies(ids[997], 10).len(),
            2,
            "read after an id"
        );
        // Trimmed to the newest `maxlen`, exactly.
        store.append_anomalies(&vec![entry.clone(); 5], 10);
        let kept = store.read_anomalies(StreamId(0, 0), 10_000);
        assert_eq!(kept.len(), 10);
        assert_eq!(kept[9].id, store.last_anomaly_id());
        assert_eq!(kept[4].id, ids[999], "the 5 newest before them");
    }
}
