//! The service inside the test's own process: [`iot_stream_processor::App`] on
//! `127.0.0.1:0`, configured like the binary (the same flags, named here by their
//! environment variables). For every API test that needs no signal, exit code, log line
//! or process of its own: no binary to start, and a panic in the service fails the test.

use clap::Parser;
use iot_stream_processor::config::Config;
use iot_stream_processor::App;
use std::net::SocketAddr;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process instance; stopped (gracefully, in the background) when dropped.
pub struct InProcess {
    pub addr: SocketAddr,
    /// The internal listener's address, in a cluster.
    pub cluster_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<JoinHandle<actors::ShutdownReport>>,
}

impl InProcess {
    /// Starts an instance with `settings` as `(ENV_NAME, value)` pairs, over the same
    /// defaults as `Service::start` (which `settings` may override). Needs a
    /// multi-threaded runtime (the test's).
    pub async fn start(settings: &[(&str, &str)]) -> Self {
        let defaults = [("LISTEN_ADDR", "127.0.0.1:0"), ("SHUTDOWN_TIMEOUT", "10s")];
        let unset = defaults
            .iter()
            .filter(|(name, _)| settings.iter().all(|(n, _)| n != name));
        let mut args = vec!["iot-processor".to_string()];
        args.extend(
            unset.chain(settings).map(|(name, value)| {
                format!("--{}={value}", name.to_lowercase().replace('_', "-"))
            }),
        );
        let config =
            Config::try_parse_from(&args).unwrap_or_else(|e| panic!("settings {settings:?}: {e}"));
        let app = App::start(config)
            .await
            .unwrap_or_else(|e| panic!("start with {settings:?}: {e}"));
        let addr = app.addr();
        let cluster_addr = app.cluster_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            cluster_addr,
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
