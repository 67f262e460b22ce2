//! The receiving end of a peer's stream: reads its batches ([`super::frame`]), takes each
//! in a task of its own (batches are pipelined and answered as they finish), and writes
//! the answers back, several in one write under load.
//!
//! A batch that arrives after its sender's deadline is answered as expired and queues
//! nothing (its sender gave up on it), unless it repeats a batch taken here before, which
//! gets that batch's answer; one whose events do not decode is answered as
//! malformed, whole. A frame too short to name its batch cannot be answered: the stream
//! is closed, and the sender's waiting batches fail as unreachable and are sent again.

use super::frame::{self, Batch, Status};
use actors::cluster::{wire, Cluster};
use actors::metrics::Metrics;
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Serves one stream until the peer closes it or `stop` is cancelled; the batches already
/// read are still taken and answered.
pub(super) async fn serve(
    tcp: TcpStream,
    early: Bytes,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let (read, write) = tcp.into_split();
    let mut frames = frame::reader(read, &early);
    let (answers, queued) = mpsc::unbounded_channel();
    let closed = CancellationToken::new();
    let writer = tokio::spawn(frame::write_frames(write, queued, closed.clone()));
    while !stop.is_cancelled() {
        let next = tokio::select! {
            next = frames.next() => next,
            _ = stop.cancelled() => break,
            _ = closed.cancelled() => break,
        };
        let batch = match next.map(|f| f.map(|f| frame::decode_batch(f.freeze()))) {
            Some(Ok(Ok(batch))) => batch,
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "a peer sent a frame that is not a batch; closing its stream");
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "cluster stream read failed");
                break;
            }
            None => break,
        };
        take(batch, &cluster, &metrics, &answers);
    }
    // The writer ends once every batch in flight has sent its answer.
    drop(answers);
    let _ = writer.await;
}

/// Takes one batch; its answer goes to `answers`.
fn take(
    batch: Batch,
    cluster: &Arc<Cluster>,
    metrics: &Metrics,
    answers: &mpsc::UnboundedSender<Bytes>,
) {
    let id = batch.id;
    let events = match wire::decode(batch.events) {
        Ok(events) => events,
        Err(e) => {
            let _ = answers.send(frame::encode_answer(
                id,
                Status::Malformed,
                e.to_string().as_bytes(),
            ));
            return;
        }
    };
    // Taken to its end even if the stream breaks meanwhile: the sender's retry (same key)
    // gets this answer.
    let (cluster, metrics, answers) = (cluster.clone(), metrics.clone(), answers.clone());
    tokio::spawn(async move {
        let answer = match cluster
            .receive(id, batch.sent, batch.deadline, events)
            .await
        {
            Some(refused) => {
                frame::encode_answer(id, Status::Taken, &wire::encode_refused(&refused))
            }
            // The sender stopped waiting (and its client was told so), and this node had
            // not taken the batch before.
            None => {
                metrics.forwarded_batches_expired.inc();
                frame::encode_answer(id, Status::Expired, b"the sender gave up on this batch")
            }
        };
        let _ = answers.send(answer);
    });
}
