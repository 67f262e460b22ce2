//! How nodes talk to each other: the [`Transport`] the binary implements over HTTP, its
//! errors, and the idempotency key of a forwarded batch.

use crate::device::BoxFuture;
use crate::metrics::ForwardFailure;
use bytes::Bytes;
use std::net::SocketAddr;

/// Why a call to a peer did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// No answer within CLUSTER_FORWARD_TIMEOUT.
    #[error("no answer within the forward timeout")]
    Timeout,
    /// The connection broke after the batch was sent (it may have arrived).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// Could not connect: the batch was not sent.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The peer refused the request (status code).
    #[error("refused with status {0}")]
    Rejected(u16),
    /// The peer is at MAX_PENDING_EVENTS: the events were not accepted (a client gets
    /// 503 and retries).
    #[error("the owner is overloaded")]
    Overloaded,
}

impl ForwardError {
    /// The failure reason for metrics; `None` for an overload (not a failure of the peer).
    pub fn failure(&self) -> Option<ForwardFailure> {
        match self {
            ForwardError::Timeout => Some(ForwardFailure::Timeout),
            ForwardError::Unreachable(_) | ForwardError::NotSent(_) => {
                Some(ForwardFailure::Unreachable)
            }
            ForwardError::Rejected(_) => Some(ForwardFailure::Rejected),
            ForwardError::Overloaded => None,
        }
    }
}

impl ForwardError {
    /// Whether the peer may have taken the batch although no answer came.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, ForwardError::Timeout | ForwardError::Unreachable(_))
    }
}

/// A forwarded batch's idempotency key: the sending node's incarnation and its sequence
/// number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64, pub u64);

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{:x}", self.0, self.1)
    }
}

impl std::str::FromStr for BatchId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (a, b) = s.split_once('-').ok_or(())?;
        Ok(Self(
            u64::from_str_radix(a, 16).map_err(|_| ())?,
            u64::from_str_radix(b, 16).map_err(|_| ())?,
        ))
    }
}

/// How nodes talk to each other (HTTP in the binary). Each call is bounded by the
/// forward timeout.
pub trait Transport: Send + Sync + 'static {
    /// Sends an encoded batch (`cluster::wire`) under its idempotency key; answers the
    /// positions the peer did not take (empty: all queued there).
    fn send_events(
        &self,
        peer: SocketAddr,
        id: BatchId,
        body: Bytes,
    ) -> BoxFuture<Result<Vec<u32>, ForwardError>>;
    /// Asks a node for its id (the start-up check that the advertised address reaches
    /// this very process).
    fn ping(&self, peer: SocketAddr) -> BoxFuture<Result<String, ForwardError>>;
    /// Tells a peer that the table changed for it (a shard was passed to it): it reads
    /// the table now instead of at its next heartbeat.
    fn kick(&self, peer: SocketAddr) -> BoxFuture<Result<(), ForwardError>>;
}
