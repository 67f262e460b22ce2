//! Handoff: a device's window moves, fenced, to its new owner.
//!
//! Pull-based. A node that starts an actor for a device asks the node that held the
//! device before — the node it handed the device to earlier, else the device's owner in
//! its previous view, else its owner if this node were not a member (a node that has
//! just joined); and, while discovery knows peers its ring leaves out (it was cut off
//! and is being taken back), the device's owner among those too — to release it
//! ([`Handoff::window_from_predecessor`]). The holder then
//! ([`Handoff::release`]):
//! 1. fences the device: from now on its events on this node go on to the new owner;
//! 2. closes the device's slot, lets its actor finish what is queued, stops it;
//! 3. takes the device's unflushed result out of the writer (so that it can never land
//!    in the store after the new owner's) and answers the final window.
//!
//! The new owner's actor waits for that answer before it processes anything, so no newer
//! event is processed before the window arrives. When the holder cannot be reached (it
//! crashed), the window comes from the store as on a single node.

use super::membership::Membership;
use super::ownership::Ring;
use super::Transport;
use crate::device::{BoxFuture, Directory, Predecessor};
use crate::metrics::{Direction, DirectionLabel, Metrics};
use crate::store::{WindowSnapshot, WriterMsg};
use dashmap::DashMap;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Devices this node handed off, and to whom; consulted on every event while non-empty.
#[derive(Debug, Default)]
pub struct Fences {
    to: DashMap<Arc<str>, (SocketAddr, Instant)>,
    len: AtomicUsize,
}

impl Fences {
    /// Where `device` went, if this node handed it off.
    pub fn holder(&self, device: &str) -> Option<SocketAddr> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.to.get(device).map(|e| e.value().0)
    }

    fn insert(&self, device: Arc<str>, to: SocketAddr) {
        if self.to.insert(device, (to, Instant::now())).is_none() {
            self.len.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Lifts the fence of `device` if it still points to `to` (another release may have
    /// set it since).
    fn take_if(&self, device: &str, to: SocketAddr) {
        if self.to.remove_if(device, |_, (t, _)| *t == to).is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn take(&self, device: &str) -> Option<SocketAddr> {
        let (_, (to, _)) = self.to.remove(device)?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Some(to)
    }

    /// Forgets fences older than `age`: by then the device's window is in the store.
    pub fn expire(&self, age: Duration) {
        let now = Instant::now();
        self.to.retain(|_, (_, since)| {
            let keep = now.duration_since(*since) < age;
            if !keep {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }
}

/// Why a release did not produce a window.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The device's actor did not finish its queue in time (it may itself be waiting
    /// for a window); the new owner falls back to the store.
    #[error("the device's queue did not drain within {0:?}")]
    Busy(Duration),
    /// The writer did not answer.
    #[error("the store writer did not answer")]
    Writer,
}

/// Both sides of a handoff on this node.
pub struct Handoff {
    pub(super) membership: Arc<Membership>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) directory: Directory,
    pub(super) writer: ActorRef<WriterMsg>,
    pub(super) fences: Arc<Fences>,
    pub(super) metrics: Metrics,
    /// How long a release waits for the device's queue to drain.
    pub(super) drain_timeout: Duration,
    /// Devices whose new actor here is asking peers for the window, and whom.
    pub(super) asking: DashMap<Arc<str>, Vec<SocketAddr>>,
}

/// Forgets a device's entry in [`Handoff::asking`] however its restore ends.
struct Asking<'a>(&'a DashMap<Arc<str>, Vec<SocketAddr>>, Arc<str>);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// What a release did with the device's processing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// An actor processed the device here, and has stopped.
    Actor,
    /// Nothing processed the device here.
    Nothing,
    /// This node keeps the device (see [`Handoff::keeps`]).
    Kept,
}

impl Handoff {
    /// Old-owner side: stop processing `device` here, hand its final window to `to`.
    /// The device's unflushed result comes out of the writer with it.
    ///
    /// When this node keeps the device instead (both nodes took it, see
    /// [`Handoff::keeps`]), the answer is the newest window this node holds, without
    /// stopping anything: the caller continues it with what it queued and then hands it
    /// back, so neither side's events are lost.
    pub async fn release(
        &self,
        device: Arc<str>,
        to: SocketAddr,
    ) -> Result<Option<WindowSnapshot>, ReleaseError> {
        let stopped = self.stop_processing(&device, to).await?;
        let window = match self
            .writer
            .call(
                |port| WriterMsg::Release(device.clone(), port),
                Some(self.drain_timeout),
            )
            .await
        {
            Ok(CallResult::Success(window)) => window,
            _ => return Err(ReleaseError::Writer),
        };
        if stopped == Stopped::Kept {
            tracing::debug!(device_id = %device, %to, "device contested; kept here, window lent");
            return Ok(window);
        }
        // Only a device this node really held counts as handed off (a first start
        // elsewhere asks here too, and finds nothing).
        if stopped == Stopped::Actor || window.is_some() {
            self.count(Direction::Out);
            tracing::debug!(device_id = %device, %to, "device handed off");
        }
        Ok(window)
    }

    fn count(&self, direction: Direction) {
        self.metrics
            .device_handoffs
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// Fences `device` (its events here go to `to` from now on), lets its actor finish
    /// what is queued, and stops it (or waits for an evicted one to finish stopping).
    async fn stop_processing(
        &self,
        device: &Arc<str>,
        to: SocketAddr,
    ) -> Result<Stopped, ReleaseError> {
        self.fences.insert(device.clone(), to);
        if let Some(slot) = self.directory.slot(device) {
            slot.close_for_handoff();
            let deadline = Instant::now() + self.drain_timeout;
            while !slot.is_drained() {
                // Its actor may itself be waiting for a window: from the caller (two
                // nodes that each took the device, each asking the other), where one of
                // the two must give way at once, else both would wait out the timeout
                // and both process the device; or from a third node that does not
                // answer. Either way the device stays here.
                let kept = self.keeps(device, to);
                if kept || Instant::now() >= deadline {
                    slot.reopen();
                    self.fences.take_if(device, to);
                    return if kept {
                        Ok(Stopped::Kept)
                    } else {
                        Err(ReleaseError::Busy(self.drain_timeout))
                    };
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if let Some(actor) = slot.attached() {
                // Waiting for it to stop: as it stops it deposits its window if that is
                // newer than its last checkpoint, and the release below answers it.
                let _ = actor
                    .stop_and_wait(Some("handed off".into()), Some(self.drain_timeout))
                    .await;
            }
            self.directory.unlist(&slot);
            // Its actor, if it started during the drain, took the fence when it asked
            // for the device's window (see `predecessors_of`): the device is gone all
            // the same, and its next events here must follow it.
            self.fences.insert(device.clone(), to);
            return Ok(Stopped::Actor);
        }
        // An actor evicted a moment ago (a view change stops idle actors) may not have
        // deposited its window yet: its newest events are then in no result the writer
        // holds, and the store has only its last checkpoint. Answering before it has
        // stopped lost those events (seen in CI at a scale-out).
        if let Some(evicted) = self.directory.stopping(device) {
            let _ = evicted.wait(Some(self.drain_timeout)).await;
            return Ok(Stopped::Actor);
        }
        Ok(Stopped::Nothing)
    }

    /// Whether this node keeps `device` when `to` asks for it: this node's new actor of
    /// the device is asking `to` for it at the same moment, and of the two nodes this
    /// one owns the device (rendezvous hashing over the pair, so both decide alike).
    /// `to` then gets this node's newest window at once (lent: nothing stops here),
    /// processes what it queued on top of it, and releases the device here, its events
    /// and all. (A cycle of three nodes is not detected: each waits out the drain
    /// timeout, as before.)
    fn keeps(&self, device: &str, to: SocketAddr) -> bool {
        let me = self.membership.me();
        self.asking
            .get(device)
            .is_some_and(|asked| asked.contains(&to))
            && Ring::new([me, to]).owner(device) == Some(me)
    }

    /// New-owner side: the nodes that may still hold `device`. First the one the view
    /// names: the node this node handed the device to, else the device's owner in the
    /// previous view, else its owner if this node were not a member (a node that has
    /// just joined). A node that was left out after a failed forward is asked too: if it
    /// was only slow, it still holds the device, and asking is what fences it; if it is
    /// gone, the refused connection answers at once.
    ///
    /// Then, when discovery knows peers that this node's ring leaves out, the device's
    /// owner among all of them: a node that was cut off and has just been taken back
    /// (a peer's probe reached it before its own view caught up) owns its devices again
    /// in its peers' rings while its own still lacks the nodes that processed them
    /// meanwhile. Asking only its stale view's candidate would start the device from the
    /// store while that node went on processing it: two owners, and a lost event.
    fn predecessors_of(&self, device: &str) -> Vec<SocketAddr> {
        let me = self.membership.me();
        let view = self.membership.view();
        let without_me = Ring::new(view.ring.members().filter(|m| *m != me));
        let first = self
            .fences
            .take(device)
            .into_iter()
            .chain(view.previous.owner(device))
            .chain(without_me.owner(device))
            .find(|p| *p != me);
        // `known` never holds this node itself.
        let known = self.membership.known();
        let wider = known
            .iter()
            .any(|p| !view.ring.contains(*p))
            .then(|| Ring::new(without_me.members().chain(known.iter().copied())))
            .and_then(|everyone| everyone.owner(device));
        let mut asked: Vec<SocketAddr> = first.into_iter().chain(wider).collect();
        asked.dedup();
        asked
    }

    /// New-owner side: the final window of `device` from the nodes that may hold it
    /// (asked at once; the newest window wins, as in the actor's restore).
    pub async fn window_from_predecessor(&self, device: Arc<str>) -> Option<WindowSnapshot> {
        let asked = self.predecessors_of(&device);
        self.asking.insert(device.clone(), asked.clone());
        let _asking = Asking(&self.asking, device.clone());
        let answers = futures_util::future::join_all(
            asked
                .iter()
                .map(|from| self.transport.release(*from, device.clone())),
        )
        .await;
        let mut windows = Vec::new();
        for (from, answer) in asked.into_iter().zip(answers) {
            match answer {
                Ok(Some(window)) => {
                    tracing::debug!(device_id = %device, %from, "device taken over");
                    windows.push(window);
                }
                // The holder knew no window either; the store may (or not).
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(device_id = %device, %from, error = %e, "handoff failed; restoring from the store");
                }
            }
        }
        let newest = windows.into_iter().max_by_key(WindowSnapshot::version);
        if newest.is_some() {
            self.count(Direction::In);
        }
        newest
    }
}

/// The device actors' way to the previous owner.
pub struct PredecessorLink(pub Arc<Handoff>);

impl Predecessor for PredecessorLink {
    fn window(&self, device: Arc<str>) -> BoxFuture<Option<WindowSnapshot>> {
        let handoff = self.0.clone();
        Box::pin(async move { handoff.window_from_predecessor(device).await })
    }
}

#[cfg(test)]
mod tests;
