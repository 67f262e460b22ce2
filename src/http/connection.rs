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

use super::metrics::{CloseReason, HttpMetrics};
use super::router;
use super::state::AppState;
use crate::tuning::SHUTDOWN_RECHECK;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

    /// Bytes of a request head have been read and its request has not started: hyper
    /// would take the connection for idle and close it at a graceful shutdown.
    fn head_in_progress(&self) -> bool {
        self.head_started.load(Ordering::Relaxed) != 0
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

/// A second handle on a connection's socket, to see request bytes that have reached the
/// kernel before hyper or even tokio's reactor has (a socket's readiness is known only
/// once the reactor has run), without consuming them.
struct Unread(Option<std::net::TcpStream>);

impl Unread {
    fn of(stream: &TcpStream) -> Self {
        // Without a descriptor to spare, shutdown closes such a connection as before.
        Self(
            stream
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from),
        )
    }

    /// Bytes wait to be read (non-blocking: the descriptor shares tokio's O_NONBLOCK).
    fn waiting(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| matches!(s.peek(&mut [0u8; 1]), Ok(1)))
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

/// A response body that keeps its request counted in flight until it is sent (or
/// dropped): a body still being sent after its handler returned (a stream) keeps the
/// connection busy, not idle.
struct Held<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one connection until the client closes it, a timeout fires, or shutdown
/// (`stop`) completes the request in flight. Holds its connection-limit `permit`.
pub async fn serve(
    stream: TcpStream,
    state: AppState,
    timeouts: Timeouts,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = state.http_metrics().clone();
    let handler = move |req| router::handle(state.clone(), req);
    drive(stream, handler, &metrics, timeouts, stop).await;
}

/// The connection loop of [`serve`], over any request handler.
async fn drive<H, F, B>(
    stream: TcpStream,
    handler: H,
    metrics: &HttpMetrics,
    timeouts: Timeouts,
    stop: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Small request/response pairs: send without waiting for Nagle.
    let _ = stream.set_nodelay(true);
    metrics.http_connections.inc();
    let unread = Unread::of(&stream);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedStream {
        inner: stream,
        activity: activity.clone(),
    });
    let service = tracked_service(activity.clone(), handler);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(io, service);
    if let Some(reason) = run(conn, &activity, &unread, timeouts, stop).await {
        metrics.closed(reason);
    }
    metrics.http_connections.dec();
}

/// `handler` as hyper's service, each request counted in flight in `activity` from its
/// start until its response body is sent.
fn tracked_service<H, F, B>(
    activity: Arc<Activity>,
    handler: H,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Held<B>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Held<B>>, Infallible>> + Send,
>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Unpin,
{
    service_fn(move |req| {
        activity.request_started();
        let in_flight = InFlight(activity.clone());
        let answer = handler(req);
        async move {
            let response = answer.await?;
            Ok::<_, Infallible>(response.map(|body| Held {
                body,
                _in_flight: in_flight,
            }))
        }
    })
}

/// Serves `conn` until the client closes it, shutdown (`stop`) has let its request in
/// flight finish, or a timeout fires (the reason, to be counted).
async fn run<S, B>(
    conn: http1::Connection<TokioIo<TrackedStream>, S>,
    activity: &Activity,
    unread: &Unread,
    timeouts: Timeouts,
    stop: CancellationToken,
) -> Option<CloseReason>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let mut watchdog = tokio::time::interval(timeouts.tick());
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Shutdown: hyper's graceful shutdown finishes a request in progress, but closes a
    // connection it takes for idle, which includes one whose next request has arrived
    // (in the kernel, or partly read) and not yet started. So the shutdown is given only
    // once no request is on its way in; such a request is then answered (503 while
    // shutting down), and HEADER_READ_TIMEOUT still bounds a client that stalls.
    let mut stopping = false;
    // The stop has come and hyper has not been told yet.
    let mut to_tell = false;
    loop {
        if to_tell && !(activity.head_in_progress() || unread.waiting()) {
            to_tell = false;
            conn.as_mut().graceful_shutdown();
        }
        // `biased`: the connection is polled first, so it reads what has arrived before
        // the checks above run again.
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return None;
            }
            // Shutdown, or the server gone.
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                to_tell = true;
            }
            // A request on its way in at shutdown: look again soon.
            () = tokio::time::sleep(SHUTDOWN_RECHECK), if to_tell => {}
            _ = watchdog.tick() => {
                if let Some(reason) = activity.overdue(&timeouts) {
                    return Some(reason);
                }
            }
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_request_s_head_is_timed_from_its_own_first_byte() {
        let a = Activity::new();
        a.on_read();
        a.request_started();
        a.request_finished();
        // Idle for most of the keep-alive timeout, then the next request's head begins.
        tokio::time::advance(Duration::from_secs(4)).await;
        a.on_read();
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(a.overdue(&T), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(a.overdue(&T), Some(CloseReason::HeaderTimeout));
    }

    #[test]
    fn the_watchdog_looks_four_times_per_shortest_timeout_within_bounds() {
        // So a timeout fires at most a quarter late (docs/operations.md, "Failure
        // behaviour and limits").
        assert_eq!(T.tick(), Duration::from_millis(500));
        let short = Timeouts {
            header: Duration::from_millis(8),
            keep_alive: Duration::from_secs(5),
        };
        assert_eq!(short.tick(), Duration::from_millis(5), "not a busy loop");
        let long = Timeouts {
            header: Duration::from_secs(60),
            keep_alive: Duration::from_secs(60),
        };
        assert_eq!(long.tick(), Duration::from_secs(1));
    }

    /// The socket wrapper passes every write through whole, plain (`poll_write`) or
    /// vectored, says it writes vectored as the socket does (hyper then writes a
    /// response's head and body without copying them into one buffer), and reports the
    /// bytes it reads to the watchdog.
    #[tokio::test]
    async fn the_tracked_stream_writes_everything_through_and_reports_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let activity = Arc::new(Activity::new());
        let mut tracked = TrackedStream {
            inner: server,
            activity: activity.clone(),
        };
        assert!(tracked.is_write_vectored());

        // A vectored write to an empty socket buffer, then more than a socket buffer
        // holds, written in several calls while the client reads.
        let slices = [io::IoSlice::new(b"head"), io::IoSlice::new(b"body")];
        let written = tracked.write_vectored(&slices).await.expect("vectored");
        assert_eq!(written, 8);
        let plain: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = [&b"headbody"[..], &plain].concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            (client, got)
        });
        tracked.write_all(&plain).await.expect("plain writes");
        tracked.flush().await.expect("flush");
        tracked.shutdown().await.expect("shutdown");
        let (mut client, got) = reader.await.expect("reader task");
        assert_eq!(got.len(), expected.len(), "every byte written arrives");
        assert!(got == expected, "in order and unchanged");

        assert!(!activity.head_in_progress(), "nothing read yet");
        client.write_all(b"GET").await.expect("client write");
        let mut buf = [0u8; 8];
        let n = tracked.read(&mut buf).await.expect("read");
        assert!(n > 0 && b"GET".starts_with(&buf[..n]), "{:?}", &buf[..n]);
        assert!(
            activity.head_in_progress(),
            "the first byte read starts a head"
        );
    }

    const REQUEST: &[u8] = b"POST /metric HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}";

    /// A connection served by `drive`, which answers every request 503 "shutting down";
    /// the client has sent `first` and it is in the server's kernel, not yet seen by
    /// tokio (accepted and peeked with std). Timeouts far beyond any test: only the stop
    /// may close it. Returns the client's end, the stop, the connection's task, and a
    /// second handle on the server's socket (to see what the server has not read).
    async fn serve_one(
        first: &[u8],
        stopped: bool,
    ) -> (
        TcpStream,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        std::net::TcpStream,
    ) {
        use tokio::io::AsyncWriteExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        client.write_all(first).await.expect("request");
        let (server, _) = listener.accept().expect("accept");
        if !first.is_empty() {
            server.peek(&mut [0u8; 1]).expect("the request arrived");
        }
        server.set_nonblocking(true).expect("non-blocking");
        let unread = server.try_clone().expect("second handle");
        let server = TcpStream::from_std(server).expect("tokio stream");
        let stop = CancellationToken::new();
        if stopped {
            stop.cancel();
        }
        let tx = stop.clone();
        let metrics = HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
        let handler = |_req| async {
            let mut r = Response::new(http_body_util::Full::new(hyper::body::Bytes::from_static(
                b"shutting down",
            )));
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            Ok(r)
        };
        let long = Timeouts {
            header: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(3600),
        };
        let served =
            tokio::spawn(async move { drive(server, handler, &metrics, long, stop).await });
        (client, tx, served, unread)
    }

    /// Everything the client reads until the server closes the connection.
    async fn read_until_closed(client: &mut TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        // Not a timing bound: a connection the stop does not close stays open for an
        // hour, and the test should fail rather than hang.
        tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_request_that_arrived_before_the_stop_is_answered_not_dropped() {
        let (mut client, _stop, served, _) = serve_one(REQUEST, true).await;
        let text = read_until_closed(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        assert!(text.ends_with("shutting down"), "{text:?}");
        served.await.expect("connection task");
    }

    #[tokio::test]
    async fn a_connection_that_sent_nothing_is_closed_at_once_on_stop() {
        let (mut client, _stop, served, _) = serve_one(b"", true).await;
        assert_eq!(read_until_closed(&mut client).await, "");
        served.await.expect("connection task");
    }

    /// Reads the answer to the first request, sends the first 20 bytes of the next one,
    /// and answers the rest of it.
    async fn answer_then_send_part_of_the_next(client: &mut TcpStream) -> &'static [u8] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut first = Vec::new();
        while !first.ends_with(b"shutting down") {
            let mut buf = [0u8; 512];
            let n = client.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the first answer");
            first.extend_from_slice(&buf[..n]);
        }
        let (head, rest) = REQUEST.split_at(20);
        client.write_all(head).await.expect("part of the next head");
        rest
    }

    #[tokio::test]
    async fn a_keep_alive_request_partly_arrived_at_the_stop_is_answered() {
        use tokio::io::AsyncWriteExt;
        let (mut client, stop, served, _) = serve_one(REQUEST, false).await;
        let rest = answer_then_send_part_of_the_next(&mut client).await;
        stop.cancel();
        client.write_all(rest).await.expect("the rest");
        let text = read_until_closed(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        assert!(text.ends_with("shutting down"), "{text:?}");
        served.await.expect("connection task");
    }

    #[tokio::test]
    async fn a_keep_alive_request_whose_head_is_partly_read_at_the_stop_is_answered() {
        use tokio::io::AsyncWriteExt;
        let (mut client, stop, served, unread) = serve_one(REQUEST, false).await;
        let rest = answer_then_send_part_of_the_next(&mut client).await;
        // Until the server has read those bytes: none is left in its socket.
        let read = async {
            while unread.peek(&mut [0u8; 1]).is_ok() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("the server reads the part sent");
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(rest).await.expect("the rest");
        let text = read_until_closed(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        assert!(text.ends_with("shutting down"), "{text:?}");
        served.await.expect("connection task");
    }
}
