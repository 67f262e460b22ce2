//! The writer's inbox as device actors and the writer use it: newest result per device,
//! checkpoints never lost to coalescing, failed flushes put back without undoing newer
//! results, the ingest-log entries a checkpoint covers kept pinned until it is stored, and
//! the early-flush signal at FLUSH_EARLY_AT devices.

use actors::analytics::{AnomalyRule, Window};
use actors::event::{Analysis, Event};
use actors::position::{Held, Pins, Position};
use actors::store::{Checkpoint, Inbox, Record, StreamId};
use actors::tuning::FLUSH_EARLY_AT;
use chrono::{TimeZone, Utc};
use std::sync::Arc;

/// The result of `device`'s window after readings `rps` (one per value), at version
/// `version`; carrying that window when `checkpoint`.
fn record(device: &str, rps: &[f64], version: u64, checkpoint: bool) -> Record {
    let mut window = Window::new(50);
    for &x in rps {
        window.push(x, 0.5);
    }
    let last = *rps.last().expect("a reading");
    let event = Event::new(
        last,
        0.5,
        Utc.timestamp_opt(1_700_000_000 + i64::try_from(version).expect("small"), 0)
            .single()
            .expect("valid"),
    )
    .expect("a valid event");
    let evaluation = AnomalyRule { threshold: 3.0 }.evaluate(&window);
    Record {
        analysis: Analysis::new(Arc::from(device), &event, evaluation, event.timestamp()),
        version,
        checkpoint: checkpoint.then(|| Checkpoint {
            window: Arc::new(window),
            version,
            event_timestamp: event.timestamp(),
            position: Position::default(),
        }),
        held: Held::default(),
    }
}

#[test]
fn log_entries_a_checkpoint_covers_stay_pinned_until_its_batch_is_dropped() {
    let pins = Pins::default();
    let inbox = Inbox::default();
    let (first, second) = (pins.pin(StreamId(1, 0)), pins.pin(StreamId(2, 0)));
    let mut held = Held::default();
    held.hold(&first);
    let mut checkpoint = record("a", &[1.0], 1, true);
    checkpoint.held = held;
    drop(first);
    assert!(!inbox.put(checkpoint));
    // A newer result replaces the checkpoint and inherits both its window and its pins.
    let mut newer = record("a", &[1.0, 2.0], 2, false);
    newer.held.hold(&second);
    drop(second);
    assert!(!inbox.put(newer));
    assert_eq!(pins.oldest(), Some(StreamId(1, 0)));
    // A flush that failed puts its batch back: still pinned.
    let batch = inbox.take();
    inbox.restore(batch);
    assert_eq!(pins.len(), 2);
    // A flush that succeeded drops the batch: the log may be trimmed past both.
    let batch = inbox.take();
    assert!(batch["a"].checkpoint.is_some());
    drop(batch);
    assert!(pins.is_empty());
}

#[test]
fn the_newest_result_per_device_waits_and_a_take_empties_the_inbox() {
    let inbox = Inbox::default();
    assert!(inbox.is_empty());
    assert!(inbox.window("a").is_none());
    assert!(!inbox.put(record("a", &[1.0], 1, true)));
    assert!(!inbox.put(record("a", &[1.0, 2.0], 2, false)));
    assert!(!inbox.put(record("b", &[7.0], 1, false)));
    assert_eq!(inbox.len(), 2);
    assert!(!inbox.is_empty());

    // The newest analysis waits, with the window of the checkpoint it replaced: only
    // checkpoints carry windows.
    let waiting = inbox.window("a").expect("a's checkpoint waits");
    assert_eq!(waiting.version(), 1);
    assert_eq!(waiting.readings(), &[(1.0, 0.5)]);
    assert!(inbox.window("b").is_none(), "b has no checkpoint waiting");

    let batch = inbox.take();
    assert!(inbox.is_empty() && inbox.window("a").is_none());
    assert_eq!(batch.len(), 2);
    let a = &batch["a"];
    assert_eq!((a.version, a.analysis.samples), (2, 2));
    let kept = a.snapshot().expect("coalescing dropped a checkpoint");
    assert_eq!((kept.version(), kept.readings().len()), (1, 1));
    assert!(batch["b"].checkpoint.is_none());
}

#[test]
fn a_newer_checkpoint_replaces_the_waiting_one() {
    let inbox = Inbox::default();
    let _ = inbox.put(record("a", &[1.0], 1, true));
    let _ = inbox.put(record("a", &[1.0, 2.0], 2, false));
    let _ = inbox.put(record("a", &[1.0, 2.0, 3.0], 3, true));
    let waiting = inbox.window("a").expect("a waits");
    assert_eq!(waiting.version(), 3);
    assert_eq!(waiting.readings(), &[(1.0, 0.5), (2.0, 0.5), (3.0, 0.5)]);
    // A late deposit of an older incarnation changes nothing.
    let _ = inbox.put(record("a", &[9.0], 0, true));
    assert_eq!(inbox.window("a").map(|w| w.version()), Some(3));
    assert_eq!(inbox.take()["a"].analysis.samples, 3);
}

#[test]
fn a_failed_flush_is_put_back_under_newer_results_keeping_its_checkpoints() {
    let inbox = Inbox::default();
    let _ = inbox.put(record("a", &[1.0], 1, true));
    let _ = inbox.put(record("b", &[5.0], 1, true));
    let failed = inbox.take();
    // Meanwhile device a reported again (not a checkpoint); b did not.
    let _ = inbox.put(record("a", &[1.0, 3.0], 2, false));
    inbox.restore(failed);

    assert_eq!(inbox.len(), 2);
    let batch = inbox.take();
    let a = &batch["a"];
    assert_eq!(a.version, 2, "the newer result wins over the one put back");
    assert_eq!(
        a.snapshot().map(|w| w.version()),
        Some(1),
        "the failed checkpoint must still be written"
    );
    assert_eq!(
        batch["b"].version, 1,
        "a result with nothing newer is put back"
    );
    assert!(batch["b"].checkpoint.is_some());
}

#[test]
fn the_writer_is_asked_to_flush_early_once_flush_early_at_devices_wait() {
    let inbox = Inbox::default();
    for i in 0..FLUSH_EARLY_AT - 1 {
        assert!(
            !inbox.put(record(&format!("d{i}"), &[1.0], 1, false)),
            "early flush asked at {} devices",
            i + 1
        );
    }
    // Another result of a waiting device adds no device.
    assert!(!inbox.put(record("d0", &[1.0, 2.0], 2, false)));
    assert!(inbox.put(record("last", &[1.0], 1, false)));
    assert_eq!(inbox.len(), FLUSH_EARLY_AT);
    let _ = inbox.take();
    assert!(!inbox.put(record("again", &[1.0], 1, false)));
}

#[test]
fn a_late_checkpoint_of_an_earlier_incarnation_is_never_carried_by_a_newer_one() {
    let (earlier, later) = (1u64 << 40, 2u64 << 40);
    let inbox = Inbox::default();
    // The earlier actor's last checkpoint lands after its successor's first one was
    // flushed: nothing newer waits, so it is taken in.
    let _ = inbox.put(record("a", &[1.0], earlier + 5, true));
    // The successor's next result is no checkpoint: it must not write the earlier
    // incarnation's window back over its own stored one.
    let _ = inbox.put(record("a", &[1.0, 2.0], later + 2, false));
    assert!(inbox.window("a").is_none());
    assert!(inbox.take()["a"].checkpoint.is_none());

    // Put back after a failed flush, likewise.
    let _ = inbox.put(record("b", &[1.0], earlier + 5, true));
    let failed = inbox.take();
    let _ = inbox.put(record("b", &[1.0, 2.0], later + 2, false));
    inbox.restore(failed);
    assert!(inbox.take()["b"].checkpoint.is_none());
}

#[test]
fn a_failed_checkpoint_put_back_under_a_newer_checkpoint_gives_way() {
    let inbox = Inbox::default();
    let _ = inbox.put(record("a", &[1.0], 1, true));
    let failed = inbox.take();
    let _ = inbox.put(record("a", &[1.0, 2.0, 3.0], 3, true));
    inbox.restore(failed);
    let batch = inbox.take();
    let kept = batch["a"].snapshot().expect("a checkpoint");
    assert_eq!((kept.version(), kept.readings().len()), (3, 3));
}
