//! The ingest log in a cluster, against real nodes (the service binary) and a real
//! redis-server: a member SIGKILLed under load loses no event it (or a member that
//! forwarded to it) answered 200, and counts none twice; its shards' new owners replay
//! its log before they take their events.

mod common;

use common::durable::{load, wait_ready, Targets, Unanswered};
use common::{free_port, Redis, Service};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn start_member(redis_url: &str) -> Service {
    let internal = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    Service::start(&[
        ("REDIS_URL", redis_url),
        ("CLUSTER_ADVERTISE_ADDR", &internal),
        ("CLUSTER_LISTEN_ADDR", &internal),
        ("CLUSTER_TOKEN", "t"),
        ("CLUSTER_HEARTBEAT_INTERVAL", "250ms"),
        ("CLUSTER_LEASE", "1s"),
        ("CLUSTER_FORWARD_TIMEOUT", "3s"),
        ("WINDOW_SIZE", "100000"),
        // Checkpoints far apart: after the kill, the windows depend on the replay.
        ("WINDOW_CHECKPOINT_INTERVAL", "30s"),
        ("RUST_LOG", "info,actors::cluster=debug"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_member_loses_no_event_it_answered_and_counts_none_twice() {
    let redis = Redis::start();
    let url = redis.url();
    let starting: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || start_member(&url))
        })
        .collect();
    let mut members = Vec::new();
    for s in starting {
        members.push(s.await.expect("member"));
    }
    for m in &members {
        wait_ready(m.addr).await;
    }
    let targets: Targets = Arc::new(Mutex::new(members.iter().map(|m| m.addr).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = tokio::spawn(load(targets.clone(), 8, 5, stop.clone(), Unanswered::GoOn));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // SIGKILL, mid-load: no drain, no handoff; the Service drops the pod.
    let killed = members.pop().expect("a member");
    targets
        .lock()
        .expect("targets")
        .retain(|a| *a != killed.addr);
    drop(killed);
    // The load goes on while the survivors take the dead member's shards (after its
    // lease) and replay its log.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = clients.await.expect("clients");
    assert!(
        outcomes.acked_count() > 200,
        "the load ran: {} events answered",
        outcomes.acked_count()
    );
    let mut replayed = 0.0;
    for m in &members {
        replayed += m.metric("ingest_log_replayed_total").await.unwrap_or(0.0);
    }
    assert!(
        replayed > 0.0,
        "the survivors replayed the dead member's log"
    );

    // Stopped gracefully, the survivors store every window: each holds every answered
    // event once, and of the others at most once.
    for m in members {
        let (code, _) = m.terminate();
        assert_eq!(code, 0);
    }
    outcomes.check_stored(redis.port).await;
}
