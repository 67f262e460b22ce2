//! The writer's coalescing inbox: the newest result per device, waiting for a flush.
//!
//! Device actors deposit results here instead of sending one message per event: a map
//! keyed by device can never hold more than one entry per device, however fast devices
//! report or however long the store is down, and depositing is a short critical section
//! instead of a message plus a wake-up of the writer per result, a cost paid by every
//! event at saturation. The writer takes the whole map at each flush in O(1).
//!
//! A `std::sync::Mutex`: every critical section is a map insert, lookup or swap, never an
//! `.await`.

use super::{Version, WindowSnapshot};
use crate::analytics::{Signal, Window};
use crate::event::Analysis;
use crate::position::{Held, Position};
use crate::tuning::FLUSH_EARLY_AT;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// What a device actor hands the writer after each event.
#[derive(Debug, Clone)]
pub struct Record {
    /// The analysis, stored under `analysis:{id}`.
    pub analysis: Analysis,
    /// The result's version (see [`super::snapshot::Version`]): a deposit never replaces
    /// a newer one.
    pub version: u64,
    /// The window to store under `window:{id}`, when a checkpoint was due (see
    /// WINDOW_CHECKPOINT_INTERVAL). Only checkpoints carry the window: between them the
    /// device actor updates its window in place instead of copying it for every result.
    /// A result that replaces a checkpoint in the inbox takes it over, so coalescing never
    /// skips one; the analysis may then be newer than the stored window, which the actor's
    /// next checkpoint catches up.
    pub checkpoint: Option<Checkpoint>,
    /// The log entries the checkpoint covers: kept untrimmed until it is stored (a
    /// result that replaces it in the inbox takes them over).
    pub held: Held,
}

/// A device's window as a checkpoint stores it.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The window after the event.
    pub window: Arc<Window>,
    /// The window's version (see [`super::snapshot::Version`]).
    pub version: u64,
    /// The time of the newest event in the window.
    pub event_timestamp: DateTime<Utc>,
    /// The ingest-log position of the newest event the window holds.
    pub position: Position,
}

impl Checkpoint {
    /// Whether a newer result of the device may carry this checkpoint to the store: only
    /// one of the same actor incarnation. A late checkpoint of an earlier incarnation (an
    /// actor that finished stopping after its successor had restored and stored its own
    /// first checkpoint) would write back an older window and position, below log entries
    /// the successor's stored checkpoint had already let be trimmed.
    fn feeds(&self, record: &Record) -> bool {
        Version::parts(self.version).0 == Version::parts(record.version).0
    }

    /// The window as persisted.
    pub fn snapshot(&self) -> WindowSnapshot {
        WindowSnapshot::of(
            &self.window,
            self.event_timestamp,
            self.version,
            self.position,
        )
    }
}

impl Record {
    /// The window this result carries to the store, if any.
    pub fn snapshot(&self) -> Option<WindowSnapshot> {
        self.checkpoint.as_ref().map(Checkpoint::snapshot)
    }
}

/// Results per device, newest only.
pub type Batch = HashMap<Arc<str>, Record>;

/// One anomalous result for the `anomalies` stream. Never coalesced: every anomalous
/// event gets its entry, even when its analysis key is overwritten before the flush.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    /// The device.
    pub device_id: Arc<str>,
    /// Which signal was anomalous.
    pub signal: Signal,
    /// The analysis of the anomalous event, as `/analyze` JSON.
    pub analysis: Bytes,
    /// Unique per entry (process and counter): a retried append that had reached Redis
    /// after all (a timed-out flush) is recognised and not appended twice.
    pub uid: String,
}

/// Anomalies waiting for the stream, oldest first, at most `max` (the oldest are dropped
/// beyond it, and counted).
#[derive(Debug, Default)]
struct AnomalyQueue {
    entries: VecDeque<StreamEntry>,
    max: usize,
    dropped: Counter,
    /// This process's part of entry uids, and the counter.
    uid_base: u64,
    next_uid: u64,
}

impl AnomalyQueue {
    fn trim(&mut self) {
        while self.entries.len() > self.max {
            self.entries.pop_front();
            self.dropped.inc();
        }
    }
}

/// The newest unflushed result of each device, and the anomalies not yet appended.
#[derive(Debug, Default)]
pub struct Inbox {
    results: Mutex<Batch>,
    anomalies: Mutex<AnomalyQueue>,
}

impl Inbox {
    /// An inbox whose anomaly queue holds at most `max` entries (ANOMALY_STREAM_MAXLEN;
    /// 0: no stream), counting those dropped beyond it in `dropped`.
    pub fn with_stream(max: usize, dropped: Counter) -> Self {
        Self {
            results: Mutex::default(),
            anomalies: Mutex::new(AnomalyQueue {
                entries: VecDeque::new(),
                max,
                dropped,
                // Distinct across processes and restarts (time and pid), for as long as a
                // retry can come (minutes).
                uid_base: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ (u64::from(std::process::id()) << 48),
                next_uid: 0,
            }),
        }
    }

    fn queue(&self) -> MutexGuard<'_, AnomalyQueue> {
        self.anomalies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an anomaly for the stream (dropping the oldest past the bound), giving it
    /// its uid.
    pub fn put_anomaly(&self, device_id: Arc<str>, signal: Signal, analysis: Bytes) {
        let mut queue = self.queue();
        if queue.max > 0 {
            queue.next_uid += 1;
            let uid = format!("{:016x}-{}", queue.uid_base, queue.next_uid);
            queue.entries.push_back(StreamEntry {
                device_id,
                signal,
                analysis,
                uid,
            });
            queue.trim();
        }
    }

    /// Takes every queued anomaly, oldest first.
    pub fn take_anomalies(&self) -> Vec<StreamEntry> {
        self.queue().entries.drain(..).collect()
    }

    /// Puts back anomalies whose append failed, before any queued since (they are older).
    pub fn restore_anomalies(&self, failed: Vec<StreamEntry>) {
        let mut queue = self.queue();
        for entry in failed.into_iter().rev() {
            queue.entries.push_front(entry);
        }
        queue.trim();
    }

    /// Anomalies waiting.
    pub fn anomalies(&self) -> usize {
        self.queue().entries.len()
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        // No code panics while holding the lock; a poisoned map is still consistent.
        self.results.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deposits a result, replacing an older one of the same device. Returns true when
    /// enough devices wait that the writer should flush now rather than at its next tick.
    #[must_use = "a full inbox must be flushed early"]
    pub fn put(&self, mut record: Record) -> bool {
        let mut results = self.lock();
        match results.entry(record.analysis.device_id.clone()) {
            // A late deposit of an older incarnation (an actor that finished stopping
            // after its successor started) never replaces a newer result.
            Entry::Occupied(mut older) if older.get().version > record.version => {
                older.get_mut().held.merge(record.held);
            }
            Entry::Occupied(mut older) => {
                let older = older.get_mut();
                if record.checkpoint.is_none() {
                    record.checkpoint = older.checkpoint.take().filter(|c| c.feeds(&record));
                }
                record.held.merge(std::mem::take(&mut older.held));
                *older = record;
            }
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
        }
        results.len() >= FLUSH_EARLY_AT
    }

    /// Takes everything waiting.
    pub fn take(&self) -> Batch {
        let mut results = self.lock();
        let capacity = results.len();
        std::mem::replace(&mut *results, HashMap::with_capacity(capacity))
    }

    /// Puts back results whose flush failed; a newer result deposited meanwhile wins.
    pub fn restore(&self, batch: Batch) {
        let mut results = self.lock();
        for (device, record) in batch {
            match results.entry(device) {
                Entry::Occupied(mut newer) => {
                    let newer = newer.get_mut();
                    if newer.checkpoint.is_none() {
                        newer.checkpoint = record.checkpoint.filter(|c| c.feeds(newer));
                    }
                    newer.held.merge(record.held);
                }
                Entry::Vacant(slot) => {
                    slot.insert(record);
                }
            }
        }
    }

    /// The window a device's waiting result carries to the store, if any.
    pub fn window(&self, device: &str) -> Option<WindowSnapshot> {
        self.lock().get(device).and_then(Record::snapshot)
    }

    /// Devices waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing waits, neither results nor anomalies.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.anomalies() == 0
    }
}
