//! The directory: device id → slot, the front end's way in.
//!
//! Submitting an event is a `DashMap` lookup and a push onto the device's queue; only a
//! device's first event (or its first after eviction) involves the supervisor, which is
//! told to spawn an actor for the new slot. Admission control happens here too: the
//! number of accepted-but-unprocessed events is bounded, because ractor mailboxes are
//! not.

use super::slot::{Closed, Queued};
use super::{Slot, SupervisorMsg};
use crate::event::Event;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;
use ractor::{ActorCell, ActorRef};
use std::sync::Arc;
use tokio::sync::Notify;

/// Why an event was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// MAX_PENDING_EVENTS events are accepted and not yet processed.
    #[error("too many events pending")]
    Overloaded,
    /// The actor system is stopping.
    #[error("the device supervisor is not running")]
    Unavailable,
    /// The device's shard is moving to another node; its events go there.
    #[error("the device's shard is moving to another node")]
    HandedOff,
    /// In a cluster: no node could take the event in time (its shard's owner is
    /// unreachable, or the shard is between owners for longer than the bound).
    #[error("the device's owner cannot take events now")]
    Unroutable,
    /// The ingest log is on and cannot be written (Redis unreachable, or the log is
    /// still being replayed at start-up): the event would not survive a crash.
    #[error("the ingest log cannot be written")]
    NotDurable,
    /// In a cluster with the ingest log: the event was sent to its owner, which failed
    /// before it answered. It may be in the owner's log, which the shard's next owner
    /// replays: sent elsewhere it could be counted twice, so it is not.
    #[error("the device's owner failed before it answered")]
    OutcomeUnknown,
}

/// The bound on accepted, unprocessed events. The count lives in the
/// `pending_events` gauge itself, so the metric can never disagree with it.
#[derive(Debug, Clone)]
pub struct Admission {
    pending: Gauge,
    max: i64,
    /// Woken when the count falls to zero (a shutdown waits for it).
    empty: Arc<Notify>,
}

impl Admission {
    /// Admission of at most `max` pending events, counted in `pending`.
    pub fn new(pending: Gauge, max: usize) -> Self {
        Self {
            pending,
            max: i64::try_from(max).unwrap_or(i64::MAX),
            empty: Arc::new(Notify::new()),
        }
    }

    fn try_acquire(&self) -> bool {
        self.try_acquire_many(1)
    }

    /// Admits `n` events at once, or none of them.
    pub(crate) fn try_acquire_many(&self, n: usize) -> bool {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.pending.inc_by(n) > self.max - n {
            self.give_back(n);
            return false;
        }
        true
    }

    /// One accepted event left the system (processed, or lost with a crashed actor).
    pub(crate) fn release(&self) {
        self.give_back(1);
    }

    fn give_back(&self, n: i64) {
        if self.pending.dec_by(n) == n {
            // Taken only when the count reaches zero, never per event under load.
            self.empty.notify_waiters();
        }
    }

    /// Events accepted and not yet processed.
    pub fn pending(&self) -> usize {
        usize::try_from(self.pending.get()).unwrap_or(0)
    }

    /// Resolves once no accepted event is left unprocessed.
    pub async fn emptied(&self) {
        loop {
            let woken = self.empty.notified();
            tokio::pin!(woken);
            // Registered before the check, so a release in between still wakes us.
            woken.as_mut().enable();
            if self.pending() == 0 {
                return;
            }
            woken.await;
        }
    }
}

/// Device id → live slot, shared by the directory (which adds) and the supervisor
/// (which evicts); plus the actors of evicted slots that are still stopping.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotMap(
    Arc<DashMap<Arc<str>, Arc<Slot>>>,
    Arc<DashMap<Arc<str>, ActorCell>>,
);

impl SlotMap {
    /// Removes `slot` from the map if it is still the device's live slot (a newer slot
    /// of the same device is left alone).
    pub(crate) fn unlist(&self, slot: &Arc<Slot>) {
        self.0
            .remove_if(slot.device_id(), |_, live| Arc::ptr_eq(live, slot));
    }

    /// Unlists an idle slot and stops its actor. Until that actor has stopped (and with
    /// it deposited its window), a new actor of the device waits for it: see
    /// [`SlotMap::stopping`].
    pub(crate) fn retire(&self, slot: &Arc<Slot>, actor: ActorCell, reason: &str) {
        // Recorded before the slot goes: a new slot (and actor) of the device can appear
        // the moment it is unlisted, and must find this one.
        self.1.insert(slot.device_id().clone(), actor.clone());
        self.unlist(slot);
        actor.stop(Some(reason.into()));
    }

    /// The device's previous actor, if it is still stopping.
    pub(crate) fn stopping(&self, device: &str) -> Option<ActorCell> {
        self.1.get(device).map(|a| a.value().clone())
    }

    /// Forgets a stopped actor (a newer stopping one of the same device is kept).
    pub(crate) fn stopped(&self, device: &str, actor: ractor::ActorId) {
        self.1.remove_if(device, |_, a| a.get_id() == actor);
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
    pub fn submit(&self, device_id: &str, event: Event) -> Result<(), SubmitError> {
        if !self.admission.try_acquire() {
            return Err(SubmitError::Overloaded);
        }
        self.push_admitted(device_id, event.into())
    }

    /// Accepts `event` even past MAX_PENDING_EVENTS: for the rest of a batch that is
    /// partly queued already (refusing it now would make its sender resend the part that
    /// was taken). Fails only when the actor system is stopping.
    pub fn submit_regardless(&self, device_id: &str, event: Event) -> Result<(), SubmitError> {
        self.admission.pending.inc();
        self.push_admitted(device_id, event.into())
    }

    /// Accepts all of `events` or none (then `Overloaded`): a batch that does not fit
    /// under MAX_PENDING_EVENTS is refused whole, so a retry never duplicates. Events of
    /// one device are queued in the order given. Returns the events of devices that were
    /// handed off meanwhile (not accepted here; the caller sends them on).
    pub fn submit_many<D: AsRef<str>>(
        &self,
        events: impl ExactSizeIterator<Item = (D, Event)>,
    ) -> Result<Vec<(D, Event)>, SubmitError> {
        let total = events.len();
        if !self.admission.try_acquire_many(total) {
            return Err(SubmitError::Overloaded);
        }
        let mut moved = Vec::new();
        for (i, (device, event)) in events.enumerate() {
            match self.push_admitted(device.as_ref(), event.into()) {
                Ok(()) => {}
                Err(SubmitError::HandedOff) => moved.push((device, event)),
                Err(e) => {
                    // Only Unavailable is left: the supervisor is gone, which happens
                    // only at the very end of shutdown, after the listeners stopped. The
                    // events before this one are queued; the rest are refused.
                    for _ in i + 1..total {
                        self.admission.release();
                    }
                    return Err(e);
                }
            }
        }
        Ok(moved)
    }

    /// Admits `n` events at once or none (MAX_PENDING_EVENTS); each admitted event is then
    /// pushed with [`Directory::push_admitted`] or given back with [`Directory::unadmit`].
    pub(crate) fn admit(&self, n: usize) -> bool {
        self.admission.try_acquire_many(n)
    }

    /// Counts `n` events as admitted even past MAX_PENDING_EVENTS (a replay of the ingest
    /// log: those events were accepted before).
    pub(crate) fn admit_regardless(&self, n: usize) {
        self.admission
            .pending
            .inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Gives back the admission of `n` events that were not pushed.
    pub(crate) fn unadmit(&self, n: usize) {
        self.admission
            .give_back(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Closes the slots of the devices `moving` selects: events already queued are still
    /// processed, later pushes are refused ([`SubmitError::HandedOff`]). Answers the
    /// closed slots, and the device actors of those devices that are still stopping after
    /// an eviction (their windows are not deposited yet).
    pub(crate) fn close_where(
        &self,
        moving: impl Fn(&str) -> bool,
    ) -> (Vec<Arc<Slot>>, Vec<ActorCell>) {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .0
            .iter()
            .filter(|e| moving(e.key()))
            .map(|e| e.value().clone())
            .collect();
        for slot in &slots {
            slot.close_for_handoff();
        }
        let stopping = self
            .slots
            .1
            .iter()
            .filter(|e| moving(e.key()))
            .map(|e| e.value().clone())
            .collect();
        (slots, stopping)
    }

    /// Queues an event whose admission is already counted; on an error the admission is
    /// released.
    pub(crate) fn push_admitted(
        &self,
        device_id: &str,
        mut event: Queued,
    ) -> Result<(), SubmitError> {
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
                Err((_, Closed::HandedOff)) => {
                    self.admission.release();
                    return Err(SubmitError::HandedOff);
                }
                Err((returned, Closed::Idle)) => {
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

    /// Resolves once no accepted event is left unprocessed.
    pub async fn emptied(&self) {
        self.admission.emptied().await;
    }

    /// Test only: the live slot of a device.
    #[cfg(test)]
    pub(crate) fn slot(&self, device_id: &str) -> Option<Arc<Slot>> {
        self.slots.0.get(device_id).map(|s| s.value().clone())
    }

    /// Test only: devices with a live slot.
    #[cfg(test)]
    pub(crate) fn devices(&self) -> usize {
        self.slots.0.len()
    }

    /// Test only: stops every device actor with nothing queued or in progress (their
    /// windows stay with the writer and the store); their devices' next events start new
    /// actors. Returns how many stopped.
    #[cfg(test)]
    pub(crate) fn evict_drained(&self) -> usize {
        let now = tokio::time::Instant::now();
        let mut stopped = 0;
        for slot in self
            .slots
            .0
            .iter()
            .map(|e| e.value().clone())
            .collect::<Vec<_>>()
        {
            if let Some(actor) = slot.close_if_idle(now, std::time::Duration::ZERO) {
                self.slots
                    .retire(&slot, actor.get_cell(), "cluster view changed");
                stopped += 1;
            }
        }
        stopped
    }

    /// Removes a handed-off slot, so that the device's next local event (once this node
    /// owns it again) starts a new actor.
    pub(crate) fn unlist(&self, slot: &Arc<Slot>) {
        self.slots.unlist(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr, ActorRef};

    /// An actor that does nothing: stands for a device's stopping actor.
    struct Idle;

    impl Actor for Idle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stopped_actor_is_forgotten_but_a_newer_stopping_one_of_the_device_is_kept() {
        let slots = SlotMap::default();
        let (older, _) = Actor::spawn(None, Idle, ()).await.expect("spawn");
        let (newer, _) = Actor::spawn(None, Idle, ()).await.expect("spawn");
        let device: Arc<str> = Arc::from("d");
        slots.1.insert(device.clone(), older.get_cell());
        // A newer actor of the device starts stopping before the older one reports.
        slots.1.insert(device.clone(), newer.get_cell());
        slots.stopped("d", older.get_id());
        assert_eq!(
            slots.stopping("d").map(|a| a.get_id()),
            Some(newer.get_id()),
            "a new actor of the device must still wait for the newer one"
        );
        slots.stopped("d", newer.get_id());
        assert!(slots.stopping("d").is_none());
        older.stop(None);
        newer.stop(None);
    }

    /// A shutdown waiting for the pending count is woken by the release that empties it,
    /// not by a timer (the clock is paused: without the wake-up the wait times out).
    #[tokio::test(start_paused = true)]
    async fn the_release_that_empties_the_pending_count_wakes_its_waiter() {
        let admission = Admission::new(Gauge::default(), 10);
        assert!(admission.try_acquire_many(2));
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.emptied().await }
        });
        tokio::task::yield_now().await;
        admission.release();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one event is still pending");
        admission.release();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the count reached zero")
            .expect("waiter");
    }
}
