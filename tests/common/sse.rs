//! A client of `GET /anomalies/stream` (server-sent events) on hyper's client: the
//! frames as they come, within bounded waits.

use super::http;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SOON: Duration = Duration::from_secs(10);

/// An SSE client reading frames as they come.
pub struct Sse {
    body: Incoming,
    buffer: String,
}

/// One frame: its id and data (events), or a comment.
#[derive(Debug, Clone)]
pub enum Frame {
    Event { id: String, data: Value },
    Comment(String),
}

impl Sse {
    pub async fn open(addr: SocketAddr, query: &str, headers: &[&str]) -> Self {
        let path = format!("/anomalies/stream{query}");
        let response = http::open(addr, "GET", &path, headers, Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
        assert_eq!(response.status(), 200, "{response:?}");
        assert_eq!(
            response.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..]),
            "{response:?}"
        );
        Self {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The body's next piece of data; `None` when the body ended (or broke).
    async fn data(&mut self) -> Option<Bytes> {
        loop {
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => return Some(data),
                    Err(_) => continue,
                },
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Reads until `marker`, returning the text before it (and dropping the marker).
    pub async fn until(&mut self, marker: &str) -> String {
        loop {
            if let Some(at) = self.buffer.find(marker) {
                let out = self.buffer[..at].to_string();
                self.buffer.drain(..at + marker.len());
                return out;
            }
            let data = tokio::time::timeout(SOON, self.data())
                .await
                .expect("a frame within 10s");
            let data =
                data.unwrap_or_else(|| panic!("the stream ended; buffered: {:?}", self.buffer));
            self.buffer.push_str(&String::from_utf8_lossy(&data));
        }
    }

    /// The next frame.
    pub async fn next(&mut self) -> Frame {
        loop {
            let block = self.until("\n\n").await;
            let mut id = None;
            let mut data = None;
            let mut comment = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).expect("data is JSON"));
                } else if let Some(v) = line.strip_prefix(": ") {
                    comment = Some(v.to_string());
                }
            }
            match (id, data, comment) {
                (Some(id), Some(data), _) => return Frame::Event { id, data },
                (_, _, Some(c)) => return Frame::Comment(c),
                _ => continue,
            }
        }
    }

    /// The next event frame, skipping comments (within SOON in all: heartbeats alone must
    /// not keep a test waiting for an event that never comes).
    pub async fn event(&mut self) -> (String, Value) {
        let deadline = Instant::now() + SOON;
        loop {
            assert!(Instant::now() < deadline, "no event within {SOON:?}");
            if let Frame::Event { id, data } = self.next().await {
                return (id, data);
            }
        }
    }

    /// Whether the stream's body ends (its last chunk, or the connection closed) within
    /// `within`, whatever frames come before.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.data()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(data)) => self.buffer.push_str(&String::from_utf8_lossy(&data)),
            }
        }
    }
}
