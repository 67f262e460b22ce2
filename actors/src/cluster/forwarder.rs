//! The forwarder: one actor per peer that batches events for the devices that peer owns
//! and sends them over the transport (in the binary, one persistent stream per peer),
//! answering each sender when the owner has acknowledged (queued) its events.
//!
//! Batching has a size and a time bound: events gather for [`FORWARD_LINGER`] after the first
//! one (or until [`FORWARD_MAX_BATCH_EVENTS`] are waiting), then go out as one batch; at most
//! [`FORWARD_MAX_IN_FLIGHT`] batches are on the wire per peer, and beyond that events gather
//! until one returns. A batch costs about the same whatever it carries, so the linger
//! buys its millisecond back many times over at load.
//!
//! Each batch carries an idempotency key, this node's incarnation and a sequence number
//! (as Kafka's idempotent producer does): a batch whose answer timed out is sent again
//! with the same key, to the same peer, for as long as that peer is a live member (it
//! answers in the end: it bounds its own wait for an owner), and the peer answers a
//! repeat with the first answer instead of queueing the events twice. Sending the batch
//! anywhere else while the peer may still take it could count it twice; only once the
//! peer's heartbeat has expired (its queue is lost to a crash or fenced) do the senders
//! get the timeout and route their events again.

use super::{wire, BatchId, ForwardError, Transport};
use crate::event::Event;
use crate::metrics::{ForwardFailureLabel, Metrics};
use crate::tuning::{
    FORWARD_LINGER, FORWARD_MAX_BATCH_EVENTS, FORWARD_MAX_IN_FLIGHT, FORWARD_RETRY_PAUSE,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The forwarder of one peer (configuration only).
#[derive(Debug, Default)]
pub struct Forwarder;

/// What a forwarder is started with.
pub struct ForwarderArgs {
    /// The peer it sends to.
    pub peer: SocketAddr,
    /// How.
    pub transport: Arc<dyn Transport>,
    /// Metric handles.
    pub metrics: Metrics,
    /// This node's incarnation (the first half of every batch's key).
    pub incarnation: u64,
    /// The batch sequence, shared by this node's forwarders.
    pub sequence: Arc<AtomicU64>,
    /// Whether the peer is a live member (its heartbeat has not expired).
    pub peer_alive: Arc<dyn Fn() -> bool + Send + Sync>,
    /// How long a timed-out batch is sent again at most.
    pub retry_for: Duration,
}

/// The answer to one [`ForwarderMsg::Forward`]: the positions (among the sender's own
/// events) that the peer did not take, each with whether it was because the peer does not
/// own the event's shard (then the sender routes it again).
pub type Ack = Result<Vec<(usize, bool)>, ForwardError>;

/// Messages of a forwarder.
pub enum ForwarderMsg {
    /// Events for devices the peer owns, in order; answered once the peer has queued
    /// them (or failed to).
    Forward(Vec<(Arc<str>, Event)>, RpcReplyPort<Ack>),
    /// The linger of the oldest waiting event is over.
    Flush,
    /// A batch came back, failed when `Some`.
    Done(Option<ForwardError>),
}

/// A forwarder's state.
pub struct ForwarderState {
    peer: SocketAddr,
    transport: Arc<dyn Transport>,
    metrics: Metrics,
    incarnation: u64,
    sequence: Arc<AtomicU64>,
    peer_alive: Arc<dyn Fn() -> bool + Send + Sync>,
    retry_for: Duration,
    buffer: Vec<(Arc<str>, Event)>,
    /// Senders waiting, each with how many of the buffered events are theirs.
    waiters: Vec<(usize, RpcReplyPort<Ack>)>,
    in_flight: usize,
    /// A [`ForwarderMsg::Flush`] is on its way.
    lingering: bool,
}

impl ForwarderState {
    /// Sends batches while the in-flight bound allows.
    fn send(&mut self, myself: &ActorRef<ForwarderMsg>) {
        while self.in_flight < FORWARD_MAX_IN_FLIGHT && !self.waiters.is_empty() {
            // Whole senders only, so each gets one answer; at least one sender.
            let mut take = 0;
            let mut events = 0;
            for (n, _) in &self.waiters {
                if take > 0 && events + n > FORWARD_MAX_BATCH_EVENTS {
                    break;
                }
                take += 1;
                events += n;
            }
            let waiters: Vec<_> = self.waiters.drain(..take).collect();
            let batch: Vec<_> = self.buffer.drain(..events).collect();
            self.in_flight += 1;
            let send = Outgoing {
                peer: self.peer,
                transport: self.transport.clone(),
                metrics: self.metrics.clone(),
                id: BatchId(
                    self.incarnation,
                    self.sequence.fetch_add(1, Ordering::Relaxed),
                ),
                peer_alive: self.peer_alive.clone(),
                retry_for: self.retry_for,
            };
            let myself = myself.clone();
            tokio::spawn(async move {
                let result = send.run(&batch).await;
                let mut offset = 0;
                for (n, reply) in waiters {
                    let mine = result.as_ref().map(|refused| {
                        refused
                            .iter()
                            .map(|p| ((p & !wire::MOVED) as usize, p & wire::MOVED != 0))
                            .filter(|(p, _)| (offset..offset + n).contains(p))
                            .map(|(p, moved)| (p - offset, moved))
                            .collect()
                    });
                    offset += n;
                    let _ = reply.send(mine.map_err(Clone::clone));
                }
                let _ = myself.cast(ForwarderMsg::Done(result.err()));
            });
        }
    }
}

/// One batch on its way, with what it needs to be sent again.
struct Outgoing {
    peer: SocketAddr,
    transport: Arc<dyn Transport>,
    metrics: Metrics,
    id: BatchId,
    peer_alive: Arc<dyn Fn() -> bool + Send + Sync>,
    retry_for: Duration,
}

impl Outgoing {
    /// Sends the batch, again under the same key after a timeout while the peer is
    /// alive; answers the positions the peer did not take.
    async fn run(&self, batch: &[(Arc<str>, Event)]) -> Result<Vec<u32>, ForwardError> {
        let started = Instant::now();
        let body = wire::encode(batch.iter().map(|(d, e)| (&**d, e)));
        // Whether an earlier send may have arrived: then a later "not sent" does not
        // mean the peer never took the batch.
        let mut maybe_delivered = false;
        loop {
            let mut result = self
                .transport
                .send_events(self.peer, self.id, body.clone())
                .await;
            if let Err(e) = &result {
                let now = e.maybe_delivered();
                if maybe_delivered && matches!(e, ForwardError::NotSent(_)) {
                    let e = e.to_string();
                    result = Err(ForwardError::Unreachable(format!(
                        "{e}, after a send that may have arrived"
                    )));
                }
                maybe_delivered |= now;
            }
            if let Err(e) = &result {
                if let Some(reason) = e.failure() {
                    self.metrics
                        .forward_failures
                        .get_or_create(&ForwardFailureLabel { reason })
                        .inc();
                }
                tracing::debug!(peer = %self.peer, error = %e, events = batch.len(), "forward failed");
                // The peer may have queued the batch (no answer, or a connection that broke
                // mid-request): only the same key to the same peer is safe while it lives.
                let unknown = matches!(
                    e,
                    ForwardError::Timeout | ForwardError::Unreachable(_) | ForwardError::NotSent(_)
                );
                if unknown && started.elapsed() < self.retry_for && (self.peer_alive)() {
                    tokio::time::sleep(FORWARD_RETRY_PAUSE).await;
                    continue;
                }
            }
            self.metrics
                .forward_batch_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Ok(refused) = &result {
                self.metrics
                    .events_forwarded
                    .inc_by((batch.len() - refused.len()) as u64);
            }
            return result;
        }
    }
}

impl Actor for Forwarder {
    type Msg = ForwarderMsg;
    type State = ForwarderState;
    type Arguments = ForwarderArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ForwarderArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ForwarderState {
            peer: args.peer,
            transport: args.transport,
            metrics: args.metrics,
            incarnation: args.incarnation,
            sequence: args.sequence,
            peer_alive: args.peer_alive,
            retry_for: args.retry_for,
            buffer: Vec::new(),
            waiters: Vec::new(),
            in_flight: 0,
            lingering: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ForwarderMsg,
        state: &mut ForwarderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ForwarderMsg::Forward(events, reply) => {
                state.waiters.push((events.len(), reply));
                state.buffer.extend(events);
                if state.buffer.len() < FORWARD_MAX_BATCH_EVENTS {
                    if !state.lingering {
                        state.lingering = true;
                        myself.send_after(FORWARD_LINGER, || ForwarderMsg::Flush);
                    }
                    return Ok(());
                }
            }
            ForwarderMsg::Flush => state.lingering = false,
            ForwarderMsg::Done(failed) => {
                state.in_flight -= 1;
                if let Some(e) = failed.filter(|e| e.failure().is_some()) {
                    // The peer is unwell: everyone waiting behind this batch is told now
                    // and re-routes, rather than queueing for the same timeout again.
                    state.buffer.clear();
                    for (_, reply) in state.waiters.drain(..) {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        state.send(&myself);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BoxFuture;
    use bytes::Bytes;
    use prometheus_client::registry::Registry;
    use std::sync::Mutex;

    /// A peer that takes every event, recording each batch: its events and when it came.
    #[derive(Default)]
    struct Peer {
        batches: Mutex<Vec<(usize, Instant)>>,
    }

    impl Transport for Peer {
        fn send_events(
            &self,
            _: SocketAddr,
            _: BatchId,
            body: Bytes,
        ) -> BoxFuture<Result<Vec<u32>, ForwardError>> {
            let events = wire::decode(body).expect("a batch that decodes").len();
            self.batches
                .lock()
                .expect("batches")
                .push((events, Instant::now()));
            Box::pin(async { Ok(Vec::new()) })
        }

        fn ping(&self, _: SocketAddr) -> BoxFuture<Result<String, ForwardError>> {
            Box::pin(async { Err(ForwardError::NotSent("no pings here".into())) })
        }

        fn kick(&self, _: SocketAddr) -> BoxFuture<Result<(), ForwardError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn events(n: usize) -> Vec<(Arc<str>, Event)> {
        let event = Event::new(1.0, 0.5, chrono::Utc::now()).expect("event");
        (0..n)
            .map(|i| (Arc::from(format!("d{i}")), event))
            .collect()
    }

    /// Sends `events` through the forwarder without waiting for the answer.
    fn forward(
        forwarder: &ActorRef<ForwarderMsg>,
        events: Vec<(Arc<str>, Event)>,
    ) -> ractor::concurrency::OneshotReceiver<Ack> {
        let (tx, rx) = ractor::concurrency::oneshot();
        forwarder
            .cast(ForwarderMsg::Forward(events, tx.into()))
            .expect("forwarder alive");
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn events_gather_for_the_linger_and_a_full_batch_goes_at_once() {
        let peer = Arc::new(Peer::default());
        let args = ForwarderArgs {
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            transport: peer.clone(),
            metrics: Metrics::register(&mut Registry::default()),
            incarnation: 1,
            sequence: Arc::new(AtomicU64::new(0)),
            peer_alive: Arc::new(|| true),
            retry_for: Duration::from_secs(1),
        };
        let (forwarder, _) = Actor::spawn(None, Forwarder, args).await.expect("spawn");

        // Two senders within the linger: one batch, sent when the linger ends.
        let start = Instant::now();
        let (a, b) = (
            forward(&forwarder, events(1)),
            forward(&forwarder, events(2)),
        );
        assert_eq!(a.await.expect("answer"), Ok(Vec::new()));
        assert_eq!(b.await.expect("answer"), Ok(Vec::new()));
        let batches = std::mem::take(&mut *peer.batches.lock().expect("batches"));
        assert_eq!(
            batches.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [3],
            "one batch"
        );
        assert_eq!(batches[0].1 - start, FORWARD_LINGER);

        // A full batch does not wait.
        let start = Instant::now();
        let full = forward(&forwarder, events(FORWARD_MAX_BATCH_EVENTS));
        assert_eq!(full.await.expect("answer"), Ok(Vec::new()));
        let batches = std::mem::take(&mut *peer.batches.lock().expect("batches"));
        assert_eq!(batches.len(), 1);
        assert_eq!(
            batches[0],
            (FORWARD_MAX_BATCH_EVENTS, start),
            "sent at once"
        );
        forwarder.stop(None);
    }
}
