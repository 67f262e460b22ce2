//! The device actor: owns one device's window and anomaly state, processes its events in
//! order, and hands each result to the store writer (through its inbox).
//!
//! On start it restores the device's persisted window (through the writer, which also
//! knows results not flushed yet), so eviction, a crash or a restart on another replica
//! continue the window instead of starting it over.

use super::directory::SlotMap;
use super::slot::Queued;
use super::{Admission, Slot};
use crate::analytics::{AnomalyRule, Signal, Window};
use crate::event::{Analysis, Event};
use crate::metrics::{Metrics, MetricsMsg};
use crate::position::{Held, Position};
use crate::store::{Checkpoint, Inbox, Record, WriterMsg};
use crate::store::{Version, WindowSnapshot};
use crate::tuning::{EVENTS_PER_TURN, RESTORE_ATTEMPTS, RESTORE_RETRY_DELAY};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

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
    /// WINDOW_CHECKPOINT_INTERVAL: how often, at most, a result carries its window to
    /// the store.
    pub checkpoint_interval: Duration,
    /// The live slots, and the actors of evicted ones still stopping.
    pub(crate) slots: SlotMap,
    /// ANOMALY_SIGNALS.
    pub signals: Vec<Signal>,
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
    /// Shared with the last checkpoint deposited in the writer's inbox: only while that
    /// checkpoint waits for its flush does the next event copy the window (at most once
    /// per checkpoint interval); otherwise it is updated in place.
    window: Arc<Window>,
    /// The window's version: this incarnation and its events (see [`Version`]).
    version: u64,
    /// When a result last carried the window to the store; `None` until the first (an
    /// incarnation's first result always does: it establishes the version that guards
    /// a cluster's writes).
    checkpointed_at: Option<Instant>,
    /// The newest analysis, when its window has not been checkpointed: written again
    /// with the window by the trailing checkpoint (or when the actor stops), so the store
    /// ends up with the exact window once the device goes quiet.
    unsaved: Option<Analysis>,
    /// A [`DeviceMsg::Checkpoint`] is on its way.
    checkpoint_timer: bool,
    /// The ingest-log position of the newest event in the window: logged events at or
    /// below it are in the window already (a replay skips them).
    position: Position,
    /// The log entries of the events since the last checkpoint, kept from being trimmed
    /// until a checkpoint holding them is deposited.
    held: Held,
}

/// The time, read once per turn: a turn's events are processed within microseconds of
/// each other, and a clock read per event cost a few per cent of the batch path.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// For checkpoint intervals.
    now: Instant,
    /// An analysis's `processed_at`.
    wall: DateTime<Utc>,
}

impl Clock {
    fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// Messages of a device actor.
#[derive(Debug)]
pub enum DeviceMsg {
    /// Events are waiting in the slot.
    Wake,
    /// The checkpoint interval has passed since the last checkpoint: write the window if
    /// newer results left it unsaved.
    Checkpoint,
    /// Test only: fail the actor, to exercise supervision (see `device::tests::panic`).
    #[cfg(test)]
    Panic,
}

impl DeviceState {
    /// Takes a queued event into the window, unless it is a logged event the window has
    /// seen (a replay after a crash: its checkpoint holds it already). `clock` is the
    /// turn's reading of the time.
    fn take(&mut self, queued: Queued, clock: Clock) {
        if let Some(logged) = &queued.logged {
            if logged.position <= self.position {
                return;
            }
            self.position = logged.position;
            self.held.hold(&logged.pin);
            if logged.replayed {
                self.ctx.metrics.ingest_log_replayed.inc();
            }
        }
        self.process(queued.event, clock);
    }

    fn process(&mut self, event: Event, clock: Clock) {
        let ctx = &*self.ctx;
        self.version += 1;
        let device_id = self.slot.device_id();
        Arc::make_mut(&mut self.window).push(event.rps(), event.cpu());
        let evaluation = ctx.rule.evaluate(&self.window);
        let analysis = Analysis::new(device_id.clone(), &event, evaluation, clock.wall);
        let mut json = None;
        for &signal in &ctx.signals {
            if evaluation.is_anomalous(signal) {
                let _ = ctx
                    .metrics_actor
                    .cast(MetricsMsg::Anomaly(device_id.clone(), signal));
                // Serialising our own plain struct cannot fail.
                let analysis = json
                    .get_or_insert_with(|| {
                        Bytes::from(serde_json::to_vec(&analysis).unwrap_or_default())
                    })
                    .clone();
                ctx.inbox.put_anomaly(device_id.clone(), signal, analysis);
            }
        }
        let now = clock.now;
        let checkpoint = self
            .checkpointed_at
            .is_none_or(|t| now.duration_since(t) >= ctx.checkpoint_interval);
        let held = if checkpoint {
            self.checkpointed_at = Some(now);
            self.unsaved = None;
            std::mem::take(&mut self.held)
        } else {
            self.unsaved = Some(analysis.clone());
            Held::default()
        };
        self.deposit(analysis, checkpoint, held);
        ctx.metrics.events_processed.inc();
    }

    /// Checkpoints an unsaved window now; the trailing checkpoint after a device's last
    /// event, so that a quiet device's stored window is exact within the interval.
    fn checkpoint_now(&mut self) {
        self.checkpoint_timer = false;
        if let Some(analysis) = self.unsaved.take() {
            self.checkpointed_at = Some(Instant::now());
            let held = std::mem::take(&mut self.held);
            self.deposit(analysis, true, held);
        }
    }

    /// Makes sure an unsaved window is checkpointed within the interval even when no
    /// further event comes.
    fn schedule_checkpoint(&mut self, myself: &ActorRef<DeviceMsg>) {
        if self.unsaved.is_none() || self.checkpoint_timer {
            return;
        }
        let since = self.checkpointed_at.map_or(Duration::ZERO, |t| t.elapsed());
        self.checkpoint_timer = true;
        myself.send_after(self.ctx.checkpoint_interval.saturating_sub(since), || {
            DeviceMsg::Checkpoint
        });
    }

    /// Hands a result to the writer; a checkpoint carries the window and the log entries
    /// it covers.
    fn deposit(&self, analysis: Analysis, checkpoint: bool, held: Held) {
        let checkpoint = checkpoint.then(|| Checkpoint {
            window: self.window.clone(),
            version: self.version,
            event_timestamp: analysis.event_timestamp,
            position: self.position,
        });
        let record = Record {
            analysis,
            version: self.version,
            checkpoint,
            held,
        };
        if self.ctx.inbox.put(record) {
            let _ = self.ctx.writer.cast(WriterMsg::Flush);
        }
    }

    /// Processes up to a turn's worth of queued events; asks to be woken again if more
    /// remain, so one busy device cannot hold a worker thread.
    fn drain(&mut self, myself: &ActorRef<DeviceMsg>) {
        let clock = Clock::read();
        for _ in 0..EVENTS_PER_TURN {
            let Some(queued) = self.slot.next() else {
                self.schedule_checkpoint(myself);
                return;
            };
            self.take(queued, clock);
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
        self.version = Version::next_incarnation(Some(snapshot.version()));
        self.position = snapshot.position();
    }

    /// Restores the device's window through this node's writer: its unflushed result,
    /// else the store (in a cluster, the newer of the two by [`Version`]). A shard moves
    /// to this node only after its previous owner wrote every window of it, so the store
    /// holds the exact window then.
    async fn restore(&mut self) {
        let ctx = &*self.ctx;
        let device = self.slot.device_id().clone();
        // An evicted actor of this device deposits its window as it stops: wait for it,
        // or this actor could read the older checkpoint.
        if let Some(previous) = ctx.slots.stopping(&device) {
            let _ = previous.wait(Some(ctx.restore_timeout)).await;
        }
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
            local = ?local.as_ref().map(|w| (Version::parts(w.version()), w.readings().len())),
            "restoring window"
        );
        if let Some(snapshot) = local {
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
            version: Version::next_incarnation(None),
            checkpointed_at: None,
            unsaved: None,
            checkpoint_timer: false,
            position: Position::default(),
            held: Held::default(),
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

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        // Stopping (idle eviction, handoff, shutdown): a window newer than its last
        // checkpoint goes to the store with the newest result.
        state.checkpoint_now();
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
            DeviceMsg::Checkpoint => state.checkpoint_now(),
            #[cfg(test)]
            DeviceMsg::Panic => super::tests::panic(&state.slot),
        }
        Ok(())
    }
}
