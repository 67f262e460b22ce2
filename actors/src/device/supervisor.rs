//! The device supervisor: spawns a device actor for each new slot, restarts a failed one
//! on the same slot, and evicts actors of devices idle for DEVICE_IDLE_TIMEOUT.
//!
//! ractor's default supervision stops the supervisor when any child fails; here a child's
//! failure is that one device's problem, so `handle_supervisor_evt` is overridden and
//! every failure restarts the child. A restart loses at most the event being processed
//! when the actor failed (the one that made it fail); everything queued behind it stays
//! in the slot and is processed by the new actor, which also restores the window.

use super::directory::SlotMap;
use super::{DeviceActor, DeviceArgs, DeviceContext, Slot};
use crate::tuning::RESPAWN_DELAY;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The supervisor (configuration only).
#[derive(Debug, Default)]
pub struct DeviceSupervisor;

/// What the supervisor is started with.
pub struct SupervisorArgs {
    /// Shared by every device actor.
    pub ctx: Arc<DeviceContext>,
    /// The directory's map, to unlist evicted devices.
    pub(crate) slots: SlotMap,
    /// DEVICE_IDLE_TIMEOUT.
    pub idle_timeout: Duration,
}

/// The supervisor's state: its children by actor id.
pub struct SupervisorState {
    ctx: Arc<DeviceContext>,
    slots: SlotMap,
    children: HashMap<ActorId, Arc<Slot>>,
    idle_timeout: Duration,
}

/// Messages of the supervisor.
pub enum SupervisorMsg {
    /// A new device slot needs an actor.
    Spawn(Arc<Slot>),
    /// Timer: evict idle device actors.
    Sweep,
    /// Test only: how many device actors are alive.
    #[cfg(test)]
    Count(ractor::RpcReplyPort<usize>),
}

impl SupervisorState {
    async fn start_child(&mut self, myself: &ActorRef<SupervisorMsg>, slot: Arc<Slot>) {
        let args = DeviceArgs {
            slot: slot.clone(),
            ctx: self.ctx.clone(),
        };
        match DeviceActor::spawn_linked(None, DeviceActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.children.insert(actor.get_id(), slot);
                self.ctx
                    .metrics
                    .device_actors
                    .set(self.children.len() as i64);
            }
            Err(e) => {
                // pre_start only records the actor in the slot, so this is unexpected;
                // the events stay queued in the slot and a sweep or the next restart
                // attempt must not forget them: retry shortly.
                tracing::error!(device_id = %slot.device_id(), error = %e, "device actor failed to start; retrying");
                let myself = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESPAWN_DELAY).await;
                    let _ = myself.cast(SupervisorMsg::Spawn(slot));
                });
            }
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        for slot in self.children.values() {
            if let Some(actor) = slot.close_if_idle(now, self.idle_timeout) {
                self.ctx.metrics.device_evictions.inc();
                self.slots.retire(slot, actor.get_cell(), "idle");
            }
        }
    }
}

impl Actor for DeviceSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Check a few times per timeout, so an idle actor lives at most ~1.25× the timeout.
        let every =
            (args.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        // The interval task ends by itself when the supervisor stops.
        myself.send_interval(every, || SupervisorMsg::Sweep);
        Ok(SupervisorState {
            ctx: args.ctx,
            slots: args.slots,
            children: HashMap::new(),
            idle_timeout: args.idle_timeout,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(slot) => state.start_child(&myself, slot).await,
            SupervisorMsg::Sweep => state.sweep(),
            #[cfg(test)]
            SupervisorMsg::Count(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(state.children.len());
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(slot) = state.children.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.slots.stopped(slot.device_id(), cell.get_id());
                state.ctx.metrics.actor_restarts.inc();
                if slot.take_in_process() {
                    // The event being processed caused the failure: it is dropped (and
                    // counted) rather than retried into the same failure.
                    state.ctx.metrics.events_failed.inc();
                    state.ctx.admission.release();
                }
                tracing::error!(device_id = %slot.device_id(), %error, "device actor failed; restarting");
                state.start_child(&myself, slot).await;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                let Some(slot) = state.children.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.slots.stopped(slot.device_id(), cell.get_id());
                state
                    .ctx
                    .metrics
                    .device_actors
                    .set(state.children.len() as i64);
            }
            _ => {}
        }
        Ok(())
    }
}
