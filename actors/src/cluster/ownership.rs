//! This node's copy of the shard table, and the shards it admits events for.
//!
//! Each shard has a small state under its own `std::sync::Mutex` (held for a lookup or a
//! push onto a device's queue, never across an `.await`): the owner and epoch the table
//! last said, and what this node does with it ([`Local`]). Events of a shard are queued
//! here only while holding that lock and only while the shard is [`Local::Active`] and
//! this node's lease is valid; a handoff switches the shard to [`Local::Moving`] under the
//! same lock, so no event slips into a shard after its handoff has begun.
//!
//! The lease: a node admits events only until one lease (minus one heartbeat interval)
//! after the start of its last successful heartbeat. Its heartbeat key in Redis expires a
//! lease after the heartbeat *arrived*, later than that, and only then can another node
//! take its shards; so a node that is paused or cut off from Redis stops admitting before
//! anyone else starts.

use super::shards::shard_of;
use super::table::{Entries, Entry};
use crate::store::Fence;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;
use tokio::time::Instant;

/// What this node does with a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Not this node's: its events go to the owner.
    No,
    /// This node owns it and admits its events.
    Active,
    /// This node owns it and is handing it off: its events wait for the new owner.
    Moving,
    /// This node owns it and replays the ingest log of its previous owner (or its own,
    /// after it was declared dead) before it admits its events: they wait.
    Replaying,
}

/// One shard as this node knows it.
#[derive(Debug, Clone)]
pub struct ShardState {
    /// The owner the table names, if any.
    pub owner: Option<Arc<str>>,
    /// The table's epoch of the shard.
    pub epoch: u64,
    /// What this node does with it.
    pub local: Local,
}

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Queued here (done under the shard's lock).
    Local,
    /// To the owner at this address.
    Remote(SocketAddr),
    /// Nowhere yet: the shard is moving, has no owner, or this node's lease lapsed.
    Wait,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The internal address in a node id (`<ip:port>#<incarnation>`).
pub fn addr_of(id: &str) -> Option<SocketAddr> {
    id.rsplit_once('#')?.0.parse().ok()
}

/// This node's view of ownership; shared by routing, the heartbeat and the store's fence.
#[derive(Debug)]
pub struct Ownership {
    me: Arc<str>,
    shards: u32,
    states: Vec<Mutex<ShardState>>,
    origin: Instant,
    /// Milliseconds after `origin` until which this node may admit events (0: not yet).
    lease_until: AtomicU64,
    /// Bumped on every change that can unblock a waiting event.
    changed: watch::Sender<u64>,
    /// Shards the store's fence refused: dropped by the next heartbeat round.
    lost: Mutex<Vec<u32>>,
    /// Wall-clock milliseconds of the last renewal that followed a lapse of the lease
    /// (0: none). Batches forwarded before it may have been given up on by their senders
    /// (who saw this node's heartbeat expire) and sent elsewhere: they are refused.
    rejoined_at: AtomicU64,
    /// Asks the heartbeat loop for a round now.
    round: tokio::sync::Notify,
}

impl Ownership {
    /// Nothing owned yet, for node `me`.
    pub fn new(me: Arc<str>, shards: u32) -> Self {
        let shards = shards.max(1);
        Self {
            me,
            shards,
            states: (0..shards)
                .map(|_| {
                    Mutex::new(ShardState {
                        owner: None,
                        epoch: 0,
                        local: Local::No,
                    })
                })
                .collect(),
            origin: Instant::now(),
            lease_until: AtomicU64::new(0),
            changed: watch::channel(0).0,
            lost: Mutex::new(Vec::new()),
            rejoined_at: AtomicU64::new(0),
            round: tokio::sync::Notify::new(),
        }
    }

    /// This node's id.
    pub fn me(&self) -> &Arc<str> {
        &self.me
    }

    /// The shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of `device`.
    pub fn shard(&self, device: &str) -> u32 {
        shard_of(device, self.shards)
    }

    fn lock(&self, shard: u32) -> MutexGuard<'_, ShardState> {
        // Nothing panics while holding this lock; recover rather than propagate a poison.
        self.states[shard as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of shard `s`'s state.
    pub fn state(&self, shard: u32) -> ShardState {
        self.lock(shard).clone()
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Extends the lease to `until` (never shortens it); records when it had lapsed.
    pub fn renew_lease(&self, until: Instant) {
        let before = self
            .lease_until
            .fetch_max(self.millis(until).max(1), Ordering::AcqRel);
        if before != 0 && self.millis(Instant::now()) >= before {
            self.rejoined_at.store(unix_millis(), Ordering::Release);
        }
        self.notify();
    }

    /// Asks the heartbeat loop for a round now.
    pub fn want_round(&self) {
        self.round.notify_one();
    }

    /// Resolves when a round is wanted.
    pub async fn round_wanted(&self) {
        self.round.notified().await;
    }

    /// When this node last renewed a lapsed lease (wall-clock ms; 0: never).
    pub fn rejoined_at(&self) -> u64 {
        self.rejoined_at.load(Ordering::Acquire)
    }

    /// Whether this node may admit events now.
    pub fn lease_valid(&self) -> bool {
        self.millis(Instant::now()) < self.lease_until.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever a waiting event may have somewhere to go.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether this node's lease ran out since it was last renewed (it may have been
    /// declared dead meanwhile).
    pub fn lease_lapsed(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until != 0 && self.millis(Instant::now()) >= until
    }

    /// Routes an event of `shard`; when the route is [`Route::Local`], runs `admit` under
    /// the shard's lock (the push onto the device's queue, given the shard's epoch) and
    /// answers its result.
    pub fn route<R>(&self, shard: u32, admit: impl FnOnce(u64) -> R) -> Result<R, Route> {
        let state = self.lock(shard);
        match state.local {
            Local::Active if self.lease_valid() => Ok(admit(state.epoch)),
            Local::Active | Local::Moving | Local::Replaying => Err(Route::Wait),
            Local::No => Err(
                match state
                    .owner
                    .as_deref()
                    .filter(|o| *o != &*self.me)
                    .and_then(addr_of)
                {
                    Some(addr) => Route::Remote(addr),
                    None => Route::Wait,
                },
            ),
        }
    }

    /// Takes in the table as read. Answers the shards this node adopted (now its own)
    /// and those it lost without handing them off (another node owns them now: their
    /// device actors must go).
    pub fn apply(&self, entries: &Entries) -> (Vec<u32>, Vec<u32>) {
        let mut adopted = Vec::new();
        let mut lost = Vec::new();
        for (s, entry) in entries.iter().enumerate() {
            let s = s as u32;
            let mut state = self.lock(s);
            match entry {
                // Read before a change this node made itself (a pass of its own handoff,
                // which runs beside the heartbeat): this node knows better.
                Some(Entry { epoch, .. }) if *epoch < state.epoch => {}
                Some(Entry { owner, epoch }) if *owner == self.me => {
                    if state.local == Local::No {
                        state.local = Local::Active;
                        adopted.push(s);
                    }
                    state.owner = Some(owner.clone());
                    state.epoch = *epoch;
                }
                // A handoff of ours under way: it settles the shard itself.
                _ if state.local == Local::Moving => {}
                // No entry while this node holds the shard: Redis lost the table. The
                // shard stays here, and this node claims it again (see the heartbeat).
                None if state.local == Local::Active => state.owner = None,
                other => {
                    if matches!(state.local, Local::Active | Local::Replaying) {
                        state.local = Local::No;
                        lost.push(s);
                    }
                    state.owner = other.as_ref().map(|e| e.owner.clone());
                    state.epoch = other.as_ref().map_or(state.epoch, |e| e.epoch);
                }
            }
        }
        if !adopted.is_empty() || !lost.is_empty() || entries.iter().any(Option::is_some) {
            self.notify();
        }
        (adopted, lost)
    }

    /// Shards this node holds that the table has no entry for (Redis lost it), with
    /// their epochs: this node claims them again first.
    pub fn orphans(&self) -> Vec<(u32, u64)> {
        (0..self.shards)
            .filter_map(|s| {
                let state = self.lock(s);
                (state.local == Local::Active && state.owner.is_none()).then_some((s, state.epoch))
            })
            .collect()
    }

    /// Records shards this node has just claimed, with their epochs: active, or
    /// replaying (events wait) when `replay`.
    pub fn claimed(&self, claimed: &[(u32, u64)], replay: bool) {
        for (s, epoch) in claimed {
            let mut state = self.lock(*s);
            state.owner = Some(self.me.clone());
            state.epoch = *epoch;
            state.local = if replay {
                Local::Replaying
            } else {
                Local::Active
            };
        }
        self.notify();
    }

    /// Admits the events of replayed shards from now on (those still replaying here at
    /// the same epoch).
    pub fn replayed(&self, shards: &[(u32, u64)]) {
        for (s, epoch) in shards {
            let mut state = self.lock(*s);
            if state.local == Local::Replaying && state.epoch == *epoch {
                state.local = Local::Active;
            }
        }
        self.notify();
    }

    /// Stops admitting every active shard (they are replayed before they are admitted
    /// again); answers them.
    pub fn suspend(&self) -> Vec<u32> {
        (0..self.shards)
            .filter(|s| {
                let mut state = self.lock(*s);
                let active = state.local == Local::Active;
                if active {
                    state.local = Local::Replaying;
                }
                active
            })
            .collect()
    }

    /// Starts handing off shard `s`: answers its epoch if it was active here.
    pub fn begin_move(&self, s: u32) -> Option<u64> {
        let mut state = self.lock(s);
        (state.local == Local::Active && state.owner.as_deref() == Some(&*self.me)).then(|| {
            state.local = Local::Moving;
            state.epoch
        })
    }

    /// Ends a handoff of `s`: passed to `to` (epoch + 1), or not (stays active here).
    pub fn end_move(&self, s: u32, passed_to: Option<&Arc<str>>) {
        let mut state = self.lock(s);
        if state.local != Local::Moving {
            return;
        }
        match passed_to {
            Some(to) => {
                state.owner = Some(to.clone());
                state.epoch += 1;
                state.local = Local::No;
            }
            None => state.local = Local::Active,
        }
        drop(state);
        self.notify();
    }

    /// Shards whose writes the store refused since the last call.
    pub fn take_lost(&self) -> Vec<u32> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Shards this node owns (active or moving).
    pub fn owned(&self) -> Vec<(u32, u64, Local)> {
        (0..self.shards)
            .filter_map(|s| {
                let state = self.lock(s);
                (state.local != Local::No).then_some((s, state.epoch, state.local))
            })
            .collect()
    }

    /// Every shard's owner as this node knows it.
    pub fn owners(&self) -> Vec<Option<Arc<str>>> {
        (0..self.shards)
            .map(|s| self.lock(s).owner.clone())
            .collect()
    }
}

impl Fence for Ownership {
    fn owner(&self) -> &str {
        &self.me
    }

    fn lease(&self, device: &str) -> Option<(u32, u64)> {
        let s = self.shard(device);
        let state = self.lock(s);
        (state.local != Local::No).then_some((s, state.epoch))
    }

    fn orphaned(&self, shards: &[u32]) {
        tracing::warn!(shards = shards.len(), "the cluster table has no entry for shards this node holds (Redis restarted empty?); claiming them again");
        self.want_round();
    }

    fn lost(&self, shards: &[u32]) {
        let mut dropped = Vec::new();
        for &s in shards {
            let mut state = self.lock(s);
            if state.local != Local::No {
                state.local = Local::No;
                state.owner = None;
                dropped.push(s);
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(shards = ?dropped, "the table refused this node's writes: these shards have another owner now");
            self.lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(dropped);
            self.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(owner: &str, epoch: u64) -> Option<Entry> {
        Some(Entry {
            owner: Arc::from(owner),
            epoch,
        })
    }

    #[tokio::test]
    async fn routes_follow_the_table_and_the_lease() {
        let me: Arc<str> = Arc::from("10.0.0.1:8081#a");
        let o = Ownership::new(me.clone(), 2);
        // Nothing known: wait.
        assert_eq!(o.route(0, |_| ()), Err(Route::Wait));
        o.apply(&vec![
            entry("10.0.0.1:8081#a", 3),
            entry("10.0.0.2:8081#b", 7),
        ]);
        // Mine, but no lease yet: wait.
        assert_eq!(o.route(0, |_| ()), Err(Route::Wait));
        o.renew_lease(Instant::now() + std::time::Duration::from_secs(5));
        assert_eq!(o.route(0, |epoch| epoch), Ok(3));
        assert_eq!(
            o.route(1, |_| ()),
            Err(Route::Remote("10.0.0.2:8081".parse().expect("addr")))
        );
        assert_eq!(o.lease("x").map(|(_, e)| e).is_some(), o.shard("x") == 0);
        // Moving: events wait, writes still go out under the old epoch.
        assert_eq!(o.begin_move(0), Some(3));
        assert_eq!(o.route(0, |_| ()), Err(Route::Wait));
        assert_eq!(o.state(0).local, Local::Moving);
        let to: Arc<str> = Arc::from("10.0.0.3:8081#c");
        o.end_move(0, Some(&to));
        assert_eq!(
            o.route(0, |_| ()),
            Err(Route::Remote("10.0.0.3:8081".parse().expect("addr")))
        );
        assert_eq!(o.state(0).epoch, 4);
    }

    #[tokio::test]
    async fn a_table_read_before_this_node_passed_a_shard_does_not_give_it_back() {
        let me = "10.0.0.1:8081#a";
        let o = Ownership::new(Arc::from(me), 1);
        o.apply(&vec![entry(me, 5)]);
        assert_eq!(o.begin_move(0), Some(5));
        let to: Arc<str> = Arc::from("10.0.0.2:8081#b");
        o.end_move(0, Some(&to));
        // A heartbeat that read the table just before the pass.
        let (adopted, lost) = o.apply(&vec![entry(me, 5)]);
        assert!(adopted.is_empty() && lost.is_empty());
        assert_eq!(o.state(0).local, Local::No);
        assert_eq!(o.state(0).owner.as_deref(), Some(&*to));
        // The next read agrees.
        o.apply(&vec![entry("10.0.0.2:8081#b", 6)]);
        assert_eq!(o.state(0).local, Local::No);
    }

    #[tokio::test]
    async fn a_held_shard_missing_from_the_table_stays_and_is_an_orphan() {
        let me = "10.0.0.1:8081#a";
        let o = Ownership::new(Arc::from(me), 2);
        o.apply(&vec![entry(me, 4), entry("10.0.0.2:8081#b", 1)]);
        o.renew_lease(Instant::now() + std::time::Duration::from_secs(5));
        let (adopted, lost) = o.apply(&vec![None, None]);
        assert!(adopted.is_empty() && lost.is_empty());
        assert_eq!(o.orphans(), vec![(0, 4)]);
        assert_eq!(o.route(0, |_| 1), Ok(1), "still admitted here");
        o.claimed(&[(0, 5)], false);
        assert!(o.orphans().is_empty());
        assert_eq!(o.lease("x").is_some(), o.shard("x") == 0);
    }

    #[tokio::test]
    async fn replaying_shards_wait_and_are_admitted_once_replayed_at_their_epoch() {
        let me = "10.0.0.1:8081#a";
        let o = Ownership::new(Arc::from(me), 3);
        o.renew_lease(Instant::now() + std::time::Duration::from_secs(5));
        o.claimed(&[(0, 4)], true);
        o.claimed(&[(1, 2)], false);
        assert_eq!(
            o.route(0, |_| ()),
            Err(Route::Wait),
            "replaying: events wait"
        );
        assert_eq!(o.route(1, |epoch| epoch), Ok(2));
        assert!(o.lease("x").is_some() || o.shard("x") == 2, "writes go out");
        // A replay of another epoch admits nothing.
        o.replayed(&[(0, 3)]);
        assert_eq!(o.route(0, |_| ()), Err(Route::Wait));
        o.replayed(&[(0, 4)]);
        assert_eq!(o.route(0, |epoch| epoch), Ok(4));
        // A lapse suspends every active shard: replayed again before it is admitted.
        let mut suspended = o.suspend();
        suspended.sort_unstable();
        assert_eq!(suspended, vec![0, 1]);
        assert_eq!(o.route(1, |_| ()), Err(Route::Wait));
        assert!(o.suspend().is_empty());
        // Taken by another node meanwhile: lost.
        let (_, lost) = o.apply(&vec![entry("10.0.0.2:8081#b", 5), entry(me, 2), None]);
        assert_eq!(lost, vec![0]);
        assert_eq!(o.state(1).local, Local::Replaying);
    }

    #[tokio::test]
    async fn a_shard_taken_by_another_node_is_lost_and_refused_writes_drop_it() {
        let o = Ownership::new(Arc::from("10.0.0.1:8081#a"), 2);
        o.apply(&vec![
            entry("10.0.0.1:8081#a", 1),
            entry("10.0.0.1:8081#a", 1),
        ]);
        let (adopted, lost) = o.apply(&vec![
            entry("10.0.0.2:8081#b", 2),
            entry("10.0.0.1:8081#a", 1),
        ]);
        assert!(adopted.is_empty());
        assert_eq!(lost, vec![0]);
        o.lost(&[1]);
        assert_eq!(o.take_lost(), vec![1]);
        assert_eq!(o.state(1).local, Local::No);
        assert!(o.owned().is_empty());
    }
}
