//! Outgoing streams: one persistent, authenticated connection from this node to each
//! peer's internal listener (`GET /cluster/stream` with CLUSTER_TOKEN, upgraded), on which
//! forwarded batches are pipelined ([`super::frame`]) and their answers matched by key.
//!
//! A connection is dialled on first use and again after it broke. A batch whose
//! connection breaks before its answer fails as unreachable, and the forwarder sends it
//! again under the same key (the peer answers a repeat with the first answer). A batch
//! that times out while nothing at all came back on its connection takes the connection
//! down with it: a peer cut off by a partition is dialled afresh, rather than waiting for
//! TCP's retransmissions once the network heals.

use super::frame::{self, PROTOCOL};
use super::paths;
use actors::cluster::{BatchId, ForwardError};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, HOST, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

type Answer = Result<Vec<u32>, ForwardError>;

/// A sender waiting for its batch's answer; `ticket` tells two sends of one key apart.
struct Waiter {
    ticket: u64,
    reply: oneshot::Sender<Answer>,
}

/// Waiters by key; `None` once the connection is closed.
type Pending = Arc<Mutex<Option<HashMap<BatchId, Waiter>>>>;

/// One open connection to a peer.
struct Link {
    frames: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    closed: CancellationToken,
    /// Answers read on this connection so far.
    answers: Arc<AtomicU64>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl Link {
    /// Starts the writer and the reader of an upgraded connection.
    fn start(tcp: TcpStream, early: Bytes) -> Self {
        let (read, write) = tcp.into_split();
        let (frames, queued) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let answers = Arc::new(AtomicU64::new(0));
        tokio::spawn(frame::write_frames(write, queued, closed.clone()));
        tokio::spawn(read_answers(
            frame::reader(read, &early),
            pending.clone(),
            answers.clone(),
            closed.clone(),
        ));
        Self {
            frames,
            pending,
            closed,
            answers,
        }
    }

    /// Drops a waiter that gave up, unless a later send of the same key replaced it.
    fn forget(&self, id: BatchId, ticket: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = pending.as_mut() {
            if map.get(&id).is_some_and(|w| w.ticket == ticket) {
                map.remove(&id);
            }
        }
    }
}

/// Hands each answer to its waiter until the connection ends; then closes it, and the
/// waiters left learn that it broke.
async fn read_answers<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, LengthDelimitedCodec>,
    pending: Pending,
    answers: Arc<AtomicU64>,
    closed: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = frames.next() => next,
            _ = closed.cancelled() => None,
        };
        let (id, answer) = match next.map(|f| f.map(|f| frame::decode_answer(f.freeze()))) {
            Some(Ok(Ok(answer))) => answer,
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "a peer sent a frame that is not an answer; closing its stream");
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "cluster stream read failed");
                break;
            }
            None => break,
        };
        answers.fetch_add(1, Ordering::Relaxed);
        let waiter = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(|map| map.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.reply.send(answer);
        }
    }
    closed.cancel();
    pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
}

fn unreachable(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Unreachable(e.to_string())
}

/// A failure before the batch was handed to a connection.
fn not_sent(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::NotSent(e.to_string())
}

/// The streams to every peer this node has forwarded to.
pub struct Links {
    links: Mutex<HashMap<SocketAddr, Arc<OnceCell<Arc<Link>>>>>,
    token: HeaderValue,
    timeout: Duration,
    tickets: AtomicU64,
}

impl Links {
    /// Streams authenticated with `token` (`Bearer …`), each batch answered within
    /// `timeout`.
    pub fn new(token: HeaderValue, timeout: Duration) -> Self {
        Self {
            links: Mutex::new(HashMap::new()),
            token,
            timeout,
            tickets: AtomicU64::new(0),
        }
    }

    /// Sends a batch's frame to `peer` and waits for its answer.
    pub async fn send(&self, peer: SocketAddr, id: BatchId, frame: Bytes) -> Answer {
        let deadline = Instant::now() + self.timeout;
        let link = tokio::time::timeout_at(deadline, self.link(peer))
            .await
            .map_err(|_| not_sent("no connection within the forward timeout"))??;
        let (reply, answer) = oneshot::channel();
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = link.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(map) = pending.as_mut() else {
                return Err(not_sent("the stream closed"));
            };
            map.insert(id, Waiter { ticket, reply });
        }
        let seen = link.answers.load(Ordering::Relaxed);
        if link.frames.send(frame).is_err() {
            link.forget(id, ticket);
            return Err(not_sent("the stream closed"));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(unreachable("the stream broke before the answer")),
            Err(_) => {
                link.forget(id, ticket);
                if link.answers.load(Ordering::Relaxed) == seen {
                    link.closed.cancel();
                }
                Err(ForwardError::Timeout)
            }
        }
    }

    /// The open stream to `peer`, dialled if there is none (one dial at a time).
    async fn link(&self, peer: SocketAddr) -> Result<Arc<Link>, ForwardError> {
        loop {
            let cell = self
                .links
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(peer)
                .or_default()
                .clone();
            let link = cell.get_or_try_init(|| self.dial(peer)).await?;
            if !link.closed.is_cancelled() {
                return Ok(link.clone());
            }
            let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            if links.get(&peer).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                links.remove(&peer);
            }
        }
    }

    /// Connects, asks for the upgrade with the token, and starts the stream.
    async fn dial(&self, peer: SocketAddr) -> Result<Arc<Link>, ForwardError> {
        let tcp = TcpStream::connect(peer).await.map_err(not_sent)?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                .await
                .map_err(not_sent)?;
        tokio::spawn(conn.with_upgrades());
        let request = Request::get(paths::STREAM)
            .header(HOST, peer.to_string())
            .header(AUTHORIZATION, self.token.clone())
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, PROTOCOL)
            .body(Empty::new())
            .map_err(not_sent)?;
        let response = sender.send_request(request).await.map_err(not_sent)?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError::Rejected(response.status().as_u16()));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(not_sent)?;
        let (tcp, early) = frame::into_tcp(upgraded).map_err(not_sent)?;
        Ok(Arc::new(Link::start(tcp, early)))
    }
}
