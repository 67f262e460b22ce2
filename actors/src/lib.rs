//! The actor side of iot-stream-processor: per-device analytics in supervised ractor
//! actors, the store writer, and the metrics actor.
//!
//! # Layout
//! - [`analytics`]: the rolling window and z-score rule; pure and synchronous.
//! - [`cluster`]: scale-out: ownership, membership, forwarding and handoff between nodes.
//! - [`event`]: a validated device id and event (the rules of both), and the analysis
//!   that results from an event.
//! - [`ingest`]: the way in for events: local or cluster, through the ingest log (a Redis
//!   stream) when it is on, and its replay at start.
//! - [`device`]: the device directory the front end submits to, the per-device queue
//!   (slot), the device actor and its supervisor.
//! - [`store`]: the store seam (embedded or Redis, plain or TLS) and the writer actor that
//!   coalesces results and flushes them pipelined.
//! - [`metrics`]: the typed Prometheus families and the actor that owns the registry.
//! - [`position`]: positions in the ingest log, and the pins that keep its entries until
//!   a stored checkpoint covers them.
//! - [`system`]: starts the actor tree, and drains it on shutdown.
//! - [`tuning`]: the fixed deadlines and periods (those that are not settings).
//!
//! # Actor tree
//! ```text
//! metrics actor      owns the Registry; counts anomalies with capped device labels; encodes scrapes
//! store writer       newest result per device → pipelined SETs every FLUSH_INTERVAL
//! device supervisor  spawns, restarts and idle-evicts device actors
//!   └─ device actor  one per live device: window + anomaly state
//! ```
#![forbid(unsafe_code)]

pub mod analytics;
pub mod cluster;
pub mod device;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod position;
pub mod store;
pub mod system;
pub mod tuning;

pub use system::{ShutdownReport, System, SystemConfig};
