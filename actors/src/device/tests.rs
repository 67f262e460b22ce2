//! Supervision and eviction, on a real actor system with the embedded store.

use super::{DeviceMsg, Slot};
use crate::event::Event;
use crate::store::{analysis_key, EmbeddedStore, Store};
use crate::{System, SystemConfig};
use chrono::Utc;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

fn config(idle: Duration) -> SystemConfig {
    SystemConfig {
        window_size: 1000,
        device_idle_timeout: idle,
        ..SystemConfig::default()
    }
}

async fn start(config: SystemConfig, store: &Store) -> System {
    System::start(config, store.clone(), Registry::default())
        .await
        .expect("start")
}

fn event(rps: f64) -> Event {
    Event::new(rps, 0.5, Utc::now()).expect("a valid event")
}

/// What a device actor does with [`DeviceMsg::Panic`]: takes the next queued event, if
/// any, as if to process it, and panics, like a failure while processing that event
/// (or, with nothing queued, outside any event).
pub(super) fn panic(slot: &Slot) -> ! {
    match slot.next() {
        Some(queued) => panic!(
            "test-induced failure of device {} while processing {:?}",
            slot.device_id(),
            queued.event
        ),
        None => panic!("test-induced failure of device {}", slot.device_id()),
    }
}

/// The stored analysis of a device, as JSON.
async fn stored(store: &Store, device: &str) -> Option<serde_json::Value> {
    let bytes = store.get(&analysis_key(device)).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Waits (in this runtime's time) until the device's stored analysis has `samples`.
/// Makes `device`'s actor panic and waits for the supervisor's first restart; answers the
/// actor that crashed.
async fn crash_and_wait_for_restart(system: &System, device: &str) -> ractor::ActorRef<DeviceMsg> {
    let first = system
        .directory()
        .slot(device)
        .and_then(|s| s.attached())
        .expect("actor");
    first.cast(DeviceMsg::Panic).expect("cast");
    for _ in 0..500 {
        if system.metrics().actor_restarts.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(system.metrics().actor_restarts.get(), 1);
    first
}

async fn wait_samples(store: &Store, device: &str, samples: u64) -> serde_json::Value {
    for _ in 0..2000 {
        if let Some(v) = stored(store, device).await {
            if v["samples"] == samples {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{device} never reached {samples} samples; last: {:?}",
        stored(store, device).await
    );
}

#[tokio::test]
async fn supervisor_restarts_a_failed_device_actor_and_the_window_continues() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    // A restarted actor continues from the last checkpoint: with every result one, from
    // the newest window.
    let config = SystemConfig {
        window_checkpoint_interval: Duration::ZERO,
        ..config(Duration::from_secs(600))
    };
    let system = start(config, &store).await;
    let dir = system.directory();
    for x in [10.0, 20.0, 30.0] {
        dir.submit("d1", event(x)).expect("accepted");
    }
    wait_samples(&store, "d1", 3).await;

    let first = crash_and_wait_for_restart(&system, "d1").await;
    let second = dir
        .slot("d1")
        .and_then(|s| s.attached())
        .expect("restarted actor");
    assert_ne!(first.get_id(), second.get_id());

    dir.submit("d1", event(40.0))
        .expect("accepted after restart");
    let v = wait_samples(&store, "d1", 4).await;
    // The restarted actor restored 10, 20, 30 and appended 40.
    assert_eq!(v["rolling_average_rps"], 25.0);
    assert_eq!(system.device_actors().await.expect("count"), 1);
    assert_eq!(
        system.metrics().events_failed.get(),
        0,
        "the panic was outside any event"
    );
}

#[tokio::test]
async fn a_panic_in_the_middle_of_an_event_drops_only_that_event() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let system = start(config(Duration::from_secs(600)), &store).await;
    let dir = system.directory();
    dir.submit("mid", event(10.0)).expect("accepted");
    wait_samples(&store, "mid", 1).await;
    // Queued together behind a Panic, with no await in between (this runtime has one
    // thread, so the actor runs only once they are all queued): the actor fails while
    // processing the first (99), the two behind it wait in the slot for the restarted
    // actor.
    let actor = dir.slot("mid").and_then(|s| s.attached()).expect("actor");
    actor.cast(DeviceMsg::Panic).expect("cast");
    for x in [99.0, 20.0, 30.0] {
        dir.submit("mid", event(x)).expect("accepted");
    }
    let v = wait_samples(&store, "mid", 3).await;
    assert_eq!(
        v["rolling_average_rps"], 20.0,
        "10, 20, 30: the failing event is not in the window"
    );
    let m = system.metrics();
    assert_eq!(m.events_failed.get(), 1);
    assert_eq!(m.actor_restarts.get(), 1);
    assert_eq!(m.events_processed.get(), 3);
    assert_eq!(
        m.pending_events.get(),
        0,
        "the failed event's pending slot was released"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_device_actors_are_evicted_and_restored_on_the_next_event() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let idle = Duration::from_secs(60);
    let system = start(config(idle), &store).await;
    let dir = system.directory();
    dir.submit("sleepy", event(1.0)).expect("accepted");
    dir.submit("sleepy", event(3.0)).expect("accepted");
    wait_samples(&store, "sleepy", 2).await;
    assert_eq!(system.device_actors().await.expect("count"), 1);
    assert_eq!(dir.devices(), 1);

    tokio::time::sleep(idle / 2).await;
    assert_eq!(
        system.device_actors().await.expect("count"),
        1,
        "not idle long enough yet"
    );

    tokio::time::sleep(idle).await;
    assert_eq!(system.device_actors().await.expect("count"), 0);
    assert_eq!(system.metrics().device_evictions.get(), 1);
    assert_eq!(dir.devices(), 0);

    dir.submit("sleepy", event(5.0))
        .expect("accepted after eviction");
    let v = wait_samples(&store, "sleepy", 3).await;
    assert_eq!(v["rolling_average_rps"], 3.0);
    assert_eq!(system.device_actors().await.expect("count"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_idle_actor_is_evicted_about_when_its_timeout_ends() {
    // The supervisor sweeps every quarter of DEVICE_IDLE_TIMEOUT (docs/architecture.md):
    // an idle actor lives at most about 1.25 × the timeout; checked at 1.5 ×.
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let idle = Duration::from_secs(4);
    let system = start(config(idle), &store).await;
    system
        .directory()
        .submit("sleepy", event(1.0))
        .expect("accepted");
    wait_samples(&store, "sleepy", 1).await;
    tokio::time::sleep(idle + idle / 2).await;
    assert_eq!(system.device_actors().await.expect("count"), 0);
    assert_eq!(system.metrics().device_evictions.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_device_that_keeps_reporting_is_never_evicted() {
    // Idleness counts from the device's last burst of events, not from its first.
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let idle = Duration::from_secs(4);
    let system = start(config(idle), &store).await;
    let dir = system.directory();
    for n in 1..=8u32 {
        dir.submit("steady", event(f64::from(n))).expect("accepted");
        wait_samples(&store, "steady", u64::from(n)).await;
        tokio::time::sleep(idle / 2).await;
    }
    assert_eq!(system.metrics().device_evictions.get(), 0);
    assert_eq!(system.device_actors().await.expect("count"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_racing_eviction_are_never_lost() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    // Evict almost immediately, so that submissions keep racing actor stops.
    let system = Arc::new(start(config(Duration::from_millis(1)), &store).await);
    let devices = 8;
    let per_device = 150;
    let mut tasks = Vec::new();
    for d in 0..devices {
        let system = system.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("racer-{d}");
            for i in 0..per_device {
                system
                    .directory()
                    .submit(&id, event(i as f64))
                    .expect("accepted");
                if i % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
    for d in 0..devices {
        let v = wait_samples(&store, &format!("racer-{d}"), per_device).await;
        // Order kept: the newest value is the last one sent.
        assert_eq!(v["last_rps"], (per_device - 1) as f64);
    }
    assert!(
        system.metrics().device_evictions.get() > 0,
        "the test must actually race evictions"
    );
    assert_eq!(
        system.metrics().events_processed.get(),
        devices * per_device
    );
    assert_eq!(system.directory().pending(), 0);
}

#[tokio::test]
async fn submissions_beyond_the_pending_bound_are_refused() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let mut cfg = config(Duration::from_secs(600));
    cfg.max_pending_events = 2;
    let system = start(cfg, &store).await;
    let dir = system.directory();
    // Submitted synchronously, without yielding: the device actor cannot run in between.
    assert!(dir.submit("a", event(1.0)).is_ok());
    assert!(dir.submit("a", event(2.0)).is_ok());
    assert_eq!(
        dir.submit("a", event(3.0)),
        Err(super::SubmitError::Overloaded)
    );
    assert_eq!(system.metrics().pending_events.get(), 2);
    // The rest of a batch already partly queued (and events forwarded by a peer) are
    // taken past the bound, and processed in order.
    assert_eq!(dir.submit_regardless("a", event(3.0)), Ok(()));
    assert_eq!(system.metrics().pending_events.get(), 3);
    let v = wait_samples(&store, "a", 3).await;
    assert_eq!(v["rolling_average_rps"], 2.0);
    assert_eq!(system.metrics().pending_events.get(), 0);
}

#[tokio::test]
async fn a_change_of_the_cluster_view_stops_drained_actors_and_their_windows_continue() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let system = start(config(Duration::from_secs(600)), &store).await;
    let dir = system.directory();
    for device in ["e1", "e2"] {
        dir.submit(device, event(10.0)).expect("accepted");
        wait_samples(&store, device, 1).await;
    }
    assert_eq!(dir.evict_drained(), 2, "both were drained");
    assert_eq!(dir.devices(), 0, "their slots are gone");
    dir.submit("e1", event(30.0)).expect("accepted");
    let v = wait_samples(&store, "e1", 2).await;
    assert_eq!(v["rolling_average_rps"], 20.0, "the new actor restored 10");
    assert_eq!(dir.devices(), 1);
}

/// Readings in the device's stored window.
async fn stored_window(store: &Store, device: &str) -> usize {
    store
        .load_window(device)
        .await
        .expect("readable")
        .map_or(0, |w| w.readings().len())
}

#[tokio::test]
async fn windows_are_checkpointed_at_most_once_per_interval_and_on_shutdown() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let cfg = SystemConfig {
        window_checkpoint_interval: Duration::from_secs(3600),
        ..config(Duration::from_secs(7200))
    };
    let system = start(cfg, &store).await;
    for (i, x) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        system.directory().submit("cp", event(x)).expect("accepted");
        // Each result flushed on its own: no coalescing carries a checkpoint along.
        wait_samples(&store, "cp", i as u64 + 1).await;
    }
    assert_eq!(
        stored_window(&store, "cp").await,
        1,
        "an incarnation's first result carries the window, the next ones only the analysis"
    );
    let report = system
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert!(report.store_flushed);
    assert_eq!(
        stored_window(&store, "cp").await,
        3,
        "a stopping actor writes its unsaved window"
    );
}

#[tokio::test]
async fn a_quiet_devices_window_is_checkpointed_within_the_interval() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let cfg = SystemConfig {
        window_checkpoint_interval: Duration::from_millis(300),
        ..config(Duration::from_secs(600))
    };
    let system = start(cfg, &store).await;
    for (i, x) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        system
            .directory()
            .submit("quiet", event(x))
            .expect("accepted");
        wait_samples(&store, "quiet", i as u64 + 1).await;
    }
    // No further event: the trailing checkpoint writes the window by itself.
    for _ in 0..1000 {
        if stored_window(&store, "quiet").await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stored_window(&store, "quiet").await, 3);
    assert_eq!(system.metrics().events_processed.get(), 3);
}

/// (incarnation, events) of the device's stored window's version.
async fn stored_version(store: &Store, device: &str) -> (u64, u64) {
    let window = store
        .load_window(device)
        .await
        .expect("readable")
        .expect("a stored window");
    crate::store::Version::parts(window.version())
}

#[tokio::test]
async fn each_event_makes_the_window_newer_and_a_restarted_actor_a_new_incarnation() {
    // The version is what a cluster's guarded writes compare: it must grow with every
    // event, and a restarted actor must outrank every window of the one before it.
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let cfg = SystemConfig {
        window_checkpoint_interval: Duration::ZERO,
        ..config(Duration::from_secs(600))
    };
    let system = start(cfg, &store).await;
    let dir = system.directory();
    for (i, x) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        dir.submit("v", event(x)).expect("accepted");
        wait_samples(&store, "v", i as u64 + 1).await;
        assert_eq!(stored_version(&store, "v").await, (1, i as u64 + 1));
    }
    crash_and_wait_for_restart(&system, "v").await;
    dir.submit("v", event(40.0)).expect("accepted");
    wait_samples(&store, "v", 4).await;
    assert_eq!(stored_version(&store, "v").await, (2, 1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_once_everything_is_done_not_at_its_deadline() {
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let system = start(config(Duration::from_secs(600)), &store).await;
    assert!(system.is_running());
    system
        .directory()
        .submit("s", event(1.0))
        .expect("accepted");
    // Paused time: waiting out the deadline would move the clock to it at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    let report = system.shutdown(deadline).await;
    assert!(
        tokio::time::Instant::now() < deadline,
        "shutdown waited for its deadline"
    );
    assert_eq!(report.unprocessed, 0);
    assert!(report.store_flushed);
    assert_eq!(stored(&store, "s").await.expect("stored")["samples"], 1);
    assert!(!system.is_running(), "every long-lived actor has stopped");
}
