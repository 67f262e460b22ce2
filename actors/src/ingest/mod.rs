//! The way in for events: [`Ingest`] takes a request's events and answers once they are
//! accepted, so that the HTTP front end only decodes, authorises and answers.
//!
//! Accepted means: on a single node, queued at the device's actor, and with the ingest
//! log on ([`IngestLog`]) written to the log first; in a cluster, queued at the shard's
//! owner (see [`crate::cluster`]).

mod appender;
mod facade;
pub(crate) mod log;
pub(crate) mod redis_log;
mod replay;
pub(crate) mod shared;

pub use facade::Ingest;
pub use log::{settled, Appended, IngestLog};
pub use redis_log::{RawEntry, RedisLog};
pub use shared::{LogSettings, Tag};
