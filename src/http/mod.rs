//! The HTTP front end: one router, one file per endpoint, the JSON error type, and the
//! server (accept loop, connection limits, graceful drain).

mod analyze;
mod connection;
mod errors;
mod ingest;
mod probes;
mod router;
mod scrape;
mod server;
mod validate;

pub use connection::Timeouts;
pub use server::{serve, Limits};

use actors::System;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What every request handler can reach; cloned per connection (an `Arc` inside).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    system: Arc<System>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    shutting_down: AtomicBool,
}

impl AppState {
    /// State over a running actor system.
    pub fn new(system: Arc<System>, max_body_bytes: usize, body_read_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                system,
                max_body_bytes,
                body_read_timeout,
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    fn system(&self) -> &System {
        &self.inner.system
    }

    /// From now on `/ready` answers 503 and no event is accepted.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}
