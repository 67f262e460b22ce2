//! The HTTP front end. Wiring only; what each file owns, from the ground floor up: a file
//! imports only files listed before it (`tests/http_layers.rs` fails on an import cycle).
//!
//! - `query`: the query-string parser.
//! - `request_log`: request ids and the rate-limited log of failed requests.
//! - `errors`: the response body type, the JSON error body and the JSON helpers.
//! - `routes`: the route table (path, method) and the `endpoint` label derived from it.
//! - `metrics`: the front end's Prometheus families.
//! - `validate`: decoding and checking events and batches.
//! - `body`: reading a request body within its limits (gzip included).
//! - `feed`: the anomaly feed, one store poller shared by every stream client.
//! - `state`: what every handler can reach, and the authorisation checks.
//! - `refusal`: counting a refused event, and the refusals the ingest endpoints share.
//! - `ingest`, `batch`, `analyze`, `stream`, `probes`, `scrape`: one file per endpoint.
//! - `router`: the one `match` from endpoint to handler, 404 and 405, request metrics and
//!   the failure log.
//! - `connection`: one client connection and its timeouts.
//! - `server`: the accept loop, the connection limit and the graceful drain.

mod analyze;
mod batch;
mod body;
mod connection;
mod errors;
mod feed;
mod ingest;
mod metrics;
mod probes;
mod query;
mod refusal;
mod request_log;
mod router;
mod routes;
mod scrape;
mod server;
mod state;
mod stream;
mod validate;

pub use connection::Timeouts;
pub use feed::AnomalyFeed;
pub use metrics::HttpMetrics;
pub use query::query_param;
pub use server::{serve, Limits};
pub use state::{AppState, BodyLimits, Parts};
