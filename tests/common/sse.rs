//! A client of `GET /anomalies/stream` (server-sent events) over a raw socket: the
//! frames as they come, within bounded waits.

use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SOON: Duration = Duration::from_secs(10);

/// An SSE client reading frames as they come.
pub struct Sse {
    stream: TcpStream,
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
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("GET /anomalies/stream{query} HTTP/1.1\r\nHost: t\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut sse = Self {
            stream,
            buffer: String::new(),
        };
        let head = sse.until("\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        sse
    }

    /// Reads until `marker`, returning the text before it (and dropping the marker).
    pub async fn until(&mut self, marker: &str) -> String {
        loop {
            if let Some(at) = self.buffer.find(marker) {
                let out = self.buffer[..at].to_string();
                self.buffer.drain(..at + marker.len());
                return out;
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(SOON, self.stream.read(&mut chunk))
                .await
                .expect("a frame within 10s")
                .expect("read");
            assert!(n > 0, "the stream ended; buffered: {:?}", self.buffer);
            self.buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }

    /// The next frame (chunked transfer framing lines are skipped).
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
            if self.buffer.contains("\r\n0\r\n\r\n") {
                return true;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    }
}
