//! Replaying the ingest log at start: every entry still in the stream is queued again at
//! its devices, in log order, before any new event is taken.
//!
//! Each replayed event carries its position; a device actor skips those at or below its
//! restored window's position (its checkpoint holds them already), so nothing is counted
//! twice, and takes the rest (`ingest_log_replayed_total`). An entry that does not decode
//! (written by something else, or cut short) is skipped, logged and counted
//! (`ingest_log_undecodable_total`); it never stops the replay.

use super::redis_log::RedisLog;
use crate::cluster::wire;
use crate::device::{Directory, Queued};
use crate::metrics::Metrics;
use crate::position::{Logged, Pins, Position};
use crate::store::{StoreError, StreamId};
use crate::tuning::LOG_REPLAY_CHUNK;

/// Queues every logged event again; answers the newest entry's id (`None`: empty log).
pub async fn run(
    log: &RedisLog,
    directory: &Directory,
    pins: &Pins,
    metrics: &Metrics,
) -> Result<Option<StreamId>, StoreError> {
    let started = tokio::time::Instant::now();
    let mut after = None;
    let (mut entries, mut events) = (0usize, 0usize);
    loop {
        let chunk = log.range(after, LOG_REPLAY_CHUNK).await?;
        let last = chunk.len() < LOG_REPLAY_CHUNK;
        for raw in chunk {
            after = Some(raw.id);
            match raw.events.map(wire::decode) {
                Some(Ok(decoded)) => {
                    entries += 1;
                    events += decoded.len();
                    queue(directory, pins, raw.id, decoded);
                }
                Some(Err(e)) => undecodable(metrics, log, raw.id, &e.to_string()),
                None => undecodable(metrics, log, raw.id, "no events field"),
            }
        }
        if last {
            break;
        }
    }
    if entries > 0 {
        tracing::info!(stream = log.key(), entries, events, elapsed = ?started.elapsed(), "ingest log replayed; events that checkpoints hold already are skipped");
    }
    Ok(after)
}

/// Queues one entry's events, each with its position and the entry's pin.
fn queue(
    directory: &Directory,
    pins: &Pins,
    id: StreamId,
    events: Vec<(crate::event::DeviceId, crate::event::Event)>,
) {
    let pin = pins.pin(id);
    directory.admit_regardless(events.len());
    for (index, (device, event)) in (0u32..).zip(events) {
        let logged = Logged {
            position: Position {
                epoch: 0,
                entry: id,
                index,
            },
            pin: pin.clone(),
            replayed: true,
        };
        // Fails only at the end of shutdown.
        let _ = directory.push_admitted(
            &device,
            Queued {
                event,
                logged: Some(logged),
            },
        );
    }
}

fn undecodable(metrics: &Metrics, log: &RedisLog, id: StreamId, why: &str) {
    metrics.ingest_log_undecodable.inc();
    tracing::error!(stream = log.key(), entry = %id, error = why, "ingest log entry does not decode; skipped");
}
