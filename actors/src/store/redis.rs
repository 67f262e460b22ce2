//! Redis behind a bb8 pool of multiplexed connections.
//!
//! Two choices matter here:
//! - bb8 would PING on every checkout by default; we turn that off (a multiplexed
//!   connection is shared and cheap), and instead mark a connection broken when a command
//!   on it fails, so that bb8 drops it and dials a new one. bb8-redis's own manager always
//!   reports connections as healthy, so [`Manager`] wraps it to carry that mark.
//! - Every operation runs under a deadline: a Redis that stops answering (paused, network
//!   partition) must turn into an error the writer can retry, not a hung flush.

use super::StoreError;
use bb8_redis::bb8::{self, ManageConnection, Pool, PooledConnection};
use bb8_redis::redis::{self, aio::MultiplexedConnection};
use bb8_redis::RedisConnectionManager;
use bytes::Bytes;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinSet;

/// Keys written per pipeline; larger flushes are split across pooled connections.
const PIPELINE_CHUNK: usize = 512;

/// A pooled connection with a flag set when a command on it failed.
pub struct TrackedConnection {
    inner: MultiplexedConnection,
    broken: bool,
}

/// bb8-redis's manager, plus broken-connection tracking.
#[derive(Debug, Clone)]
pub struct Manager(RedisConnectionManager);

impl ManageConnection for Manager {
    type Connection = TrackedConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let inner = self.0.connect().await?;
        Ok(TrackedConnection {
            inner,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        self.0.is_valid(&mut conn.inner).await
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken
    }
}

/// Redis store handle; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool<Manager>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("state", &self.pool.state())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisStore {
    /// A pool for `url`. Connects lazily: an unreachable Redis at start-up is not an
    /// error here, it shows as failed operations (and so as not ready).
    pub fn new(url: &str, pool_size: u32, timeout: Duration) -> Result<Self, StoreError> {
        let manager = Manager(RedisConnectionManager::new(url)?);
        let pool = bb8::Pool::builder()
            .max_size(pool_size.max(1))
            .test_on_check_out(false)
            .connection_timeout(timeout)
            .build_unchecked(manager);
        Ok(Self { pool, timeout })
    }

    /// Runs `op` on a pooled connection under the deadline; marks the connection broken
    /// when it fails so the pool replaces it.
    async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut conn: PooledConnection<'_, Manager> =
            self.pool.get().await.map_err(|e| match e {
                bb8::RunError::User(e) => StoreError::Redis(e),
                bb8::RunError::TimedOut => StoreError::Timeout(self.timeout),
            })?;
        let result = tokio::time::timeout(self.timeout, op(conn.inner.clone())).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A reply error (e.g. WRONGTYPE) leaves the connection usable.
                conn.broken = !matches!(e.kind(), redis::ErrorKind::Server(_));
                Err(e.into())
            }
            Err(_) => {
                conn.broken = true;
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    /// `SET key value PX ttl` for every entry, pipelined, chunks in parallel.
    pub async fn set_many(
        &self,
        entries: Vec<(String, Bytes)>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut chunks = JoinSet::new();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let mut pipe = redis::pipe();
            for (key, value) in entries.by_ref().take(PIPELINE_CHUNK) {
                pipe.cmd("SET")
                    .arg(key)
                    .arg(&value[..])
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
            let store = self.clone();
            chunks.spawn(async move {
                store
                    .with_conn(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
                    .await
            });
        }
        let mut first_error = None;
        while let Some(joined) = chunks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(join) => {
                    first_error.get_or_insert(StoreError::TaskFailed(join));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let value: Option<Vec<u8>> = self
            .with_conn(
                |mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await },
            )
            .await?;
        Ok(value.map(Bytes::from))
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(
            |mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await },
        )
        .await
    }
}
