//! Presence: who is online, and since when they are not. Owns the two halves of it:
//!
//! - [`Tracker`]: this node's users. It counts each user's *visible* connections here
//!   (authenticated, handshake complete, not hidden) and decides which changes are published:
//!   online at the first visible connection, offline [`GRACE`] after the last one ended (a
//!   reconnect within the grace publishes nothing, so a flapping connection publishes at most
//!   one online and one offline per [`GRACE`]). Sans-IO: every call takes the time, and the
//!   tests drive it with simulated time.
//! - [`Book`]: the cluster's view, per user the nodes that show them online and when they were
//!   last seen. This node's published changes and its peers' (the mesh's presence lane, with a
//!   snapshot whenever a link comes up) both land here; a user is online while any node shows
//!   them, which is how a user's devices on two nodes (during a ring change) are one state.
//!   It records which users' cluster-wide state flipped, from whatever source.
//!
//! The node ([`crate::node::Node::presence_tick`]) publishes the tracker's due changes every
//! [`TICK`], into the book and to every peer. Then, for each user whose state flipped in the
//! book since the last tick and whose **home** (ring owner) is this node, it pushes the
//! user's current state as a `PresenceEvent` to their contacts (the users they share a 1:1
//! chat with, at most [`MAX_FANOUT`]) through the router: one `Deliver` per node, whatever
//! the number of contacts there. One node per user pushes, and it pushes what its book holds
//! after every update it applied, so the contacts' last push is the cluster's final state
//! even when a user's devices on two nodes come and go at once, or a node leaves (its users'
//! new homes push their offline: a ring change marks every user it moved here as flipped, so
//! a flip seen while the home was the leaving node is pushed). A push that fails (the
//! contacts unreadable) is retried at the next tick.
//!
//! What it does not do: it stores nothing. Last seen lives in the nodes' memory: a node that
//! restarts knows the last seen of no one until they are seen again (0, "unknown"), and a
//! user who went offline on a node while the link to it was down is last seen, on the other
//! side, when the link came back. A node that is down but still a member (a static cluster)
//! keeps its users as they were on the other nodes until it comes back; its users' contacts
//! are told of them again when they reconnect (their home pushes), not of those who do not.
//! During a ring change an old and a new home may both push, and a contact can get them out
//! of order: each state carries when it began (`changed_unix_ms`, the clock of the node that
//! saw it), and clients keep the later. A node that just started answers from what snapshots
//! have brought so far; a node that drops out of the member set and comes straight back
//! leaves its users shown offline (pushed by their interim homes) until their next change.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dashmap::DashMap;
pub use meshchat_backplane::delivery::PresenceChange;
use meshchat_idgen::{NodeId, UserId};
use parking_lot::Mutex;

/// How long a user with no visible connection left is still shown online.
pub const GRACE: Duration = Duration::from_secs(5);
/// How often the node publishes due changes.
pub const TICK: Duration = Duration::from_millis(250);
/// Most contacts one change is pushed to.
pub const MAX_FANOUT: usize = 10_000;
/// Most contacts in one `PresenceList`.
pub const MAX_QUERY: usize = 1_000;
/// Most pushes one tick makes; the rest wait for the next ticks (a ring change can flip a
/// node's worth of users at once).
pub const MAX_PUSHES_PER_TICK: usize = 2_000;
/// Users a ring change moves here are pushed again if online, or offline for less than this.
pub const RECENT: Duration = Duration::from_secs(60);
/// Users the book remembers; past it, housekeeping forgets the offline ones.
pub const MAX_REMEMBERED: usize = 2_000_000;

/// One of this node's users.
#[derive(Debug, Default)]
struct Local {
    /// Visible connections here.
    devices: u32,
    /// What was last published (false: offline, or never published).
    published: bool,
    /// When `devices` last fell to 0.
    zero_since: Option<Instant>,
    /// Unix ms of that moment (the user's last seen once offline is published).
    last_seen_ms: u64,
    /// Unix ms the first of the visible connections now counted came (while published
    /// online: when the user came online here).
    online_since_ms: u64,
}

/// This node's users' visible connections, and the changes due to be published.
#[derive(Debug, Default)]
pub struct Tracker {
    users: HashMap<UserId, Local>,
    /// Users whose published state may differ from their devices.
    dirty: HashSet<UserId>,
}

impl Tracker {
    /// A visible connection of `user` began at `now_ms` (Unix ms).
    pub fn connected(&mut self, user: UserId, now_ms: u64) {
        let u = self.users.entry(user).or_default();
        // A reconnect within the grace keeps the online it never left.
        if u.devices == 0 && !u.published {
            u.online_since_ms = now_ms;
        }
        u.devices += 1;
        u.zero_since = None;
        self.dirty.insert(user);
    }

    /// A visible connection of `user` ended at `now` (`now_ms` in Unix ms).
    pub fn disconnected(&mut self, user: UserId, now: Instant, now_ms: u64) {
        let Some(u) = self.users.get_mut(&user) else {
            return;
        };
        u.devices = u.devices.saturating_sub(1);
        if u.devices == 0 {
            u.zero_since = Some(now);
            u.last_seen_ms = now_ms;
            self.dirty.insert(user);
        }
    }

    /// The changes due at `now`, marked published.
    pub fn due(&mut self, now: Instant) -> Vec<PresenceChange> {
        let mut out = Vec::new();
        let users = &mut self.users;
        self.dirty.retain(|user| {
            let Some(u) = users.get_mut(user) else {
                return false;
            };
            let want = u.devices > 0;
            if want == u.published {
                if !want {
                    users.remove(user);
                }
                return false;
            }
            if !want && u.zero_since.is_some_and(|t| now.duration_since(t) < GRACE) {
                // Still within the grace: wait.
                return true;
            }
            out.push(PresenceChange {
                user: *user,
                online: want,
                at_ms: if want {
                    u.online_since_ms
                } else {
                    u.last_seen_ms
                },
            });
            if want {
                u.published = true;
            } else {
                users.remove(user);
            }
            false
        });
        out
    }

    /// Every user published online here (a peer's snapshot).
    pub fn online(&self) -> Vec<PresenceChange> {
        self.users
            .iter()
            .filter(|(_, u)| u.published)
            .map(|(user, u)| PresenceChange {
                user: *user,
                online: true,
                at_ms: u.online_since_ms,
            })
            .collect()
    }

    /// Visible connections of `user` here.
    pub fn devices(&self, user: UserId) -> u32 {
        self.users.get(&user).map_or(0, |u| u.devices)
    }

    /// Users tracked (the memory bound: users with a visible connection or a change due).
    pub fn tracked(&self) -> usize {
        self.users.len()
    }
}

/// A user in the cluster's view.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The nodes that show the user online (one, except during a ring change).
    nodes: Vec<NodeId>,
    /// Unix ms the user was last seen (0: unknown).
    last_seen_ms: u64,
    /// Unix ms the user's cluster-wide state last flipped (0: unknown).
    changed_ms: u64,
}

/// A user's presence as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// Online on some node.
    pub online: bool,
    /// When last seen (Unix ms; 0 while online or when unknown).
    pub last_seen_ms: u64,
    /// When this state began (Unix ms; 0 when unknown): the later of two states is newer.
    pub changed_ms: u64,
}

/// The cluster's presence as this node knows it.
#[derive(Debug, Default)]
pub struct Book {
    users: DashMap<UserId, Seen>,
    /// Users whose cluster-wide state flipped since [`Book::take_flipped`] (at most every
    /// user remembered).
    flipped: Mutex<HashSet<UserId>>,
    /// Snapshot parts waiting for their last part, per peer (at most that peer's online
    /// users).
    pending: Mutex<HashMap<NodeId, Vec<PresenceChange>>>,
}

/// The time of a flip: `at`, and always after the previous flip's (`prev`), so that of two
/// states of one user the later one is the newer, even when a clock said otherwise.
fn stamp(prev: u64, at: u64) -> u64 {
    at.max(prev + 1)
}

impl Book {
    /// Applies `node`'s change; returns the user's cluster-wide state when it flipped (and
    /// records the flip for [`Book::take_flipped`]).
    pub fn apply(&self, node: NodeId, c: &PresenceChange) -> Option<State> {
        let flip = self.apply_entry(node, c);
        if flip.is_some() {
            self.flipped.lock().insert(c.user);
        }
        flip
    }

    /// Presence from peer `node` (see `LocalDelivery::presence_from`): a change applies at
    /// once; a snapshot (`full`, continued while `more`) applies whole once its last part is
    /// in: the users `node` no longer lists are offline from `now_ms`, the others keep their
    /// state (and its time) unless it changed.
    pub fn from_peer(
        &self,
        node: NodeId,
        full: bool,
        more: bool,
        changes: Vec<PresenceChange>,
        now_ms: u64,
    ) {
        // An online state with no time (a node of an older version) began now.
        let changes = changes.into_iter().map(|mut c| {
            if c.online && c.at_ms == 0 {
                c.at_ms = now_ms;
            }
            c
        });
        let snapshot = {
            let mut pending = self.pending.lock();
            if full {
                pending.insert(node, changes.collect());
            } else if let Some(part) = pending.get_mut(&node) {
                part.extend(changes);
            } else {
                drop(pending);
                for c in changes {
                    self.apply(node, &c);
                }
                return;
            }
            if more {
                return;
            }
            pending.remove(&node).unwrap_or_default()
        };
        let listed: HashSet<UserId> = snapshot
            .iter()
            .filter(|c| c.online)
            .map(|c| c.user)
            .collect();
        let mut flipped = Vec::new();
        for mut seen in self.users.iter_mut() {
            if seen.nodes.contains(&node) && !listed.contains(seen.key()) {
                seen.nodes.retain(|n| *n != node);
                if seen.nodes.is_empty() {
                    seen.last_seen_ms = seen.last_seen_ms.max(now_ms);
                    seen.changed_ms = stamp(seen.changed_ms, now_ms);
                    flipped.push(*seen.key());
                }
            }
        }
        self.flipped.lock().extend(flipped);
        for c in &snapshot {
            self.apply(node, c);
        }
    }

    /// The users whose cluster-wide state flipped since the last call.
    pub fn take_flipped(&self) -> Vec<UserId> {
        self.flipped.lock().drain().collect()
    }

    /// Records `user` as flipped again (its push failed: retried at the next take).
    pub fn reflip(&self, user: UserId) {
        self.flipped.lock().insert(user);
    }

    /// Records as flipped every user for whom `moved_here` holds (the ring moved their home to
    /// this node) and whose last push may have been lost with their old home: the online ones,
    /// and those offline for less than [`RECENT`] at `now_ms`. Their state is pushed once
    /// more, from here; users offline for longer were pushed offline long ago.
    pub fn reflip_where(&self, now_ms: u64, moved_here: impl Fn(UserId) -> bool) {
        let recent = RECENT.as_millis() as u64;
        let moved: Vec<UserId> = self
            .users
            .iter()
            .filter(|e| !e.nodes.is_empty() || now_ms.saturating_sub(e.last_seen_ms) < recent)
            .map(|e| *e.key())
            .filter(|u| moved_here(*u))
            .collect();
        self.flipped.lock().extend(moved);
    }

    fn apply_entry(&self, node: NodeId, c: &PresenceChange) -> Option<State> {
        let mut seen = self.users.entry(c.user).or_default();
        let before = !seen.nodes.is_empty();
        if c.online {
            if !seen.nodes.contains(&node) {
                seen.nodes.push(node);
            }
        } else {
            seen.nodes.retain(|n| *n != node);
            seen.last_seen_ms = seen.last_seen_ms.max(c.at_ms);
        }
        let after = !seen.nodes.is_empty();
        if before == after {
            return None;
        }
        seen.changed_ms = stamp(seen.changed_ms, c.at_ms);
        Some(State {
            online: after,
            last_seen_ms: if after { 0 } else { seen.last_seen_ms },
            changed_ms: seen.changed_ms,
        })
    }

    /// `node` shows nobody online any more (it left the member set); users only it showed are
    /// last seen at `now_ms` unless it said otherwise.
    pub fn forget_node(&self, node: NodeId, now_ms: u64) {
        let mut flipped = Vec::new();
        for mut seen in self.users.iter_mut() {
            let before = seen.nodes.len();
            seen.nodes.retain(|n| *n != node);
            if before > 0 && seen.nodes.is_empty() {
                seen.last_seen_ms = seen.last_seen_ms.max(now_ms);
                seen.changed_ms = stamp(seen.changed_ms, now_ms);
                flipped.push(*seen.key());
            }
        }
        self.flipped.lock().extend(flipped);
    }

    /// `user`'s state.
    pub fn state(&self, user: UserId) -> State {
        match self.users.get(&user) {
            Some(s) => State {
                online: !s.nodes.is_empty(),
                last_seen_ms: if s.nodes.is_empty() {
                    s.last_seen_ms
                } else {
                    0
                },
                changed_ms: s.changed_ms,
            },
            None => State {
                online: false,
                last_seen_ms: 0,
                changed_ms: 0,
            },
        }
    }

    /// Forgets offline users past [`MAX_REMEMBERED`] (their last seen becomes unknown).
    pub fn housekeeping(&self) {
        if self.users.len() > MAX_REMEMBERED {
            self.users.retain(|_, s| !s.nodes.is_empty());
            self.users.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: UserId = UserId(1);
    const BOB: UserId = UserId(2);

    /// Simulated time: an origin and an offset.
    struct Clock(Instant, Duration);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now(), Duration::ZERO)
        }
        fn now(&self) -> Instant {
            self.0 + self.1
        }
        fn ms(&self) -> u64 {
            1_000_000 + self.1.as_millis() as u64
        }
        fn advance(&mut self, d: Duration) {
            self.1 += d;
        }
    }

    fn online_at(user: UserId, at: u64) -> PresenceChange {
        PresenceChange {
            user,
            online: true,
            at_ms: at,
        }
    }

    fn online(user: UserId) -> PresenceChange {
        online_at(user, 1)
    }

    fn offline(user: UserId, at: u64) -> PresenceChange {
        PresenceChange {
            user,
            online: false,
            at_ms: at,
        }
    }

    #[test]
    fn online_at_the_first_device_offline_a_grace_after_the_last() {
        let mut t = Tracker::default();
        let mut clock = Clock::new();
        t.connected(ALICE, clock.ms());
        t.connected(ALICE, clock.ms());
        assert_eq!(
            t.due(clock.now()),
            vec![online_at(ALICE, 1_000_000)],
            "online since the first device came"
        );
        assert_eq!(t.due(clock.now()), vec![], "published once");
        clock.advance(Duration::from_secs(1));
        t.disconnected(ALICE, clock.now(), clock.ms());
        assert_eq!(t.due(clock.now()), vec![], "a device is left");
        let last = clock.ms();
        t.disconnected(ALICE, clock.now(), last);
        clock.advance(GRACE - Duration::from_millis(1));
        assert_eq!(t.due(clock.now()), vec![], "within the grace");
        clock.advance(Duration::from_millis(1));
        assert_eq!(t.due(clock.now()), vec![offline(ALICE, last)]);
        assert_eq!(t.tracked(), 0, "an offline user costs nothing");
    }

    #[test]
    fn a_reconnect_within_the_grace_publishes_nothing() {
        let mut t = Tracker::default();
        let mut clock = Clock::new();
        t.connected(BOB, clock.ms());
        assert_eq!(t.due(clock.now()), vec![online_at(BOB, 1_000_000)]);
        // A phone flapping between networks: 20 reconnects a second apart.
        for _ in 0..20 {
            t.disconnected(BOB, clock.now(), clock.ms());
            clock.advance(Duration::from_secs(1));
            assert_eq!(t.due(clock.now()), vec![]);
            t.connected(BOB, clock.ms());
            assert_eq!(t.due(clock.now()), vec![]);
        }
        assert_eq!(
            t.online(),
            vec![online_at(BOB, 1_000_000)],
            "online since the first connection, through every reconnect"
        );
    }

    #[test]
    fn flapping_slower_than_the_grace_publishes_at_most_two_changes_per_grace() {
        let mut t = Tracker::default();
        let mut clock = Clock::new();
        let mut published = 0;
        let cycles = 10;
        for _ in 0..cycles {
            t.connected(ALICE, clock.ms());
            published += t.due(clock.now()).len();
            clock.advance(Duration::from_millis(100));
            t.disconnected(ALICE, clock.now(), clock.ms());
            // Ticks every 250 ms until the next connect.
            for _ in 0..24 {
                clock.advance(TICK);
                published += t.due(clock.now()).len();
            }
        }
        // Each cycle lasts 6.1 s, longer than the grace: one online and one offline each.
        assert_eq!(published, 2 * cycles);
    }

    #[test]
    fn a_connect_before_the_offline_is_due_cancels_it_and_the_user_stays_online() {
        let mut t = Tracker::default();
        let mut clock = Clock::new();
        t.connected(ALICE, clock.ms());
        t.due(clock.now());
        t.disconnected(ALICE, clock.now(), clock.ms());
        clock.advance(GRACE / 2);
        t.connected(ALICE, clock.ms());
        clock.advance(GRACE);
        assert_eq!(t.due(clock.now()), vec![]);
        t.disconnected(ALICE, clock.now(), clock.ms());
        let last = clock.ms();
        clock.advance(GRACE);
        assert_eq!(t.due(clock.now()), vec![offline(ALICE, last)]);
    }

    #[test]
    fn a_user_offline_before_the_first_publish_is_never_published() {
        let mut t = Tracker::default();
        let mut clock = Clock::new();
        t.connected(ALICE, clock.ms());
        t.disconnected(ALICE, clock.now(), clock.ms());
        clock.advance(GRACE);
        assert_eq!(t.due(clock.now()), vec![]);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn the_book_is_the_union_of_the_nodes_and_flips_only_on_the_union() {
        let b = Book::default();
        let (n1, n2) = (NodeId(1), NodeId(2));
        assert_eq!(
            b.apply(n1, &online(ALICE)),
            Some(State {
                online: true,
                last_seen_ms: 0,
                changed_ms: 1
            })
        );
        assert_eq!(b.apply(n2, &online(ALICE)), None, "a second node's device");
        assert_eq!(b.apply(n1, &offline(ALICE, 10)), None, "still on node 2");
        assert!(b.state(ALICE).online);
        assert_eq!(
            b.apply(n2, &offline(ALICE, 20)),
            Some(State {
                online: false,
                last_seen_ms: 20,
                changed_ms: 20
            })
        );
        assert_eq!(
            b.state(ALICE),
            State {
                online: false,
                last_seen_ms: 20,
                changed_ms: 20
            }
        );
        assert_eq!(
            b.state(BOB),
            State {
                online: false,
                last_seen_ms: 0,
                changed_ms: 0
            },
            "never seen: unknown"
        );
        // A node that leaves takes its users' presence with it.
        b.apply(n2, &online(BOB));
        b.forget_node(n2, 99);
        assert_eq!(
            b.state(BOB),
            State {
                online: false,
                last_seen_ms: 99,
                changed_ms: 99
            }
        );
        assert_eq!(
            b.state(ALICE).last_seen_ms,
            20,
            "already offline: unchanged"
        );
    }

    #[test]
    fn every_flip_is_recorded_whatever_its_source_and_only_flips() {
        let b = Book::default();
        let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
        // Alice's devices on two nodes leave at once: each node's own change alone is no
        // flip, the second one applied is, wherever it came from.
        b.apply(n1, &online(ALICE));
        b.apply(n2, &online(ALICE));
        assert_eq!(b.take_flipped(), vec![ALICE]);
        b.apply(n2, &offline(ALICE, 5));
        assert_eq!(b.take_flipped(), vec![], "still online on node 1");
        b.apply(n1, &offline(ALICE, 6));
        assert_eq!(b.take_flipped(), vec![ALICE]);
        assert_eq!(b.state(ALICE).changed_ms, 6, "the flip's time orders it");
        // Bob only on node 3, which leaves: a flip nobody published.
        b.apply(n3, &online_at(BOB, 7));
        b.take_flipped();
        b.forget_node(n3, 9);
        assert_eq!(b.take_flipped(), vec![BOB]);
        assert_eq!(b.state(BOB).changed_ms, 9);
        assert_eq!(b.take_flipped(), vec![], "taken");
        b.reflip(BOB);
        assert_eq!(b.take_flipped(), vec![BOB], "a failed push comes back");
        // A ring change moves users here: the online and the recently offline are pushed
        // again, not those offline for long.
        b.apply(n1, &online_at(UserId(3), 10));
        b.apply(n1, &offline(UserId(4), 1_000));
        b.apply(n1, &online_at(UserId(4), 1_500));
        b.apply(n1, &offline(UserId(4), 2_000));
        b.take_flipped();
        b.reflip_where(2_000 + RECENT.as_millis() as u64 - 1, |_| true);
        let mut moved = b.take_flipped();
        moved.sort_unstable();
        assert_eq!(moved, vec![UserId(3), UserId(4)]);
        b.reflip_where(2_000 + RECENT.as_millis() as u64, |u| u != UserId(3));
        assert_eq!(
            b.take_flipped(),
            vec![],
            "user 4 offline for long; user 3 not moved"
        );
    }

    #[test]
    fn a_snapshot_applies_whole_and_keeps_the_times_of_those_it_lists_again() {
        let b = Book::default();
        let (me, peer) = (NodeId(1), NodeId(2));
        let (carol, dave) = (UserId(3), UserId(4));
        b.from_peer(peer, false, false, vec![online_at(ALICE, 10)], 50);
        b.from_peer(peer, false, false, vec![online_at(BOB, 20)], 50);
        b.apply(me, &online_at(carol, 30));
        b.take_flipped();
        // A snapshot in two parts: alice, then dave (new); bob is no longer listed.
        b.from_peer(peer, true, true, vec![online_at(ALICE, 10)], 100);
        assert!(b.state(BOB).online, "nothing applies before the last part");
        b.from_peer(peer, false, false, vec![online_at(dave, 0)], 100);
        assert_eq!(
            b.state(ALICE).changed_ms,
            10,
            "listed again: no flicker, same time"
        );
        assert_eq!(
            b.state(BOB),
            State {
                online: false,
                last_seen_ms: 100,
                changed_ms: 100
            },
            "not listed: offline when the snapshot came"
        );
        assert_eq!(
            b.state(dave).changed_ms,
            100,
            "an online with no time began when it arrived"
        );
        assert!(b.state(carol).online, "other nodes' users untouched");
        let mut flipped = b.take_flipped();
        flipped.sort_unstable();
        assert_eq!(flipped, vec![BOB, dave]);
        // A later change from the peer applies at once; times never go back.
        b.from_peer(peer, false, false, vec![offline(ALICE, 5)], 120);
        assert_eq!(b.state(ALICE).changed_ms, 11, "after the online it ends");
    }
}
