//! The fixed timings and sizes of the front end (HTTP, the anomaly feed, the cluster's
//! client) that are not settings, named in one place. The library's are in
//! `actors::tuning`.

use std::time::Duration;

/// How often AUTH_TOKENS_FILE is checked for changes (SIGHUP reloads at once).
pub const TOKENS_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Failed-request lines written per second at most.
pub const REQUEST_LOG_LINES_PER_SECOND: u32 = 20;

/// Output decompressed on the request's own task; beyond it the decoder moves to the
/// blocking pool. Small enough (well under a millisecond of CPU) not to delay the other
/// tasks of the worker, large enough that a `/metric` body (`MAX_BODY_BYTES`, 64 KiB by
/// default) and most batches never pay for the hand-over.
pub const INLINE_GUNZIP_BYTES: u64 = 256 * 1024;

/// How often the poller reads the store while clients are connected: well inside the
/// FLUSH_INTERVAL + 10 ms that an anomaly may take to reach a client.
pub const FEED_POLL_EVERY: Duration = Duration::from_millis(2);

/// Entries read per store call.
pub const FEED_READ_BATCH: usize = 512;

/// Entries the broadcast holds for the slowest client before it counts as lagging.
pub const FEED_CAPACITY: usize = 4096;

/// How often a connection whose next request is on its way in at shutdown looks again
/// whether that request has started.
pub const SHUTDOWN_RECHECK: Duration = Duration::from_millis(5);

/// Frames waiting in front of one client's connection before it counts as not reading.
pub const STREAM_CLIENT_BUFFER: usize = 256;

/// Idle pooled connections per peer: pings and kicks are rare.
pub const IDLE_PER_PEER: usize = 1;
