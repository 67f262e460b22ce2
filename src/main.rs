//! The `iot-processor` binary: the process around [`iot_stream_processor::App`] —
//! settings from flags and the environment, logging, the signals, exit codes — and the
//! `token add` command.
#![forbid(unsafe_code)]

use iot_stream_processor::{auth, config::Config, logging, shutdown, App, StartError};

/// glibc malloc showed up in profiles as lock contention between worker threads (and
/// musl's allocator, used by the container build, is slower still).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `iot-processor token add NAME PREFIX MODE`: prints a new token and its line for
/// AUTH_TOKENS_FILE, then exits; `None` when the arguments are not that command.
fn token_command() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("token") {
        return None;
    }
    let usage = "usage: iot-processor token add NAME PREFIX MODE   (PREFIX: device-id prefix or '*'; MODE: rw, w or r)";
    let [_, add, name, prefix, mode] = &args[..] else {
        eprintln!("{usage}");
        return Some(2);
    };
    if add != "add" {
        eprintln!("{usage}");
        return Some(2);
    }
    match auth::new_token_line(name, prefix, mode) {
        Ok((token, line)) => {
            println!(
                "token (shown once; give it to the client as 'Authorization: Bearer <token>'):"
            );
            println!("{token}");
            println!("line for AUTH_TOKENS_FILE:");
            println!("{line}");
            Some(0)
        }
        Err(e) => {
            eprintln!("error: {e}\n{usage}");
            Some(2)
        }
    }
}

#[tokio::main]
async fn main() {
    if let Some(code) = token_command() {
        std::process::exit(code);
    }
    let (config, settings) = Config::load();
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
