//! The ingest log: accepted events are appended to a Redis stream before they are
//! answered, so a crash loses nothing that was acknowledged.
//!
//! One task appends (group commit): it takes every request waiting, writes them as one
//! entry, and only when Redis has answered queues the events at their devices, in entry
//! order, each with its [`Position`], and answers the requests. An idle service pays one
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

use super::redis_log::{encode_tags, RedisLog};
use super::replay;
use crate::cluster::wire;
use crate::device::{Directory, Queued, SubmitError};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::position::{Logged, Pins, Position};
use crate::store::{StoreError, StreamId};
use crate::tuning::{
    LOG_COMMIT_GAP, LOG_LINGER_BELOW, LOG_LINGER_RATE, LOG_MAX_ENTRY_EVENTS, LOG_PROBE_EVERY,
    LOG_RATE_FLOOR_MS, LOG_RATE_SMOOTHING, LOG_RESOLVE_WAIT, LOG_SETTLE_ASIDE, LOG_TRIM_EVERY,
    LOG_WRITER_LEASE,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// The log's settings (the stream is the [`RedisLog`]'s).
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// INGEST_LOG_MAXLEN: entries kept at most.
    pub maxlen: usize,
    /// In a cluster, the shard count (events are appended with their shard's epoch);
    /// 0 on a single node.
    pub shards: u32,
    /// On a single node, who writes the stream (host name and LISTEN_ADDR): the holder of
    /// its writer key. `None` in a cluster, whose members' streams are their own.
    pub writer: Option<String>,
}

/// A cluster shard's part of a request: every event of it belongs to `shard`, taken
/// while the shard's epoch was `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The shard.
    pub shard: u32,
    /// Its epoch when the events were taken.
    pub epoch: u64,
}

/// The answer to an append: `Ok` once the events are in the log and queued.
pub type Appended = oneshot::Receiver<Result<(), SubmitError>>;

/// Events waiting to be appended, with whom to answer.
struct Append {
    events: Vec<(Arc<str>, Event)>,
    tag: Option<Tag>,
    reply: oneshot::Sender<Result<(), SubmitError>>,
    /// Counts the events of the shard between admission and their queues.
    _flight: Option<Flight>,
}

/// What the appender is asked.
enum Msg {
    Append(Append),
    /// Append to this stream from now on (a node that was declared dead starts a new
    /// one; the old is sealed); answered once every earlier append is done.
    Switch(RedisLog, oneshot::Sender<()>),
}

/// One shard's part of an append, counted from its admission until its events are
/// queued at their devices (or refused): a handoff waits for the count to reach zero.
struct Flight {
    counts: Arc<[AtomicUsize]>,
    shard: usize,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.counts[self.shard].fetch_sub(1, Ordering::AcqRel);
    }
}

/// An entry written: its requests, to be queued and answered by the settler.
struct Written {
    group: Vec<Append>,
    entry: StreamId,
    pin: Arc<crate::position::Pin>,
}

/// What the handle and the tasks share.
struct Shared {
    /// The start-up replay is done: new events are taken.
    replayed: AtomicBool,
    /// Redis did not answer the last append: new events are refused until it does.
    down: AtomicBool,
    /// The newest entry appended or replayed (what to trim to when nothing is pinned).
    newest: Mutex<Option<StreamId>>,
    /// Another writer holds the stream (this node's writer key lapsed): nothing is
    /// appended until this node holds it again.
    fenced: AtomicBool,
}

/// The ingest log of this node; cheap to share (`Arc`).
pub struct IngestLog {
    tx: mpsc::UnboundedSender<Msg>,
    directory: Directory,
    shared: Arc<Shared>,
    /// The stream appended to (the trimmer's).
    log: Mutex<RedisLog>,
    /// Per shard (in a cluster), its parts between admission and their queues.
    flights: Arc<[AtomicUsize]>,
    /// Who holds the stream's writer key (a single node).
    writer: Option<String>,
    pins: Pins,
    metrics: Metrics,
    stop: watch::Sender<bool>,
}

impl IngestLog {
    /// Starts the appender (which replays the log first) on a thread of its own, and the
    /// trimmer. `log`'s connections should be its own (see `RedisStore::with_own_pool`).
    pub fn start(
        log: RedisLog,
        settings: LogSettings,
        directory: Directory,
        metrics: Metrics,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            replayed: AtomicBool::new(false),
            down: AtomicBool::new(false),
            newest: Mutex::new(None),
            fenced: AtomicBool::new(false),
        });
        let pins = Pins::default();
        let stop = watch::channel(false).0;
        let (settle, written) = mpsc::unbounded_channel();
        let settling = Arc::new(AtomicUsize::new(0));
        tokio::spawn(settler(written, directory.clone(), settling.clone()));
        let appender = Appender {
            rx,
            settle,
            settling,
            log: log.clone(),
            switch: None,
            maxlen: settings.maxlen,
            directory: directory.clone(),
            pins: pins.clone(),
            metrics: metrics.clone(),
            shared: shared.clone(),
            nonce: (nonce_base(), 0),
            last_commit: None,
            rate: 0.0,
            writer: settings.writer.clone(),
        };
        // The appender runs on a thread and runtime of its own, with the log's own
        // connections: every request's latency is its round trips, which must not wait
        // behind the HTTP and actor tasks of the main runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("ingest-log".into())
            .spawn(move || runtime.block_on(appender.run()))?;
        let this = Arc::new(Self {
            tx,
            directory,
            shared,
            log: Mutex::new(log),
            flights: (0..settings.shards).map(|_| AtomicUsize::new(0)).collect(),
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
            let count = self.flights.get(shard)?;
            count.fetch_add(1, Ordering::AcqRel);
            Some(Flight {
                counts: self.flights.clone(),
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
            .get(shard as usize)
            .map_or(0, |c| c.load(Ordering::Acquire))
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
        self.stop.send_replace(true);
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

/// A nonce prefix distinct across processes and restarts.
fn nonce_base() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

/// The appending task's state.
struct Appender {
    rx: mpsc::UnboundedReceiver<Msg>,
    /// A switch met while gathering: done after the group's append.
    switch: Option<(RedisLog, oneshot::Sender<()>)>,
    settle: mpsc::UnboundedSender<Written>,
    /// Entries handed to the settler and not yet queued.
    settling: Arc<AtomicUsize>,
    log: RedisLog,
    maxlen: usize,
    directory: Directory,
    pins: Pins,
    metrics: Metrics,
    shared: Arc<Shared>,
    nonce: (u64, u64),
    /// When the last append started.
    last_commit: Option<Instant>,
    /// Events arriving per millisecond, averaged over recent appends.
    rate: f64,
    /// Who holds the stream's writer key (a single node).
    writer: Option<String>,
}

/// How an append ended.
enum Outcome {
    /// In the log, as this entry.
    Appended(StreamId),
    /// Not in the log.
    Failed(StoreError),
    /// Unknown after [`LOG_RESOLVE_WAIT`]: answered 503, and the entry (the nonce's) is
    /// withdrawn from the log if it turns out to be there.
    Unsettled(Vec<u8>),
}

/// How many events a group of requests holds.
fn group_size(group: &[Append]) -> usize {
    group.iter().map(|a| a.events.len()).sum()
}

/// Whether a group of `events` waits for [`LOG_COMMIT_GAP`] at an arrival rate of `rate`
/// events per millisecond: a small group at a moderate rate (see `Appender::linger`).
fn lingers(rate: f64, events: usize) -> bool {
    LOG_LINGER_RATE.contains(&rate) && events < LOG_LINGER_BELOW
}

impl Appender {
    async fn run(mut self) {
        self.replay().await;
        loop {
            if self.shared.down.load(Ordering::Acquire) {
                self.refuse_waiting();
                // A switch to a new stream (Redis answered the node that asked for it)
                // ends the refusals.
                if self.shared.down.load(Ordering::Acquire) {
                    self.probe().await;
                }
                continue;
            }
            let first = match self.rx.recv().await {
                None => return,
                Some(Msg::Switch(log, done)) => {
                    self.switch_to(log, done);
                    continue;
                }
                Some(Msg::Append(first)) => first,
            };
            let mut group = vec![first];
            self.gather(&mut group);
            self.observe(&group);
            self.linger(&mut group).await;
            self.last_commit = Some(Instant::now());
            let outcome = self.commit(&group).await;
            let unsettled = match &outcome {
                Outcome::Unsettled(nonce) => Some(nonce.clone()),
                _ => None,
            };
            self.settle(group, outcome);
            if let Some(nonce) = unsettled {
                self.withdraw(&nonce).await;
            }
            if let Some((log, done)) = self.switch.take() {
                self.switch_to(log, done);
            }
        }
    }

    /// Appends to `log` from now on.
    fn switch_to(&mut self, log: RedisLog, done: oneshot::Sender<()>) {
        tracing::info!(
            from = self.log.key(),
            to = log.key(),
            "ingest log switched to a new stream"
        );
        self.log = log;
        self.shared.down.store(false, Ordering::Release);
        let _ = done.send(());
    }

    /// Replays the log, retrying until Redis answers; then new events are taken.
    async fn replay(&mut self) {
        self.claim_stream().await;
        loop {
            match replay::run(&self.log, &self.directory, &self.pins, &self.metrics).await {
                Ok(newest) => {
                    *lock(&self.shared.newest) = newest;
                    self.shared.down.store(false, Ordering::Release);
                    self.shared.replayed.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    if !self.shared.down.swap(true, Ordering::AcqRel) {
                        tracing::warn!(error = %e, stream = self.log.key(), "ingest log replay failed; retrying (events are refused until Redis answers)");
                    }
                    self.refuse_waiting();
                    tokio::time::sleep(LOG_PROBE_EVERY).await;
                }
            }
        }
    }

    /// Waits until this node holds the stream's writer key (a single node): another node
    /// with the same INGEST_LOG_KEY may be appending to it.
    async fn claim_stream(&mut self) {
        let Some(me) = self.writer.clone() else {
            return;
        };
        let mut warned = false;
        loop {
            match self.log.claim_writer(&me, LOG_WRITER_LEASE).await {
                Ok(true) => {
                    self.shared.down.store(false, Ordering::Release);
                    return;
                }
                Ok(false) if !warned => {
                    warned = true;
                    tracing::warn!(stream = self.log.key(), "another node appends to this ingest log (INGEST_LOG_KEY must be one per node); waiting, not ready, until it stops");
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "cannot claim the ingest log yet"),
            }
            // Meanwhile requests are refused at once (503), not queued.
            self.shared.down.store(true, Ordering::Release);
            self.refuse_waiting();
            tokio::time::sleep(LOG_PROBE_EVERY).await;
        }
    }

    /// Adds every request waiting to `group`, up to an entry's bound.
    fn gather(&mut self, group: &mut Vec<Append>) {
        let mut events = group_size(group);
        while events < LOG_MAX_ENTRY_EVENTS && self.switch.is_none() {
            match self.rx.try_recv() {
                Ok(Msg::Append(next)) => {
                    events += next.events.len();
                    group.push(next);
                }
                Ok(Msg::Switch(log, done)) => self.switch = Some((log, done)),
                Err(_) => break,
            }
        }
    }

    /// Updates the arrival rate with what arrived since the last append started.
    fn observe(&mut self, group: &[Append]) {
        if let Some(last) = self.last_commit {
            let ms = last.elapsed().as_secs_f64() * 1e3;
            let sample = group_size(group) as f64 / ms.max(LOG_RATE_FLOOR_MS);
            self.rate += (sample - self.rate) / LOG_RATE_SMOOTHING;
        }
    }

    /// At a moderate arrival rate ([`LOG_LINGER_RATE`]) a small group right after the
    /// previous append waits until [`LOG_COMMIT_GAP`] after it, gathering what arrives
    /// meanwhile: an entry then holds several requests instead of one or two (each append
    /// costs Redis a round trip). Below that rate (a quiet service, a client sending one
    /// request after another) a wait would gather nothing and only add latency; above it
    /// appends are full anyway, and under a closed-loop load, where every client waits on
    /// an append, a pause would only idle them.
    async fn linger(&mut self, group: &mut Vec<Append>) {
        let waits = lingers(self.rate, group_size(group));
        if let Some(last) = self.last_commit.filter(|_| waits) {
            let due = last + LOG_COMMIT_GAP;
            if Instant::now() < due {
                tokio::time::sleep_until(due).await;
                self.gather(group);
            }
        }
    }

    /// Writes the group as one entry; settles a lost answer by reading the log back. An
    /// append that certainly failed on a broken connection (one left over from before an
    /// outage) is tried once more on a fresh one.
    async fn commit(&mut self, group: &[Append]) -> Outcome {
        match self.commit_once(group).await {
            Outcome::Failed(StoreError::Redis(e)) if e.is_io_error() => {
                tracing::debug!(error = %e, "ingest log append failed on a broken connection; trying again");
                self.commit_once(group).await
            }
            outcome => outcome,
        }
    }

    async fn commit_once(&mut self, group: &[Append]) -> Outcome {
        self.nonce.1 += 1;
        let nonce = [self.nonce.0.to_le_bytes(), self.nonce.1.to_le_bytes()].concat();
        let events: Vec<(&str, &Event)> = group
            .iter()
            .flat_map(|a| a.events.iter().map(|(d, e)| (&**d, e)))
            .collect();
        let body = wire::encode(events.into_iter());
        let mut tags: Vec<(u32, u64)> = group
            .iter()
            .filter_map(|a| a.tag.map(|t| (t.shard, t.epoch)))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        let tags = encode_tags(tags.into_iter());
        let started = Instant::now();
        let result = self.log.append(self.maxlen, &nonce, &body, &tags).await;
        self.metrics
            .ingest_log_append_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(id) => Outcome::Appended(id),
            Err(e) if never_sent(&e) => Outcome::Failed(e),
            Err(e) => {
                tracing::debug!(error = %e, "ingest log append unanswered; reading the log to see whether it was written");
                self.shared.down.store(true, Ordering::Release);
                tokio::time::timeout(LOG_RESOLVE_WAIT, self.resolve(&nonce, e))
                    .await
                    .unwrap_or(Outcome::Unsettled(nonce))
            }
        }
    }

    /// Removes the entry with `nonce` if the log holds it after all (its requests were
    /// answered 503, and their clients send the events again); waits until Redis
    /// answers, appending nothing meanwhile.
    async fn withdraw(&self, nonce: &[u8]) {
        loop {
            let removed = match self.log.last().await {
                Ok(Some((id, Some(found)))) if found == nonce => self.log.delete(id).await,
                Ok(_) => return,
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => {
                    tracing::info!(stream = self.log.key(), "an append answered 503 had reached the log after all; its entry was removed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ingest log still unreachable");
                    tokio::time::sleep(LOG_PROBE_EVERY).await;
                }
            }
        }
    }

    /// Whether the entry with `nonce` is the log's newest (nothing else appends to this
    /// stream): asked until Redis answers.
    async fn resolve(&self, nonce: &[u8], cause: StoreError) -> Outcome {
        loop {
            match self.log.last().await {
                Ok(Some((id, Some(found)))) if found == nonce => return Outcome::Appended(id),
                Ok(_) => return Outcome::Failed(cause),
                Err(e) => {
                    tracing::debug!(error = %e, "ingest log still unreachable");
                    tokio::time::sleep(LOG_PROBE_EVERY).await;
                }
            }
        }
    }

    /// Queues a written group's events and answers it, or hands it to the settler (a
    /// large group, or any while the settler has earlier ones: the order must hold);
    /// answers a failed one 503.
    fn settle(&self, group: Vec<Append>, outcome: Outcome) {
        match &outcome {
            &Outcome::Appended(entry) => {
                self.shared.down.store(false, Ordering::Release);
                *lock(&self.shared.newest) = Some(entry);
                let pin = self.pins.pin(entry);
                self.metrics.ingest_log_appends.inc();
                self.metrics
                    .ingest_log_uncovered_entries
                    .set(self.pins.len() as i64);
                let written = Written { group, entry, pin };
                if group_size(&written.group) < LOG_SETTLE_ASIDE
                    && self.settling.load(Ordering::Acquire) == 0
                {
                    queue_written(&self.directory, written);
                } else {
                    self.settling.fetch_add(1, Ordering::AcqRel);
                    // The settler ends only with the runtime; the events are in the log
                    // and the next start replays them.
                    let _ = self.settle.send(written);
                }
            }
            Outcome::Failed(_) | Outcome::Unsettled(_) => {
                self.metrics.ingest_log_append_failures.inc();
                let error = match &outcome {
                    Outcome::Failed(e) => e.to_string(),
                    _ => "no answer from Redis".to_string(),
                };
                if !self.shared.down.swap(true, Ordering::AcqRel) {
                    tracing::warn!(stream = self.log.key(), %error, "ingest log unwritable; new events are refused (503) until Redis answers");
                } else {
                    tracing::debug!(stream = self.log.key(), %error, "ingest log append failed");
                }
                for append in group {
                    self.directory.unadmit(append.events.len());
                    let _ = append.reply.send(Err(SubmitError::NotDurable));
                }
            }
        }
    }

    /// Refuses the requests that were already waiting when Redis stopped answering.
    fn refuse_waiting(&mut self) {
        while self.shared.down.load(Ordering::Acquire) {
            let Ok(msg) = self.rx.try_recv() else {
                return;
            };
            match msg {
                Msg::Append(append) => {
                    self.directory.unadmit(append.events.len());
                    let _ = append.reply.send(Err(SubmitError::NotDurable));
                }
                Msg::Switch(log, done) => self.switch_to(log, done),
            }
        }
    }

    /// Waits until Redis answers again.
    async fn probe(&mut self) {
        tokio::time::sleep(LOG_PROBE_EVERY).await;
        if self.log.last().await.is_ok() {
            self.shared.down.store(false, Ordering::Release);
            tracing::info!(stream = self.log.key(), "ingest log writable again");
        }
    }
}

/// Queues each written entry handed to it, in entry order.
async fn settler(
    mut written: mpsc::UnboundedReceiver<Written>,
    directory: Directory,
    settling: Arc<AtomicUsize>,
) {
    while let Some(entry) = written.recv().await {
        queue_written(&directory, entry);
        settling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Queues a written entry's events at their devices, in entry order, and answers its
/// requests.
fn queue_written(directory: &Directory, Written { group, entry, pin }: Written) {
    let mut index = 0;
    for append in group {
        let epoch = append.tag.map_or(0, |t| t.epoch);
        for (device, event) in append.events {
            let logged = Logged {
                position: Position {
                    epoch,
                    entry,
                    index,
                },
                pin: pin.clone(),
                replayed: false,
            };
            index += 1;
            // Only the end of shutdown refuses here; the event is in the log and the
            // next start replays it.
            let _ = directory.push_admitted(
                &device,
                Queued {
                    event,
                    logged: Some(logged),
                },
            );
        }
        let _ = append.reply.send(Ok(()));
    }
}

/// Whether a failed append certainly did not reach Redis (or was refused by it).
fn never_sent(e: &StoreError) -> bool {
    match e {
        StoreError::Connect(_) => true,
        StoreError::Redis(e) => matches!(e.kind(), bb8_redis::redis::ErrorKind::Server(_)),
        _ => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Trims the log about once a second until stopped.
async fn trimmer(log: Arc<IngestLog>) {
    let mut stop = log.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_TRIM_EVERY) => {}
            _ = stop.changed() => return,
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
            if let Some(oldest) = oldest.filter(|o| first.is_none_or(|f| f > *o)) {
                log.metrics.ingest_log_overruns.inc();
                tracing::error!(stream = stream.key(), oldest_needed = %oldest, first = ?first, "ingest log entries were dropped before a checkpoint covered them (INGEST_LOG_MAXLEN reached, or Redis lost data): a crash now would lose events");
            }
        }
        Err(e) => tracing::debug!(error = %e, "ingest log trim failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_small_group_at_a_moderate_rate_lingers() {
        let moderate = (LOG_LINGER_RATE.start() + LOG_LINGER_RATE.end()) / 2.0;
        assert!(lingers(moderate, 1));
        assert!(lingers(moderate, LOG_LINGER_BELOW - 1));
        assert!(
            !lingers(moderate, LOG_LINGER_BELOW),
            "a large group goes at once"
        );
        assert!(
            !lingers(LOG_LINGER_RATE.start() / 2.0, 1),
            "a quiet service"
        );
        assert!(!lingers(LOG_LINGER_RATE.end() * 2.0, 1), "a saturated one");
        assert!(lingers(*LOG_LINGER_RATE.start(), 1));
        assert!(lingers(*LOG_LINGER_RATE.end(), 1));
    }
}
