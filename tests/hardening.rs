//! Slow, idle and hostile clients against the real binary over real sockets.

mod common;

use serde_json::Value;

use common::{get, post_event, raw, rss_kb, Service};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes; returns what arrived and when the close came.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Instant>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (data, Some(Instant::now())),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Err(_) => return (data, None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_neither_starve_others_nor_outstay_the_timeout() {
    let svc = Service::start(&[("HEADER_READ_TIMEOUT", "3s")]);
    let rss_before = rss_kb(svc.pid());
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(svc.addr).await.expect("connect");
        s.write_all(b"POST /metric HTTP/1.1\r\nHost: slow\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    // All 500 are held open (plus the scrape's own connection) until their timeout. The
    // gauge counts a connection once the service has accepted it: on an overloaded
    // machine that backlog took more than 1 s (5 runs of 18 with 24 test processes on 2
    // cores), so up to 2 s, still short of the 3 s timeout of the first ones.
    common::eventually(
        Duration::from_secs(2),
        "500 open slow connections",
        || async {
            let open = svc.metric("http_connections").await;
            open.filter(|n| *n == 501.0)
        },
    )
    .await;
    // Keep dribbling header bytes, while normal clients are served.
    let mut served = 0;
    for round in 0..5 {
        for s in slow.iter_mut().step_by(7) {
            let _ = s
                .write_all(format!("X-Drip-{round}: y\r\n").as_bytes())
                .await;
        }
        let t = Instant::now();
        assert_eq!(post_event(svc.addr, "normal", 0.5, 1.0).await.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "normal request took {:?}",
            t.elapsed()
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served, 5);
    let rss_during = rss_kb(svc.pid());
    // Every slow connection is closed by the server within the timeout (plus the
    // watchdog's quarter-timeout granularity), even though it kept sending bytes.
    for s in slow.iter_mut() {
        let (_, closed) = until_closed(s, Duration::from_secs(10)).await;
        let closed = closed.expect("server closed the slow connection");
        // Timeout + watchdog granularity + slack for a loaded test machine (seen: 5.07 s
        // with the suite and a mutation run on 2 cores); without the timeout the server
        // would wait for the rest of their heads for ever.
        assert!(
            closed - started < Duration::from_millis(2_000 + 500 + 6_500),
            "closed after {:?}",
            closed - started
        );
    }
    let timed_out = svc
        .metric(r#"http_connections_closed_total{reason="header_timeout"}"#)
        .await;
    assert_eq!(timed_out, Some(500.0));
    assert!(
        rss_during < rss_before + 64 * 1024,
        "500 slow connections pinned {} kB",
        rss_during.saturating_sub(rss_before)
    );
    assert_eq!(get(svc.addr, "/health").await.status, 200);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_keep_alive_timeout() {
    let svc = Service::start(&[("KEEP_ALIVE_TIMEOUT", "1s"), ("HEADER_READ_TIMEOUT", "5s")]);
    let mut s = TcpStream::connect(svc.addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = Instant::now();
    let (_, closed) = until_closed(&mut s, Duration::from_secs(4)).await;
    let after = closed.expect("closed") - idle_from;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(1_600),
        "closed after {after:?}"
    );
    assert_eq!(
        svc.metric(r#"http_connections_closed_total{reason="idle_timeout"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_a_closed_connection() {
    let svc = Service::start(&[("BODY_READ_TIMEOUT", "500ms")]);
    let mut s = TcpStream::connect(svc.addr).await.expect("connect");
    s.write_all(b"POST /metric HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"device_id\"")
        .await
        .expect("write");
    let (data, closed) = until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(closed.is_some(), "connection closed after the 408");
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("\"field\":null") && text.contains("BODY_READ_TIMEOUT"),
        "{text}"
    );
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_with_503_and_counted() {
    let svc = Service::start(&[("MAX_CONNECTIONS", "8")]);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(svc.addr).await.expect("connect"));
    }
    // Until the accept loop has taken all 8, a ninth connection may still get in; the
    // first refusal ends the wait.
    let refused = common::eventually(Duration::from_secs(5), "a refused connection", || async {
        let r = raw(
            svc.addr,
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("connections")));
    drop(held);
    // Capacity comes back as soon as connections close (the server may still refuse a
    // few while it notices the closes: those are counted too).
    let refused_meanwhile = std::sync::atomic::AtomicU32::new(0);
    common::eventually(Duration::from_secs(5), "a free connection slot", || async {
        match get(svc.addr, "/health").await.status {
            200 => Some(()),
            _ => {
                refused_meanwhile.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    })
    .await;
    let rejected = svc
        .metric("http_connections_rejected_total")
        .await
        .expect("metric");
    let seen = 1 + refused_meanwhile.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rejected, f64::from(seen), "every refusal counted, once");
}

#[tokio::test]
async fn hostile_requests_get_4xx_never_5xx_and_the_service_stays_up() {
    let svc = Service::start(&[]);
    let deep = format!(
        "{{\"device_id\":{}1{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let huge_number = r#"{"device_id":"h","cpu":0.5,"rps":1e999999}"#.to_string();
    let mut invalid_utf8 = b"{\"device_id\":\"".to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    invalid_utf8.extend_from_slice(b"\",\"cpu\":0.5,\"rps\":1}");
    // Each with the field its error names (null: the JSON itself is malformed).
    let bodies: Vec<(&str, Vec<u8>, Value)> = vec![
        ("deeply nested JSON", deep.into_bytes(), "device_id".into()),
        (
            "a number beyond f64",
            huge_number.into_bytes(),
            "rps".into(),
        ),
        ("invalid UTF-8", invalid_utf8, Value::Null),
        (
            "a NUL byte",
            b"{\"device_id\":\"a\0\",\"cpu\":0.5,\"rps\":1}".to_vec(),
            Value::Null,
        ),
    ];
    for (what, body, field) in bodies {
        let mut req = format!(
            "POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let r = raw(svc.addr, &req).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert_eq!(r.json()["field"], field, "{what}: {}", r.body);
    }
    // Framing errors: hyper answers with a bare 4xx or closes; never 5xx.
    let framing: Vec<(&str, Vec<u8>)> = vec![
        (
            "broken chunked framing",
            b"POST /metric HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot-a-chunk\r\n0\r\n\r\n".to_vec(),
        ),
        ("negative Content-Length", b"POST /metric HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n{}".to_vec()),
        (
            "huge Content-Length",
            b"POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 99999999999999\r\n\r\n{}".to_vec(),
        ),
        (
            "100 KB of headers",
            format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024)).into_bytes(),
        ),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec()),
    ];
    for (what, req) in framing {
        let oversized = what.contains("headers");
        let mut s = TcpStream::connect(svc.addr).await.expect("connect");
        let _ = s.write_all(&req).await;
        let (data, closed) = until_closed(&mut s, Duration::from_secs(15)).await;
        assert!(closed.is_some(), "{what}: connection not closed");
        let text = String::from_utf8_lossy(&data);
        // docs/operations.md promises 431 for oversized headers: an answer, not just a
        // close.
        if oversized {
            assert!(text.starts_with("HTTP/1.1 431 "), "{what}: {text}");
        }
        if !text.is_empty() {
            let status: u16 = text
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert!((400..500).contains(&status), "{what}: {text}");
        }
    }
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    // Under the 16 KiB limit, a large head is served.
    let pad = format!("X-Pad: {}", "a".repeat(12 * 1024));
    let r = common::request_with(svc.addr, "GET", "/health", &[pad.as_str()], b"").await;
    assert_eq!(r.status, 200, "a 12 KiB head is within the limit");
    let five_xx: f64 = {
        let text = get(svc.addr, "/metrics").await.body;
        text.lines()
            .filter(|l| l.starts_with("http_requests_total{") && l.contains("status=\"5"))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    assert_eq!(five_xx, 0.0);
}
