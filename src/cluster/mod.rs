//! The network side of scale-out: the internal listener other nodes call (`server`), the
//! streams of forwarded batches it serves (`stream`), the client this node calls them
//! with (`client`, the [`actors::cluster::Transport`]) and its streams (`link`), and the
//! frames on those streams (`frame`).

pub mod client;
pub mod frame;
mod link;
pub mod server;
mod stream;

pub use actors::cluster::ownership::unix_millis;

/// Carries `Bearer <CLUSTER_TOKEN>`.
pub const TOKEN_HEADER: hyper::header::HeaderName = hyper::header::AUTHORIZATION;

/// The internal routes.
pub mod paths {
    /// The stream of forwarded batches (an HTTP upgrade to [`super::frame::PROTOCOL`]).
    pub const STREAM: &str = "/cluster/stream";
    /// A node's id.
    pub const PING: &str = "/cluster/ping";
    /// Read the table now.
    pub const KICK: &str = "/cluster/kick";
}
