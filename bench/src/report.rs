//! The summary of one load-test run: counts, rate, latency percentiles, the failure
//! breakdown, its text form, and the minimum-success check that decides the exit code
//! (so a run against a dead or failing server cannot end "successfully").

use crate::failure::Failures;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// The load generator's default success threshold: more than 95 % of requests succeed
/// (the original service's target at 1000 RPS).
pub const DEFAULT_MIN_SUCCESS_PERCENT: f64 = 95.0;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    /// p99.9 (`p99_9` in JSON).
    pub p99_9: f64,
    pub max: f64,
}

impl Latency {
    /// The percentiles of a histogram of microseconds; `None` when nothing was recorded
    /// (every request failed without an answer), rather than a row of misleading zeros.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            min: ms(h.min()),
            avg: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// Failed requests in the JSON report: answers by status, the rest by what broke.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FailureBreakdown {
    /// Answers outside 2xx, by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests without an answer, by error ("connection refused", "timed out", …).
    pub by_error: BTreeMap<String, u64>,
}

impl From<&Failures> for FailureBreakdown {
    fn from(f: &Failures) -> Self {
        Self {
            by_status: f.by_status(),
            by_error: f.by_error(),
        }
    }
}

/// What one run measured; printed as text or as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: usize,
    pub threads: usize,
    pub rate: Option<f64>,
    pub devices: u64,
    pub duration_s: f64,
    pub total: u64,
    pub successful: u64,
    pub failed: u64,
    /// Percent of requests answered 2xx; 0 when nothing was sent.
    pub success_rate: f64,
    /// Successful requests per second.
    pub requests_per_sec: f64,
    /// Events per request (1: `POST /metric`).
    pub batch: usize,
    /// Bodies were gzip-compressed.
    pub gzip: bool,
    /// Events of successful requests per second.
    pub events_per_sec: f64,
    /// Latency of the requests that got an answer (2xx or not); `null` when none did.
    pub latency_ms: Option<Latency>,
    pub failures: FailureBreakdown,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visibility_ms: Option<Latency>,
    /// Anomaly to SSE frame (`--sse-probes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sse_ms: Option<Latency>,
}

/// Percent of `total` that is `ok`; 0 when `total` is 0.
pub fn success_rate(ok: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * ok as f64 / total as f64
    }
}

/// Why a run does not count as a success (the load generator exits 1 with this).
#[derive(Debug, Clone, PartialEq)]
pub enum Shortfall {
    /// Not a single request was sent (zero duration or zero requests).
    NothingSent,
    /// Too many requests failed.
    BelowMinimum {
        success_rate: f64,
        min_success: f64,
        failed: u64,
        total: u64,
    },
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NothingSent => f.write_str("no request was sent"),
            Self::BelowMinimum {
                success_rate,
                min_success,
                failed,
                total,
            } => write!(
                f,
                "success rate {success_rate:.3}% is below --min-success {min_success}% \
                 ({failed} of {total} requests failed)"
            ),
        }
    }
}

impl std::error::Error for Shortfall {}

impl Report {
    /// Ok when at least `min_success` percent of the requests succeeded.
    pub fn check(&self, min_success: f64) -> Result<(), Shortfall> {
        if self.total == 0 {
            return Err(Shortfall::NothingSent);
        }
        if self.success_rate < min_success {
            return Err(Shortfall::BelowMinimum {
                success_rate: self.success_rate,
                min_success,
                failed: self.failed,
                total: self.total,
            });
        }
        Ok(())
    }

    /// The human-readable summary (the original load test's lines, plus the failure
    /// breakdown and p99.9).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "Duration:        {:.2}s", self.duration_s)?;
        writeln!(out, "Total requests:  {}", self.total)?;
        writeln!(out, "Successful:      {}", self.successful)?;
        writeln!(out, "Failed:          {}", self.failed)?;
        for (status, n) in &self.failures.by_status {
            writeln!(out, "  HTTP {status}:        {n}")?;
        }
        for (error, n) in &self.failures.by_error {
            writeln!(out, "  {error}: {n}")?;
        }
        writeln!(out, "Success rate:    {:.3}%", self.success_rate)?;
        writeln!(out, "Requests/sec:    {:.1}", self.requests_per_sec)?;
        if self.batch > 1 || self.gzip {
            writeln!(
                out,
                "Events/sec:      {:.1}  ({} events per request{})",
                self.events_per_sec,
                self.batch,
                if self.gzip { ", gzip" } else { "" }
            )?;
        }
        match &self.latency_ms {
            Some(l) => writeln!(
                out,
                "Latency (ms):    min {:.3}  avg {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.min, l.avg, l.p50, l.p95, l.p99, l.p99_9, l.max
            )?,
            None => writeln!(out, "Latency (ms):    none (no answer received)")?,
        }
        for (what, latency) in [
            ("Event→visible", &self.visibility_ms),
            ("Anomaly→SSE", &self.sse_ms),
        ] {
            if let Some(v) = latency {
                writeln!(
                    out,
                    "{what} (ms): min {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    v.min, v.p50, v.p95, v.p99, v.p99_9, v.max
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Failure;
    use std::io;

    fn report(ok: u64, failures: &Failures, hist: &Histogram<u64>) -> Report {
        let failed = failures.total();
        Report {
            url: "http://127.0.0.1:1/metric".into(),
            connections: 4,
            threads: 1,
            rate: None,
            devices: 10,
            duration_s: 2.0,
            total: ok + failed,
            successful: ok,
            failed,
            success_rate: success_rate(ok, ok + failed),
            requests_per_sec: ok as f64 / 2.0,
            batch: 1,
            gzip: false,
            events_per_sec: ok as f64 / 2.0,
            latency_ms: Latency::of(hist),
            failures: failures.into(),
            visibility_ms: None,
            sse_ms: None,
        }
    }

    fn hist_of(values_us: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for v in values_us {
            h.record(v).expect("in range");
        }
        h
    }

    #[test]
    fn percentiles_include_p99_9() {
        // 1..=10 000 µs: each percentile is that share of 10 ms (within HDR's 3 digits).
        let l = Latency::of(&hist_of(1..=10_000)).expect("values recorded");
        let near = |got: f64, want: f64| (got - want).abs() <= want * 1e-3;
        assert!(near(l.p50, 5.0), "{l:?}");
        assert!(near(l.p99, 9.9), "{l:?}");
        assert!(near(l.p99_9, 9.99), "{l:?}");
        assert!(near(l.max, 10.0), "{l:?}");
        assert!(l.p99 <= l.p99_9 && l.p99_9 <= l.max);
    }

    #[test]
    fn no_answers_means_no_latency_rather_than_zeros() {
        assert_eq!(Latency::of(&hist_of([])), None);
    }

    #[test]
    fn json_carries_p99_9_and_the_failure_breakdown() {
        let mut f = Failures::default();
        f.record(Failure::Status(503));
        f.record(Failure::Io(io::ErrorKind::ConnectionRefused));
        let v = serde_json::to_value(report(98, &f, &hist_of([100, 200]))).expect("json");
        assert_eq!(v["failed"], 2);
        assert_eq!(v["failures"]["by_status"]["503"], 1);
        assert_eq!(v["failures"]["by_error"]["connection refused"], 1);
        assert_eq!(v["latency_ms"]["p99_9"], 0.2);
        assert!(v.get("visibility_ms").is_none());
    }

    #[test]
    fn text_names_each_kind_of_failure_and_p99_9() {
        let mut f = Failures::default();
        for _ in 0..704 {
            f.record(Failure::Io(io::ErrorKind::ConnectionRefused));
        }
        let text = report(0, &f, &hist_of([])).to_text();
        assert!(text.contains("Failed:          704\n"), "{text}");
        assert!(text.contains("  connection refused: 704\n"), "{text}");
        assert!(text.contains("Success rate:    0.000%"), "{text}");
        assert!(text.contains("none (no answer received)"), "{text}");

        let ok = report(10, &Failures::default(), &hist_of([1000])).to_text();
        assert!(ok.contains("p99.9 1.000"), "{ok}");
    }

    #[test]
    fn the_minimum_success_rate_decides_the_outcome() {
        let mut f = Failures::default();
        for _ in 0..704 {
            f.record(Failure::Io(io::ErrorKind::ConnectionRefused));
        }
        let all_failed = report(0, &f, &hist_of([]));
        assert_eq!(
            all_failed.check(DEFAULT_MIN_SUCCESS_PERCENT),
            Err(Shortfall::BelowMinimum {
                success_rate: 0.0,
                min_success: 95.0,
                failed: 704,
                total: 704
            })
        );
        assert!(all_failed
            .check(95.0)
            .unwrap_err()
            .to_string()
            .contains("704 of 704 requests failed"));
        // Explicitly tolerating failures (--min-success 0) accepts it.
        assert_eq!(all_failed.check(0.0), Ok(()));

        // 5 of 100 failed: exactly 95 % passes, 96 % does not.
        let mut five = Failures::default();
        for _ in 0..5 {
            five.record(Failure::Status(503));
        }
        let r = report(95, &five, &hist_of([100]));
        assert_eq!(r.check(95.0), Ok(()));
        assert!(r.check(96.0).is_err());

        let nothing = report(0, &Failures::default(), &hist_of([]));
        assert_eq!(nothing.check(0.0), Err(Shortfall::NothingSent));
    }
}
