//! The embedded store: an in-process key-value map with per-key expiry, standing in for
//! Redis on a single machine with the same semantics (expired keys read as absent).
//!
//! A `DashMap` rather than a `Mutex<HashMap>`: `/analyze` readers on many connections and
//! the writer's flushes touch different shards, and nothing is held across `.await`.

use bytes::Bytes;
use dashmap::DashMap;
use std::time::Duration;
use tokio::time::Instant;

/// In-process key-value store with TTL.
#[derive(Debug, Default)]
pub struct EmbeddedStore {
    entries: DashMap<String, (Bytes, Instant)>,
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

    /// Number of entries, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no entry is held.
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
        store.purge_expired();
        assert!(store.is_empty());
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
}
