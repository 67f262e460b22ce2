//! Shared pieces of the benchmark binaries.
//!
//! # Layout
//! - `events`: the load's shape (deterministic RNG, device baselines, event bodies).
//! - `failure`: why a request failed, classified for the failure breakdown.
//! - `report`: the summary of a run (latencies, failures), its text form, and the
//!   minimum-success check that sets the exit code.
//! - `bin/loadtest.rs`: the load generator (closed loop or fixed rate, HDR latencies).
//! - `bin/limit-server.rs`: the hardware-limit reference, a bare hyper server.
//! - `run.sh`, `soak.sh`, `overload.sh`: the benchmarks that start Redis and the service
//!   on free loopback ports and run the scenarios (`common.sh` holds their helpers);
//!   `cluster.sh` compares one node with a two-node cluster (the cost of forwarding).
#![forbid(unsafe_code)]

pub mod events;
pub mod failure;
pub mod report;

pub use events::{event_body, Baseline, Rng};
