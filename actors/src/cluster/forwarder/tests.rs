//! The forwarder against a scripted peer, on a paused clock: which events go out in
//! which batches and in what order, how many batches are on the wire at once, what each
//! sender is answered on success, overload and failure, and what the metrics count.

use super::*;
use crate::cluster::PeerState;
use crate::device::BoxFuture;
use crate::metrics::ForwardFailure;
use crate::store::WindowSnapshot;
use bytes::Bytes;
use chrono::Utc;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

const PEER: &str = "10.0.0.2:8081";

/// How long a test waits for something that should happen before it fails (in the
/// paused clock's time: reached at once when nothing else can happen any more).
const GUARD: Duration = Duration::from_secs(10);

/// One batch as the peer received it, decoded, waiting for the test's answer.
struct Request {
    peer: SocketAddr,
    events: Vec<(Arc<str>, Event)>,
    answer: oneshot::Sender<Ack>,
}

impl Request {
    /// The batch as runs of one sender's events: (device, how many). Every sender in
    /// these tests forwards events of a device of its own.
    fn senders(&self) -> Vec<(String, usize)> {
        let mut runs: Vec<(String, usize)> = Vec::new();
        for (device, _) in &self.events {
            match runs.last_mut() {
                Some((d, n)) if **d == **device => *n += 1,
                _ => runs.push((device.to_string(), 1)),
            }
        }
        runs
    }

    /// Answers the batch as the peer would.
    fn answer(self, ack: Ack) {
        self.answer.send(ack).expect("the transport still waits");
    }
}

/// The peer as the test scripts it: every batch it is sent arrives, decoded, on the
/// test's channel, and is answered when the test answers it (a batch the test drops
/// unanswered fails as unreachable). Probes and releases are not needed here.
struct ScriptedPeer {
    requests: mpsc::UnboundedSender<Request>,
}

impl Transport for ScriptedPeer {
    fn send_events(&self, peer: SocketAddr, body: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        let events = wire::decode(body).expect("the forwarder sends well-formed bodies");
        let (answer, answered) = oneshot::channel();
        let _ = self.requests.send(Request {
            peer,
            events,
            answer,
        });
        Box::pin(async move {
            answered
                .await
                .unwrap_or_else(|_| Err(ForwardError::Unreachable("dropped".into())))
        })
    }

    fn ping(&self, _: SocketAddr, _: bool) -> BoxFuture<Result<PeerState, ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }

    fn release(
        &self,
        _: SocketAddr,
        _: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }
}

/// A forwarder's metrics, as a scrape would show them.
struct Counts {
    metrics: Metrics,
    registry: Registry,
}

impl Counts {
    /// `events_forwarded`.
    fn forwarded(&self) -> u64 {
        self.metrics.events_forwarded.get()
    }

    /// `forward_failures` of `reason`.
    fn failures(&self, reason: ForwardFailure) -> u64 {
        self.metrics
            .forward_failures
            .get_or_create(&ForwardFailureLabel { reason })
            .get()
    }

    /// The batches `forward_batch_duration_seconds` has timed.
    fn batches_timed(&self) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix("forward_batch_duration_seconds_count "))
            .expect("the histogram is exposed")
            .parse()
            .expect("a count")
    }
}

/// A forwarder to [`PEER`], the batches it sends, and its metrics.
async fn start() -> (
    ActorRef<ForwarderMsg>,
    mpsc::UnboundedReceiver<Request>,
    Counts,
) {
    let (requests, received) = mpsc::unbounded_channel();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let args = ForwarderArgs {
        peer: PEER.parse().expect("address"),
        transport: Arc::new(ScriptedPeer { requests }),
        metrics: metrics.clone(),
    };
    let (forwarder, _) = Actor::spawn(None, Forwarder, args).await.expect("started");
    (forwarder, received, Counts { metrics, registry })
}

/// `n` events of `device`, their rps counting up from `first` so each is told apart.
fn events(device: &str, first: usize, n: usize) -> Vec<(Arc<str>, Event)> {
    let device: Arc<str> = Arc::from(device);
    (first..first + n)
        .map(|i| {
            let event = Event {
                rps: i as f64,
                cpu: 0.5,
                timestamp: Utc::now(),
            };
            (device.clone(), event)
        })
        .collect()
}

/// What the peer should receive of `events`: (device, rps) in order.
fn sent(events: &[(Arc<str>, Event)]) -> Vec<(String, f64)> {
    events.iter().map(|(d, e)| (d.to_string(), e.rps)).collect()
}

/// Forwards `events` as one sender; answers the receiver of its answer.
fn forward(
    forwarder: &ActorRef<ForwarderMsg>,
    events: Vec<(Arc<str>, Event)>,
) -> oneshot::Receiver<Ack> {
    let (port, answer) = oneshot::channel();
    forwarder
        .cast(ForwarderMsg::Forward(events, port.into()))
        .expect("the forwarder runs");
    answer
}

/// The next batch on the wire; fails the test when none comes within `limit`.
async fn batch_within(received: &mut mpsc::UnboundedReceiver<Request>, limit: Duration) -> Request {
    tokio::time::timeout(limit, received.recv())
        .await
        .unwrap_or_else(|_| panic!("no batch on the wire within {limit:?}"))
        .expect("the forwarder runs")
}

/// The next batch on the wire.
async fn next_batch(received: &mut mpsc::UnboundedReceiver<Request>) -> Request {
    batch_within(received, GUARD).await
}

/// The answer a sender gets.
async fn answer_of(answer: oneshot::Receiver<Ack>) -> Ack {
    tokio::time::timeout(GUARD, answer)
        .await
        .expect("answered in time")
        .expect("answered, not dropped")
}

fn unanswered(answer: &mut oneshot::Receiver<Ack>) -> bool {
    matches!(answer.try_recv(), Err(TryRecvError::Empty))
}

/// Lets ten lingers pass. The clock is paused: this takes no time, and whatever the
/// forwarder would do by then is done; for checking what did not happen.
async fn let_lingers_pass() {
    tokio::time::sleep(LINGER * 10).await;
}

/// Puts [`MAX_IN_FLIGHT`] batches of one event each on the wire, one at a time, and
/// leaves them unanswered: (their senders' answers, the batches).
async fn fill_the_wire(
    forwarder: &ActorRef<ForwarderMsg>,
    received: &mut mpsc::UnboundedReceiver<Request>,
) -> (Vec<oneshot::Receiver<Ack>>, Vec<Request>) {
    let mut answers = Vec::new();
    let mut batches = Vec::new();
    for i in 0..MAX_IN_FLIGHT {
        answers.push(forward(forwarder, events(&format!("early-{i}"), i, 1)));
        let batch = next_batch(received).await;
        assert_eq!(batch.senders(), [(format!("early-{i}"), 1)]);
        batches.push(batch);
    }
    (answers, batches)
}

#[tokio::test(start_paused = true)]
async fn senders_within_one_linger_share_one_batch_in_order_and_get_its_answer() {
    let (forwarder, mut received, metrics) = start().await;
    let (a, b, c) = (events("a", 0, 3), events("b", 10, 2), events("c", 20, 1));
    let expected: Vec<_> = [&a, &b, &c].into_iter().flat_map(|e| sent(e)).collect();
    let mut answers = vec![
        forward(&forwarder, a),
        forward(&forwarder, b),
        forward(&forwarder, c),
    ];
    let batch = next_batch(&mut received).await;
    assert_eq!(batch.peer, PEER.parse().expect("address"));
    assert_eq!(
        sent(&batch.events),
        expected,
        "one batch: each sender's events in order, senders in the order they came"
    );
    assert!(
        answers.iter_mut().all(unanswered),
        "no sender is answered before the peer"
    );
    assert_eq!(metrics.forwarded(), 0);
    batch.answer(Ok(()));
    for answer in answers {
        assert_eq!(answer_of(answer).await, Ok(()));
    }
    assert_eq!(metrics.forwarded(), 6);
    assert_eq!(metrics.batches_timed(), 1);
    for reason in ForwardFailure::ALL {
        assert_eq!(metrics.failures(reason), 0);
    }
    let_lingers_pass().await;
    assert!(received.try_recv().is_err(), "nothing else was sent");
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_out_at_once_without_waiting_for_the_linger() {
    let (forwarder, mut received, _) = start().await;
    let answer = forward(&forwarder, events("a", 0, MAX_BATCH_EVENTS));
    // On the paused clock, half a linger passes only once the forwarder has nothing
    // left to do but wait for a timer.
    let batch = batch_within(&mut received, LINGER / 2).await;
    assert_eq!(batch.senders(), [("a".to_string(), MAX_BATCH_EVENTS)]);
    batch.answer(Ok(()));
    assert_eq!(answer_of(answer).await, Ok(()));
}

#[tokio::test(start_paused = true)]
async fn batches_take_whole_senders_up_to_the_bound_and_each_sender_gets_its_batch_s_answer() {
    let (forwarder, mut received, metrics) = start().await;
    let half = MAX_BATCH_EVENTS / 2;
    let most = MAX_BATCH_EVENTS * 3 / 4;
    let a = forward(&forwarder, events("a", 0, half));
    let b = forward(&forwarder, events("b", 0, half));
    let c = forward(&forwarder, events("c", 0, most));
    let d = forward(&forwarder, events("d", 0, most));
    let mut batches = Vec::new();
    for _ in 0..3 {
        batches.push(next_batch(&mut received).await);
    }
    // Batches on the wire together may reach the peer in any order.
    batches.sort_by_key(|b| b.senders());
    let senders: Vec<_> = batches.iter().map(Request::senders).collect();
    assert_eq!(
        senders,
        [
            vec![("a".to_string(), half), ("b".to_string(), half)],
            vec![("c".to_string(), most)],
            vec![("d".to_string(), most)],
        ],
        "a and b fill a batch exactly; c and d together would not fit in one"
    );
    let mut batches = batches.into_iter();
    let (ab, c_batch, d_batch) = (
        batches.next().expect("a and b"),
        batches.next().expect("c"),
        batches.next().expect("d"),
    );
    c_batch.answer(Err(ForwardError::Rejected(401)));
    assert_eq!(answer_of(c).await, Err(ForwardError::Rejected(401)));
    ab.answer(Ok(()));
    d_batch.answer(Ok(()));
    assert_eq!(answer_of(a).await, Ok(()));
    assert_eq!(answer_of(b).await, Ok(()));
    assert_eq!(answer_of(d).await, Ok(()));
    assert_eq!(
        metrics.forwarded(),
        (2 * half + most) as u64,
        "the events of acknowledged batches"
    );
    assert_eq!(metrics.failures(ForwardFailure::Rejected), 1);
    assert_eq!(metrics.batches_timed(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_sender_with_more_than_a_batch_of_events_goes_out_whole_in_a_batch_of_its_own() {
    let (forwarder, mut received, metrics) = start().await;
    let big = MAX_BATCH_EVENTS + 1000;
    let before = forward(&forwarder, events("before", 0, 1));
    let large = forward(&forwarder, events("large", 0, big));
    let after = forward(&forwarder, events("after", 0, 1));
    let mut batches = Vec::new();
    for _ in 0..3 {
        batches.push(next_batch(&mut received).await);
    }
    let mut senders: Vec<_> = batches.iter().map(Request::senders).collect();
    senders.sort();
    assert_eq!(
        senders,
        [
            vec![("after".to_string(), 1)],
            vec![("before".to_string(), 1)],
            vec![("large".to_string(), big)],
        ]
    );
    for batch in batches {
        batch.answer(Ok(()));
    }
    for answer in [before, large, after] {
        assert_eq!(answer_of(answer).await, Ok(()));
    }
    assert_eq!(metrics.forwarded(), big as u64 + 2);
    let_lingers_pass().await;
    assert!(received.try_recv().is_err(), "nothing else was sent");
}

#[tokio::test(start_paused = true)]
async fn at_most_four_batches_are_on_the_wire_and_senders_arriving_meanwhile_go_next_together() {
    let (forwarder, mut received, metrics) = start().await;
    let (mut early, mut on_wire) = fill_the_wire(&forwarder, &mut received).await;
    let mut later = Vec::new();
    for device in ["x", "y", "z"] {
        later.push(forward(&forwarder, events(device, 0, 2)));
        // Each would have gone alone if a batch could.
        let_lingers_pass().await;
    }
    assert!(received.try_recv().is_err(), "no fifth batch on the wire");
    assert!(later.iter_mut().all(unanswered));
    assert!(early.iter_mut().all(unanswered));

    on_wire.remove(0).answer(Ok(()));
    let next = next_batch(&mut received).await;
    assert_eq!(
        next.senders(),
        [
            ("x".to_string(), 2),
            ("y".to_string(), 2),
            ("z".to_string(), 2)
        ],
        "the waiting senders go together, in order, once a batch returns"
    );
    let mut early = early.into_iter();
    assert_eq!(answer_of(early.next().expect("first")).await, Ok(()));
    next.answer(Ok(()));
    for answer in later {
        assert_eq!(answer_of(answer).await, Ok(()));
    }
    for (batch, answer) in on_wire.into_iter().zip(early) {
        batch.answer(Ok(()));
        assert_eq!(answer_of(answer).await, Ok(()));
    }
    assert_eq!(metrics.forwarded(), MAX_IN_FLIGHT as u64 + 6);
    assert_eq!(metrics.batches_timed(), MAX_IN_FLIGHT as u64 + 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_fails_its_senders_and_every_sender_waiting_behind_it_at_once() {
    for (error, reason) in [
        (ForwardError::Timeout, ForwardFailure::Timeout),
        (
            ForwardError::Unreachable("connection refused".into()),
            ForwardFailure::Unreachable,
        ),
        (ForwardError::Rejected(401), ForwardFailure::Rejected),
    ] {
        let (forwarder, mut received, metrics) = start().await;
        let (early, mut on_wire) = fill_the_wire(&forwarder, &mut received).await;
        let waiting = [
            forward(&forwarder, events("x", 0, 2)),
            forward(&forwarder, events("y", 0, 1)),
        ];
        let_lingers_pass().await;
        let mut early = early.into_iter();

        on_wire.remove(0).answer(Err(error.clone()));
        assert_eq!(
            answer_of(early.next().expect("first")).await,
            Err(error.clone())
        );
        for answer in waiting {
            assert_eq!(
                answer_of(answer).await,
                Err(error.clone()),
                "told at once, to re-route"
            );
        }
        // The batches already on the wire get their own answers.
        for (batch, answer) in on_wire.into_iter().zip(early) {
            batch.answer(Ok(()));
            assert_eq!(answer_of(answer).await, Ok(()));
        }
        let_lingers_pass().await;
        assert!(
            received.try_recv().is_err(),
            "the failed senders' events are not sent ({error})"
        );
        for r in ForwardFailure::ALL {
            assert_eq!(metrics.failures(r), u64::from(r == reason), "{error}");
        }
        assert_eq!(metrics.forwarded(), MAX_IN_FLIGHT as u64 - 1);
        assert_eq!(metrics.batches_timed(), MAX_IN_FLIGHT as u64);

        // A later sender is sent as usual.
        let later = forward(&forwarder, events("z", 0, 1));
        let batch = next_batch(&mut received).await;
        assert_eq!(batch.senders(), [("z".to_string(), 1)]);
        batch.answer(Ok(()));
        assert_eq!(answer_of(later).await, Ok(()));
    }
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_peer_refuses_only_that_batch_and_no_failure_is_counted() {
    let (forwarder, mut received, metrics) = start().await;
    let (early, mut on_wire) = fill_the_wire(&forwarder, &mut received).await;
    let waiting = forward(&forwarder, events("x", 0, 2));
    let_lingers_pass().await;
    let mut early = early.into_iter();

    on_wire.remove(0).answer(Err(ForwardError::Overloaded));
    assert_eq!(
        answer_of(early.next().expect("first")).await,
        Err(ForwardError::Overloaded)
    );
    let next = next_batch(&mut received).await;
    assert_eq!(
        next.senders(),
        [("x".to_string(), 2)],
        "the waiting sender still goes"
    );
    next.answer(Ok(()));
    assert_eq!(answer_of(waiting).await, Ok(()));
    for (batch, answer) in on_wire.into_iter().zip(early) {
        batch.answer(Ok(()));
        assert_eq!(answer_of(answer).await, Ok(()));
    }
    for reason in ForwardFailure::ALL {
        assert_eq!(metrics.failures(reason), 0, "an overload is not a failure");
    }
    assert_eq!(
        metrics.forwarded(),
        MAX_IN_FLIGHT as u64 + 1,
        "all but the refused event"
    );
    assert_eq!(metrics.batches_timed(), MAX_IN_FLIGHT as u64 + 1);
}

#[tokio::test(start_paused = true)]
async fn a_forwarder_goes_on_through_many_batches_and_senders_that_stopped_waiting() {
    let (forwarder, mut received, metrics) = start().await;
    let rounds = 3 * MAX_IN_FLIGHT;
    for round in 0..rounds {
        let answer = forward(&forwarder, events("d", 2 * round, 2));
        let batch = next_batch(&mut received).await;
        assert_eq!(
            sent(&batch.events),
            [
                ("d".to_string(), (2 * round) as f64),
                ("d".to_string(), (2 * round + 1) as f64)
            ]
        );
        if round == 1 {
            // This sender gave up (its call timed out) before the peer answered.
            drop(answer);
            batch.answer(Ok(()));
        } else {
            batch.answer(Ok(()));
            assert_eq!(answer_of(answer).await, Ok(()), "round {round}");
        }
    }
    assert_eq!(metrics.forwarded(), 2 * rounds as u64);
    assert_eq!(metrics.batches_timed(), rounds as u64);
}
