//! The fixed timings and sizes of the library: deadlines, retry and probe periods, batch
//! and buffer bounds that are not settings (an operator has no reason to change them),
//! named in one place so that nothing in the code carries an unexplained number. The
//! front end's are in the service crate's `tuning.rs`.

use std::time::Duration;

/// Deadline of one Redis operation (a pooled checkout included). Also bounds how fast
/// `/ready` sees a hanging store: a probe that does not answer within it fails.
pub const STORE_OP_TIMEOUT: Duration = Duration::from_millis(500);

/// First retry delay after a failed flush; doubles up to [`STORE_MAX_BACKOFF`].
pub const STORE_MIN_BACKOFF: Duration = Duration::from_millis(50);

/// Longest retry delay after failed flushes.
pub const STORE_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The writer probes the store when nothing else touched it for this long, so that
/// `/ready` reflects a failure within about a second even when no events arrive.
pub const STORE_PROBE_EVERY: Duration = Duration::from_millis(250);

/// How often the embedded store drops expired keys.
pub const EMBEDDED_PURGE_EVERY: Duration = Duration::from_secs(1);

/// Devices waiting in the writer's inbox before a flush starts without waiting for the
/// timer: bounds one pipelined flush.
pub const FLUSH_EARLY_AT: usize = 8192;

/// How long a starting device actor waits for its persisted window before it starts
/// empty (and counts a restore failure).
pub const WINDOW_RESTORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Attempts to read a starting device actor's window before it starts empty: a store
/// that is slow for a moment (a burst of restores) should not cost the window.
pub const RESTORE_ATTEMPTS: u32 = 3;

/// Pause after a failed window read, times the attempt number.
pub const RESTORE_RETRY_DELAY: Duration = Duration::from_millis(100);

/// How long a request to one of the long-lived actors (a scrape, a count) may take.
pub const ACTOR_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Events a device actor processes per wake-up before yielding its worker thread, so one
/// busy device cannot hold a thread.
pub const EVENTS_PER_TURN: usize = 256;

/// Delay before a device actor that failed to start is spawned again.
pub const RESPAWN_DELAY: Duration = Duration::from_millis(100);

/// Events in one ingest-log entry at most: a group commit takes waiting requests up to
/// this many (a request is never split, so one large batch may exceed it).
pub const LOG_MAX_ENTRY_EVENTS: usize = 8192;

/// How often an unreachable ingest log is probed (and a failed replay retried).
pub const LOG_PROBE_EVERY: Duration = Duration::from_millis(250);

/// How often the ingest log is trimmed below the entries checkpoints do not cover yet.
pub const LOG_TRIM_EVERY: Duration = Duration::from_secs(1);

/// Entries read per round trip when the ingest log is replayed.
pub const LOG_REPLAY_CHUNK: usize = 512;

/// How long an ingest-log append whose answer was lost waits for Redis to say whether it
/// was written, before its requests are answered 503.
pub const LOG_RESOLVE_WAIT: Duration = Duration::from_secs(1);

/// How long a small ingest-log group waits after the previous append started, at a
/// moderate arrival rate: an entry then holds several requests (Redis pays per round
/// trip, not per event), for at most this much more latency. Tokio's timers tick in
/// milliseconds.
pub const LOG_COMMIT_GAP: Duration = Duration::from_millis(1);

/// A group of fewer events than this may wait for [`LOG_COMMIT_GAP`]; a larger one is
/// appended at once.
pub const LOG_LINGER_BELOW: usize = 16;

/// The arrival rates (events per millisecond) at which a small group waits: below, a wait
/// gathers nothing (a quiet service, one client sending request after request); above,
/// groups are large anyway and a closed-loop load would only be slowed.
pub const LOG_LINGER_RATE: std::ops::RangeInclusive<f64> = 4.0..=24.0;

/// The arrival rate is averaged over about this many appends.
pub const LOG_RATE_SMOOTHING: f64 = 8.0;

/// The shortest interval the arrival rate is measured over (milliseconds), so that two
/// appends in quick succession do not read as a burst.
pub const LOG_RATE_FLOOR_MS: f64 = 0.1;

/// An ingest-log entry of this many events or more is queued at its devices by a task
/// beside the actors rather than by the appender's thread: queueing is then cheap for the
/// appender, which writes the next entry meanwhile, and wakes the actors on their own
/// runtime; a small entry is queued at once, without a hop.
pub const LOG_SETTLE_ASIDE: usize = 256;

/// How long a single node's hold on its ingest-log stream lasts without renewal (the
/// trimmer renews it every [`LOG_TRIM_EVERY`]): another node with the same stream waits
/// this long after the holder was killed somewhere else.
pub const LOG_WRITER_LEASE: Duration = Duration::from_secs(10);

/// Connections of the ingest log's own pool: the appender uses one at a time, the
/// trimmer another.
pub const LOG_POOL_SIZE: u32 = 2;

/// Keys written per pipeline; larger flushes are split across pooled connections.
pub const PIPELINE_CHUNK: usize = 512;

/// How long an appended entry's uid is remembered: far longer than any retry takes.
pub const APPENDED_UID_TTL_MS: u64 = 600_000;

/// Transactions tried per flush when the table keeps changing under it; then the flush
/// fails and the writer retries it with backoff.
pub const FENCED_ATTEMPTS: usize = 3;

/// Batches on the wire to one peer at once: enough to keep the link busy while answers
/// travel back; beyond it events gather into the next batch, which keeps batches large
/// under load.
pub const FORWARD_MAX_IN_FLIGHT: usize = 4;

/// How long the first event of a forwarded batch waits for others: what a forwarded
/// event's latency may grow by so that a busy link sends fewer, larger batches.
pub const FORWARD_LINGER: Duration = Duration::from_millis(1);

/// Pause before a batch is sent again.
pub const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Events in one forwarded batch at most.
pub const FORWARD_MAX_BATCH_EVENTS: usize = 4096;

/// An event whose shard is between owners waits; every change of this node's view of
/// the table wakes it, and it looks again at least this often.
pub const OWNER_WAIT_STEP: Duration = Duration::from_millis(25);

/// Forwarded batches whose answers are remembered at most (a sender's retry of one is
/// answered from memory, not taken twice): bounds that memory.
pub const RECEIVED_MAX_REMEMBERED: usize = 200_000;

/// Rounds never follow each other closer than this, however often they are kicked.
pub const MIN_ROUND_GAP: Duration = Duration::from_millis(10);

/// Every this many rounds, ingest-log streams nobody needs are deleted.
pub const COLLECT_LOGS_EVERY: u64 = 10;
