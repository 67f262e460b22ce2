//! The ingest log: accepted events are appended to a Redis stream before they are
//! answered, so a crash loses nothing that was acknowledged.
//!
//! One task appends (group commit): it takes every request waiting, writes them as one
//! entry, and only when Redis has answered queues the events at their devices, in entry
//! order, each with its [`Position`](crate::position::Position), and answers the requests. An idle service pays one
//! round trip per request; a busy one shares it among everything that arrived
//! meanwhile, and small groups are at most one per [`LOG_COMMIT_GAP`]. The appender runs
//! on a thread of its own (its round trips must not wait behind the HTTP and actor
//! tasks). An entry of [`LOG_SETTLE_ASIDE`] events or more is queued by the settler, a
//! task beside the actors, instead: queueing many events wakes their actors on their own
//! runtime, and the appender writes the next entry meanwhile; while the settler has
//! entries, later ones go to it too.
//! Because the events are queued in log order, each device processes its events in log
//! order, so a window's position says exactly which logged events it holds.
//!
//! - Admission (MAX_PENDING_EVENTS) is taken before the append: an event in the log is
//!   never refused afterwards.
//! - An append that failed before it reached Redis (no connection) is answered 503. One
//!   whose answer was lost (timeout, broken connection) may have been written: the task
//!   reads the stream's newest entry, whose nonce says whether it was. If Redis does not
//!   answer within [`LOG_RESOLVE_WAIT`], the requests are answered 503 and the entry, if
//!   Redis turns out to hold it, is deleted before anything else is appended. So a
//!   request is answered 200 exactly when its events are in the log, and its events stay
//!   in the log only if it was.
//! - While Redis is unreachable, new requests are refused at once (503) and the task
//!   probes until it answers again.
//! - At start the task replays the log (see [`super::replay`]) before it appends any new
//!   event: requests wait for it (refused with 503 if Redis does not answer), and
//!   `/ready` says not ready until it is done.
//! - On a single node one stream has one writer: before the replay the node takes the
//!   stream's writer key (`<stream>:writer`, its host name and LISTEN_ADDR, renewed by
//!   the trimmer, released at a clean stop). Another node with the same INGEST_LOG_KEY
//!   (a second replica, a rolling update's new pod) waits, not ready, until the holder
//!   stops or its lease runs out, instead of replaying the holder's events as its own;
//!   the same process restarted after a crash takes its key back at once.
//! - A second task trims the log below the oldest entry a stored checkpoint does not
//!   cover yet ([`Pins`]), about once a second; the stream's MAXLEN (INGEST_LOG_MAXLEN)
//!   bounds it if checkpoints stall, and entries it drops that were still needed are
//!   counted (`ingest_log_overruns_total`).

use super::appender::{self, Appender};
use super::redis_log::RedisLog;
use super::shared::{lock, Append, Flight, Flights, LogSettings, Msg, Shared, Tag};
use crate::device::{Directory, SubmitError};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::position::Pins;
use crate::store::StreamId;
use crate::tuning::{LOG_TRIM_EVERY, LOG_WRITER_LEASE};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// The answer to an append: `Ok` once the events are in the log and queued.
pub type Appended = oneshot::Receiver<Result<(), SubmitError>>;

/// The ingest log of this node; cheap to share (`Arc`).
pub struct IngestLog {
    tx: mpsc::UnboundedSender<Msg>,
    directory: Directory,
    shared: Arc<Shared>,
    /// The stream appended to (the trimmer's).
    log: Mutex<RedisLog>,
    /// Per shard (in a cluster), its parts between admission and their queues.
    flights: Arc<Flights>,
    /// Who holds the stream's writer key (a single node).
    writer: Option<String>,
    pins: Pins,
    metrics: Metrics,
    /// Stops the trimmer.
    stop: CancellationToken,
}

impl IngestLog {
    /// Starts the appender (which replays the log first) on a thread of its own, and the
    /// trimmer, which runs until `stop` is cancelled or [`IngestLog::close`]. `log`'s
    /// connections should be its own (see `RedisStore::with_own_pool`).
    pub fn start(
        log: RedisLog,
        settings: LogSettings,
        directory: Directory,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            replayed: AtomicBool::new(false),
            down: AtomicBool::new(false),
            newest: Mutex::new(None),
            fenced: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        });
        let pins = Pins::default();
        appender::start(Appender::new(
            rx,
            log.clone(),
            &settings,
            directory.clone(),
            pins.clone(),
            metrics.clone(),
            shared.clone(),
        ))?;
        let this = Arc::new(Self {
            tx,
            directory,
            shared,
            log: Mutex::new(log),
            flights: Arc::new(Flights {
                counts: (0..settings.shards).map(|_| AtomicUsize::new(0)).collect(),
                landed: Notify::new(),
            }),
            writer: settings.writer,
            pins,
            metrics,
            stop,
        });
        tokio::spawn(trimmer(this.clone()));
        Ok(this)
    }

    /// Whether the start-up replay is done.
    pub fn is_replayed(&self) -> bool {
        self.shared.replayed.load(Ordering::Acquire)
    }

    /// In a cluster: whether the stream appended to is gone (see
    /// [`RedisLog::create`]); the member appends to a new one.
    pub fn stream_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Acquire)
    }

    /// Whether the start-up replay is done and Redis answered the last append.
    pub fn is_ready(&self) -> bool {
        self.shared.replayed.load(Ordering::Acquire)
            && !self.shared.down.load(Ordering::Acquire)
            && !self.shared.fenced.load(Ordering::Acquire)
    }

    /// Appends `events` (all or none), then queues them at their devices: `Ok` once they
    /// are in the log. `Overloaded` past MAX_PENDING_EVENTS, `NotDurable` when the log
    /// cannot be written (Redis unreachable).
    pub async fn append(&self, events: Vec<(Arc<str>, Event)>) -> Result<(), SubmitError> {
        settled(self.enqueue(events, None)?).await
    }

    /// Admits `events` (all or none) and hands them to the appender; the receiver
    /// answers once they are in the log and queued. In a cluster `tag` names their shard
    /// and its epoch, and this runs under the shard's lock (it never waits).
    pub fn enqueue(
        &self,
        events: Vec<(Arc<str>, Event)>,
        tag: Option<Tag>,
    ) -> Result<Appended, SubmitError> {
        // During the start-up replay requests wait their turn (they are appended after
        // it); while Redis does not answer they are refused at once.
        if self.shared.down.load(Ordering::Acquire) || self.shared.fenced.load(Ordering::Acquire) {
            return Err(SubmitError::NotDurable);
        }
        let n = events.len();
        if !self.directory.admit(n) {
            return Err(SubmitError::Overloaded);
        }
        let flight = tag.and_then(|t| {
            let shard = t.shard as usize;
            let count = self.flights.counts.get(shard)?;
            count.fetch_add(1, Ordering::AcqRel);
            Some(Flight {
                flights: self.flights.clone(),
                shard,
            })
        });
        let (reply, answer) = oneshot::channel();
        let append = Append {
            events,
            tag,
            reply,
            _flight: flight,
        };
        if self.tx.send(Msg::Append(append)).is_err() {
            self.directory.unadmit(n);
            return Err(SubmitError::Unavailable);
        }
        Ok(answer)
    }

    /// Parts of `shard` admitted and not yet queued at their devices (or refused).
    pub fn in_flight(&self, shard: u32) -> usize {
        self.flights
            .counts
            .get(shard as usize)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Resolves once no part of `shards` is between admission and its queues.
    pub async fn landed(&self, shards: impl Iterator<Item = u32> + Clone) {
        loop {
            let woken = self.flights.landed.notified();
            tokio::pin!(woken);
            // Registered before the check, so a part landing in between still wakes us.
            woken.as_mut().enable();
            if shards.clone().all(|s| self.in_flight(s) == 0) {
                return;
            }
            woken.await;
        }
    }

    /// The stream appended to.
    pub fn stream(&self) -> RedisLog {
        lock(&self.log).clone()
    }

    /// Appends to `log` from now on; resolves once every earlier append is done.
    pub async fn switch(&self, log: RedisLog) {
        *lock(&self.log) = log.clone();
        let (done, switched) = oneshot::channel();
        if self.tx.send(Msg::Switch(log, done)).is_ok() {
            let _ = switched.await;
        }
    }

    /// Trims the log once more and stops the trimmer (at shutdown, once every window is
    /// stored: a restart then replays nothing it does not need).
    pub async fn close(&self) {
        self.stop.cancel();
        trim_once(self).await;
        if let Some(me) = &self.writer {
            if let Err(e) = self.stream().release_writer(me).await {
                tracing::debug!(error = %e, "could not release the ingest log's writer key; it lapses");
            }
        }
    }
}

/// The answer to an append; a dropped reply means the appender is gone (the runtime is
/// shutting down), and so are the events.
pub async fn settled(answer: Appended) -> Result<(), SubmitError> {
    answer.await.unwrap_or(Err(SubmitError::Unavailable))
}

/// Trims the log about once a second until stopped.
async fn trimmer(log: Arc<IngestLog>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_TRIM_EVERY) => {}
            _ = log.stop.cancelled() => return,
        }
        renew_stream(&log).await;
        trim_once(&log).await;
    }
}

/// Renews this node's writer key (a single node); while another node holds it, nothing
/// is appended.
async fn renew_stream(log: &IngestLog) {
    let Some(me) = &log.writer else {
        return;
    };
    match log.stream().claim_writer(me, LOG_WRITER_LEASE).await {
        Ok(held) => {
            let was_fenced = log.shared.fenced.swap(!held, Ordering::AcqRel);
            if was_fenced == held {
                if held {
                    tracing::info!("the ingest log's writer key is this node's again");
                } else {
                    tracing::error!(stream = %log.stream().key(), "another node holds this ingest log's writer key (this node's lapsed: paused, or cut off from Redis); new events are refused until it is this node's again");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "renewing the ingest log's writer key failed"),
    }
}

/// Trims below the oldest pinned entry (or past the newest when nothing is pinned), and
/// reports entries MAXLEN dropped while they were still needed.
async fn trim_once(log: &IngestLog) {
    let oldest = log.pins.oldest();
    let newest = *lock(&log.shared.newest);
    let Some(min) = oldest.or(newest.map(|StreamId(ms, seq)| StreamId(ms, seq + 1))) else {
        return;
    };
    let stream = log.stream();
    match stream.trim(min).await {
        Ok((len, first)) => {
            log.metrics.ingest_log_length.set(len as i64);
            log.metrics
                .ingest_log_uncovered_entries
                .set(log.pins.len() as i64);
            // A cluster member's stream found empty while entries of it are pinned is gone
            // (trims keep every pinned entry): collected after another member replayed it,
            // or lost with the table; the appender reports that when it next appends. Its
            // entries are not needed here any more.
            let gone = log.writer.is_none() && len == 0 && first.is_none();
            if let Some(oldest) = oldest.filter(|o| !gone && first.is_none_or(|f| f > *o)) {
                log.metrics.ingest_log_overruns.inc();
                tracing::error!(stream = stream.key(), oldest_needed = %oldest, first = ?first, "ingest log entries were dropped before a checkpoint covered them (INGEST_LOG_MAXLEN reached, or Redis lost data): a crash now would lose events");
            }
        }
        Err(e) => tracing::debug!(error = %e, "ingest log trim failed"),
    }
}
