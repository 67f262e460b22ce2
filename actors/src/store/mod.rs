//! The store seam: where analyses and windows live between events and across restarts.
//!
//! [`Store`] is an enum over the two backends rather than a trait object: there are
//! exactly two, the calls are async, and an enum keeps them monomorphic and cheap to
//! clone. Both have the same semantics: `SET key value` with an expiry on every write,
//! `GET key`. The writer actor ([`WriterActor`]) is the only writer; the HTTP front end only reads.
//!
//! Redis is [`RedisStore`]: plain `redis://`, or `rediss://` with the TLS material of
//! [`RedisTls`].
//!
//! Keys (the same as the original service's for analyses):
//! - `analysis:{device_id}`: the `/analyze` JSON.
//! - `window:{device_id}`: the device's rolling window (see `store::snapshot` for the
//!   format), written with the analysis at most every WINDOW_CHECKPOINT_INTERVAL (and
//!   when its actor stops), with the same expiry.

mod embedded;
mod fenced;
mod inbox;
mod redis;
mod snapshot;
pub mod stream_id;
mod tls;
mod writer;

pub use embedded::EmbeddedStore;
pub use inbox::{Batch, Checkpoint, Inbox, Record, StreamEntry};
pub use redis::RedisStore;
pub use snapshot::{SnapshotError, Version, WindowSnapshot};
pub use stream_id::StreamId;
pub use tls::{ClientIdentity, PemError, RedisTls, TlsError};
pub use writer::{StoreHealth, WriterActor, WriterArgs, WriterMsg};

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Key of a device's analysis.
pub fn analysis_key(device_id: &str) -> String {
    format!("analysis:{device_id}")
}

/// Key of a device's persisted window.
pub fn window_key(device_id: &str) -> String {
    format!("window:{device_id}")
}

/// The Redis stream of anomalous results (`XADD anomalies MAXLEN ~ …`).
pub const ANOMALY_STREAM: &str = "anomalies";

/// An entry read back from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// Its id.
    pub id: StreamId,
    /// The device.
    pub device_id: String,
    /// `rps` or `cpu`.
    pub signal: String,
    /// The analysis JSON.
    pub analysis: Bytes,
}

/// How a cluster fences its writes: which shard and epoch a device's keys are written
/// under, and what to do when the table refused them. Implemented by the cluster's
/// ownership state.
pub trait Fence: Send + Sync {
    /// This node's id in the table.
    fn owner(&self) -> &str;
    /// The shard of `device` and the epoch under which this node owns it; `None` when it
    /// does not own it (the write is dropped: the shard's owner has the window).
    fn lease(&self, device: &str) -> Option<(u32, u64)>;
    /// The table refused writes of these shards: another node owns them now.
    fn lost(&self, shards: &[u32]);
    /// The table has no entry for these shards (Redis restarted empty): this node, which
    /// holds them, should claim them again.
    fn orphaned(&self, shards: &[u32]);
}

/// One device's keys, written together.
#[derive(Debug, Clone)]
pub struct DeviceWrite {
    /// The device.
    pub device: Arc<str>,
    /// `analysis:{id}` and its JSON.
    pub analysis: (String, Bytes),
    /// `window:{id}`, and its snapshot bytes (see [`WindowSnapshot`]) on a checkpoint.
    pub window: (String, Option<Bytes>),
}

impl DeviceWrite {
    /// Keys this write sets.
    pub fn keys(&self) -> usize {
        1 + usize::from(self.window.1.is_some())
    }
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] bb8_redis::redis::RedisError),
    /// No pooled connection within the deadline, because dialling failed (refused, TLS
    /// handshake, authentication).
    #[error("cannot connect to redis: {0}")]
    Connect(#[source] bb8_redis::redis::RedisError),
    /// TLS settings were given for a URL that is not `rediss://`.
    #[error("TLS settings need a rediss:// URL")]
    TlsWithoutRediss,
    /// A task running a store operation panicked or was cancelled.
    #[error("store task failed: {0}")]
    TaskFailed(#[from] tokio::task::JoinError),
    /// The store did not answer within the deadline (a pooled connection included).
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// A stored window could not be decoded.
    #[error("corrupt value under {key}: {source}")]
    Corrupt {
        /// The key read.
        key: String,
        /// Why it did not decode.
        source: SnapshotError,
    },
    /// In a cluster: the table has no entry for shards this node holds (Redis lost it);
    /// their results are kept until this node has claimed them again.
    #[error("the cluster table has no entry for {0} shards this node holds")]
    Unowned(usize),
    /// In a cluster: the shard table kept changing during a flush's transaction.
    #[error("the cluster table changed during every try of the flush")]
    Contended,
    /// In a cluster: this member's ingest-log stream does not exist any more (it was
    /// collected after this member was declared dead, or Redis lost it); nothing was
    /// appended.
    #[error("the ingest-log stream {0} is gone")]
    StreamGone(String),
    /// A result could not be serialised.
    #[error("encoding a result: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The store backend.
#[derive(Clone, Debug)]
pub enum Store {
    /// In-process map with expiry; the default when REDIS_URL is unset.
    Embedded(Arc<EmbeddedStore>),
    /// Redis through a bb8 pool.
    Redis(RedisStore),
}

impl Store {
    /// Whether writes are fenced by shard (a cluster).
    pub fn is_guarded(&self) -> bool {
        matches!(self, Store::Redis(s) if s.is_guarded())
    }

    /// A short name for logs and readiness checks.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Redis(_) => "redis",
        }
    }

    /// Writes every device's analysis and window with expiry `ttl`.
    pub async fn write(&self, writes: Vec<DeviceWrite>, ttl: Duration) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.set_many(
                    writes.into_iter().flat_map(|w| {
                        let (key, window) = w.window;
                        std::iter::once(w.analysis).chain(window.map(|bytes| (key, bytes)))
                    }),
                    ttl,
                );
                Ok(())
            }
            Store::Redis(s) => s.write(writes, ttl).await,
        }
    }

    /// Appends anomalies to the stream, oldest first, trimming it to about `maxlen`.
    pub async fn append_anomalies(
        &self,
        entries: &[StreamEntry],
        maxlen: usize,
    ) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.append_anomalies(entries, maxlen);
                Ok(())
            }
            Store::Redis(s) => s.append_anomalies(entries, maxlen).await,
        }
    }

    /// Up to `count` stream entries after `after`, oldest first.
    pub async fn read_anomalies(
        &self,
        after: StreamId,
        count: usize,
    ) -> Result<Vec<StreamRecord>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.read_anomalies(after, count)),
            Store::Redis(s) => s.read_anomalies(after, count).await,
        }
    }

    /// The id of the newest stream entry (`0-0` when the stream is empty).
    pub async fn last_anomaly_id(&self) -> Result<StreamId, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.last_anomaly_id()),
            Store::Redis(s) => s.last_anomaly_id().await,
        }
    }

    /// Reads one key; `None` when absent or expired.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.get(key)),
            Store::Redis(s) => s.get(key).await,
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Redis(s) => s.ping().await,
        }
    }

    /// Drops expired entries (embedded store only; Redis expires by itself).
    pub fn purge_expired(&self) {
        if let Store::Embedded(s) = self {
            s.purge_expired();
        }
    }

    /// Reads a device's persisted window.
    pub async fn load_window(&self, device_id: &str) -> Result<Option<WindowSnapshot>, StoreError> {
        let key = window_key(device_id);
        match self.get(&key).await? {
            None => Ok(None),
            Some(bytes) => WindowSnapshot::decode(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { key, source }),
        }
    }
}
