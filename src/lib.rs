//! iot-processor: accepts IoT metric events over HTTP, analyses each device's rolling
//! window in a supervised actor, publishes results to Redis (or the embedded store), and
//! exports Prometheus metrics.
//!
//! The front end is this library so that it can run inside another process: `main` reads
//! the settings, sets up logging and the signals and calls [`App`]; the API tests start an
//! [`App`] on `127.0.0.1:0` in their own process (tests/common/inprocess.rs). Several
//! instances can share a process, but some parts live as long as the process, not the
//! instance: the AUTH_TOKENS_FILE watcher (and its SIGHUP handler), and what a failed
//! [`App::start`] had started before it failed.
//!
//! # Layout
//! - `app`: the wiring — config → store → actors → listeners → drain in order.
//! - `auth`: client tokens (AUTH_TOKENS_FILE) and `iot-processor token add`.
//! - `cluster`: the internal listener and the client of scale-out (forwarding, handoff).
//! - `config`: every setting, its flag, environment variable and default.
//! - `http`: the router, one file per endpoint, errors, and the server.
//! - `logging`: text or JSON logs.
//! - `shutdown`: the signal that starts a graceful shutdown.
#![forbid(unsafe_code)]

mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod logging;
pub mod shutdown;
mod tuning;

pub use app::{App, StartError};
