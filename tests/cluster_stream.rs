//! The stream of forwarded batches between nodes, spoken to a real node (the service
//! binary, a one-node cluster on a real redis-server) the way a peer speaks it: a batch
//! sent again under the same key after its connection broke is taken once; a connection
//! without the token is refused and counted; a frame that does not decode is refused
//! without taking the node down.

mod common;

use actors::cluster::{wire, BatchId};
use actors::event::Event;
use bytes::Bytes;
use common::{eventually, free_port, get, Redis, Service};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use iot_stream_processor::cluster::frame::{self, PROTOCOL};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const SOON: Duration = Duration::from_secs(20);
const TOKEN: &str = "stream-token";

/// A one-node cluster: it owns every shard once ready.
fn start_node(redis: &Redis) -> (Service, SocketAddr) {
    let internal = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let svc = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("CLUSTER_ADVERTISE_ADDR", &internal.to_string()),
        ("CLUSTER_LISTEN_ADDR", &internal.to_string()),
        ("CLUSTER_TOKEN", TOKEN),
        ("CLUSTER_HEARTBEAT_INTERVAL", "250ms"),
        ("CLUSTER_LEASE", "1s"),
    ]);
    (svc, internal)
}

async fn ready(svc: &Service) {
    eventually(SOON, "/ready", || async {
        (get(svc.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
}

/// Asks for the stream with `token` (none: no Authorization header); the framed stream,
/// or the status of the refusal.
async fn open(
    internal: SocketAddr,
    token: Option<&str>,
) -> Result<Framed<TcpStream, LengthDelimitedCodec>, StatusCode> {
    let tcp = TcpStream::connect(internal).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn.with_upgrades());
    let mut request = hyper::Request::get("/cluster/stream")
        .header("host", internal.to_string())
        .header("connection", "upgrade")
        .header("upgrade", PROTOCOL);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::new()).expect("request"))
        .await
        .expect("response");
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(response.status());
    }
    let upgraded = hyper::upgrade::on(response).await.expect("upgrade");
    let (tcp, early) = frame::into_tcp(upgraded).expect("tcp");
    assert!(early.is_empty());
    Ok(Framed::new(tcp, frame::codec()))
}

fn events(device: &str, n: usize) -> Bytes {
    let events: Vec<Event> = (0..n)
        .map(|i| {
            let timestamp =
                chrono::DateTime::from_timestamp(1_700_000_000 + i as i64, 0).expect("time");
            Event::new(100.0 + i as f64, 0.5, timestamp).expect("a valid event")
        })
        .collect();
    wire::encode(events.iter().map(|e| (device, e)))
}

fn batch(id: BatchId, body: &[u8]) -> Bytes {
    let now = chrono::Utc::now().timestamp_millis() as u64;
    frame::encode_batch(id, now, now + 60_000, body)
}

async fn answer(
    stream: &mut Framed<TcpStream, LengthDelimitedCodec>,
) -> (BatchId, Result<Vec<u32>, actors::cluster::ForwardError>) {
    let frame = tokio::time::timeout(SOON, stream.next())
        .await
        .expect("an answer in time")
        .expect("a frame")
        .expect("readable");
    frame::decode_answer(frame.freeze()).expect("an answer")
}

#[tokio::test]
async fn a_batch_sent_again_after_its_connection_broke_is_taken_once() {
    let redis = Redis::start();
    let (svc, internal) = start_node(&redis);
    ready(&svc).await;
    let id = BatchId(0x5eed, 1);
    let body = events("retried-1", 3);
    // The first send: the connection breaks before the answer is read.
    let mut first = open(internal, Some(TOKEN)).await.expect("stream");
    first.send(batch(id, &body)).await.expect("send");
    drop(first);
    eventually(SOON, "the first copy taken", || async {
        (svc.metric("forwarded_events_received_total").await == Some(3.0)).then_some(())
    })
    .await;
    // The retry, same key, on a new connection: answered as the first was, taken once.
    let mut again = open(internal, Some(TOKEN)).await.expect("stream");
    again.send(batch(id, &body)).await.expect("send");
    assert_eq!(answer(&mut again).await, (id, Ok(vec![])));
    assert_eq!(svc.metric("events_duplicate_total").await, Some(3.0));
    assert_eq!(
        svc.metric("forwarded_events_received_total").await,
        Some(3.0)
    );
    eventually(SOON, "3 samples", || async {
        let r = get(svc.addr, "/analyze?device_id=retried-1").await;
        (r.status == 200).then(|| r.json()["samples"].clone())
    })
    .await;
    let r = get(svc.addr, "/analyze?device_id=retried-1").await;
    assert_eq!(r.json()["samples"], 3, "{}", r.body);
    // Pipelined on one stream: answers come back by key.
    let ids: Vec<BatchId> = (10..14).map(|s| BatchId(0x5eed, s)).collect();
    for (i, id) in ids.iter().enumerate() {
        again
            .feed(batch(*id, &events(&format!("piped-{i}"), 2)))
            .await
            .expect("feed");
    }
    SinkExt::<Bytes>::flush(&mut again).await.expect("flush");
    let mut answered = Vec::new();
    for _ in &ids {
        let (id, refused) = answer(&mut again).await;
        assert_eq!(refused, Ok(vec![]));
        answered.push(id);
    }
    answered.sort();
    assert_eq!(answered, ids);
}

/// A batch whose deadline passed before it arrived (`encode_batch` with a deadline in the
/// past).
fn late_batch(id: BatchId, body: &[u8]) -> Bytes {
    let now = chrono::Utc::now().timestamp_millis() as u64;
    frame::encode_batch(id, now - 2_000, now - 1_000, body)
}

#[tokio::test]
async fn a_late_repeat_of_a_taken_batch_gets_its_answer_and_a_late_first_copy_is_refused() {
    let redis = Redis::start();
    let (svc, internal) = start_node(&redis);
    ready(&svc).await;
    let mut stream = open(internal, Some(TOKEN)).await.expect("stream");
    let id = BatchId(0x1a7e, 1);
    let body = events("late-1", 2);
    stream.send(batch(id, &body)).await.expect("send");
    assert_eq!(answer(&mut stream).await, (id, Ok(vec![])));
    // The same key again, arriving after its own deadline (its answer was lost and the
    // retry was slow): the first answer, not "expired", which would make the sender
    // route the events again and count them twice.
    stream.send(late_batch(id, &body)).await.expect("send");
    assert_eq!(answer(&mut stream).await, (id, Ok(vec![])));
    assert_eq!(svc.metric("events_duplicate_total").await, Some(2.0));
    // A batch this node never took, arriving late: refused, nothing queued.
    let never = BatchId(0x1a7e, 2);
    stream
        .send(late_batch(never, &events("late-2", 2)))
        .await
        .expect("send");
    assert_eq!(
        answer(&mut stream).await,
        (never, Err(actors::cluster::ForwardError::Rejected(410)))
    );
    assert_eq!(
        svc.metric("forwarded_batches_expired_total").await,
        Some(1.0)
    );
    assert_eq!(
        svc.metric("forwarded_events_received_total").await,
        Some(2.0)
    );
    let r = get(svc.addr, "/analyze?device_id=late-1").await;
    assert_eq!(r.json()["samples"], 2, "{}", r.body);
    assert_eq!(get(svc.addr, "/analyze?device_id=late-2").await.status, 404);
}

#[tokio::test]
async fn a_stream_without_the_token_is_refused_and_counted() {
    let redis = Redis::start();
    let (svc, internal) = start_node(&redis);
    ready(&svc).await;
    for token in [Some("wrong-token"), None] {
        assert_eq!(
            open(internal, token).await.err(),
            Some(StatusCode::UNAUTHORIZED)
        );
    }
    assert_eq!(svc.metric("cluster_unauthorized_total").await, Some(2.0));
    assert_eq!(
        svc.metric("forwarded_events_received_total").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn frames_that_do_not_decode_are_refused_and_the_node_carries_on() {
    let redis = Redis::start();
    let (svc, internal) = start_node(&redis);
    ready(&svc).await;
    let mut stream = open(internal, Some(TOKEN)).await.expect("stream");
    // A batch whose events break the rules: refused whole, as malformed (400).
    let id = BatchId(0xbad, 1);
    let mut broken = events("bad-1", 2).to_vec();
    broken.truncate(broken.len() - 3);
    stream.send(batch(id, &broken)).await.expect("send");
    assert_eq!(
        answer(&mut stream).await,
        (id, Err(actors::cluster::ForwardError::Rejected(400)))
    );
    stream
        .send(batch(BatchId(0xbad, 2), b"XX1"))
        .await
        .expect("send");
    assert_eq!(
        answer(&mut stream).await.1,
        Err(actors::cluster::ForwardError::Rejected(400))
    );
    // A frame too short to name a batch cannot be answered: the stream is closed.
    stream
        .send(Bytes::from_static(b"short"))
        .await
        .expect("send");
    let end = tokio::time::timeout(SOON, stream.next())
        .await
        .expect("closed in time");
    assert!(
        !matches!(end, Some(Ok(_))),
        "no answer to a frame without a key"
    );
    // The node is well: a new stream takes a good batch.
    let mut fresh = open(internal, Some(TOKEN)).await.expect("stream");
    let id = BatchId(0xbad, 3);
    fresh
        .send(batch(id, &events("good-1", 1)))
        .await
        .expect("send");
    assert_eq!(answer(&mut fresh).await, (id, Ok(vec![])));
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    assert_eq!(
        svc.metric("forwarded_events_received_total").await,
        Some(1.0)
    );
}
