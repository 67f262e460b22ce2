//! The HTTP side of scale-out: the internal listener other nodes call (`server`), and
//! the client this node calls them with (`client`, the [`actors::cluster::Transport`]).

pub mod client;
pub mod server;

/// Carries `Bearer <CLUSTER_TOKEN>`.
pub const TOKEN_HEADER: hyper::header::HeaderName = hyper::header::AUTHORIZATION;
/// The calling node's advertised address (a release hands the device to it).
pub const FROM_HEADER: &str = "x-cluster-from";

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
    /// Liveness and state of a node.
    pub const PING: &str = "/cluster/ping";
    /// The same, from a node that does not count the callee as a member.
    pub const PING_REJOIN: &str = "/cluster/ping?rejoin=1";
    /// Hand a device over to the caller.
    pub const RELEASE: &str = "/cluster/release";
}

#[cfg(test)]
mod tests;
