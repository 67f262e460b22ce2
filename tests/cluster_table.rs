//! The shard table in a real redis-server: claims are exclusive, a dead member's shards
//! are taken only after its lease (with its ingest-log stream owed to their replay), a
//! node that lost a shard can write nothing of it, streams nobody needs are collected, and
//! the start-up checks that refuse a node (another shard count, an advertised address
//! that reaches another process) with exit code 2.

mod common;

use actors::cluster::logs::Logs;
use actors::cluster::shards::shard_of;
use actors::cluster::{Ownership, Table, TableError};
use actors::store::{analysis_key, window_key, DeviceWrite, Fence, RedisStore, RedisTls};
use common::{free_port, Redis, Service};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const SHARDS: u32 = 8;

fn pool(redis: &Redis) -> RedisStore {
    RedisStore::with_tls(
        &redis.url(),
        &RedisTls::default(),
        2,
        Duration::from_secs(2),
    )
    .expect("pool")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn table(redis: &Redis, id: &str, lease: Duration) -> Table {
    Table::new(pool(redis), Arc::from(id), SHARDS, lease)
}

fn write(device: &str, marker: &str) -> DeviceWrite {
    DeviceWrite {
        device: device.into(),
        analysis: (
            analysis_key(device),
            bytes::Bytes::from(format!("{{\"m\":\"{marker}\"}}")),
        ),
        window: (window_key(device), None),
    }
}

/// Runs the binary as a cluster member that must refuse to start: exit code 2; answers
/// what it printed on stderr.
fn refused_member(redis: &Redis, advertise: &str, listen: &str, extra: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("REDIS_URL", redis.url())
        .env("CLUSTER_ADVERTISE_ADDR", advertise)
        .env("CLUSTER_LISTEN_ADDR", listen)
        .env("CLUSTER_TOKEN", "t")
        .envs(extra.iter().copied())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[tokio::test]
async fn claims_are_exclusive_and_a_dead_member_s_shards_wait_for_its_lease() {
    let redis = Redis::start();
    let lease = Duration::from_millis(600);
    let a = table(&redis, "127.0.0.1:1#a", lease);
    let b = table(&redis, "127.0.0.1:2#b", lease);
    // Each appends to an ingest-log stream of its own.
    a.beat(addr(1), false, 0, Some("log:a:0"))
        .await
        .expect("a registers");
    let beat = b
        .beat(addr(2), false, 0, Some("log:b:0"))
        .await
        .expect("b registers");
    assert_eq!(beat.members.len(), 2);
    let all: Vec<(u32, u64)> = (0..SHARDS).map(|s| (s, 0)).collect();
    let taken = a.claim(&all).await.expect("claim");
    assert_eq!(taken.len(), SHARDS as usize);
    // A new cluster's shards owe no replay.
    assert!(taken.iter().all(|c| c.epoch == 1 && c.pending.is_empty()));
    // A live owner keeps its shards: the same claim by b takes nothing.
    assert!(b.claim(&all).await.expect("claim").is_empty());
    // a stops beating; b does. Before a's lease runs out, nothing moves.
    tokio::time::sleep(lease / 3).await;
    b.beat(addr(2), false, 0, Some("log:b:0"))
        .await
        .expect("beat");
    assert!(b.claim(&all).await.expect("claim").is_empty());
    tokio::time::sleep(lease).await;
    let beat = b
        .beat(addr(2), false, 0, Some("log:b:0"))
        .await
        .expect("beat");
    assert_eq!(beat.members.len(), 1, "a's heartbeat expired");
    let taken = b.claim(&all).await.expect("claim");
    assert_eq!(taken.len(), SHARDS as usize);
    // The dead owner's stream is owed to every shard b took from it.
    assert!(
        taken.iter().all(|c| c.epoch == 2 && c.pending == "log:a:0"),
        "{taken:?}"
    );
    let (_, entries) = b.read().await.expect("read");
    assert!(entries
        .iter()
        .all(|e| e.as_ref().is_some_and(|e| &*e.owner == "127.0.0.1:2#b")));
}

#[tokio::test]
async fn owed_replays_are_cleared_only_by_their_owner_and_unneeded_streams_are_collected() {
    let redis = Redis::start();
    let lease = Duration::from_millis(600);
    let (a_id, b_id) = ("127.0.0.1:1#a", "127.0.0.1:2#b");
    let (a, b) = (table(&redis, a_id, lease), table(&redis, b_id, lease));
    let a_logs = Logs::new(pool(&redis), Arc::from(a_id));
    let b_logs = Logs::new(pool(&redis), Arc::from(b_id));
    let exists = |key: &str| redis.cli(&["EXISTS", key]).as_deref() == Some("1");
    for key in ["log:a:0", "log:a:1", "log:b:0"] {
        redis.cli(&["XADD", key, "*", "e1", "x"]).expect("xadd");
    }
    a.beat(addr(1), false, 0, Some("log:a:0"))
        .await
        .expect("beat");
    b.beat(addr(2), false, 0, Some("log:b:0"))
        .await
        .expect("beat");
    let all: Vec<(u32, u64)> = (0..SHARDS).map(|s| (s, 0)).collect();
    assert_eq!(a.claim(&all).await.expect("claim").len(), SHARDS as usize);

    // a's lease ran out and it takes its own shards again: epoch + 1, its stream owed,
    // a new stream its current one.
    let mine: Vec<(u32, u64)> = (0..SHARDS).map(|s| (s, 1)).collect();
    let again = a_logs.reclaim(&mine, "log:a:1").await.expect("reclaim");
    assert_eq!(again.len(), SHARDS as usize);
    assert!(again.iter().all(|c| c.epoch == 2 && c.pending == "log:a:0"));
    // Only the shards' owner clears what they owe, once.
    assert!(b_logs.clear(&again).await.expect("clear").is_empty());
    assert_eq!(
        a_logs.clear(&again).await.expect("clear").len(),
        SHARDS as usize
    );
    // a's old stream is neither current nor owed: collected; the current ones stay.
    assert_eq!(a_logs.collect().await.expect("collect"), 1);
    assert!(!exists("log:a:0") && exists("log:a:1") && exists("log:b:0"));

    // a dies: its stream stays while it owns shards nobody has taken yet...
    tokio::time::sleep(lease + lease / 2).await;
    b.beat(addr(2), false, 0, Some("log:b:0"))
        .await
        .expect("beat");
    assert_eq!(b_logs.collect().await.expect("collect"), 0);
    assert!(exists("log:a:1"));
    // ...and while b replays it; then it goes.
    let taken = b.claim(&all).await.expect("claim");
    assert!(taken.iter().all(|c| c.pending == "log:a:1"), "{taken:?}");
    assert_eq!(b_logs.collect().await.expect("collect"), 0);
    assert_eq!(
        b_logs.clear(&taken).await.expect("clear").len(),
        SHARDS as usize
    );
    assert_eq!(b_logs.collect().await.expect("collect"), 1);
    assert!(!exists("log:a:1") && exists("log:b:0"));
}

#[tokio::test]
async fn a_node_that_passed_or_lost_a_shard_can_write_nothing_of_it() {
    let redis = Redis::start();
    let lease = Duration::from_secs(10);
    let (a_id, b_id) = ("127.0.0.1:1#a", "127.0.0.1:2#b");
    let (a, b) = (table(&redis, a_id, lease), table(&redis, b_id, lease));
    a.beat(addr(1), false, 0, None).await.expect("beat");
    b.beat(addr(2), false, 0, None).await.expect("beat");
    let all: Vec<(u32, u64)> = (0..SHARDS).map(|s| (s, 0)).collect();
    let claimed: Vec<(u32, u64)> = a
        .claim(&all)
        .await
        .expect("claim")
        .iter()
        .map(|c| (c.shard, c.epoch))
        .collect();
    // a's view, which fences a's store.
    let a_view = Arc::new(Ownership::new(Arc::from(a_id), SHARDS));
    a_view.claimed(&claimed, false);
    let a_store = pool(&redis).fenced(a_view.clone());
    let ttl = Duration::from_secs(60);
    a_store
        .write(vec![write("g", "a-0")], ttl)
        .await
        .expect("write");
    // While the table does not change, a flush of checked shards skips the check: one
    // round trip, no HMGET.
    let checks = redis.command_calls("hmget");
    a_store
        .write(vec![write("g", "a-1")], ttl)
        .await
        .expect("write");
    assert_eq!(
        redis.command_calls("hmget"),
        checks,
        "no check of an unchanged table"
    );
    assert_eq!(
        redis.cli(&["GET", "analysis:g"]).as_deref(),
        Some(r#"{"m":"a-1"}"#)
    );
    // The shard of g moves to b in the table (as a handoff of a's would, but a's view
    // is not told: a node paused or cut off at that moment).
    let s = shard_of("g", SHARDS);
    let passed = a.pass(&[(s, 1, Arc::from(b_id))]).await.expect("pass");
    assert_eq!(passed, vec![s]);
    a_store
        .write(vec![write("g", "a-stale")], ttl)
        .await
        .expect("write");
    assert_eq!(
        redis.cli(&["GET", "analysis:g"]).as_deref(),
        Some(r#"{"m":"a-1"}"#),
        "a's late write is refused"
    );
    assert_eq!(
        a_view.take_lost(),
        vec![s],
        "a learns that it lost the shard"
    );
    assert_eq!(a_view.lease("g"), None);
    // Another device of a shard a still owns is written as before.
    let other = (0..100)
        .map(|i| format!("o{i}"))
        .find(|d| shard_of(d, SHARDS) != s)
        .expect("a device of another shard");
    a_store
        .write(vec![write(&other, "a-2")], ttl)
        .await
        .expect("write");
    assert_eq!(
        redis.cli(&["GET", &analysis_key(&other)]).as_deref(),
        Some(r#"{"m":"a-2"}"#)
    );
    // b, the new owner, writes g under epoch 2.
    let b_view = Arc::new(Ownership::new(Arc::from(b_id), SHARDS));
    let (_, entries) = b.read().await.expect("read");
    let (adopted, _) = b_view.apply(&entries);
    assert_eq!(adopted, vec![s]);
    pool(&redis)
        .fenced(b_view)
        .write(vec![write("g", "b-1")], ttl)
        .await
        .expect("write");
    assert_eq!(
        redis.cli(&["GET", "analysis:g"]).as_deref(),
        Some(r#"{"m":"b-1"}"#)
    );
    // Passing a shard to a member that is not live does nothing.
    assert!(a
        .pass(&[(s, 2, Arc::from("127.0.0.1:9#gone"))])
        .await
        .expect("pass")
        .is_empty());
}

#[tokio::test]
async fn a_table_of_another_shard_count_is_refused_and_a_node_with_it_exits_2() {
    let redis = Redis::start();
    let lease = Duration::from_secs(5);
    table(&redis, "127.0.0.1:1#a", lease)
        .beat(addr(1), false, 0, None)
        .await
        .expect("the first node sets the shard count");
    let other = Table::new(pool(&redis), Arc::from("127.0.0.1:2#b"), 16, lease);
    match other.beat(addr(2), false, 0, None).await {
        Err(TableError::Mismatch { shards, ours, .. }) => {
            assert_eq!((shards.as_str(), ours), ("8", 16));
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // An unknown format: refused the same way.
    redis.cli(&["HSET", "{iot}:meta", "format", "99"]);
    assert!(matches!(
        table(&redis, "127.0.0.1:3#c", lease)
            .beat(addr(3), false, 0, None)
            .await,
        Err(TableError::Mismatch { .. })
    ));
    redis.cli(&["HSET", "{iot}:meta", "format", "1"]);
    // The binary with CLUSTER_SHARDS=16 against this table: exit 2, naming the setting.
    let me = addr(free_port()).to_string();
    let err = refused_member(&redis, &me, &me, &[("CLUSTER_SHARDS", "16")]);
    assert!(
        err.contains("CLUSTER_SHARDS") && err.contains("8 shards"),
        "{err}"
    );
}

#[tokio::test]
async fn an_advertised_address_that_reaches_another_node_is_refused_at_start_up() {
    let redis = Redis::start();
    let first = addr(free_port()).to_string();
    let _running = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("CLUSTER_ADVERTISE_ADDR", &first),
        ("CLUSTER_LISTEN_ADDR", &first),
        ("CLUSTER_TOKEN", "t"),
    ]);
    // Two nodes on one host: the second listens elsewhere but advertises the first's
    // internal address (a copied setting, or the default port taken).
    let own = addr(free_port()).to_string();
    let err = refused_member(&redis, &first, &own, &[]);
    assert!(
        err.contains(&format!("CLUSTER_ADVERTISE_ADDR {first}"))
            && err.contains(&format!("CLUSTER_LISTEN_ADDR {own}")),
        "both addresses named: {err}"
    );
}

/// A member declared dead while it was paused: the new owner seals its stream and
/// replays it, and the stream is collected (deleted) once nothing owes it. An append
/// the member had queued before the pause and sends when it wakes must then fail (503):
/// before, XADD created the deleted stream again, without its seal, and the event was
/// answered 200 from a stream nobody replays (`a_paused_node_loses_its_shards…` in
/// tests/cluster.rs lost one event that way). The member then appends to a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_and_collected_stream_takes_no_late_append() {
    use actors::device::SubmitError;
    use actors::ingest::{settled, IngestLog, LogSettings, RedisLog, Tag};
    let redis = Redis::start();
    let exists = |key: &str| redis.cli(&["EXISTS", key]).as_deref() == Some("1");
    let store = pool(&redis);
    let system = actors::System::start(
        actors::SystemConfig::default(),
        actors::store::Store::Redis(store.clone()),
        prometheus_client::registry::Registry::default(),
    )
    .await
    .expect("system");
    let key = "log:a:0";
    let stream = RedisLog::new(store.clone(), key.to_string());
    // A member creates each stream of its own before the table registers it.
    stream.create().await.expect("create");
    assert!(exists(key));
    let log = IngestLog::start(
        stream.clone(),
        LogSettings {
            maxlen: 1000,
            shards: SHARDS,
            writer: None,
        },
        system.directory().clone(),
        system.metrics().clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .expect("log");
    let device: Arc<str> = Arc::from("d-1");
    let tag = Some(Tag {
        shard: shard_of(&device, SHARDS),
        epoch: 1,
    });
    let event = || {
        vec![(
            device.clone(),
            actors::event::Event::new(1.0, 0.5, chrono::Utc::now()).expect("event"),
        )]
    };
    let append = |tag| {
        let admitted = log.enqueue(event(), tag);
        async move { settled(admitted?).await }
    };
    common::eventually(Duration::from_secs(5), "the log replayed", || async {
        log.is_replayed().then_some(())
    })
    .await;
    assert_eq!(append(tag).await, Ok(()));

    // The new owner seals the stream and replays it; nothing owes it any more, and it
    // is collected.
    stream.seal().await.expect("seal");
    redis.cli(&["DEL", key]).expect("del");
    // The member wakes and appends what it had queued: refused, and the stream stays gone.
    assert_eq!(append(tag).await, Err(SubmitError::NotDurable));
    assert!(!exists(key), "a collected stream never comes back");
    assert!(log.stream_gone());
    // Until it appends to a new stream, events are refused at once.
    assert_eq!(append(tag).await, Err(SubmitError::NotDurable));
    assert!(!exists(key));

    // A new stream (created first) takes appends again.
    let next = stream.with_key("log:a:1".to_string());
    next.create().await.expect("create");
    log.switch(next).await;
    assert!(!log.stream_gone());
    assert_eq!(append(tag).await, Ok(()));
    assert_eq!(redis.cli(&["XLEN", "log:a:1"]).as_deref(), Some("1"));
}
