//! The device actor: owns one device's window and anomaly state, processes its events in
//! order, and hands each result to the store writer (through its inbox).
//!
//! On start it restores the device's persisted window (through the writer, which also
//! knows results not flushed yet), so eviction, a crash or a restart on another replica
//! continue the window instead of starting it over.

use super::{Admission, Slot};
use crate::analytics::{AnomalyRule, Window};
use crate::event::{Analysis, Event};
use crate::metrics::{Metrics, MetricsMsg};
use crate::store::{Inbox, Record, WriterMsg};
use crate::store::{Version, WindowSnapshot};
use crate::tuning::{EVENTS_PER_TURN, RESTORE_ATTEMPTS, RESTORE_RETRY_DELAY};
use chrono::Utc;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where a starting device actor finds a window that another node holds: the cluster
/// (the previous owner of the device) when this node has just taken the device over.
pub trait Predecessor: Send + Sync {
    /// The device's final window from the node that processed it before, once that node
    /// has stopped processing it; `None` when there is no such node or it cannot be
    /// reached, and the window comes from this node's writer or the store as usual.
    fn window(&self, device: Arc<str>) -> BoxFuture<Option<WindowSnapshot>>;
}

/// Test only: an event with this rps makes its device actor panic while processing it
/// (validation at the front end never lets a negative rps through).
#[cfg(test)]
pub(crate) const PANIC_RPS: f64 = -1.0;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What every device actor shares.
pub struct DeviceContext {
    /// WINDOW_SIZE.
    pub window_size: usize,
    /// ANOMALY_THRESHOLD.
    pub rule: AnomalyRule,
    /// Where results are deposited for the writer.
    pub inbox: Arc<Inbox>,
    /// The writer: window restores, early flushes.
    pub writer: ActorRef<WriterMsg>,
    /// Where anomalies are counted.
    pub metrics_actor: ActorRef<MetricsMsg>,
    /// Metric handles.
    pub metrics: Metrics,
    /// The pending-events bound, released per processed event.
    pub admission: Admission,
    /// How long a starting actor waits for its persisted window.
    pub restore_timeout: Duration,
    /// Set once when the node runs in a cluster.
    pub predecessor: OnceLock<Arc<dyn Predecessor>>,
}

/// The device actor (configuration only).
#[derive(Debug, Default)]
pub struct DeviceActor;

/// What a device actor is started with.
pub struct DeviceArgs {
    /// The device's queue.
    pub slot: Arc<Slot>,
    /// Shared configuration and handles.
    pub ctx: Arc<DeviceContext>,
}

/// A device actor's state.
pub struct DeviceState {
    slot: Arc<Slot>,
    ctx: Arc<DeviceContext>,
    /// Shared with the result last deposited in the writer's inbox: when that result has
    /// been flushed (the usual case), the next event updates the window in place instead
    /// of copying it.
    window: Arc<Window>,
    /// The newest event processed (restored with the window): an identical one arriving
    /// again is a re-delivery, not a new reading.
    last: Option<Event>,
    /// The window's version: this incarnation and its events (see [`Version`]).
    version: u64,
}

/// Messages of a device actor.
#[derive(Debug)]
pub enum DeviceMsg {
    /// Events are waiting in the slot.
    Wake,
    /// Test only: fail the actor, to exercise supervision.
    #[cfg(test)]
    Panic,
}

impl DeviceState {
    fn process(&mut self, event: Event) {
        let ctx = &*self.ctx;
        // A forward that timed out after the owner had queued it is re-routed, and may
        // then reach this window a second time: the same timestamp (to the nanosecond)
        // and the same values are the same event.
        if self.last == Some(event) {
            ctx.metrics.events_duplicate.inc();
            return;
        }
        #[cfg(test)]
        if event.rps == PANIC_RPS {
            panic!("test-induced failure while processing an event");
        }
        self.last = Some(event);
        self.version += 1;
        let device_id = self.slot.device_id();
        Arc::make_mut(&mut self.window).push(event.rps, event.cpu);
        let evaluation = ctx.rule.evaluate(&self.window, event.rps);
        if evaluation.is_anomaly {
            let _ = ctx
                .metrics_actor
                .cast(MetricsMsg::Anomaly(device_id.clone()));
        }
        let record = Record {
            analysis: Analysis::new(device_id.clone(), &event, evaluation, Utc::now()),
            window: self.window.clone(),
            version: self.version,
        };
        if ctx.inbox.put(record) {
            let _ = ctx.writer.cast(WriterMsg::Flush);
        }
        ctx.metrics.events_processed.inc();
    }

    /// Processes up to a turn's worth of queued events; asks to be woken again if more
    /// remain, so one busy device cannot hold a worker thread.
    fn drain(&mut self, myself: &ActorRef<DeviceMsg>) {
        for _ in 0..EVENTS_PER_TURN {
            let Some(event) = self.slot.next() else {
                return;
            };
            self.process(event);
            self.slot.finish_event();
            self.ctx.admission.release();
        }
        // Still scheduled: the slot will not wake us, so wake ourselves.
        let _ = myself.cast(DeviceMsg::Wake);
    }

    fn adopt(&mut self, snapshot: &WindowSnapshot) {
        self.window = Arc::new(Window::restore(
            self.ctx.window_size,
            snapshot.readings().iter().copied(),
        ));
        self.last = snapshot.last_event();
        self.version = Version::next_incarnation(Some(snapshot.version()));
    }

    /// Restores the device's window from the newest of its possible sources: the node
    /// that held it before (in a cluster), and this node's writer (its unflushed result,
    /// else the store). "Newest" is the highest [`Version`]: an incarnation that took the
    /// device over outranks one that kept running cut off from the cluster.
    async fn restore(&mut self) {
        let ctx = &*self.ctx;
        let device = self.slot.device_id().clone();
        let pulled = match ctx.predecessor.get() {
            Some(predecessor) => predecessor.window(device.clone()).await,
            None => None,
        };
        let mut local = None;
        for attempt in 1..=RESTORE_ATTEMPTS {
            let reply = ctx
                .writer
                .call(
                    |port| WriterMsg::LoadWindow(device.clone(), port),
                    Some(ctx.restore_timeout),
                )
                .await;
            let failure = match reply {
                Ok(CallResult::Success(Ok(found))) => {
                    local = found;
                    break;
                }
                Ok(CallResult::Success(Err(e))) => e.to_string(),
                Ok(CallResult::Timeout | CallResult::SenderError) | Err(_) => {
                    "no answer in time".to_string()
                }
            };
            if pulled.is_some() {
                break;
            }
            if attempt == RESTORE_ATTEMPTS {
                // Starting empty rather than holding the device's events any longer.
                ctx.metrics.window_restore_failures.inc();
                tracing::warn!(device_id = %device, error = %failure, "window not restored; starting empty");
            } else {
                tokio::time::sleep(RESTORE_RETRY_DELAY * attempt).await;
            }
        }
        tracing::debug!(
            device_id = %device,
            pulled = ?pulled.as_ref().map(|w| (Version::parts(w.version()), w.readings().len())),
            local = ?local.as_ref().map(|w| (Version::parts(w.version()), w.readings().len())),
            "restoring window"
        );
        let newest = match (pulled, local) {
            (Some(p), Some(l)) if l.version() > p.version() => Some(l),
            (Some(p), _) => Some(p),
            (None, l) => l,
        };
        if let Some(snapshot) = newest {
            self.adopt(&snapshot);
        }
    }
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DeviceArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.slot.attach(myself);
        Ok(DeviceState {
            window: Arc::new(Window::new(args.ctx.window_size)),
            last: None,
            version: Version::next_incarnation(None),
            slot: args.slot,
            ctx: args.ctx,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        // Restoring here rather than in pre_start keeps the supervisor, which awaits
        // pre_start when spawning, from waiting on the store.
        state.restore().await;
        state.drain(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Wake => state.drain(&myself),
            #[cfg(test)]
            DeviceMsg::Panic => panic!("test-induced failure of device {}", state.slot.device_id()),
        }
        Ok(())
    }
}
