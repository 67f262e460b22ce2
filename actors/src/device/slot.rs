//! One device's queue of accepted, unprocessed events, shared by the front end and the
//! device actor.
//!
//! A `std::sync::Mutex` is the right lock here: it is held for a push or a pop, never
//! across an `.await`, and is almost never contended (one producer burst, one consumer).

use super::DeviceMsg;
use crate::event::Event;
use crate::position::Logged;
use ractor::ActorRef;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a slot takes no more events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Evicted after DEVICE_IDLE_TIMEOUT: a new slot (and actor) takes the next event.
    Idle,
    /// The device moved to another node, which takes the next event.
    HandedOff,
}

/// An accepted event waiting in its device's queue: with its place in the ingest log when
/// the log is on.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The event.
    pub event: Event,
    /// Where the ingest log holds it (`None`: no log).
    pub logged: Option<Logged>,
}

impl From<Event> for Queued {
    fn from(event: Event) -> Self {
        Self {
            event,
            logged: None,
        }
    }
}

/// The queue and lifecycle flags of one device.
#[derive(Debug)]
pub struct Slot {
    device_id: Arc<str>,
    inner: Mutex<SlotInner>,
    /// An event was popped and is being processed; cleared when done. If the actor
    /// crashes meanwhile, the supervisor finds this set and accounts for that event.
    in_process: AtomicBool,
}

#[derive(Debug)]
struct SlotInner {
    queue: VecDeque<Queued>,
    /// The actor has been told (or will find out on start) that the queue is non-empty.
    scheduled: bool,
    /// No push is accepted any more: evicted (the front end makes a new slot) or handed
    /// off to another node (the front end forwards there).
    closed: Option<Closed>,
    actor: Option<ActorRef<DeviceMsg>>,
    /// When the queue last ran empty (or the slot was made): idleness counts from there,
    /// read once per burst of events rather than per event.
    last_event: Instant,
    /// Woken when the queue runs empty, while someone waits for that ([`Slot::drained`]).
    emptied: Option<Arc<Notify>>,
}

impl Slot {
    /// A new slot holding its first event. It starts scheduled: the actor that the
    /// supervisor spawns for it drains the queue when it starts.
    pub(crate) fn new(device_id: Arc<str>, first: Queued) -> Arc<Self> {
        Arc::new(Self {
            device_id,
            inner: Mutex::new(SlotInner {
                queue: VecDeque::from([first]),
                scheduled: true,
                closed: None,
                actor: None,
                last_event: Instant::now(),
                emptied: None,
            }),
            in_process: AtomicBool::new(false),
        })
    }

    /// The device this slot belongs to.
    pub fn device_id(&self) -> &Arc<str> {
        &self.device_id
    }

    fn lock(&self) -> MutexGuard<'_, SlotInner> {
        // Nothing panics while holding this lock; recover rather than propagate a poison.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an event, waking the actor if it was idle. Gives the event back, with the
    /// reason, when the slot is closed.
    pub(crate) fn push(&self, event: Queued) -> Result<(), (Queued, Closed)> {
        let wake = {
            let mut inner = self.lock();
            if let Some(closed) = inner.closed {
                return Err((event, closed));
            }
            inner.queue.push_back(event);
            if inner.scheduled {
                None
            } else {
                inner.scheduled = true;
                inner.actor.clone()
            }
        };
        if let Some(actor) = wake {
            // A failed cast means the actor just died; the event stays queued and the
            // restarted actor drains it on start.
            let _ = actor.cast(DeviceMsg::Wake);
        }
        Ok(())
    }

    /// Records the actor now serving this slot.
    pub(crate) fn attach(&self, actor: ActorRef<DeviceMsg>) {
        let mut inner = self.lock();
        inner.actor = Some(actor);
        inner.scheduled = true;
    }

    /// The next event to process, or `None` when the queue is empty, in which case the
    /// slot becomes unscheduled and the next push wakes the actor.
    pub(crate) fn next(&self) -> Option<Queued> {
        let mut inner = self.lock();
        match inner.queue.pop_front() {
            Some(event) => {
                self.in_process.store(true, Ordering::Relaxed);
                Some(event)
            }
            None => {
                inner.scheduled = false;
                inner.last_event = Instant::now();
                // The event before this call is finished (in_process is clear): drained.
                if let Some(emptied) = &inner.emptied {
                    emptied.notify_waiters();
                }
                None
            }
        }
    }

    /// The event returned by [`Slot::next`] is fully processed.
    pub(crate) fn finish_event(&self) {
        // Release: whoever sees the slot drained (a handoff) also sees the result this
        // event deposited with the writer.
        self.in_process.store(false, Ordering::Release);
    }

    /// After a crash: whether an event was being processed (and is therefore lost).
    pub(crate) fn take_in_process(&self) -> bool {
        self.in_process.swap(false, Ordering::Relaxed)
    }

    /// Closes the slot if the device has been idle for `idle` and nothing is queued or
    /// in progress; returns the actor to stop.
    pub(crate) fn close_if_idle(
        &self,
        now: Instant,
        idle: Duration,
    ) -> Option<ActorRef<DeviceMsg>> {
        let mut inner = self.lock();
        if inner.closed.is_some()
            || inner.scheduled
            || !inner.queue.is_empty()
            || now.duration_since(inner.last_event) < idle
        {
            return None;
        }
        inner.closed = Some(Closed::Idle);
        inner.actor.clone()
    }

    /// Closes the slot for a handoff: events already queued are still processed (wait
    /// for [`Slot::is_drained`]); any later push is refused with [`Closed::HandedOff`].
    pub(crate) fn close_for_handoff(&self) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(Closed::HandedOff);
        }
    }

    /// Undoes [`Slot::close_for_handoff`] when the handoff did not happen: the device
    /// stays here.
    pub(crate) fn reopen(&self) {
        let mut inner = self.lock();
        if inner.closed == Some(Closed::HandedOff) {
            inner.closed = None;
        }
    }

    /// Nothing queued and nothing being processed.
    pub(crate) fn is_drained(&self) -> bool {
        let inner = self.lock();
        inner.queue.is_empty() && !self.in_process.load(Ordering::Acquire)
    }

    /// Resolves once the slot is drained. Meant for a closed slot (nothing new is queued);
    /// an open one may fill again at once.
    pub(crate) async fn drained(&self) {
        loop {
            let emptied = {
                let mut inner = self.lock();
                inner.emptied.get_or_insert_with(Default::default).clone()
            };
            let woken = emptied.notified();
            tokio::pin!(woken);
            // Registered before the check, so the queue running empty in between still
            // wakes us. The actor finds the queue empty after each event it finishes, or,
            // restarted after a crash, when it starts.
            woken.as_mut().enable();
            if self.is_drained() {
                return;
            }
            woken.await;
        }
    }

    /// The actor serving this slot, if one has attached.
    pub(crate) fn attached(&self) -> Option<ActorRef<DeviceMsg>> {
        self.lock().actor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    /// A handoff waiting for a closed slot is woken when its actor finds the queue empty,
    /// not by a timer (the clock is paused: without the wake-up the wait times out).
    #[tokio::test(start_paused = true)]
    async fn a_closed_slot_wakes_its_waiter_when_the_queue_runs_empty() {
        let event = Event::new(1.0, 0.5, Utc::now()).expect("event");
        let slot = Slot::new(Arc::from("d"), Queued::from(event));
        slot.close_for_handoff();
        let waiter = tokio::spawn({
            let slot = slot.clone();
            async move { slot.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "an event is queued");
        assert!(slot.next().is_some());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the event is being processed");
        slot.finish_event();
        assert!(slot.next().is_none());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the queue ran empty")
            .expect("waiter");
    }
}
