//! Reading a request body for the ingest endpoints: the size limit (by `Content-Length`
//! first, then while reading), `BODY_READ_TIMEOUT`, and `Content-Encoding: gzip`.
//!
//! A gzip body is decompressed as a stream into a buffer that may grow only to the
//! limit: the limit applies to the decompressed size, so a small body that expands
//! without bound (a zip bomb) costs at most the limit in memory before its 413. The
//! first [`INLINE_GUNZIP_BYTES`] of output are decompressed on the request's task; the
//! rest, if any, on tokio's blocking pool, so a large batch (up to `MAX_BATCH_BYTES`,
//! milliseconds of CPU) does not hold up the other requests of its worker thread.

use super::errors::ApiError;
use super::metrics::{CloseReason, HttpMetrics};
use crate::tuning::INLINE_GUNZIP_BYTES;
use actors::metrics::RejectReason;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use hyper::{Request, StatusCode};
use std::io::Read;
use std::time::Duration;

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

/// What a body may be.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Most bytes, after decompression.
    pub bytes: usize,
    /// The setting of `bytes`, named in the 413.
    pub setting: &'static str,
    /// BODY_READ_TIMEOUT: then 408 and the connection is closed (counted in `metrics`).
    pub timeout: Duration,
}

/// The body of `req`, decompressed, within `limit`.
pub async fn read(
    req: Request<Incoming>,
    limit: Limit,
    metrics: &HttpMetrics,
) -> Result<Bytes, BodyError> {
    let Limit {
        bytes: limit,
        setting,
        timeout,
    } = limit;
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
            metrics.closed(CloseReason::BodyTimeout);
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
        Encoding::Gzip => gunzip(body, limit).await.map_err(|e| match e {
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
/// pass `limit`: up to [`INLINE_GUNZIP_BYTES`] here, the rest on the blocking pool.
async fn gunzip(compressed: Bytes, limit: usize) -> Result<Bytes, GunzipError> {
    let mut gunzip = Gunzip::new(compressed, limit);
    if !gunzip.step(INLINE_GUNZIP_BYTES)? {
        gunzip = match tokio::task::spawn_blocking(move || {
            gunzip.step(u64::MAX)?;
            Ok(gunzip)
        })
        .await
        {
            Ok(done) => done?,
            // A blocking task is cancelled only when the runtime shuts down, which drops
            // this future first: an error here is the decoder's panic, passed on.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
    }
    gunzip.finish()
}

/// A gzip body being decompressed, in steps that can move between threads.
struct Gunzip {
    /// Stops one byte past the limit, which tells "exactly the limit" from "more".
    decoder: std::io::Take<flate2::read::MultiGzDecoder<bytes::buf::Reader<Bytes>>>,
    out: Vec<u8>,
    limit: usize,
}

impl Gunzip {
    fn new(compressed: Bytes, limit: usize) -> Self {
        Self {
            out: Vec::with_capacity((compressed.len() * 4).min(limit)),
            decoder: flate2::read::MultiGzDecoder::new(compressed.reader()).take(limit as u64 + 1),
            limit,
        }
    }

    /// Decompresses up to `budget` more bytes; true when the output is complete (or one
    /// byte past the limit).
    fn step(&mut self, budget: u64) -> Result<bool, GunzipError> {
        let before = self.out.len();
        (&mut self.decoder)
            .take(budget)
            .read_to_end(&mut self.out)
            .map_err(|e| GunzipError::Corrupt(e.to_string()))?;
        Ok(((self.out.len() - before) as u64) < budget)
    }

    fn finish(self) -> Result<Bytes, GunzipError> {
        if self.out.len() > self.limit {
            return Err(GunzipError::TooLarge);
        }
        Ok(Bytes::from(self.out))
    }
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

    fn gzip_bytes(data: &[u8]) -> Bytes {
        Bytes::from(gzip(data))
    }

    #[tokio::test]
    async fn gunzip_round_trips_up_to_the_limit() {
        let data = b"{\"device_id\":\"a\",\"cpu\":0.5,\"rps\":1}\n".repeat(100);
        let compressed = gzip_bytes(&data);
        assert_eq!(
            gunzip(compressed.clone(), data.len()).await.expect("fits"),
            data[..]
        );
        assert_eq!(
            gunzip(compressed, data.len() - 1).await,
            Err(GunzipError::TooLarge)
        );
    }

    #[tokio::test]
    async fn a_zip_bomb_stops_at_the_limit() {
        // 64 MiB of zeros compress to about 64 KiB.
        let compressed = gzip_bytes(&vec![0u8; 64 << 20]);
        assert!(compressed.len() < 1 << 20);
        assert_eq!(
            gunzip(compressed, 1 << 20).await,
            Err(GunzipError::TooLarge)
        );
    }

    #[tokio::test]
    async fn concatenated_members_are_one_body_and_garbage_is_refused() {
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(
            gunzip(Bytes::from(two), 100).await.expect("valid"),
            b"abcd"[..]
        );
        assert!(matches!(
            gunzip(Bytes::from_static(b"not gzip at all"), 100).await,
            Err(GunzipError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn a_body_larger_than_the_inline_part_is_finished_on_the_blocking_pool() {
        let inline = INLINE_GUNZIP_BYTES as usize;
        // Around the hand-over: just under, exactly at, just over, and far beyond it,
        // each exactly at and one byte under the limit.
        for size in [inline - 1, inline, inline + 1, 4 * inline + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let compressed = gzip_bytes(&data);
            assert_eq!(
                gunzip(compressed.clone(), size).await.expect("fits"),
                data[..],
                "{size}"
            );
            assert_eq!(
                gunzip(compressed, size - 1).await,
                Err(GunzipError::TooLarge),
                "{size}"
            );
        }
        // Corruption after the inline part is found on the blocking pool.
        let mut broken = gzip(&vec![7u8; 4 * inline]);
        let at = broken.len() - 12;
        broken.truncate(at);
        assert!(matches!(
            gunzip(Bytes::from(broken), 8 * inline).await,
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
