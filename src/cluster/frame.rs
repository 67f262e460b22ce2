//! The frames of the persistent stream between two nodes (`GET /cluster/stream`,
//! upgraded): what a forwarded batch and its answer look like on it, and the writer loop
//! both ends share.
//!
//! Every frame is length-delimited ([`LengthDelimitedCodec`]: a 4-byte big-endian
//! length, then the payload). A batch's payload is its idempotency key (incarnation and
//! sequence, u64 LE each), the sender's clock when it sent it and its deadline (Unix
//! milliseconds, u64 LE each), then the batch's events ([`actors::cluster::wire`]). An
//! answer's payload is the key it answers, a status byte ([`Status`]), then for
//! [`Status::Taken`] the positions not taken ([`wire::encode_refused`]) and otherwise a
//! message. Answers are matched by key, so batches are pipelined and may be answered
//! out of order.

use actors::cluster::{wire, BatchId, ForwardError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// The protocol named in the upgrade request and answer.
pub const PROTOCOL: &str = "iot-cluster-stream/1";
/// The largest frame: a full batch of 128-byte device ids fits many times over.
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Bytes before a batch's events.
const BATCH_HEADER: usize = 32;
/// Bytes before an answer's body.
const ANSWER_HEADER: usize = 17;

/// The codec of both directions.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// A forwarded batch as it arrives.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// Its idempotency key.
    pub id: BatchId,
    /// The sender's clock when it sent it (Unix ms).
    pub sent: u64,
    /// Past this (Unix ms) the sender has given up on it.
    pub deadline: u64,
    /// The encoded events ([`wire::decode`]).
    pub events: Bytes,
}

/// A frame that is not a batch or an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame too short for its header")]
pub struct Truncated;

fn put_id(out: &mut BytesMut, id: BatchId) {
    out.put_u64_le(id.0);
    out.put_u64_le(id.1);
}

fn get_id(frame: &mut Bytes) -> BatchId {
    BatchId(frame.get_u64_le(), frame.get_u64_le())
}

/// A batch's frame.
pub fn encode_batch(id: BatchId, sent: u64, deadline: u64, events: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(BATCH_HEADER + events.len());
    put_id(&mut out, id);
    out.put_u64_le(sent);
    out.put_u64_le(deadline);
    out.put_slice(events);
    out.freeze()
}

/// Reads a batch's frame (the events are decoded by the caller).
pub fn decode_batch(mut frame: Bytes) -> Result<Batch, Truncated> {
    if frame.len() < BATCH_HEADER {
        return Err(Truncated);
    }
    let id = get_id(&mut frame);
    let (sent, deadline) = (frame.get_u64_le(), frame.get_u64_le());
    Ok(Batch {
        id,
        sent,
        deadline,
        events: frame,
    })
}

/// How a batch was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Taken: the body lists the positions not taken.
    Taken = 0,
    /// Its events do not decode; nothing queued.
    Malformed = 1,
    /// It arrived after its sender's deadline; nothing queued.
    Expired = 2,
}

/// An answer's frame.
pub fn encode_answer(id: BatchId, status: Status, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(ANSWER_HEADER + body.len());
    put_id(&mut out, id);
    out.put_u8(status as u8);
    out.put_slice(body);
    out.freeze()
}

/// Reads an answer's frame: the key it answers and what the sender makes of it (the
/// positions not taken, or why the batch was refused, as the HTTP status of the same
/// refusal: 400 malformed, 410 expired, 500 a status this node does not know).
pub fn decode_answer(
    mut frame: Bytes,
) -> Result<(BatchId, Result<Vec<u32>, ForwardError>), Truncated> {
    if frame.len() < ANSWER_HEADER {
        return Err(Truncated);
    }
    let id = get_id(&mut frame);
    let answer = match frame.get_u8() {
        0 => wire::decode_refused(frame).map_err(|_| ForwardError::Rejected(200)),
        1 => Err(ForwardError::Rejected(400)),
        2 => Err(ForwardError::Rejected(410)),
        _ => Err(ForwardError::Rejected(500)),
    };
    Ok((id, answer))
}

/// Writes the frames that `frames` yields until it closes, `stop` is cancelled or a write
/// fails (then it cancels `stop`). Frames that are already waiting go out together: under
/// load several frames share one write, and a lone frame is written at once.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    io: W,
    mut frames: mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
) {
    let mut sink = FramedWrite::new(io, codec());
    loop {
        let first = tokio::select! {
            frame = frames.recv() => frame,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut written = sink.feed(first).await;
        while written.is_ok() {
            match frames.try_recv() {
                Ok(next) => written = sink.feed(next).await,
                Err(_) => break,
            }
        }
        if let Err(e) = written.and(SinkExt::<Bytes>::flush(&mut sink).await) {
            tracing::debug!(error = %e, "cluster stream write failed");
            stop.cancel();
            break;
        }
    }
}

/// The TCP connection under an upgraded one, with the bytes hyper had read past the
/// upgrade (the first frames, if the other end sent them early).
pub fn into_tcp(upgraded: hyper::upgrade::Upgraded) -> std::io::Result<(TcpStream, Bytes)> {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Ok((parts.io.into_inner(), parts.read_buf)),
        Err(_) => Err(std::io::Error::other("the upgraded connection is not TCP")),
    }
}

/// Reads frames from `io`, starting with the bytes `early` that were read with the
/// upgrade.
pub fn reader<R: tokio::io::AsyncRead>(io: R, early: &[u8]) -> FramedRead<R, LengthDelimitedCodec> {
    let mut frames = FramedRead::new(io, codec());
    frames.read_buffer_mut().extend_from_slice(early);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_answers_round_trip() {
        let id = BatchId(0xfeed, 7);
        let frame = encode_batch(id, 10, 20, b"IE1");
        assert_eq!(
            decode_batch(frame),
            Ok(Batch {
                id,
                sent: 10,
                deadline: 20,
                events: Bytes::from_static(b"IE1")
            })
        );
        let refused = wire::encode_refused(&[1, 5 | wire::MOVED]);
        let (back, answer) =
            decode_answer(encode_answer(id, Status::Taken, &refused)).expect("answer");
        assert_eq!((back, answer), (id, Ok(vec![1, 5 | wire::MOVED])));
        for (status, code) in [(Status::Malformed, 400), (Status::Expired, 410)] {
            let (_, answer) = decode_answer(encode_answer(id, status, b"why")).expect("answer");
            assert_eq!(answer, Err(ForwardError::Rejected(code)));
        }
    }

    #[test]
    fn short_frames_are_refused() {
        assert_eq!(decode_batch(Bytes::from_static(&[0; 31])), Err(Truncated));
        assert_eq!(decode_answer(Bytes::from_static(&[0; 16])), Err(Truncated));
        let (_, answer) =
            decode_answer(encode_answer(BatchId(1, 1), Status::Taken, b"abc")).expect("frame");
        assert_eq!(answer, Err(ForwardError::Rejected(200)));
    }
}
