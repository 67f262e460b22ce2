//! The HTTP side of scale-out: the internal listener other nodes call (`server`), and
//! the client this node calls them with (`client`, the [`actors::cluster::Transport`]).

pub mod client;
pub mod server;

pub use actors::cluster::ownership::unix_millis;

/// Carries `Bearer <CLUSTER_TOKEN>`.
pub const TOKEN_HEADER: hyper::header::HeaderName = hyper::header::AUTHORIZATION;
/// A forwarded batch's idempotency key (`<incarnation>-<sequence>`, hex).
pub const BATCH_HEADER: &str = "x-cluster-batch";

/// The internal routes.
pub mod paths {
    /// A forwarded batch of events.
    pub const EVENTS: &str = "/cluster/events";
    /// A node's id.
    pub const PING: &str = "/cluster/ping";
    /// Read the table now.
    pub const KICK: &str = "/cluster/kick";
}
