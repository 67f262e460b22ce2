//! Reading a request body for the ingest endpoints: the size limit (by `Content-Length`
//! first, then while reading), `BODY_READ_TIMEOUT`, and `Content-Encoding: gzip`.
//!
//! A gzip body is decompressed as a stream into a buffer that may grow only to the
//! limit: the limit applies to the decompressed size, so a small body that expands
//! without bound (a zip bomb) costs at most the limit in memory before its 413.

use super::errors::ApiError;
use super::metrics::CloseReason;
use super::AppState;
use actors::metrics::RejectReason;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use hyper::{Request, StatusCode};
use std::io::Read;

/// Why a body could not be read, with the reason it is counted under.
pub type BodyError = (RejectReason, ApiError);

/// How the body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

fn encoding<B>(req: &Request<B>) -> Result<Encoding, ApiError> {
    let Some(value) = req.headers().get(CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let unsupported = || {
        ApiError::status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding must be gzip or identity",
        )
    };
    let text = value.to_str().map_err(|_| unsupported())?.trim();
    if text.eq_ignore_ascii_case("gzip") || text.eq_ignore_ascii_case("x-gzip") {
        Ok(Encoding::Gzip)
    } else if text.is_empty() || text.eq_ignore_ascii_case("identity") {
        Ok(Encoding::Identity)
    } else {
        Err(unsupported())
    }
}

/// The body of `req`, decompressed, at most `limit` bytes (`setting` names the limit in
/// the 413).
pub async fn read(
    state: &AppState,
    req: Request<Incoming>,
    limit: usize,
    setting: &'static str,
) -> Result<Bytes, BodyError> {
    let too_large = || {
        (
            RejectReason::TooLarge,
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {setting} ({limit} bytes)"),
            ),
        )
    };
    let encoding = encoding(&req).map_err(|e| (RejectReason::Invalid, e))?;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A compressed body is never larger than what it expands to, for any body that is
    // worth compressing; the decompressed size is checked below.
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = state.inner.body_read_timeout;
    let reading = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
    let body = match reading.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err((
                RejectReason::Invalid,
                ApiError::bad_body(format!("could not read the request body: {e}")),
            ));
        }
        Err(_) => {
            state.http_metrics().closed(CloseReason::BodyTimeout);
            let mut error = ApiError::status(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within BODY_READ_TIMEOUT ({timeout:?})"),
            );
            error.close = true;
            return Err((RejectReason::Invalid, error));
        }
    };
    match encoding {
        Encoding::Identity => Ok(body),
        Encoding::Gzip => gunzip(&body, limit).map_err(|e| match e {
            GunzipError::TooLarge => too_large(),
            GunzipError::Corrupt(message) => (
                RejectReason::Invalid,
                ApiError::bad_body(format!("body is not valid gzip: {message}")),
            ),
        }),
    }
}

#[derive(Debug, PartialEq)]
enum GunzipError {
    TooLarge,
    Corrupt(String),
}

/// Decompresses every gzip member of `compressed`, failing as soon as the output would
/// pass `limit`.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Bytes, GunzipError> {
    let mut out = Vec::with_capacity((compressed.len() * 4).min(limit));
    // One byte past the limit tells "exactly the limit" from "more".
    flate2::read::MultiGzDecoder::new(compressed)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| GunzipError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("write");
        encoder.finish().expect("finish")
    }

    #[test]
    fn gunzip_round_trips_up_to_the_limit() {
        let data = b"{\"device_id\":\"a\",\"cpu\":0.5,\"rps\":1}\n".repeat(100);
        let compressed = gzip(&data);
        assert_eq!(gunzip(&compressed, data.len()).expect("fits"), data[..]);
        assert_eq!(
            gunzip(&compressed, data.len() - 1),
            Err(GunzipError::TooLarge)
        );
    }

    #[test]
    fn a_zip_bomb_stops_at_the_limit() {
        // 64 MiB of zeros compress to about 64 KiB.
        let compressed = gzip(&vec![0u8; 64 << 20]);
        assert!(compressed.len() < 1 << 20);
        assert_eq!(gunzip(&compressed, 1 << 20), Err(GunzipError::TooLarge));
    }

    #[test]
    fn concatenated_members_are_one_body_and_garbage_is_refused() {
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(gunzip(&two, 100).expect("valid"), b"abcd"[..]);
        assert!(matches!(
            gunzip(b"not gzip at all", 100),
            Err(GunzipError::Corrupt(_))
        ));
    }

    #[test]
    fn encodings() {
        let with = |v: &str| {
            let req = Request::builder()
                .header(CONTENT_ENCODING, v)
                .body(())
                .expect("request");
            encoding(&req).map_err(|e| e.status)
        };
        assert_eq!(with("gzip"), Ok(Encoding::Gzip));
        assert_eq!(with("GZIP"), Ok(Encoding::Gzip));
        assert_eq!(with("x-gzip"), Ok(Encoding::Gzip));
        assert_eq!(with("identity"), Ok(Encoding::Identity));
        for other in ["br", "deflate", "gzip, br", "zstd"] {
            assert_eq!(
                with(other),
                Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{other}"
            );
        }
        let plain = Request::builder().body(()).expect("request");
        assert_eq!(
            encoding(&plain).map_err(|e| e.status),
            Ok(Encoding::Identity)
        );
    }
}
