//! The hardware limit: a bare hyper HTTP/1.1 server that reads each request body and
//! answers 200 with the same JSON as `POST /metric`, doing nothing else. Whatever the
//! service adds on top (validation, actors, metrics, store) shows as the gap to this.
//!
//! Usage: `limit-server [ADDR]` (default 127.0.0.1:18081; port 0 picks a free port). The
//! bound address is printed on stderr as `limit-server listening on ADDR`.
#![forbid(unsafe_code)]

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// A bare hyper server answering every request like `POST /metric` does: the reference
/// for what the hardware can do.
#[derive(Debug, Parser)]
#[command(name = "limit-server")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on
    /// stderr).
    #[arg(default_value = "127.0.0.1:18081")]
    addr: SocketAddr,
}

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
    let args = Args::parse();
    let listener = TcpListener::bind(args.addr).await?;
    eprintln!("limit-server listening on {}", listener.local_addr()?);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors under a big load: back off and go on rather
                // than end the reference mid-benchmark.
                eprintln!("limit-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn the_address_defaults_and_can_be_given() {
        let a = Args::try_parse_from(["limit-server"]).expect("no arguments");
        assert_eq!(a.addr, "127.0.0.1:18081".parse().expect("addr"));
        let a = Args::try_parse_from(["limit-server", "127.0.0.1:0"]).expect("port 0");
        assert_eq!(a.addr.port(), 0);
    }

    #[test]
    fn help_is_help_and_a_bad_address_names_the_argument() {
        let help = Args::try_parse_from(["limit-server", "--help"]).expect_err("help exits");
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        let bad = Args::try_parse_from(["limit-server", "nonsense"]).expect_err("invalid");
        assert_eq!(bad.kind(), ErrorKind::ValueValidation);
        assert!(bad.to_string().contains("[ADDR]"), "{bad}");
    }
}
