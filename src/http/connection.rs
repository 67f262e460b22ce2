//! One client connection: hyper's HTTP/1.1 state machine, plus the timeouts that keep
//! slow or idle clients from holding connections (nginx's `client_header_timeout` and
//! `keepalive_timeout`).
//!
//! hyper 1's own `header_read_timeout` starts counting as soon as a keep-alive connection
//! goes idle, so it cannot tell "slow headers" from "idle between requests"; it is turned
//! off and both are timed here instead. The socket is wrapped so that the first byte read
//! while no request is in flight marks the start of the next request's headers; a
//! watchdog then closes the connection when those headers take longer than
//! HEADER_READ_TIMEOUT, or when no byte arrives for KEEP_ALIVE_TIMEOUT (HEADER_READ_TIMEOUT
//! on a connection that has not sent a first request). Closing drops the connection
//! future, which closes the socket; nothing is in flight at that point by construction.

use super::errors::Body;
use super::metrics::{CloseReason, HttpMetrics};
use super::router;
use super::AppState;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

/// Largest request head (request line and headers); beyond it hyper answers 431 and
/// closes. Device requests carry a few hundred bytes of headers.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The connection timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// HEADER_READ_TIMEOUT.
    pub header: Duration,
    /// KEEP_ALIVE_TIMEOUT.
    pub keep_alive: Duration,
}

impl Timeouts {
    /// How often the watchdog looks: a quarter of the shortest timeout, so a timeout
    /// fires at most 25 % late.
    fn tick(&self) -> Duration {
        (self.header.min(self.keep_alive) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

/// What the socket wrapper and the request service tell the watchdog.
#[derive(Debug)]
struct Activity {
    base: Instant,
    /// Requests being served.
    in_flight: AtomicU32,
    /// Requests started so far.
    started: AtomicU64,
    /// Milliseconds after `base` of the last byte read (+1; 0 = none yet).
    last_read: AtomicU64,
    /// Milliseconds after `base` of the first byte of headers not yet complete (+1; 0 =
    /// no request head in progress).
    head_started: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicU32::new(0),
            started: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn on_read(&self) {
        let now = self.now_ms();
        self.last_read.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Idle again: the keep-alive clock starts now, not at the last byte read.
        self.last_read.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether the connection has outstayed a timeout.
    fn overdue(&self, t: &Timeouts) -> Option<CloseReason> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = self.now_ms();
        let ms = |d: Duration| d.as_millis() as u64;
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            return (now - head >= ms(t.header)).then_some(CloseReason::HeaderTimeout);
        }
        let idle_limit = if self.started.load(Ordering::Relaxed) == 0 {
            t.header
        } else {
            t.keep_alive
        };
        let since = self.last_read.load(Ordering::Relaxed).max(1);
        (now - since >= ms(idle_limit)).then_some(CloseReason::IdleTimeout)
    }
}

/// The TCP stream, reporting reads to the watchdog.
struct TrackedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request in flight for as long as it lives (also if its future is dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Serves one connection until the client closes it, a timeout fires, or shutdown
/// (`stop`) completes the request in flight. Holds its connection-limit `permit`.
pub async fn serve(
    stream: TcpStream,
    state: AppState,
    timeouts: Timeouts,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = state.http_metrics().clone();
    let handler = move |req| router::handle(state.clone(), req);
    drive(stream, handler, &metrics, timeouts, stop).await;
}

/// The connection loop of [`serve`], over any request handler.
async fn drive<H, F>(
    stream: TcpStream,
    handler: H,
    metrics: &HttpMetrics,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    // Small request/response pairs: send without waiting for Nagle.
    let _ = stream.set_nodelay(true);
    metrics.http_connections.inc();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedStream {
        inner: stream,
        activity: activity.clone(),
    });
    let handler = Arc::new(handler);
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            activity.request_started();
            let guard = InFlight(activity.clone());
            let answer = handler(req);
            async move {
                let mut response = answer.await;
                // A streamed body (SSE) is still being answered after the handler
                // returns: the connection counts as busy, not idle, until it ends.
                if let Ok(r) = &mut response {
                    if let Either::Right(stream) = r.body_mut() {
                        stream.hold(Box::new(guard));
                        return response;
                    }
                }
                drop(guard);
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut watchdog = tokio::time::interval(timeouts.tick());
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        // `biased`, the connection first: hyper's graceful shutdown closes a connection
        // it has read nothing from, so it must have read what the client already sent
        // (a request written before the stop, on a connection accepted just before it)
        // before it is told; that request is then answered (503 while shutting down).
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            // Shutdown, or the server gone: finish the request in flight, then close.
            _ = stop.wait_for(|stopped| *stopped), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = watchdog.tick() => {
                if let Some(reason) = activity.overdue(&timeouts) {
                    metrics.closed(reason);
                    break;
                }
            }
        }
    }
    metrics.http_connections.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(2),
        keep_alive: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_silent_connection_gets_the_header_timeout() {
        let a = Activity::new();
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(a.overdue(&T), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(a.overdue(&T), Some(CloseReason::IdleTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_headers_time_out_even_while_bytes_trickle_in() {
        let a = Activity::new();
        a.on_read();
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(600)).await;
            a.on_read();
        }
        assert_eq!(a.overdue(&T), None);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(a.overdue(&T), Some(CloseReason::HeaderTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn served_connections_get_the_keep_alive_timeout_and_requests_never_time_out() {
        let a = Activity::new();
        a.on_read();
        a.request_started();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            a.overdue(&T),
            None,
            "a request in flight is the body timeout's business"
        );
        a.request_finished();
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert_eq!(a.overdue(&T), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(a.overdue(&T), Some(CloseReason::IdleTimeout));
    }

    /// Serves one connection with `drive`, the stop already given once the client's
    /// `request` (if any) has reached the server, and returns what the client read.
    async fn answer_after_stop(request: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        client.write_all(request).await.expect("request");
        let (server, _) = listener.accept().await.expect("accept");
        let mut probe = [0u8; 1];
        if !request.is_empty() {
            server.peek(&mut probe).await.expect("the request arrived");
        }
        let (_tx, stop) = watch::channel(true);
        let metrics = HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
        let handler = |_req| async {
            let mut r = Response::new(Either::Left(http_body_util::Full::new(
                hyper::body::Bytes::from_static(b"shutting down"),
            )));
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            Ok(r)
        };
        // Timeouts far beyond the client's patience: only the stop may close it.
        let long = Timeouts {
            header: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(3600),
        };
        let served =
            tokio::spawn(async move { drive(server, handler, &metrics, long, stop).await });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("the server closes the connection, without waiting for a timeout")
            .expect("read");
        served.await.expect("connection task");
        out
    }

    #[tokio::test]
    async fn a_request_that_arrived_before_the_stop_is_answered_not_dropped() {
        let out =
            answer_after_stop(b"POST /metric HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
                .await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        assert!(text.ends_with("shutting down"), "{text:?}");
    }

    #[tokio::test]
    async fn a_connection_that_sent_nothing_is_closed_at_once_on_stop() {
        assert_eq!(answer_after_stop(b"").await, b"");
    }
}
