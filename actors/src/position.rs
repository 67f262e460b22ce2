//! Positions in the ingest log, and the pins that keep log entries from being trimmed
//! while an event they hold is not yet in a stored checkpoint.
//!
//! A [`Position`] is the shard's epoch when the event was taken, its entry's stream id
//! and the event's index in it: a window that has seen position `p` has seen every event
//! of its device up to `p`, so a replayed event at or below the window's position is
//! skipped (a position, not the event's content, says what a window has seen). In a
//! cluster each owner appends to a stream of its own; the epoch, raised by every change
//! of a shard's owner, orders positions across owners (a single node's epoch is 0).
//!
//! A [`Pin`] stands for one log entry; every event of the entry holds it (an `Arc`), from
//! the append through its device's queue and window until a checkpoint holding the event
//! is in the store. [`Pins`] keeps the ids of the entries still pinned, so the log is
//! trimmed below the oldest of them and never further. The set is touched once per entry
//! (when the entry is appended and when its last holder lets go), not once per event.

use crate::store::stream_id::StreamId;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where an event is in the ingest log: its shard's epoch, its entry and its index in the
/// entry (compared in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The epoch of the event's shard when it was taken (0 on a single node).
    pub epoch: u64,
    /// The entry.
    pub entry: StreamId,
    /// The event's index in the entry.
    pub index: u32,
}

/// The entries appended and not yet covered by stored checkpoints (one pin per entry: the
/// `Arc<Pin>` counts its holders). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<Mutex<BTreeSet<StreamId>>>);

impl Pins {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<StreamId>> {
        // Only inserts and removes run under the lock; a poisoned map is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pins an entry until every holder of the returned pin has let go.
    pub fn pin(&self, entry: StreamId) -> Arc<Pin> {
        self.lock().insert(entry);
        Arc::new(Pin {
            entry,
            pins: self.clone(),
        })
    }

    /// The oldest pinned entry, if any.
    pub fn oldest(&self) -> Option<StreamId> {
        self.lock().first().copied()
    }

    /// Entries pinned.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no entry is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One pinned log entry; unpinned when the last `Arc` of it drops.
#[derive(Debug)]
pub struct Pin {
    entry: StreamId,
    pins: Pins,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.pins.lock().remove(&self.entry);
    }
}

/// What a logged event carries besides the event itself.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Its position.
    pub position: Position,
    /// Its entry's pin.
    pub pin: Arc<Pin>,
    /// It comes from a replay of the log, not from a client.
    pub replayed: bool,
}

/// The pins a window holds: those of its events since its last checkpoint. Consecutive
/// events of one entry share one pin, so a device adds one per entry.
#[derive(Debug, Clone, Default)]
pub struct Held(Vec<Arc<Pin>>);

impl Held {
    /// Holds `pin` (once, if it is the one held last).
    pub fn hold(&mut self, pin: &Arc<Pin>) {
        if !self.0.last().is_some_and(|last| Arc::ptr_eq(last, pin)) {
            self.0.push(pin.clone());
        }
    }

    /// Adds what `other` holds.
    pub fn merge(&mut self, other: Held) {
        self.0.extend(other.0);
    }

    /// Test only: entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Test only: true when nothing is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stays_pinned_until_its_last_holder_lets_go() {
        let pins = Pins::default();
        let a = pins.pin(StreamId(1, 0));
        let b = pins.pin(StreamId(2, 0));
        assert_eq!(pins.oldest(), Some(StreamId(1, 0)));
        let mut held = Held::default();
        held.hold(&a);
        held.hold(&a);
        assert_eq!(held.len(), 1, "one pin per entry");
        drop(a);
        assert_eq!(
            pins.oldest(),
            Some(StreamId(1, 0)),
            "the window still holds it"
        );
        drop(held);
        assert_eq!(pins.oldest(), Some(StreamId(2, 0)));
        drop(b);
        assert!(pins.is_empty());
    }

    #[test]
    fn positions_order_by_entry_then_index() {
        let p = |ms, seq, index| Position {
            epoch: 0,
            entry: StreamId(ms, seq),
            index,
        };
        assert!(p(1, 0, 9) < p(1, 1, 0));
        // A later epoch (a later owner, another stream) is newer whatever its entry.
        let later = Position {
            epoch: 1,
            ..p(0, 1, 0)
        };
        assert!(later > p(2, 0, 0));
        assert!(p(1, 1, 0) < p(1, 1, 1));
        assert!(p(2, 0, 0) > p(1, 99, 99));
    }
}
