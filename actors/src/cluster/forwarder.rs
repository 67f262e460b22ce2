//! The forwarder: one actor per peer that batches events for the devices that peer owns
//! and sends them over the pooled connection, answering each sender when the owner has
//! acknowledged (queued) its events.
//!
//! Batching has a size and a time bound: events gather for [`LINGER`] after the first
//! one (or until [`MAX_BATCH_EVENTS`] are waiting), then go out in one request; at most
//! [`MAX_IN_FLIGHT`] requests are on the wire per peer, and beyond that events gather
//! until one returns. Measured on the 2-core bench, sending at once whenever a request
//! slot was free gave about 3 events a request at saturation and 30 µs of CPU per
//! forwarded event; a request costs the same whatever it carries, so the linger buys
//! its millisecond back many times over.

use super::{wire, ForwardError, Transport};
use crate::event::Event;
use crate::metrics::{ForwardFailureLabel, Metrics};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Batches on the wire to one peer at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long the first event of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(1);
/// Events in one forwarded request at most.
pub const MAX_BATCH_EVENTS: usize = 4096;

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
}

/// The answer to one [`ForwarderMsg::Forward`].
pub type Ack = Result<(), ForwardError>;

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
        while self.in_flight < MAX_IN_FLIGHT && !self.waiters.is_empty() {
            // Whole senders only, so each gets one answer; at least one sender.
            let mut take = 0;
            let mut events = 0;
            for (n, _) in &self.waiters {
                if take > 0 && events + n > MAX_BATCH_EVENTS {
                    break;
                }
                take += 1;
                events += n;
            }
            let waiters: Vec<_> = self.waiters.drain(..take).collect();
            let batch: Vec<_> = self.buffer.drain(..events).collect();
            self.in_flight += 1;
            let (peer, transport, metrics, myself) = (
                self.peer,
                self.transport.clone(),
                self.metrics.clone(),
                myself.clone(),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let body = wire::encode(batch.iter().map(|(d, e)| (&**d, e)));
                let result = transport.send_events(peer, body).await;
                metrics
                    .forward_batch_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                match &result {
                    Ok(()) => {
                        metrics.events_forwarded.inc_by(batch.len() as u64);
                    }
                    Err(e) => {
                        if let Some(reason) = e.failure() {
                            metrics
                                .forward_failures
                                .get_or_create(&ForwardFailureLabel { reason })
                                .inc();
                        }
                        tracing::debug!(%peer, error = %e, events = batch.len(), "forward failed");
                    }
                }
                for (_, reply) in waiters {
                    let _ = reply.send(result.clone());
                }
                let _ = myself.cast(ForwarderMsg::Done(result.err()));
            });
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
                if state.buffer.len() < MAX_BATCH_EVENTS {
                    if !state.lingering {
                        state.lingering = true;
                        myself.send_after(LINGER, || ForwarderMsg::Flush);
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
mod tests;
