//! The appender: the task that writes the ingest log (group commit), and the settler
//! beside it that queues large entries' events at their devices. See [`super::log`] for
//! what the log guarantees.

use super::redis_log::{encode_tags, RedisLog};
use super::replay;
use super::shared::{lock, Append, LogSettings, Msg, Shared, Written};
use crate::cluster::wire;
use crate::device::{Directory, Queued, SubmitError};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::position::{Logged, Pins, Position};
use crate::store::{StoreError, StreamId};
use crate::tuning::{
    LOG_COMMIT_GAP, LOG_LINGER_BELOW, LOG_LINGER_RATE, LOG_MAX_ENTRY_EVENTS, LOG_PROBE_EVERY,
    LOG_RATE_FLOOR_MS, LOG_RATE_SMOOTHING, LOG_RESOLVE_WAIT, LOG_SETTLE_ASIDE, LOG_WRITER_LEASE,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A nonce prefix distinct across processes and restarts.
fn nonce_base() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

/// The appending task's state.
pub(super) struct Appender {
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
    /// In a cluster: the stream must exist (the member created it before the table
    /// registered it); an append never creates it again.
    existing: bool,
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

/// Starts the settler on this runtime and the appender on a thread and runtime of its
/// own: with the log's own connections, every request's latency is its round trips,
/// which must not wait behind the HTTP and actor tasks of the main runtime.
pub(super) fn start(appender: Appender) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ingest-log".into())
        .spawn(move || runtime.block_on(appender.run()))?;
    Ok(())
}

impl Appender {
    /// An appender of the requests of `rx` to `log`; spawns its settler.
    pub(super) fn new(
        rx: mpsc::UnboundedReceiver<Msg>,
        log: RedisLog,
        settings: &LogSettings,
        directory: Directory,
        pins: Pins,
        metrics: Metrics,
        shared: Arc<Shared>,
    ) -> Self {
        let (settle, written) = mpsc::unbounded_channel();
        let settling = Arc::new(AtomicUsize::new(0));
        tokio::spawn(settler(written, directory.clone(), settling.clone()));
        Self {
            rx,
            settle,
            settling,
            log,
            switch: None,
            maxlen: settings.maxlen,
            directory,
            pins,
            metrics,
            shared,
            nonce: (nonce_base(), 0),
            last_commit: None,
            rate: 0.0,
            writer: settings.writer.clone(),
            existing: settings.shards > 0,
        }
    }

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
        self.shared.gone.store(false, Ordering::Release);
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
        let result = self
            .log
            .append(self.maxlen, &nonce, &body, &tags, self.existing)
            .await;
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
                if matches!(outcome, Outcome::Failed(StoreError::StreamGone(_)))
                    && !self.shared.gone.swap(true, Ordering::AcqRel)
                {
                    tracing::warn!(stream = self.log.key(), "this member's ingest-log stream is gone (collected after it was declared dead, or lost by Redis); new events are refused until it appends to a new stream");
                }
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
        // A stream that is gone stays so: only a switch to a new one ends the refusals.
        if !self.shared.gone.load(Ordering::Acquire) && self.log.last().await.is_ok() {
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
        StoreError::Connect(_) | StoreError::StreamGone(_) => true,
        StoreError::Redis(e) => matches!(e.kind(), bb8_redis::redis::ErrorKind::Server(_)),
        _ => false,
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
