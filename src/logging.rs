//! Log output: the one global tracing subscriber, text or JSON lines on stderr, filtered
//! by RUST_LOG (default `info`).
//!
//! RUST_LOG is a setting like any other: an invalid value stops start-up with a message
//! naming it (the caller exits 2, as clap does), instead of silently logging at `info`
//! while the operator believes debug logging is on. Colours are written only to a
//! terminal: escape codes in a log file or a log collector are noise.

use crate::config::LogFormat;
use std::error::Error;
use std::ffi::OsStr;
use std::fmt;
use std::io::IsTerminal;
use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

/// The filter when RUST_LOG is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// Why logging could not be set up.
#[derive(Debug)]
pub enum LoggingError {
    /// RUST_LOG is not valid UTF-8.
    NotUnicode,
    /// RUST_LOG does not parse as a filter.
    InvalidFilter {
        /// The value as given.
        value: String,
        /// What the filter parser objected to.
        reason: ParseError,
    },
    /// A global subscriber was installed already (a bug: `init` runs once, in `main`).
    Install(Box<dyn Error + Send + Sync>),
}

impl fmt::Display for LoggingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUnicode => f.write_str("invalid RUST_LOG: not valid UTF-8"),
            Self::InvalidFilter { value, reason } => write!(
                f,
                "invalid RUST_LOG '{value}': {reason} (expected e.g. info or info,actors=debug)"
            ),
            Self::Install(e) => write!(f, "cannot install the log subscriber: {e}"),
        }
    }
}

impl Error for LoggingError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::NotUnicode => None,
            Self::InvalidFilter { reason, .. } => Some(reason),
            Self::Install(e) => Some(e.as_ref()),
        }
    }
}

/// Installs the global subscriber, reading RUST_LOG and NO_COLOR and whether stderr is a
/// terminal. Call once, before anything logs; on error nothing is installed.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let filter = filter_from(std::env::var_os("RUST_LOG").as_deref())?;
    let ansi = use_ansi(
        format,
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(LoggingError::Install)
}

/// The filter for a RUST_LOG value: unset or blank means `info`; anything else must parse.
pub fn filter_from(rust_log: Option<&OsStr>) -> Result<EnvFilter, LoggingError> {
    let value = match rust_log {
        None => return Ok(EnvFilter::new(DEFAULT_FILTER)),
        Some(v) => v.to_str().ok_or(LoggingError::NotUnicode)?,
    };
    // `RUST_LOG=` (e.g. an empty ConfigMap entry) would otherwise parse as "no
    // directives", which logs errors only: treat it as unset.
    if value.trim().is_empty() {
        return Ok(EnvFilter::new(DEFAULT_FILTER));
    }
    EnvFilter::builder()
        .parse(value)
        .map_err(|reason| LoggingError::InvalidFilter {
            value: value.to_string(),
            reason,
        })
}

/// Whether to colour the output: only text, only to a terminal, and not when NO_COLOR is
/// set to a non-empty value (no-color.org).
pub fn use_ansi(format: LogFormat, stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    let no_color = no_color.is_some_and(|v| !v.is_empty());
    format == LogFormat::Text && stderr_is_terminal && !no_color
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    fn parse(s: &str) -> Result<EnvFilter, LoggingError> {
        filter_from(Some(OsStr::new(s)))
    }

    #[test]
    fn unset_or_blank_rust_log_means_info() {
        for value in [None, Some(""), Some("  ")] {
            let filter = filter_from(value.map(OsStr::new)).expect("default");
            assert_eq!(
                filter.max_level_hint(),
                Some(LevelFilter::INFO),
                "{value:?}"
            );
        }
    }

    #[test]
    fn valid_filters_are_taken_as_given() {
        let filter = parse("warn").expect("valid");
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::WARN));
        let filter = parse("info,actors=debug").expect("valid");
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::DEBUG));
        assert_eq!(filter.to_string(), "actors=debug,info");
    }

    #[test]
    fn an_invalid_filter_is_an_error_naming_rust_log_and_the_value() {
        for bad in ["info,[=", "actors=loud", "[{"] {
            let err = parse(bad).expect_err(bad);
            assert!(
                matches!(&err, LoggingError::InvalidFilter { value, .. } if value == bad),
                "{err:?}"
            );
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("invalid RUST_LOG '{bad}': ")),
                "{message}"
            );
            // The parser's own error is the source (for error chains), and is in the message.
            let source = err.source().expect("the parse error as source").to_string();
            assert!(message.contains(&source), "{source} not in {message}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_rust_log_that_is_not_utf8_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let err = filter_from(Some(OsStr::from_bytes(b"info,\xff"))).expect_err("not UTF-8");
        assert!(matches!(err, LoggingError::NotUnicode));
        assert!(err.to_string().contains("RUST_LOG"));
    }

    #[test]
    fn colours_only_for_text_on_a_terminal_without_no_color() {
        assert!(use_ansi(LogFormat::Text, true, None));
        assert!(use_ansi(LogFormat::Text, true, Some(OsStr::new(""))));
        assert!(!use_ansi(LogFormat::Text, false, None));
        assert!(!use_ansi(LogFormat::Text, true, Some(OsStr::new("1"))));
        assert!(!use_ansi(LogFormat::Json, true, None));
        assert!(!use_ansi(LogFormat::Json, false, None));
    }
}
