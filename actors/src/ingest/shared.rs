//! What the ingest log's handle ([`super::IngestLog`]) and its appender task share: the
//! requests handed over, the flags both read, and the per-shard counts of requests not
//! yet queued at their devices.

use super::redis_log::RedisLog;
use crate::device::SubmitError;
use crate::event::Event;
use crate::store::StreamId;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{oneshot, Notify};

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

/// Events waiting to be appended, with whom to answer.
pub(super) struct Append {
    pub(super) events: Vec<(Arc<str>, Event)>,
    pub(super) tag: Option<Tag>,
    pub(super) reply: oneshot::Sender<Result<(), SubmitError>>,
    /// Counts the events of the shard between admission and their queues.
    pub(super) _flight: Option<Flight>,
}

/// What the appender is asked.
pub(super) enum Msg {
    Append(Append),
    /// Append to this stream from now on (a node that was declared dead starts a new
    /// one; the old is sealed); answered once every earlier append is done.
    Switch(RedisLog, oneshot::Sender<()>),
}

/// One shard's part of an append, counted from its admission until its events are
/// queued at their devices (or refused): a handoff waits for the count to reach zero.
pub(super) struct Flight {
    pub(super) flights: Arc<Flights>,
    pub(super) shard: usize,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.flights.counts[self.shard].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.flights.landed.notify_waiters();
        }
    }
}

/// Per shard, its parts between admission and their queues.
pub(super) struct Flights {
    pub(super) counts: Box<[AtomicUsize]>,
    /// Woken whenever a shard's count falls to zero.
    pub(super) landed: Notify,
}

/// An entry written: its requests, to be queued and answered by the settler.
pub(super) struct Written {
    pub(super) group: Vec<Append>,
    pub(super) entry: StreamId,
    pub(super) pin: Arc<crate::position::Pin>,
}

/// What the handle and the tasks share.
pub(super) struct Shared {
    /// The start-up replay is done: new events are taken.
    pub(super) replayed: AtomicBool,
    /// Redis did not answer the last append: new events are refused until it does.
    pub(super) down: AtomicBool,
    /// The newest entry appended or replayed (what to trim to when nothing is pinned).
    pub(super) newest: Mutex<Option<StreamId>>,
    /// Another writer holds the stream (this node's writer key lapsed): nothing is
    /// appended until this node holds it again.
    pub(super) fenced: AtomicBool,
    /// In a cluster: the stream appended to is gone (collected after this member was
    /// declared dead, or lost by Redis). New events are refused until the member
    /// switches to a new stream.
    pub(super) gone: AtomicBool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
