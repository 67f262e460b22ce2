//! The hardware limit: a bare hyper HTTP/1.1 server that reads each request body and
//! answers 200 with the same JSON as `POST /metric`, doing nothing else. Whatever the
//! service adds on top (validation, actors, metrics, store) shows as the gap to this.
//!
//! Usage: `limit-server [ADDR]` (default 127.0.0.1:18081).
#![forbid(unsafe_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _body = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"status":"accepted","device_id":"device-0"}"#,
    )));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("limit-server listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
