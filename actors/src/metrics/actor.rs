//! The metrics actor: owns the [`Registry`], counts anomalies under capped device labels,
//! and encodes scrapes.
//!
//! Anomalies arrive as messages because the label cap needs one owner of the set of
//! labelled devices; they are rare next to events, so a message each is cheap. Request
//! counters never come through here (see [`super::Metrics`]).

use super::{DeviceLabel, Metrics};
use crate::analytics::Signal;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashSet;
use std::sync::Arc;

/// Label under which anomalies of devices past the cap are counted.
pub const OTHER_DEVICES: &str = "__other__";

/// The registry could not be encoded.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the metrics could not be encoded")]
pub struct ScrapeError;

/// The metrics actor (configuration only).
#[derive(Debug, Default)]
pub struct MetricsActor;

/// What the metrics actor is started with.
pub struct MetricsArgs {
    /// The registry holding every family.
    pub registry: Registry,
    /// The handles registered in it.
    pub metrics: Metrics,
    /// Most distinct `device_id` label values.
    pub max_device_labels: usize,
}

/// The metrics actor's state.
pub struct MetricsState {
    registry: Registry,
    metrics: Metrics,
    labelled: HashSet<Arc<str>>,
    max_device_labels: usize,
}

/// Messages of the metrics actor.
pub enum MetricsMsg {
    /// One anomalous event of this device, on this signal.
    Anomaly(Arc<str>, Signal),
    /// Encode the registry in the exposition format.
    Scrape(RpcReplyPort<Result<String, ScrapeError>>),
}

impl Actor for MetricsActor {
    type Msg = MetricsMsg;
    type State = MetricsState;
    type Arguments = MetricsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: MetricsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(MetricsState {
            registry: args.registry,
            metrics: args.metrics,
            labelled: HashSet::new(),
            max_device_labels: args.max_device_labels,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: MetricsMsg,
        state: &mut MetricsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MetricsMsg::Anomaly(device, signal) => {
                let label = if state.labelled.contains(&device) {
                    device.to_string()
                } else if state.labelled.len() < state.max_device_labels {
                    state.labelled.insert(device.clone());
                    device.to_string()
                } else {
                    OTHER_DEVICES.to_string()
                };
                state
                    .metrics
                    .anomalies_detected
                    .get_or_create(&DeviceLabel {
                        device_id: label,
                        signal: signal.as_str(),
                    })
                    .inc();
            }
            MetricsMsg::Scrape(reply) => {
                state.metrics.process.refresh();
                let mut body = String::with_capacity(16 * 1024);
                // Encoding into a String fails only if a label value's encoder does; the
                // scrape then answers an error, and this actor, unsupervised, stays up.
                let encoded = encode(&mut body, &state.registry).map(|()| body);
                if let Err(e) = &encoded {
                    tracing::error!(error = %e, "encoding the metrics failed");
                }
                // A scraper that hung up is no reason to stop: ignore a closed port.
                let _ = reply.send(encoded.map_err(|_| ScrapeError));
            }
        }
        Ok(())
    }
}
