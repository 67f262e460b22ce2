//! Request ids and the log of failed requests.
//!
//! Every request gets an `X-Request-Id`: the client's (1 to 128 visible ASCII characters)
//! or a generated one, echoed in the response. Every answer of 400 or above is logged
//! with method, path, status, reason, device id (when known) and that id, so a client's
//! complaint can be found in the log. A flood of bad requests must not become a flood of
//! log lines: at most [`REQUEST_LOG_LINES_PER_SECOND`] are written per second, and the next line
//! written says how many were left out.

use crate::tuning::REQUEST_LOG_LINES_PER_SECOND;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Why a request failed, attached to its response by the handler that answered it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error message of the JSON body.
    pub reason: String,
    /// The field at fault, if any.
    pub field: Option<&'static str>,
}

/// The device a request was about, when the handler knew it.
#[derive(Debug, Clone)]
pub struct DeviceNote(pub String);

/// Request ids and the rate limit of failure lines; one per process.
#[derive(Debug)]
pub struct RequestLog {
    seed: u64,
    next: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

/// Whether to write a failure line, and how many were left out before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, saying how many lines were suppressed since the last one written.
    Write { suppressed: u64 },
    /// Leave it out (counted).
    Suppress,
}

impl RequestLog {
    /// A log whose generated ids start from `seed` (the start time, so that ids of two
    /// runs differ).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            next: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// The request's id: the client's when acceptable, else a new one.
    pub fn id(&self, given: Option<&[u8]>) -> String {
        match given {
            Some(id)
                if (1..=128).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic()) =>
            {
                // Checked above: visible ASCII is valid UTF-8.
                String::from_utf8_lossy(id).into_owned()
            }
            _ => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                format!(
                    "{:016x}",
                    self.seed
                        .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                )
            }
        }
    }

    /// Whether a failure line may be written at `now`.
    pub fn admit(&self, now: Instant) -> Verdict {
        // A short critical section, never across an .await.
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.duration_since(w.started).as_secs() >= 1 {
            w.started = now;
            w.written = 0;
        }
        if w.written < REQUEST_LOG_LINES_PER_SECOND {
            w.written += 1;
            Verdict::Write {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn client_ids_are_kept_when_sane_and_replaced_otherwise() {
        let log = RequestLog::new(7);
        assert_eq!(log.id(Some(b"abc-123")), "abc-123");
        let generated: Vec<String> = [
            None,
            Some(&b""[..]),
            Some(&b"has space"[..]),
            Some(&[b'a'; 129][..]),
        ]
        .into_iter()
        .map(|given| log.id(given))
        .collect();
        for id in &generated {
            assert_eq!(id.len(), 16, "{id}");
        }
        let mut unique = generated.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), generated.len(), "generated ids differ");
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_next_line_counts_what_was_left_out() {
        let log = RequestLog::new(0);
        let t0 = Instant::now();
        for _ in 0..REQUEST_LOG_LINES_PER_SECOND {
            assert_eq!(log.admit(t0), Verdict::Write { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(log.admit(t0), Verdict::Suppress);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(t1), Verdict::Write { suppressed: 5 });
        assert_eq!(log.admit(t1), Verdict::Write { suppressed: 0 });
    }
}
