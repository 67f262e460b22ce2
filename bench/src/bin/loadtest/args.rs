//! The command line: the original `loadtest URL threads connections duration` and the
//! options, each checked by the parser, so that an invalid argument exits 2 before any
//! request.

use bench::report::DEFAULT_MIN_SUCCESS_PERCENT;
use clap::Parser;
use hyper::Uri;
use std::time::Duration;

/// Posts realistic device events and reports throughput and latency.
#[derive(Debug, Parser)]
#[command(name = "loadtest")]
pub struct Args {
    /// Target, e.g. http://127.0.0.1:8080/metric (a bare host gets /metric); several as a
    /// comma-separated list, e.g. http://127.0.0.1:8080/metric,http://127.0.0.1:8090/metric:
    /// connection i talks to target i mod n. Visibility probe k posts to target k mod n and
    /// reads /analyze from target (k + 1) mod n (the same one when there is only one).
    #[arg(value_parser = url_list)]
    pub url: String,
    /// Worker threads of the generator.
    #[arg(default_value_t = 1)]
    pub threads: usize,
    /// Keep-alive connections, each with one request in flight.
    #[arg(default_value_t = 64, value_parser = at_least_one)]
    pub connections: usize,
    /// How long to run (humantime: 10s, 1m).
    #[arg(default_value = "10s", value_parser = humantime_duration)]
    pub duration: Duration,
    /// Fixed total request rate (open loop). Latency counts from each request's intended
    /// send time, so a stalled server is not hidden by the generator waiting for it.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Distinct device ids.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub devices: u64,
    /// Share of events that are spikes (5–10× the device's baseline rps).
    #[arg(long, default_value_t = 0.01)]
    pub spike_share: f64,
    /// Stop after this many requests in total (each device in turn, in order, when
    /// --requests equals --devices: one event per device).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Visit devices in order instead of at random.
    #[arg(long)]
    pub sequential: bool,
    /// Also measure event-to-visible latency with this many probes: post a marked event,
    /// poll /analyze until it shows.
    #[arg(long, default_value_t = 0)]
    pub visibility_probes: u64,
    /// Also measure anomaly-to-SSE latency with this many probes: a listener on
    /// /anomalies/stream of the last target, a spike posted to the first, timed from its
    /// 200 until the listener sees it.
    #[arg(long, default_value_t = 0)]
    pub sse_probes: u64,
    /// Exit 1 when the share of 2xx answers (percent) is below this; 0 accepts any.
    #[arg(long, default_value_t = DEFAULT_MIN_SUCCESS_PERCENT, value_parser = percent)]
    pub min_success: f64,
    /// Longest wait for one answer (connecting included); then it counts as "timed out".
    /// Bounds the run even when the server hangs.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    pub timeout: Duration,
    /// Events per request: above 1, NDJSON bodies of this many events go to
    /// /metric/batch (a target path of /metric becomes /metric/batch).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub batch: usize,
    /// Compress bodies with gzip (Content-Encoding: gzip). Bodies come from a pool made
    /// before the run, so that compressing does not take the generator's CPU from the
    /// service it measures.
    #[arg(long)]
    pub gzip: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn humantime_duration(s: &str) -> Result<Duration, String> {
    // Accept the original's plain seconds ("30") as well as "30s".
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The targets of a comma-separated URL list, in order; empty entries are refused.
pub fn split_urls(s: &str) -> Result<Vec<&str>, String> {
    s.split(',')
        .map(str::trim)
        .map(|u| {
            if u.is_empty() {
                Err("empty URL in the list".to_string())
            } else {
                Ok(u)
            }
        })
        .collect()
}

/// A URL list whose every entry is a plain-HTTP target with a host: checked by the parser
/// so that a mistyped URL is an invalid argument (exit 2), not a failed run.
pub fn url_list(s: &str) -> Result<String, String> {
    for url in split_urls(s)? {
        check_url(url)?;
    }
    Ok(s.to_string())
}

/// `url` is `http://host[:port][/path]` or `host[:port][/path]`; the generator speaks
/// plain HTTP/1.1 only.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if let Some(scheme) = uri.scheme_str() {
        if scheme != "http" {
            return Err(format!(
                "bad URL {url}: only http:// is supported, not {scheme}://"
            ));
        }
    }
    if uri.authority().is_none() {
        return Err(format!(
            "bad URL {url}: it needs a host, e.g. http://127.0.0.1:8080/metric"
        ));
    }
    Ok(())
}

pub fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Ok(_) => Err("must be between 0 and 100".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_originals_plain_seconds() {
        assert_eq!(humantime_duration("30").ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            humantime_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            humantime_duration("2m").ok(),
            Some(Duration::from_secs(120))
        );
        assert!(humantime_duration("soon").is_err());
    }

    #[test]
    fn the_originals_positional_arguments_and_the_defaults() {
        let a = Args::try_parse_from(["loadtest", "http://127.0.0.1:8080/metric", "2", "32", "30"])
            .expect("valid");
        assert_eq!((a.threads, a.connections), (2, 32));
        assert_eq!(a.duration, Duration::from_secs(30));
        // Failures beyond 5 % fail the run unless the caller says otherwise.
        assert_eq!(a.min_success, 95.0);
        assert_eq!(a.timeout, Duration::from_secs(10));
        assert!(!a.json);
    }

    #[test]
    fn a_comma_separated_url_is_a_list_of_targets_and_one_url_stays_one() {
        let one = "http://127.0.0.1:8080/metric";
        assert_eq!(split_urls(one), Ok(vec![one]));
        assert_eq!(
            split_urls("http://127.0.0.1:8080/metric, http://127.0.0.1:8090/metric"),
            Ok(vec![
                "http://127.0.0.1:8080/metric",
                "http://127.0.0.1:8090/metric"
            ])
        );
        for bad in [
            "",
            "http://a:1/metric,",
            ",http://a:1",
            "http://a:1,,http://b:2",
        ] {
            assert!(split_urls(bad).is_err(), "{bad:?}");
        }
        // The parser keeps the argument as given (it is the report's `url`) and refuses
        // an empty entry.
        let a = Args::try_parse_from(["loadtest", "http://a:1/metric,http://b:2/metric"])
            .expect("valid");
        assert_eq!(a.url, "http://a:1/metric,http://b:2/metric");
        let err = Args::try_parse_from(["loadtest", "http://a:1/metric,"]).expect_err("empty");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn bad_arguments_are_refused_by_the_parser() {
        let parse = |extra: &[&str]| {
            Args::try_parse_from(["loadtest", "http://127.0.0.1:1"].iter().chain(extra))
        };
        assert_eq!(
            parse(&["--min-success", "0"]).expect("valid").min_success,
            0.0
        );
        for bad in [
            &["--min-success", "101"][..],
            &["--min-success=-1"],
            &["--devices", "0"],
            &["1", "0"],
            &["--timeout", "soon"],
        ] {
            let err = parse(bad).expect_err("invalid");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
        let help = Args::try_parse_from(["loadtest", "--help"]).expect_err("help exits");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn a_url_that_is_not_a_plain_http_target_is_an_invalid_argument() {
        for good in [
            "http://127.0.0.1:8080/metric",
            "127.0.0.1:8080",
            "http://localhost/metric,127.0.0.1:1",
        ] {
            assert!(Args::try_parse_from(["loadtest", good]).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("ht!tp://x", "bad URL ht!tp://x: "),
            (
                "https://127.0.0.1:1/metric",
                "only http:// is supported, not https://",
            ),
            ("/metric", "it needs a host"),
            ("http://127.0.0.1:1/metric,https://b/", "not https://"),
        ] {
            let err = Args::try_parse_from(["loadtest", bad]).expect_err(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }
}
