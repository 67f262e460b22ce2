//! [`Ingest`]: the one way in for a request's events, local or to their owners, through
//! the ingest log when it is on.

use super::log::IngestLog;
use crate::cluster::Cluster;
use crate::device::{Directory, SubmitError};
use crate::event::{DeviceId, Event};
use std::borrow::Cow;
use std::sync::Arc;

/// Where the front end hands events over; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    directory: Directory,
    cluster: Option<Arc<Cluster>>,
    log: Option<Arc<IngestLog>>,
}

impl Ingest {
    /// Events go to `directory` (through `log` when it is on), or to their owners through
    /// `cluster`.
    pub fn new(
        directory: Directory,
        cluster: Option<Arc<Cluster>>,
        log: Option<Arc<IngestLog>>,
    ) -> Self {
        Self {
            directory,
            cluster,
            log,
        }
    }

    /// The ingest log, when it is on.
    pub fn log(&self) -> Option<&Arc<IngestLog>> {
        self.log.as_ref()
    }

    /// Accepts one event; `Ok` once it is queued at its owner (and logged, with the log).
    pub async fn submit<S: AsRef<str> + Sync>(
        &self,
        device_id: &DeviceId<S>,
        event: Event,
    ) -> Result<(), SubmitError> {
        match (&self.cluster, &self.log) {
            (Some(cluster), _) => cluster.submit(device_id, event).await,
            (None, Some(log)) => {
                log.append(vec![(Arc::from(device_id.as_str()), event)])
                    .await
            }
            (None, None) => self.directory.submit(device_id, event),
        }
    }

    /// Accepts the events of a batch, in order per device: all of them or (`Overloaded`,
    /// `NotDurable`) none on a single node; in a cluster each owner's part is all or
    /// nothing, and the answer lists the positions (in the request) of events whose owner
    /// was overloaded.
    pub async fn submit_batch(
        &self,
        events: Vec<(DeviceId<Cow<'_, str>>, Event)>,
    ) -> Result<Vec<usize>, SubmitError> {
        match (&self.cluster, &self.log) {
            (Some(cluster), _) => cluster.submit_batch(owned(events)).await,
            (None, Some(log)) => log.append(owned(events)).await.map(|()| Vec::new()),
            (None, None) => {
                // Only a cluster moves devices away; should one be, it stays here.
                for (device, event) in self.directory.submit_many(events.into_iter())? {
                    self.directory.submit_regardless(&device, event)?;
                }
                Ok(Vec::new())
            }
        }
    }
}

fn owned(events: Vec<(DeviceId<Cow<'_, str>>, Event)>) -> Vec<(Arc<str>, Event)> {
    events
        .into_iter()
        .map(|(d, e)| (d.to_shared().into_inner(), e))
        .collect()
}
