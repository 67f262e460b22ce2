//! The receiving side of forwarding: batches other nodes send here, taken once per
//! idempotency key.

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
    /// queues nothing again. A batch sent (`sent_ms`, the sender's clock) before this
    /// node last renewed a lapsed lease is refused whole. The answer lists the positions
    /// not taken.
    pub async fn receive(
        self: &Arc<Self>,
        id: BatchId,
        sent_ms: u64,
        events: Vec<(DeviceId, Event)>,
    ) -> Vec<u32> {
        let count = events.len() as u64;
        let rejoined = self.ownership.rejoined_at();
        if sent_ms < rejoined {
            return (0..count as u32).collect();
        }
        let first = {
            let mut received = self.received.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire_received(&mut received);
            match received.answers.get(&id) {
                Some(answer) => Err(answer.clone()),
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
                        return refused;
                    }
                    if answer.changed().await.is_err() {
                        // The first delivery's task is gone: nothing of it was answered.
                        return (0..count as u32).collect();
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
                refused
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
