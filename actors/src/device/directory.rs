//! The directory: device id → slot, the front end's way in.
//!
//! Submitting an event is a `DashMap` lookup and a push onto the device's queue; only a
//! device's first event (or its first after eviction) involves the supervisor, which is
//! told to spawn an actor for the new slot. Admission control happens here too: the
//! number of accepted-but-unprocessed events is bounded, because ractor mailboxes are
//! not.

use super::{Slot, SupervisorMsg};
use crate::event::Event;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;
use ractor::ActorRef;
use std::sync::Arc;

/// Why an event was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// MAX_PENDING_EVENTS events are accepted and not yet processed.
    #[error("too many events pending")]
    Overloaded,
    /// The actor system is stopping.
    #[error("the device supervisor is not running")]
    Unavailable,
}

/// The bound on accepted, unprocessed events. The count lives in the
/// `pending_events` gauge itself, so the metric can never disagree with it.
#[derive(Debug, Clone)]
pub struct Admission {
    pending: Gauge,
    max: i64,
}

impl Admission {
    /// Admission of at most `max` pending events, counted in `pending`.
    pub fn new(pending: Gauge, max: usize) -> Self {
        Self {
            pending,
            max: i64::try_from(max).unwrap_or(i64::MAX),
        }
    }

    fn try_acquire(&self) -> bool {
        if self.pending.inc() >= self.max {
            self.pending.dec();
            return false;
        }
        true
    }

    /// One accepted event left the system (processed, or lost with a crashed actor).
    pub(crate) fn release(&self) {
        self.pending.dec();
    }

    /// Events accepted and not yet processed.
    pub fn pending(&self) -> usize {
        usize::try_from(self.pending.get()).unwrap_or(0)
    }
}

/// Device id → live slot, shared by the directory (which adds) and the supervisor
/// (which evicts).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotMap(Arc<DashMap<Arc<str>, Arc<Slot>>>);

impl SlotMap {
    /// Removes `slot` from the map if it is still the device's live slot (a newer slot
    /// of the same device is left alone).
    pub(crate) fn unlist(&self, slot: &Arc<Slot>) {
        self.0
            .remove_if(slot.device_id(), |_, live| Arc::ptr_eq(live, slot));
    }
}

/// Where the front end submits events; cheap to clone.
#[derive(Clone)]
pub struct Directory {
    slots: SlotMap,
    supervisor: ActorRef<SupervisorMsg>,
    admission: Admission,
}

impl Directory {
    pub(crate) fn new(
        slots: SlotMap,
        supervisor: ActorRef<SupervisorMsg>,
        admission: Admission,
    ) -> Self {
        Self {
            slots,
            supervisor,
            admission,
        }
    }

    /// Accepts `event` for `device_id`: once this returns `Ok`, the event will be
    /// processed in order with the device's other events.
    pub fn submit(&self, device_id: &str, mut event: Event) -> Result<(), SubmitError> {
        if !self.admission.try_acquire() {
            return Err(SubmitError::Overloaded);
        }
        // At most a few rounds: a closed slot is removed before we look again.
        loop {
            let existing = self.slots.0.get(device_id).map(|s| s.value().clone());
            let slot = match existing {
                Some(slot) => slot,
                None => match self.slots.0.entry(Arc::from(device_id)) {
                    Entry::Occupied(o) => o.get().clone(),
                    Entry::Vacant(v) => {
                        let slot = Slot::new(v.key().clone(), event);
                        v.insert(slot.clone());
                        if self
                            .supervisor
                            .cast(SupervisorMsg::Spawn(slot.clone()))
                            .is_err()
                        {
                            self.slots.unlist(&slot);
                            self.admission.release();
                            return Err(SubmitError::Unavailable);
                        }
                        return Ok(());
                    }
                },
            };
            match slot.push(event) {
                Ok(()) => return Ok(()),
                Err(returned) => {
                    self.slots.unlist(&slot);
                    event = returned;
                }
            }
        }
    }

    /// Events accepted and not yet processed.
    pub fn pending(&self) -> usize {
        self.admission.pending()
    }

    /// The live slot of a device.
    #[cfg(test)]
    pub(crate) fn slot(&self, device_id: &str) -> Option<Arc<Slot>> {
        self.slots.0.get(device_id).map(|s| s.value().clone())
    }

    /// Devices with a live slot.
    pub fn devices(&self) -> usize {
        self.slots.0.len()
    }
}
