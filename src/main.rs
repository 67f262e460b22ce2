//! The `iot-processor` binary: the process around [`iot_stream_processor::App`] —
//! settings from flags and the environment, logging, the signals, exit codes — and the
//! `token add` command.
#![forbid(unsafe_code)]

use clap::error::ErrorKind;
use clap::CommandFactory;
use iot_stream_processor::config::{Command, Config, TokenCommand};
use iot_stream_processor::{auth, logging, shutdown, App, StartError};

/// glibc malloc showed up in profiles as lock contention between worker threads (and
/// musl's allocator, used by the container build, is slower still).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `iot-processor token add NAME PREFIX MODE`: prints a new token and its line for
/// AUTH_TOKENS_FILE; the exit code.
fn token_add(name: &str, prefix: &str, mode: &str) -> i32 {
    match auth::new_token_line(name, prefix, mode) {
        Ok((token, line)) => {
            println!(
                "token (shown once; give it to the client as 'Authorization: Bearer <token>'):"
            );
            println!("{token}");
            println!("line for AUTH_TOKENS_FILE:");
            println!("{line}");
            0
        }
        Err(e) => {
            // As clap reports an invalid argument: the message, the usage, exit 2.
            let mut command = Config::command();
            command.build();
            match command
                .find_subcommand_mut("token")
                .and_then(|token| token.find_subcommand_mut("add"))
            {
                Some(add) => add.error(ErrorKind::ValueValidation, e).exit(),
                None => fail(CONFIGURATION, &e),
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let (config, settings) = Config::load();
    if let Some(Command::Token(TokenCommand::Add { name, prefix, mode })) = &config.subcommand {
        std::process::exit(token_add(name, prefix, mode));
    }
    if let Err(e) = logging::init(config.log_format) {
        // Like clap's own errors for every other setting: a message naming it, exit 2.
        fail(CONFIGURATION, &e);
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), %settings, "starting");
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // From here on SIGTERM means a graceful shutdown (not the default action), even before
    // the server first looks at it.
    let terminated = shutdown::signal();
    let app = match App::start(config).await {
        Ok(app) => app,
        Err(StartError::Setting(e)) => fail(CONFIGURATION, &e),
        // The cause chain on one line ("LISTEN_ADDR: cannot listen on …: Address in use"),
        // never a backtrace: these are expected failures, not bugs.
        Err(StartError::Failed(e)) => fail(RUNTIME, &format_args!("{e:#}")),
    };
    app.run(terminated).await;
}

/// Exit code of a setting that is invalid, inconsistent or names an unusable file
/// (clap's own code for an invalid value).
const CONFIGURATION: i32 = 2;
/// Exit code of any other failure (a listen address in use, …).
const RUNTIME: i32 = 1;

/// Prints `error: <message>` on one line of stderr and exits with `code`.
fn fail(code: i32, message: &dyn std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(code)
}
