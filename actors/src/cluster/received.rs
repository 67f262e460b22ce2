//! The receiving side of forwarding: batches other nodes send here, taken once per
//! idempotency key.

use super::ownership::unix_millis;
use super::{wire, BatchId, Cluster, Refused};
use crate::event::{DeviceId, Event};
use crate::tuning::RECEIVED_MAX_REMEMBERED;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError};
use tokio::sync::watch;
use tokio::time::Instant;

/// Answers given to forwarded batches, by key, for as long as a repeat can come.
#[derive(Default)]
pub(super) struct Received {
    answers: HashMap<BatchId, watch::Receiver<Option<Vec<u32>>>>,
    order: VecDeque<(Instant, BatchId)>,
}

impl Cluster {
    /// Accepts a batch forwarded by another node under its idempotency key: a repeat of a
    /// key gets the first answer (waiting for it if the first is still being taken), and
    /// queues nothing again, whenever it arrives. Any other batch sent (`sent_ms`, the
    /// sender's clock) before this node last renewed a lapsed lease is refused whole. The answer
    /// lists the positions not taken; `None` when the batch, never taken here, arrived
    /// after its sender's deadline (`deadline_ms`): the sender gave up on it, and taking
    /// it now would count its events twice once they are sent again.
    pub async fn receive(
        self: &Arc<Self>,
        id: BatchId,
        sent_ms: u64,
        deadline_ms: u64,
        events: Vec<(DeviceId, Event)>,
    ) -> Option<Vec<u32>> {
        let count = events.len() as u64;
        let rejoined = self.ownership.rejoined_at();
        let first = {
            let mut received = self.received.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire_received(&mut received);
            match received.answers.get(&id) {
                Some(answer) => Err(answer.clone()),
                None if sent_ms < rejoined => return Some((0..count as u32).collect()),
                // Clocks of pods agree to well within a forward timeout.
                None if unix_millis() > deadline_ms => return None,
                None => {
                    let (tx, rx) = watch::channel(None);
                    received.answers.insert(id, rx);
                    received.order.push_back((Instant::now(), id));
                    Ok(tx)
                }
            }
        };
        match first {
            Err(mut answer) => {
                self.metrics.events_duplicate.inc_by(count);
                loop {
                    if let Some(refused) = answer.borrow_and_update().clone() {
                        return Some(refused);
                    }
                    if answer.changed().await.is_err() {
                        // The first delivery's task is gone: nothing of it was answered.
                        return Some((0..count as u32).collect());
                    }
                }
            }
            Ok(tx) => {
                let refused: Vec<u32> = self
                    .take_positioned(
                        events
                            .into_iter()
                            .map(|(d, e)| (d.into_inner(), e))
                            .enumerate(),
                        Some(rejoined),
                    )
                    .await
                    .into_iter()
                    .map(|(p, why)| {
                        p as u32
                            | if why == Refused::Moved {
                                wire::MOVED
                            } else {
                                0
                            }
                    })
                    .collect();
                self.metrics
                    .forwarded_events_received
                    .inc_by(count - refused.len() as u64);
                let _ = tx.send(Some(refused.clone()));
                Some(refused)
            }
        }
    }

    /// Forgets answers older than any repeat of their batch can be.
    fn expire_received(&self, received: &mut Received) {
        let keep = self.config.route_deadline() * 2 + self.config.forward_timeout;
        let now = Instant::now();
        while let Some((at, id)) = received.order.front().copied() {
            if now.duration_since(at) < keep && received.order.len() < RECEIVED_MAX_REMEMBERED {
                break;
            }
            received.order.pop_front();
            received.answers.remove(&id);
        }
    }
}
