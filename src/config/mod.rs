//! Every setting of the service: its flag, environment variable, default and meaning.
//!
//! Parsed once at start-up; an invalid value stops start-up (exit 2) with a message naming
//! the setting as it was given: its environment variable, or its flag. Library code never
//! reads the environment.
//!
//! # Layout
//! - `cli`: the clap [`Config`] (every setting, its variable, default and docs) and the
//!   `token add` command, with the parsers of single values.
//! - `check`: what clap cannot check: combinations of settings and the Redis TLS files.
//! - `effective`: from the command line and the environment to the settings in force: the
//!   error that names a variable, the start-up line, warnings, the actor system's config.

mod check;
mod cli;
mod effective;

pub use check::ConfigError;
pub use cli::{Command, Config, LogFormat, Switch, TokenCommand};

/// The settings of `args` (after the program name), as the unit tests parse them.
#[cfg(test)]
fn parse(args: &[&str]) -> Result<Config, clap::Error> {
    use clap::Parser;
    Config::try_parse_from(std::iter::once("iot-processor").chain(args.iter().copied()))
}
