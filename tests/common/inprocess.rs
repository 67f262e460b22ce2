//! The service inside the test's own process: [`iot_stream_processor::App`] on
//! `127.0.0.1:0`, configured like the binary (the same flags, named here by their
//! environment variables; the test process's own environment is not read). For every
//! API test that needs no signal, exit code, log line or process of its own: no binary
//! to start. Dropping it begins a graceful shutdown, which the test's runtime cuts short
//! when the test ends; [`InProcess::shutdown`] waits for it instead.

use clap::{CommandFactory, FromArgMatches};
use iot_stream_processor::config::Config;
use iot_stream_processor::App;
use std::net::SocketAddr;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process instance; asked to stop when dropped.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<JoinHandle<actors::ShutdownReport>>,
}

impl InProcess {
    /// Starts an instance with `settings` as `(ENV_NAME, value)` pairs, over the same
    /// defaults as `Service::start` (which they may override). Needs a multi-threaded
    /// runtime (the test's).
    pub async fn start(settings: &[(&str, &str)]) -> Self {
        let defaults = [("LISTEN_ADDR", "127.0.0.1:0"), ("SHUTDOWN_TIMEOUT", "10s")];
        let flags = defaults
            .iter()
            .filter(|(name, _)| !settings.iter().any(|(n, _)| n == name))
            .chain(settings)
            .map(|(name, value)| format!("--{}={value}", name.to_lowercase().replace('_', "-")));
        let args: Vec<String> = std::iter::once("iot-processor".to_string())
            .chain(flags)
            .collect();
        // Flags only: a REDIS_URL or AUTH_TOKENS_FILE exported in the shell running the
        // tests must not change what they test.
        let config = Config::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .try_get_matches_from(&args)
            .and_then(|matches| Config::from_arg_matches(&matches))
            .unwrap_or_else(|e| panic!("settings {settings:?}: {e}"));
        let app = App::start(config)
            .await
            .unwrap_or_else(|e| panic!("start with {settings:?}: {e}"));
        let addr = app.addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Begins a graceful shutdown (as SIGTERM does) and waits for its report.
    pub async fn shutdown(mut self) -> actors::ShutdownReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done
            .take()
            .expect("running")
            .await
            .expect("the service's task did not panic")
    }

    /// A metric's value in the exposition, by exact series text (name{labels}).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        super::metric(self.addr, series).await
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
