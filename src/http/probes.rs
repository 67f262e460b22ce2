//! `GET /health` (liveness: the process answers) and `GET /ready` (readiness: the store
//! answers, the actors run, the ingest log is replayed and writable, and shutdown has not
//! begun).

use super::errors::{json, Body};
use super::state::AppState;
use chrono::{SecondsFormat, Utc};
use hyper::{Response, StatusCode};
use serde::Serialize;

#[derive(Serialize)]
struct Health {
    status: &'static str,
    timestamp: String,
}

#[derive(Serialize)]
struct Checks {
    store: &'static str,
    actors: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_log: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown: Option<&'static str>,
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
    checks: Checks,
}

/// Liveness; checks no dependency, so a store outage never restarts the pod.
pub fn health() -> Response<Body> {
    json(
        StatusCode::OK,
        &Health {
            status: "healthy",
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        },
    )
}

/// Readiness, from the writer's store health flag (kept within a second of the truth).
pub fn ready(state: &AppState) -> Response<Body> {
    let system = state.system();
    let store_ok = system.store_health().is_up();
    let actors_ok = system.is_running();
    let stopping = state.is_shutting_down();
    // In a cluster: ready once registered in the table (the first heartbeat). A new node
    // owns nothing at first: its events go to the shards' owners until shards move here.
    let cluster = state.cluster().map(|c| {
        if c.is_leaving() {
            "leaving"
        } else if c.is_registered() {
            "ok"
        } else {
            "joining"
        }
    });
    // With the ingest log: ready once the start-up replay is done and the log writable.
    let ingest_log = state.ingest().log().map(|log| {
        if !log.is_replayed() {
            "replaying"
        } else if log.is_ready() {
            "ok"
        } else {
            "unwritable"
        }
    });
    let checks = Checks {
        store: if store_ok { "ok" } else { "unreachable" },
        actors: if actors_ok { "ok" } else { "stopped" },
        ingest_log,
        cluster,
        shutdown: stopping.then_some("in progress"),
    };
    let ready = store_ok
        && actors_ok
        && !stopping
        && cluster.is_none_or(|c| c == "ok")
        && ingest_log.is_none_or(|l| l == "ok");
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &Ready {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        },
    )
}
