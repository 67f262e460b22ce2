//! From the command line and the environment to the settings in force: parsing with an
//! error that names the environment variable a bad value came from, the start-up line of
//! every setting (secrets hidden), the warnings about settings that work but not as set,
//! and the actor system's configuration.

use super::cli::Config;
use clap::{CommandFactory, FromArgMatches};

impl Config {
    /// Parses the command line and the environment (exiting 2 with a message naming the
    /// setting on an invalid value), and describes the effective settings for the
    /// start-up line.
    pub fn load() -> (Self, String) {
        let mut command = Self::command();
        // A command (`token add`) does not read the service's settings: an invalid one in
        // the environment must not stop it.
        if std::env::args_os()
            .nth(1)
            .is_some_and(|first| command.find_subcommand(&first).is_some())
        {
            command = command.mut_args(|a| a.env(None));
        }
        let matches = command
            .clone()
            .try_get_matches()
            .unwrap_or_else(|e| exit(&command, std::env::args_os(), e));
        let config = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        (config, effective(&command, &matches))
    }

    /// Settings that work but not as set, one warning line each for the start-up log:
    /// MAX_BATCH_EVENTS above MAX_PENDING_EVENTS is capped at it (a batch is admitted
    /// whole, so a larger one never would be).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_batch_events > self.max_pending_events {
            out.push(format!(
                "MAX_BATCH_EVENTS ({}) is above MAX_PENDING_EVENTS ({pending}): a batch is admitted whole, so batches hold at most {pending} events (more get 413)",
                self.max_batch_events,
                pending = self.max_pending_events,
            ));
        }
        out
    }

    /// Settings that are accepted but no longer do anything, for a warning at start-up.
    pub fn deprecated(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.cluster_peers.iter().any(|p| !p.trim().is_empty()) {
            out.push("CLUSTER_PEERS");
        }
        if self.cluster_discovery_interval.is_some() {
            out.push("CLUSTER_DISCOVERY_INTERVAL");
        }
        out
    }
}

impl From<&Config> for actors::SystemConfig {
    fn from(c: &Config) -> Self {
        Self {
            window_size: c.window_size as usize,
            anomaly_threshold: c.anomaly_threshold,
            flush_interval: c.flush_interval,
            result_ttl: c.result_ttl,
            device_idle_timeout: c.device_idle_timeout,
            max_pending_events: c.max_pending_events as usize,
            max_device_labels: c.max_device_labels as usize,
            window_checkpoint_interval: c.window_checkpoint_interval,
            // In a fixed order, each once, however the setting listed them.
            anomaly_signals: actors::analytics::Signal::ALL
                .into_iter()
                .filter(|s| c.anomaly_signals.contains(s))
                .collect(),
            anomaly_stream_maxlen: c.anomaly_stream_maxlen as usize,
        }
    }
}

/// Exits with clap's error `e`, or, for an invalid value that came from an environment
/// variable, with one line naming the variable (clap names only the flag, which the user
/// never typed): `error: invalid value '0' for WINDOW_SIZE (--window-size): …`. Exit code 2
/// either way (0 for `--help` and `--version`).
fn exit<I, T>(command: &clap::Command, args: I, e: clap::Error) -> !
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match from_environment(command, args, &e) {
        Some(message) => {
            eprintln!("error: {message}");
            std::process::exit(2)
        }
        None => e.exit(),
    }
}

/// The message for `e` naming the environment variable its value came from; `None` when
/// the value was given as a flag (or `e` is not about a value).
fn from_environment<I, T>(command: &clap::Command, args: I, e: &clap::Error) -> Option<String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::parser::ValueSource;
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // Built, as clap's message shows it (an unbuilt argument cannot be displayed).
    let mut built = command.clone();
    built.build();
    let arg = built.get_arguments().find(|a| a.to_string() == *shown)?;
    let env = arg.get_env()?.to_string_lossy();
    // Where the value came from, by clap's own precedence (flag over variable): the same
    // command with every value taken as it is, so that nothing can fail to parse.
    let raw = built
        .clone()
        .mut_args(|a| a.value_parser(clap::builder::ValueParser::os_string()))
        .try_get_matches_from(args)
        .ok()?;
    if raw.value_source(arg.get_id().as_str()) != Some(ValueSource::EnvVariable) {
        return None;
    }
    let flag = arg
        .get_long()
        .map(|l| format!(" (--{l})"))
        .unwrap_or_default();
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !arg.is_hide_env_values_set() => format!(" '{v}'"),
        _ => String::new(),
    };
    let why = match (std::error::Error::source(e), e.get(ContextKind::ValidValue)) {
        (Some(source), _) => format!(": {source}"),
        (None, Some(ContextValue::Strings(valid))) => {
            format!(": expected one of {}", valid.join(", "))
        }
        _ => String::new(),
    };
    Some(format!("invalid value{value} for {env}{flag}{why}"))
}

/// Every setting as `ENV=value`, defaults included; secrets (the settings clap hides in
/// `--help`) show only that they are set, and a URL only its scheme and host.
fn effective(command: &clap::Command, matches: &clap::ArgMatches) -> String {
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy();
            let value = matches
                .get_raw(arg.get_id().as_str())?
                .map(|v| v.to_string_lossy())
                .collect::<Vec<_>>()
                .join(",");
            let shown = if !arg.is_hide_env_values_set() {
                value
            } else if let Some((scheme, rest)) = value.split_once("://") {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://***@{host}")
            } else {
                "<set>".to_string()
            };
            Some(format!("{env}={shown}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    #[test]
    fn the_start_up_line_shows_every_setting_but_no_secret() {
        let command = Config::command();
        let matches = command
            .clone()
            .try_get_matches_from([
                "iot-processor",
                "--redis-url",
                "redis://:hunter2@redis:6379/0",
                "--cluster-token",
                "tok3n",
                "--redis-ca-file",
                "/etc/redis-tls/ca.crt",
                "--redis-client-key-file",
                "/etc/redis-tls/tls.key",
            ])
            .expect("parses");
        let line = effective(&command, &matches);
        for shown in [
            "LISTEN_ADDR=0.0.0.0:8080",
            "WINDOW_SIZE=50",
            "REDIS_URL=redis://***@redis:6379/0",
            "CLUSTER_TOKEN=<set>",
            // Paths, not contents: where the TLS files are is what an operator checks.
            "REDIS_CA_FILE=/etc/redis-tls/ca.crt",
            "REDIS_CLIENT_KEY_FILE=/etc/redis-tls/tls.key",
        ] {
            assert!(line.contains(shown), "{shown} missing from {line}");
        }
        assert!(
            !line.contains("hunter2") && !line.contains("tok3n"),
            "{line}"
        );
    }

    #[test]
    fn the_defaults_reach_the_actor_system_unchanged() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(
            actors::SystemConfig::from(&c),
            actors::SystemConfig::default()
        );
    }

    #[test]
    fn a_batch_limit_above_the_pending_bound_is_warned_about_with_the_effective_value() {
        assert!(parse(&[]).expect("defaults").warnings().is_empty());
        let equal = ["--max-batch-events", "100", "--max-pending-events", "100"];
        assert!(parse(&equal).expect("valid").warnings().is_empty());
        let above = ["--max-batch-events", "200", "--max-pending-events", "100"];
        assert_eq!(
            parse(&above).expect("valid").warnings(),
            ["MAX_BATCH_EVENTS (200) is above MAX_PENDING_EVENTS (100): a batch is admitted whole, so batches hold at most 100 events (more get 413)"]
        );
    }
}
