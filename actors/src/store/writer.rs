//! The store writer actor: the newest result per device, flushed pipelined every
//! FLUSH_INTERVAL.
//!
//! Device actors deposit a [`Record`] per event in the writer's [`Inbox`], which keeps
//! only the newest per device, so however fast a device reports, it costs at most one
//! write per flush, and during an outage memory stays at one record per device. A flush
//! takes the inbox into `inflight` and runs in its own task, so devices keep depositing
//! while Redis works; a failed flush puts its records back (newer ones win) and retries
//! after a capped exponential backoff.
//!
//! The writer is also the one place that knows about results not yet in the store, so
//! window restores ([`WriterMsg::LoadWindow`]) go through it: a device actor that starts
//! right after its predecessor was evicted sees the predecessor's last window even if it
//! was never flushed.

use super::inbox::{Batch, Inbox};
use super::{
    analysis_key, window_key, DeviceWrite, Record, Store, StoreError, StreamEntry, WindowSnapshot,
};
use crate::metrics::Metrics;
use crate::tuning::{
    EMBEDDED_PURGE_EVERY, STORE_MAX_BACKOFF, STORE_MIN_BACKOFF, STORE_PROBE_EVERY,
};
use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Whether the store answered the last contact; read by `/ready`.
#[derive(Debug, Clone)]
pub struct StoreHealth {
    up: Arc<AtomicBool>,
}

impl StoreHealth {
    /// A flag starting at `up`.
    pub fn new(up: bool) -> Self {
        Self {
            up: Arc::new(AtomicBool::new(up)),
        }
    }

    /// True when the last flush or probe succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// The writer actor (configuration only).
#[derive(Debug, Default)]
pub struct WriterActor;

/// What the writer is started with.
pub struct WriterArgs {
    /// Where results go.
    pub store: Store,
    /// Expiry of every key written.
    pub ttl: Duration,
    /// Flush period.
    pub flush_interval: Duration,
    /// Metric handles.
    pub metrics: Metrics,
    /// The flag the writer keeps current.
    pub health: StoreHealth,
    /// Where device actors deposit results.
    pub inbox: Arc<Inbox>,
    /// ANOMALY_STREAM_MAXLEN: the stream's approximate length.
    pub stream_maxlen: usize,
}

/// The writer's state.
pub struct WriterState {
    store: Store,
    ttl: Duration,
    metrics: Metrics,
    health: StoreHealth,
    inbox: Arc<Inbox>,
    stream_maxlen: usize,
    inflight: Option<Arc<Batch>>,
    /// Anomalies of the flush in flight.
    inflight_anomalies: usize,
    backoff: Duration,
    retry_at: Option<Instant>,
    probing: bool,
    last_contact: Instant,
    last_purge: Instant,
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// Flushes started so far; the one in flight, if any, is number `flushes`.
    flushes: u64,
    /// Barriers, each with the flush whose success answers it.
    barriers: Vec<(u64, RpcReplyPort<()>)>,
    /// Whether the store has been contacted yet (the first contact is logged as such).
    contacted: bool,
}

/// Messages of the writer.
pub enum WriterMsg {
    /// The inbox holds a full batch: flush now rather than at the next tick.
    Flush,
    /// Timer: flush if due, probe if idle, purge expired keys.
    Tick,
    /// A flush task finished, after `elapsed`: the keys written (or why not), and the
    /// anomalies that could not be appended (to be put back).
    Flushed(Result<usize, StoreError>, Duration, Vec<StreamEntry>),
    /// A probe task finished.
    Probed(Result<(), StoreError>),
    /// A device actor is starting: its window, as the store will hold it.
    LoadWindow(
        Arc<str>,
        RpcReplyPort<Result<Option<WindowSnapshot>, StoreError>>,
    ),
    /// A shard moves to another node: answered once every result deposited before this
    /// message is in the store (a flush that started after it has succeeded).
    Barrier(RpcReplyPort<()>),
    /// Shutdown: flush everything now, answer when nothing is pending.
    Drain(RpcReplyPort<()>),
}

impl WriterState {
    /// A writer started at `now` with nothing pending; `contacted` when the store counts
    /// as seen already (the embedded one).
    fn new(args: WriterArgs, contacted: bool, now: Instant) -> Self {
        Self {
            store: args.store,
            ttl: args.ttl,
            metrics: args.metrics,
            health: args.health,
            inbox: args.inbox,
            stream_maxlen: args.stream_maxlen,
            inflight: None,
            inflight_anomalies: 0,
            backoff: STORE_MIN_BACKOFF,
            retry_at: None,
            probing: false,
            last_contact: now.checked_sub(STORE_PROBE_EVERY).unwrap_or(now),
            last_purge: now,
            drain_waiters: Vec::new(),
            flushes: 0,
            barriers: Vec::new(),
            contacted,
        }
    }

    fn pending_gauge(&self) {
        let inflight = self.inflight.as_ref().map_or(0, |b| b.len());
        self.metrics
            .store_pending_results
            .set((self.inbox.len() + inflight) as i64);
    }

    /// Records whether the store answered; logs the first contact and every change,
    /// with the error that made it unreachable (an operator must see why: refused,
    /// timed out, or a TLS certificate problem).
    fn set_up(&mut self, result: Result<(), &StoreError>) {
        let up = result.is_ok();
        let was = self.health.up.swap(up, Ordering::Relaxed);
        self.metrics.store_up.set(i64::from(up));
        let first = !std::mem::replace(&mut self.contacted, true);
        let store = self.store.kind();
        match (result, first) {
            (Ok(()), true) => tracing::info!(store, "store reachable"),
            (Ok(()), false) if !was => tracing::info!(store, "store reachable again"),
            (Err(error), true) => tracing::warn!(
                store,
                %error,
                "store unreachable at start-up; events are accepted, results are kept and retried, /ready answers 503 until it answers"
            ),
            (Err(error), false) if was => tracing::warn!(
                store,
                %error,
                "store unreachable; results are kept and retried"
            ),
            _ => {}
        }
    }

    fn maybe_flush(&mut self, myself: &ActorRef<WriterMsg>, now: Instant) {
        if self.inflight.is_some()
            || self.inbox.is_empty()
            || self.retry_at.is_some_and(|t| now < t)
        {
            return;
        }
        let batch = Arc::new(self.inbox.take());
        let anomalies = self.inbox.take_anomalies();
        self.flushes += 1;
        self.inflight = Some(batch.clone());
        self.inflight_anomalies = anomalies.len();
        let (store, ttl, myself) = (self.store.clone(), self.ttl, myself.clone());
        let maxlen = self.stream_maxlen;
        tokio::spawn(async move {
            let started = Instant::now();
            let keys = async {
                let writes = encode(&batch).map_err(StoreError::Encode)?;
                let keys = writes.iter().map(DeviceWrite::keys).sum();
                store.write(writes, ttl).await.map(|()| keys)
            };
            let (result, appended) = tokio::join!(keys, store.append_anomalies(&anomalies, maxlen));
            // The stream is retried on its own: a stream-only failure (say, a key of the
            // wrong type) must neither rewrite the results nor make the store not ready.
            let unappended = match appended {
                Ok(()) => Vec::new(),
                Err(e) => {
                    tracing::debug!(error = %e, entries = anomalies.len(), "appending anomalies failed; kept for the next flush");
                    anomalies
                }
            };
            // Let go of the batch before reporting, so that after a failure the writer
            // can take it back without copying it.
            drop(batch);
            // The writer may be gone at the end of shutdown; nothing to tell then.
            let _ = myself.cast(WriterMsg::Flushed(result, started.elapsed(), unappended));
        });
    }

    fn maybe_probe(&mut self, myself: &ActorRef<WriterMsg>, now: Instant) {
        if self.probing
            || self.inflight.is_some()
            || now.duration_since(self.last_contact) < STORE_PROBE_EVERY
        {
            return;
        }
        self.probing = true;
        let (store, myself) = (self.store.clone(), myself.clone());
        tokio::spawn(async move {
            let result = store.ping().await;
            let _ = myself.cast(WriterMsg::Probed(result));
        });
    }

    /// A device's unflushed window: in the inbox, else in the flight it was taken into.
    fn in_memory(&self, device: &str) -> Option<WindowSnapshot> {
        self.inbox.window(device).or_else(|| {
            self.inflight
                .as_ref()
                .and_then(|b| b.get(device))
                .and_then(Record::snapshot)
        })
    }

    /// Answers a device's window: the unflushed one, else the store's (read in a task,
    /// so the writer never waits on the store). With conditional writes (a cluster) the
    /// store is read either way and the newer window wins: this node's unflushed one may
    /// be older than what another node wrote while this one was cut off.
    fn answer_window(
        &self,
        device: Arc<str>,
        reply: RpcReplyPort<Result<Option<WindowSnapshot>, StoreError>>,
    ) {
        let known = self.in_memory(&device);
        if known.is_some() && !self.store.is_guarded() {
            let _ = reply.send(Ok(known));
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let answer = match (known, store.load_window(&device).await) {
                (Some(mine), Ok(Some(stored))) if stored.version() > mine.version() => {
                    Ok(Some(stored))
                }
                (Some(mine), Ok(_)) => Ok(Some(mine)),
                (Some(mine), Err(e)) => {
                    tracing::debug!(device_id = %device, error = %e, "store unreadable; using the unflushed window");
                    Ok(Some(mine))
                }
                (None, stored) => stored,
            };
            let _ = reply.send(answer);
        });
    }

    /// Answers the barriers that the flush just completed covers.
    fn answer_barriers(&mut self, completed: u64) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.barriers)
            .into_iter()
            .partition(|(target, _)| *target <= completed);
        self.barriers = waiting;
        for (_, reply) in done {
            if !reply.is_closed() {
                let _ = reply.send(());
            }
        }
    }

    fn answer_drain_if_done(&mut self) {
        if self.inflight.is_none() && self.inbox.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                if !waiter.is_closed() {
                    let _ = waiter.send(());
                }
            }
        }
    }
}

/// Serialises a batch: the analysis of every device, the window of those due a checkpoint.
fn encode(batch: &Batch) -> Result<Vec<DeviceWrite>, serde_json::Error> {
    batch
        .iter()
        .map(|(device, record)| {
            Ok(DeviceWrite {
                analysis: (
                    analysis_key(device),
                    Bytes::from(serde_json::to_vec(&record.analysis)?),
                ),
                window: (
                    window_key(device),
                    record.checkpoint.as_ref().map(|c| {
                        WindowSnapshot::encode(
                            c.window.readings(),
                            Some(c.event_timestamp),
                            c.version,
                            c.position,
                        )
                    }),
                ),
                device: device.clone(),
            })
        })
        .collect()
}

/// The writer's handling of each message, one step each.
impl WriterState {
    /// The timer: purge the embedded store's expired keys, flush when due, probe when idle.
    fn on_tick(&mut self, myself: &ActorRef<WriterMsg>) {
        let now = Instant::now();
        if now.duration_since(self.last_purge) >= EMBEDDED_PURGE_EVERY {
            self.last_purge = now;
            self.store.purge_expired();
        }
        self.maybe_flush(myself, now);
        self.maybe_probe(myself, now);
        self.pending_gauge();
    }

    /// A flush ended: count it, answer the barriers it completes, or put its batch back
    /// and back off.
    fn on_flushed(
        &mut self,
        myself: &ActorRef<WriterMsg>,
        result: Result<usize, StoreError>,
        elapsed: Duration,
        unappended: Vec<StreamEntry>,
    ) {
        let now = Instant::now();
        self.last_contact = now;
        let batch = self.inflight.take();
        let appended = self.inflight_anomalies - unappended.len();
        self.inflight_anomalies = 0;
        self.metrics.anomaly_stream_entries.inc_by(appended as u64);
        if !unappended.is_empty() {
            self.inbox.restore_anomalies(unappended);
        }
        self.metrics
            .store_write_duration_seconds
            .observe(elapsed.as_secs_f64());
        match result {
            Ok(keys) => {
                let completed = self.flushes;
                self.answer_barriers(completed);
                self.metrics.store_flushes.inc();
                self.metrics.store_keys_written.inc_by(keys as u64);
                self.backoff = STORE_MIN_BACKOFF;
                self.retry_at = None;
                self.set_up(Ok(()));
            }
            Err(e) => {
                self.metrics.store_write_errors.inc();
                tracing::debug!(error = %e, retry_in = ?self.backoff, "store flush failed");
                if let Some(batch) = batch {
                    let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
                    self.inbox.restore(batch);
                }
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(STORE_MAX_BACKOFF);
                // Redis answered; only the table has to be rebuilt.
                if !matches!(e, StoreError::Unowned(_)) {
                    self.set_up(Err(&e));
                }
            }
        }
        if !self.drain_waiters.is_empty() || !self.barriers.is_empty() {
            self.maybe_flush(myself, now);
        }
        self.pending_gauge();
        self.answer_drain_if_done();
    }

    /// A probe of an idle store ended.
    fn on_probed(&mut self, result: Result<(), StoreError>) {
        self.probing = false;
        self.last_contact = Instant::now();
        match result {
            Ok(()) => {
                // Redis is back: retry at once rather than after the backoff.
                self.retry_at = None;
                self.backoff = STORE_MIN_BACKOFF;
                self.set_up(Ok(()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "store probe failed");
                self.set_up(Err(&e));
            }
        }
    }

    /// Answers `reply` once everything deposited so far is in the store.
    fn on_barrier(&mut self, myself: &ActorRef<WriterMsg>, reply: RpcReplyPort<()>) {
        // Everything deposited so far is in the inbox (the next flush takes it) or
        // in the flight under way (nothing left in the inbox: that flight is
        // enough).
        let target = if self.inbox.is_empty() {
            self.flushes
        } else {
            self.flushes + 1
        };
        if self.inflight.is_none() && self.inbox.is_empty() {
            let _ = reply.send(());
        } else {
            self.barriers.push((target, reply));
            self.retry_at = None;
            self.maybe_flush(myself, Instant::now());
        }
    }
}

impl Actor for WriterActor {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WriterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let now = Instant::now();
        // Redis starts as "not yet seen"; the first probe, a tick away, settles it.
        let up = matches!(args.store, Store::Embedded(_));
        args.health.up.store(up, Ordering::Relaxed);
        args.metrics.store_up.set(i64::from(up));
        // The interval task ends by itself when this actor stops.
        myself.send_interval(args.flush_interval, || WriterMsg::Tick);
        Ok(WriterState::new(args, up, now))
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: WriterMsg,
        state: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WriterMsg::Flush => state.maybe_flush(&myself, Instant::now()),
            WriterMsg::Tick => state.on_tick(&myself),
            WriterMsg::Flushed(result, elapsed, unappended) => {
                state.on_flushed(&myself, result, elapsed, unappended);
            }
            WriterMsg::Probed(result) => state.on_probed(result),
            WriterMsg::LoadWindow(device, reply) => {
                // Only this actor takes from the inbox, so a result is either still in
                // the inbox, in the flight it was taken into, or already in the store.
                state.answer_window(device, reply);
            }
            WriterMsg::Barrier(reply) => state.on_barrier(&myself, reply),
            WriterMsg::Drain(reply) => {
                state.drain_waiters.push(reply);
                state.retry_at = None;
                state.maybe_flush(&myself, Instant::now());
                state.answer_drain_if_done();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::Signal;
    use crate::store::EmbeddedStore;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    /// Stands for the writer: receives the flush task's report and ignores it.
    struct Ignore;

    impl Actor for Ignore {
        type Msg = WriterMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<WriterMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_flush_is_retried_the_moment_its_backoff_ends() {
        let (myself, _) = Actor::spawn(None, Ignore, ()).await.expect("spawn");
        let inbox = Arc::new(Inbox::with_stream(10, Counter::default()));
        let args = WriterArgs {
            store: Store::Embedded(Arc::new(EmbeddedStore::new())),
            ttl: Duration::from_secs(60),
            flush_interval: Duration::from_millis(10),
            metrics: Metrics::register(&mut Registry::default()),
            health: StoreHealth::new(true),
            inbox: inbox.clone(),
            stream_maxlen: 10,
        };
        let now = Instant::now();
        let mut state = WriterState::new(args, true, now);
        inbox.put_anomaly(Arc::from("d"), Signal::Rps, Bytes::from_static(b"{}"));
        // As a failed flush leaves it.
        let due = now + STORE_MIN_BACKOFF;
        state.retry_at = Some(due);

        state.maybe_flush(&myself, due - Duration::from_nanos(1));
        assert_eq!(state.flushes, 0, "still backing off");
        state.maybe_flush(&myself, due);
        assert_eq!(state.flushes, 1, "the backoff has ended");
        assert_eq!(inbox.anomalies(), 0, "taken by the flush");
        myself.stop(None);
    }
}
