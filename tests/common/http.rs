//! The tests' HTTP client for well-formed requests: hyper's, one connection per request.
//! Tests about the bytes on the wire (hostile or partial requests, chunking,
//! `100-continue`, a request cut across a signal, a client that never reads) write raw
//! bytes instead (`common::raw`).

use super::Reply;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Why no answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made.
    Connect,
    /// The connection broke before the whole answer was in.
    Broken,
}

/// Sends `method path` with extra header lines (`Name: value`) and `body` on a new
/// connection; the response head, with its body still to come.
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Bytes,
) -> Result<Response<Incoming>, Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| Failure::Connect)?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Connect)?;
    // Drives the connection until the response's body is read or dropped.
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "t")
        .header("connection", "close");
    for line in headers {
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("a header line is `Name: value`: {line:?}"));
        req = req.header(name.trim(), value.trim());
    }
    let req = req.body(Full::new(body)).expect("a well-formed request");
    sender.send_request(req).await.map_err(|_| Failure::Broken)
}

/// [`open`], and the whole answer.
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: impl Into<Bytes>,
) -> Result<Reply, Failure> {
    let response = open(addr, method, path, headers, body.into()).await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Broken)?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
