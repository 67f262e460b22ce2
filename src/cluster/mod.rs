//! The HTTP side of scale-out: the internal listener other nodes call (`server`), and
//! the client this node calls them with (`client`, the [`actors::cluster::Transport`]).

pub mod client;
pub mod server;

/// Carries `Bearer <CLUSTER_TOKEN>`.
pub const TOKEN_HEADER: hyper::header::HeaderName = hyper::header::AUTHORIZATION;
/// A forwarded batch's idempotency key (`<incarnation>-<sequence>`, hex).
pub const BATCH_HEADER: &str = "x-cluster-batch";

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The internal routes.
pub mod paths {
    /// A forwarded batch of events.
    pub const EVENTS: &str = "/cluster/events";
    /// A node's id.
    pub const PING: &str = "/cluster/ping";
    /// Read the table now.
    pub const KICK: &str = "/cluster/kick";
}
