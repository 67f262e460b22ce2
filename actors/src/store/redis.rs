//! Redis behind a bb8 pool of multiplexed connections.
//!
//! Three choices matter here:
//! - A multiplexed connection serves any number of commands at once, so an operation
//!   holds its pooled connection only to clone the handle: the pool spreads operations
//!   over its connections instead of limiting how many run (with exclusive checkouts,
//!   thousands of window restores at once timed out waiting for one of four connections).
//! - bb8 would PING on every checkout by default; instead, a command that fails marks its
//!   connection broken (a shared flag), and the checkout test is a look at that flag, so
//!   bb8 drops the connection and dials a new one. bb8-redis's own manager always reports
//!   connections as healthy, so [`Manager`] is our own, to carry that mark.
//! - Every operation runs under a deadline: a Redis that stops answering (paused, network
//!   partition) must turn into an error the writer can retry, not a hung flush.
//! - bb8 retries a failed connect until the checkout deadline and then reports only that
//!   it timed out; [`Manager`] keeps the last connect error, so an operator reads why (a
//!   refused connection, or "invalid peer certificate: UnknownIssuer") rather than a
//!   bare timeout.
//!
//! `rediss://` connects over rustls (see [`super::tls`]).

use super::fenced::FencedWriter;
use super::tls::{self, RedisTls};
use super::{DeviceWrite, Fence, StoreError, StreamEntry, StreamId, StreamRecord, ANOMALY_STREAM};
use crate::tuning::{APPENDED_UID_TTL_MS, PIPELINE_CHUNK};
use bb8_redis::bb8::{self, ManageConnection, Pool, PooledConnection};
use bb8_redis::redis::{self, aio::MultiplexedConnection, ConnectionAddr, IntoConnectionInfo};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;

/// A pooled connection with a flag set when a command on it failed.
pub struct TrackedConnection {
    inner: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// The last failed connect of a pool; cleared when a connect succeeds. Shared by the
/// manager, which dials, and the store, which reports.
#[derive(Debug, Clone, Default)]
struct LastConnectError(Arc<Mutex<Option<redis::RedisError>>>);

impl LastConnectError {
    // A std mutex: held only to swap a value, never across an `.await`; a poisoned one
    // still holds a usable value.
    fn get(&self) -> Option<redis::RedisError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, error: Option<&redis::RedisError>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = error.cloned();
    }
}

/// Dials multiplexed connections (what bb8-redis's manager does), and tracks broken
/// connections and the last failed connect.
#[derive(Debug, Clone)]
pub struct Manager {
    client: redis::Client,
    last_connect_error: LastConnectError,
}

impl ManageConnection for Manager {
    type Connection = TrackedConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let connected = self.client.get_multiplexed_async_connection().await;
        self.last_connect_error.set(connected.as_ref().err());
        Ok(TrackedConnection {
            inner: connected?,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        // No round trip: a connection is valid until a command on it failed.
        if conn.broken.load(Ordering::Relaxed) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connection marked broken",
            )));
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// Appends a stream entry unless an append of the same uid ran already (a flush that
/// timed out on the client may still reach Redis and run: its retry must not append
/// twice). KEYS: the stream, the uid's marker; ARGV: maxlen, device, signal, analysis,
/// the marker's expiry in ms.
const APPEND_ONCE: &str = r#"
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[5]) then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'device_id', ARGV[2], 'signal', ARGV[3], 'analysis', ARGV[4])
end
return false
"#;

/// Redis store handle; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool<Manager>,
    /// Dials the pool's connections (kept for pools of its own).
    manager: Arc<Manager>,
    last_connect_error: LastConnectError,
    timeout: Duration,
    /// In a cluster: writes are fenced by their shard's epoch.
    fence: Option<Arc<dyn Fence>>,
    /// The fenced writes' transaction, on a connection of its own.
    fenced: Arc<FencedWriter>,
    append_sha: Arc<str>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("state", &self.pool.state())
            .field("timeout", &self.timeout)
            .field("fenced", &self.fence.is_some())
            .finish()
    }
}

/// A pool that dials lazily, checks a connection's broken flag on check-out, and gives
/// up on a check-out after `timeout`.
fn pool(manager: Manager, pool_size: u32, timeout: Duration) -> Pool<Manager> {
    bb8::Pool::builder()
        .max_size(pool_size.max(1))
        .test_on_check_out(true)
        .connection_timeout(timeout)
        .build_unchecked(manager)
}

impl RedisStore {
    /// A pool for `url` with TLS settings, which need a `rediss://` URL (a `rediss://` URL
    /// with the default settings trusts the built-in public roots). Connects lazily: an
    /// unreachable Redis at start-up is not an error here, it shows as failed operations
    /// (and so as not ready).
    pub fn with_tls(
        url: &str,
        tls: &RedisTls,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let info = url.into_connection_info()?;
        let client = if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            tls::install_provider();
            redis::Client::build_with_tls(info, tls.certificates())?
        } else if tls.is_configured() {
            return Err(StoreError::TlsWithoutRediss);
        } else {
            redis::Client::open(info)?
        };
        let fenced = Arc::new(FencedWriter::new(client.clone(), timeout));
        let last_connect_error = LastConnectError::default();
        let manager = Manager {
            client,
            last_connect_error: last_connect_error.clone(),
        };
        Ok(Self {
            pool: pool(manager.clone(), pool_size, timeout),
            manager: Arc::new(manager),
            last_connect_error,
            timeout,
            fence: None,
            fenced,
            append_sha: Arc::from(redis::Script::new(APPEND_ONCE).get_hash()),
        })
    }

    /// The same store on a pool of its own, whose connections are dialled (and driven) on
    /// the runtime that first uses them: a task on a runtime of its own then does not
    /// wait behind the main runtime's tasks for its replies.
    pub fn with_own_pool(&self, pool_size: u32) -> Self {
        Self {
            pool: pool(Manager::clone(&self.manager), pool_size, self.timeout),
            ..self.clone()
        }
    }

    /// Fenced writes (a cluster): a device's keys are written only while this node owns
    /// its shard under the epoch it holds, so a node that lost a shard (paused, cut off)
    /// can never overwrite what the shard's new owner wrote.
    pub fn fenced(mut self, fence: Arc<dyn Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Whether writes are fenced.
    pub fn is_guarded(&self) -> bool {
        self.fence.is_some()
    }

    /// Runs a Lua script (EVALSHA, loading it on a miss) under the deadline.
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        self.with_conn(|mut conn| async move {
            let mut invocation = script.prepare_invoke();
            for k in keys {
                invocation.key(*k);
            }
            for a in args {
                invocation.arg(*a);
            }
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<(), StoreError> {
        self.with_conn(|mut conn| async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Runs `op` on a pooled connection under the deadline; marks the connection broken
    /// when it fails so the pool replaces it.
    pub(crate) async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (inner, broken) = {
            let conn: PooledConnection<'_, Manager> =
                self.pool.get().await.map_err(|e| match e {
                    bb8::RunError::User(e) => StoreError::Redis(e),
                    // No connection within the deadline: say why when dialling failed.
                    bb8::RunError::TimedOut => match self.last_connect_error.get() {
                        Some(cause) => StoreError::Connect(cause),
                        None => StoreError::Timeout(self.timeout),
                    },
                })?;
            (conn.inner.clone(), conn.broken.clone())
        };
        let result = tokio::time::timeout(self.timeout, op(inner)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A reply error (e.g. WRONGTYPE) leaves the connection usable.
                if !matches!(e.kind(), redis::ErrorKind::Server(_)) {
                    broken.store(true, Ordering::Relaxed);
                }
                Err(e.into())
            }
            Err(_) => {
                broken.store(true, Ordering::Relaxed);
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    /// Every device's analysis (and window, on a checkpoint) with `PX ttl`, pipelined,
    /// chunks in parallel; fenced by shard when [`RedisStore::fenced`].
    pub async fn write(&self, writes: Vec<DeviceWrite>, ttl: Duration) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut chunks = JoinSet::new();
        match &self.fence {
            None => {
                let mut writes = writes.into_iter().peekable();
                while writes.peek().is_some() {
                    let mut pipe = redis::pipe();
                    let mut keys = 0;
                    for w in writes.by_ref() {
                        keys += w.keys();
                        let window = w.window.1.map(|bytes| (w.window.0, bytes));
                        for (key, value) in std::iter::once(w.analysis).chain(window) {
                            pipe.cmd("SET")
                                .arg(key)
                                .arg(&value[..])
                                .arg("PX")
                                .arg(ttl_ms)
                                .ignore();
                        }
                        if keys >= PIPELINE_CHUNK {
                            break;
                        }
                    }
                    let store = self.clone();
                    chunks.spawn(async move {
                        store
                            .with_conn(
                                |mut conn| async move { pipe.query_async::<()>(&mut conn).await },
                            )
                            .await
                    });
                }
            }
            Some(fence) => return self.fenced.write(&**fence, writes, ttl_ms).await,
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

    /// `XADD anomalies MAXLEN ~ maxlen * …` per entry, once per uid (see `APPEND_ONCE`),
    /// in one pipeline (so entries keep their order).
    pub async fn append_anomalies(
        &self,
        entries: &[StreamEntry],
        maxlen: usize,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        // Idempotent and cheap next to the entries: EVALSHA below never misses.
        pipe.cmd("SCRIPT").arg("LOAD").arg(APPEND_ONCE).ignore();
        for e in entries {
            pipe.cmd("EVALSHA")
                .arg(&*self.append_sha)
                .arg(2)
                .arg(ANOMALY_STREAM)
                .arg(format!("{ANOMALY_STREAM}:appended:{}", e.uid))
                .arg(maxlen)
                .arg(&*e.device_id)
                .arg(e.signal.as_str())
                .arg(&e.analysis[..])
                .arg(APPENDED_UID_TTL_MS)
                .ignore();
        }
        self.with_conn(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    /// `XRANGE anomalies (after + COUNT count`.
    pub async fn read_anomalies(
        &self,
        after: StreamId,
        count: usize,
    ) -> Result<Vec<StreamRecord>, StoreError> {
        let start = format!("({after}");
        let raw: Vec<(String, Vec<Vec<u8>>)> = self
            .with_conn(|mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(ANOMALY_STREAM)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw.into_iter().filter_map(stream_record).collect())
    }

    /// The newest entry's id (`XREVRANGE anomalies + - COUNT 1`), `0-0` when empty.
    pub async fn last_anomaly_id(&self) -> Result<StreamId, StoreError> {
        let raw: Vec<(String, Vec<Vec<u8>>)> = self
            .with_conn(|mut conn| async move {
                redis::cmd("XREVRANGE")
                    .arg(ANOMALY_STREAM)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw
            .first()
            .and_then(|(id, _)| StreamId::parse(id))
            .unwrap_or_default())
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

/// A raw `XRANGE` entry as a record; entries written by something else are skipped.
fn stream_record((id, fields): (String, Vec<Vec<u8>>)) -> Option<StreamRecord> {
    let id = StreamId::parse(&id)?;
    let mut device_id = None;
    let mut signal = None;
    let mut analysis = None;
    for pair in fields.chunks_exact(2) {
        match &pair[0][..] {
            b"device_id" => device_id = String::from_utf8(pair[1].clone()).ok(),
            b"signal" => signal = String::from_utf8(pair[1].clone()).ok(),
            b"analysis" => analysis = Some(Bytes::from(pair[1].clone())),
            _ => {}
        }
    }
    Some(StreamRecord {
        id,
        device_id: device_id?,
        signal: signal?,
        analysis: analysis?,
    })
}
