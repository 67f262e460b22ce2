//! Why one request failed, as the load generator counts it: an answer outside 2xx (by
//! status) or no answer at all (by what broke: refused, reset, closed early, timed out…).
//! A run against a port where nothing listens must say "connection refused", not just
//! "704 failed", so every failure is classified rather than lumped together.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// The server answered with a status outside 2xx.
    Status(u16),
    /// No answer: the socket failed with this I/O error (refused, reset, …).
    Io(io::ErrorKind),
    /// The connection closed before a complete answer arrived.
    Closed,
    /// The answer was not valid HTTP/1.1.
    InvalidAnswer,
    /// No answer within the request timeout.
    Timeout,
    /// Any other client-side error (hyper's own).
    Other,
}

impl Failure {
    /// The failure behind an error of the HTTP client. hyper wraps socket errors, so the
    /// source chain is searched for an `io::Error` first: its kind says the most.
    pub fn of_hyper(err: &hyper::Error) -> Self {
        if let Some(kind) = io_kind_in_chain(err) {
            return Self::of_io(kind);
        }
        if err.is_timeout() {
            Self::Timeout
        } else if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
            Self::Closed
        } else if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
            Self::InvalidAnswer
        } else {
            Self::Other
        }
    }

    /// The failure behind a socket error.
    pub fn of_io(kind: io::ErrorKind) -> Self {
        match kind {
            // A peer that closes mid-answer shows as an early EOF.
            io::ErrorKind::UnexpectedEof => Self::Closed,
            io::ErrorKind::TimedOut => Self::Timeout,
            kind => Self::Io(kind),
        }
    }
}

fn io_kind_in_chain(err: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        current = e.source();
    }
    None
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "HTTP {status}"),
            Self::Io(kind) => write!(f, "{kind}"),
            Self::Closed => f.write_str("connection closed before the answer"),
            Self::InvalidAnswer => f.write_str("invalid HTTP answer"),
            Self::Timeout => f.write_str("timed out"),
            Self::Other => f.write_str("other client error"),
        }
    }
}

/// An error of one request, before it is counted.
#[derive(Debug)]
pub enum RequestError {
    /// The TCP connection could not be made.
    Connect(io::Error),
    /// The HTTP exchange failed (handshake, send, or reading the answer).
    Http(hyper::Error),
    /// The request could not be built (a host header that is not a valid value).
    Build(hyper::http::Error),
    /// No complete answer within the request timeout.
    Timeout,
}

impl RequestError {
    /// How this error is counted in the breakdown.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Connect(e) => Failure::of_io(e.kind()),
            Self::Http(e) => Failure::of_hyper(e),
            Self::Build(_) => Failure::Other,
            Self::Timeout => Failure::Timeout,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Http(e) => write!(f, "HTTP: {e}"),
            Self::Build(e) => write!(f, "building the request: {e}"),
            Self::Timeout => f.write_str("no answer within the request timeout"),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) => Some(e),
            Self::Http(e) => Some(e),
            Self::Build(e) => Some(e),
            Self::Timeout => None,
        }
    }
}

impl From<hyper::Error> for RequestError {
    fn from(e: hyper::Error) -> Self {
        Self::Http(e)
    }
}

/// Failed requests counted by why they failed. Each connection keeps its own and they
/// are merged at the end, so counting needs no shared state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures(BTreeMap<Failure, u64>);

impl Failures {
    /// Counts one failure.
    pub fn record(&mut self, failure: Failure) {
        *self.0.entry(failure).or_default() += 1;
    }

    /// Adds another set of counts to this one.
    pub fn merge(&mut self, other: &Failures) {
        for (failure, n) in &other.0 {
            *self.0.entry(*failure).or_default() += n;
        }
    }

    /// All failed requests.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// How many failures of this kind.
    pub fn count(&self, failure: Failure) -> u64 {
        self.0.get(&failure).copied().unwrap_or(0)
    }

    /// Each kind of failure with its count, answers (by status) first.
    pub fn iter(&self) -> impl Iterator<Item = (Failure, u64)> + '_ {
        self.0.iter().map(|(f, n)| (*f, *n))
    }

    /// Answers outside 2xx, by status code.
    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        self.iter()
            .filter_map(|(f, n)| match f {
                Failure::Status(status) => Some((status, n)),
                _ => None,
            })
            .collect()
    }

    /// Requests without an answer, by what broke (the `Display` of the failure).
    pub fn by_error(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (f, n) in self.iter() {
            if !matches!(f, Failure::Status(_)) {
                *out.entry(f.to_string()).or_default() += n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    #[test]
    fn breakdown_counts_statuses_and_errors_separately_and_merges() {
        let mut a = Failures::default();
        a.record(Failure::Status(503));
        a.record(Failure::Status(503));
        a.record(Failure::Io(io::ErrorKind::ConnectionRefused));
        let mut b = Failures::default();
        b.record(Failure::Status(400));
        b.record(Failure::Io(io::ErrorKind::ConnectionRefused));
        b.record(Failure::Timeout);
        a.merge(&b);

        assert_eq!(a.total(), 6);
        assert_eq!(a.count(Failure::Status(503)), 2);
        assert_eq!(
            a.by_status().into_iter().collect::<Vec<_>>(),
            [(400, 1), (503, 2)]
        );
        assert_eq!(
            a.by_error().into_iter().collect::<Vec<_>>(),
            [
                ("connection refused".to_string(), 2),
                ("timed out".to_string(), 1)
            ]
        );
    }

    #[test]
    fn io_errors_are_named_by_their_kind() {
        assert_eq!(
            Failure::of_io(io::ErrorKind::ConnectionRefused).to_string(),
            "connection refused"
        );
        assert_eq!(
            Failure::of_io(io::ErrorKind::ConnectionReset).to_string(),
            "connection reset"
        );
        assert_eq!(
            Failure::of_io(io::ErrorKind::UnexpectedEof),
            Failure::Closed
        );
        assert_eq!(Failure::of_io(io::ErrorKind::TimedOut), Failure::Timeout);
        assert_eq!(Failure::Status(503).to_string(), "HTTP 503");
    }

    #[test]
    fn a_refused_connection_is_classified_as_refused() {
        // Bind, learn the port, close: nothing listens there any more.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        let err = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .expect_err("nothing listens on a port just closed");
        assert_eq!(
            RequestError::Connect(err).failure(),
            Failure::Io(io::ErrorKind::ConnectionRefused)
        );
    }

    #[tokio::test]
    async fn a_server_that_closes_without_answering_is_classified_as_closed() {
        use bytes::Bytes;
        use http_body_util::Full;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        // Reads the request, then closes without a byte of answer.
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::post("/metric")
            .header(hyper::header::HOST, addr.to_string())
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let err = sender.send_request(req).await.expect_err("no answer");
        server.await.expect("server task");
        assert_eq!(RequestError::from(err).failure(), Failure::Closed);
    }
}
