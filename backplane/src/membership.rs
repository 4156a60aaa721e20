//! Cluster membership as a sans-IO core: snapshots of the member set in, ring decisions out.
//!
//! The source of truth (the Redis registry, or a static config published once with epoch 1)
//! publishes [`Snapshot`]s: the whole member set plus an epoch that grows with every change.
//! The driver feeds them to [`Membership::handle`] together with what it learns about its
//! connection to the source ([`Event::SourceDown`], [`Event::SourceUp`]) and timer ticks, and
//! acts on the returned [`Decision`]s. The core reads no clock and does no I/O, so every rule
//! here is tested without sockets or sleeps, alone (below) and as a cluster of cores in the
//! deterministic simulation (`sim.rs`).
//!
//! ## Rules
//!
//! - **Epochs only grow.** A snapshot whose epoch is not above the current one is stale (it
//!   was overtaken in flight) or a duplicate (a periodic resync): it is ignored and yields no
//!   decision. Delivery order therefore does not matter, only that the newest snapshot
//!   eventually arrives.
//! - **The ring is a function of the snapshot alone**: Active members with a non-zero weight,
//!   at their published weights (see [`Membership::handle`] for the edge cases). Every core
//!   that has seen the same epoch has the same ring, whatever it saw before.
//! - **Rebuild only on change.** Building a ring costs ~20 ms at 64 members, and most epochs
//!   (an address change, a member registering as Draining or with weight 0) do not change it. A newer snapshot with the same ring input updates the epoch and the
//!   member details but keeps the same `Arc<Ring>` and emits no decision, so
//!   [`Decision::RingChanged`] always means ownership may have moved and is worth a handoff
//!   pass ([`moved_away`]).
//! - **An unreachable source is not an empty cluster.** On [`Event::SourceDown`] the core keeps
//!   its last ring and says so once per outage ([`Decision::KeepServing`]); it catches up when
//!   snapshots arrive again.
//! - **...but only while the lease lasts.** A node whose worker id and registration are leased
//!   from the source ([`Membership::with_lease`]) holds them until `sent_at + ttl - margin` of
//!   its last successful round ([`Event::LeaseRound`]), on its own monotonic clock. `sent_at`
//!   is taken *before* the round is sent, so the source's own expiry (which starts when it
//!   executes the round, later) is never earlier than the node's. Past that instant the node
//!   is **fenced** ([`Decision::Fenced`]): the source may already have expired its registration
//!   (its users re-homed elsewhere) and granted its worker id to another process, so it must
//!   stop issuing ids, stop serving clients and report not-ready until a round succeeds again
//!   ([`Decision::Unfenced`]). A static cluster has no lease and is never fenced.
//! - **A source that lost its data is not a fresh start.** A source restarted empty (or failed
//!   over to a replica that missed recent writes) forgets the leases and the high-water marks
//!   of the worker ids, so the process that takes a worker id next cannot know whether a
//!   previous holder is still inside a lease the lost data granted. Such a take is reported
//!   with `no_history` ([`Event::LeaseRound`]); the core then holds the node fenced until a
//!   full TTL after the answer arrived ([`Membership::serve_from_ms`]): any previous holder
//!   fences itself at the end of its own lease, which ended by then. The one exception is the
//!   process that held the lease itself when the round was sent (the common case of a Redis
//!   restart): nobody else could hold the worker id meanwhile, so it serves on. The source's
//!   forgetting is also no reason to drop members: after the driver reports a new source
//!   instance ([`Event::SourceInstance`], e.g. Redis's run id changed), a snapshot that drops
//!   members of the current ring is deferred for one TTL ([`Decision::ShrinkDeferred`]), the
//!   time every live member takes to re-register (a member that does not would have expired
//!   by then anyway). Snapshots that drop nobody are adopted at once, so the ring moves on
//!   as soon as the members are back; a deferred one is adopted when offered again after the
//!   grace (the driver re-reads every heartbeat).

use std::collections::BTreeMap;
use std::sync::Arc;

use meshchat_idgen::{NodeId, UserId};

use crate::ring::{self, Ring, RingError};

/// One member of the cluster as the source of truth publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// Where peers reach it over the QUIC mesh (`host:port`).
    pub mesh_addr: String,
    /// Where clients reach it (`host:port`), for redirects.
    pub client_addr: String,
    /// Its share of users relative to the other members. 0 means no share at all: such a
    /// member is kept in the set but left out of the ring.
    pub weight: u32,
    /// Whether it takes users.
    pub state: MemberState,
}

/// Whether a member takes users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// On the ring: owns its share of users.
    Active,
    /// Leaving gracefully: still in the member set (peers keep talking to it while its users
    /// are handed off) but left out of the ring, so it owns no users.
    Draining,
}

/// The whole member set at one epoch, as the source of truth publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Grows with every change at the source (a static config publishes epoch 1 once).
    pub epoch: u64,
    /// Every member, in any order. If an id appears twice, the last entry wins.
    pub members: Vec<Member>,
}

/// What the driver tells the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A snapshot arrived (a publish or a periodic resync), possibly late or twice.
    Snapshot(Snapshot),
    /// The source of truth could not be reached (a failed heartbeat or read). Report every
    /// failure; the core decides once per outage.
    SourceDown {
        /// The driver's clock, in ms.
        now_ms: u64,
    },
    /// The source of truth answered again after a [`Event::SourceDown`].
    SourceUp {
        /// The driver's clock, in ms.
        now_ms: u64,
    },
    /// A round with the source succeeded: it began (was sent) at `sent_at_ms` and ended at
    /// `now_ms`; `held` says whether the worker-id lease is ours (false: another process
    /// holds it). Both on the driver's monotonic clock.
    LeaseRound {
        /// When the round was sent (before the source could have applied it).
        sent_at_ms: u64,
        /// When its answer arrived.
        now_ms: u64,
        /// Whether the source says the worker-id lease is this process's.
        held: bool,
        /// The round took the lease and the source had no record of earlier holders (no
        /// high-water mark: it lost its data, or the worker id was never used). Unless this
        /// process held the lease when the round was sent, it may not serve until a TTL after
        /// `now_ms`.
        no_history: bool,
    },
    /// The instance of the source that answered (e.g. Redis's run id), reported with every
    /// successful round. A change means the source restarted or failed over and may have lost
    /// registrations: for one TTL, snapshots that drop ring members are deferred.
    SourceInstance {
        /// The instance's id; only equality matters.
        id: String,
        /// The driver's clock, in ms.
        now_ms: u64,
    },
    /// A timer tick: fences a node whose lease ran out (drivers tick at least once per
    /// heartbeat; the id gate itself checks the deadline on every id).
    Tick {
        /// The driver's clock, in ms.
        now_ms: u64,
    },
}

/// What the core tells the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Adopt [`Membership::ring`]: ownership may have moved (hand off users with
    /// [`moved_away`]). Emitted only when the ring's input (Active members with their weights)
    /// changed; both lists empty means only weights changed.
    RingChanged {
        /// The epoch of the snapshot that changed the ring.
        epoch: u64,
        /// Members now on the ring that were not, sorted by id.
        joined: Vec<NodeId>,
        /// Members no longer on the ring (gone, Draining or weight 0), sorted by id.
        left: Vec<NodeId>,
    },
    /// The source of truth is unreachable: keep serving on the current ring (at `epoch`)
    /// rather than dropping users. Emitted once per outage, at its first
    /// [`Event::SourceDown`].
    KeepServing {
        /// The epoch of the ring being kept.
        epoch: u64,
    },
    /// The lease ran out (or is held by another process): stop issuing ids, close or redirect
    /// clients, report not-ready. Emitted once per fenced period.
    Fenced {
        /// The epoch of the last ring this node knew.
        epoch: u64,
    },
    /// The lease is held again: serve.
    Unfenced {
        /// The current epoch.
        epoch: u64,
    },
    /// A snapshot that drops ring members arrived while the source may have lost
    /// registrations (within a TTL of a new [`Event::SourceInstance`]): the current ring is
    /// kept until the members re-register or the grace ends. Emitted once per deferred epoch.
    ShrinkDeferred {
        /// The deferred snapshot's epoch.
        epoch: u64,
        /// Ring members it lacks, sorted by id.
        missing: Vec<NodeId>,
        /// Until when (driver's ms, exclusive) such snapshots are deferred.
        until_ms: u64,
    },
}

/// Lease timings of a node whose worker id and registration the source leases out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The TTL the source puts on the registration and the worker-id lease, in ms.
    pub ttl_ms: u64,
    /// Safety margin taken off the TTL, in ms: covers clock-rate differences between the node
    /// and the source over one TTL (a few ppm in practice), and the gap between a fence
    /// decision and its last effects. Keep it well above the driver's tick.
    pub margin_ms: u64,
}

impl LeaseConfig {
    /// A lease of `ttl_ms` with the default margin: a tenth of the TTL, at least 100 ms (and
    /// never the whole TTL).
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms,
            margin_ms: (ttl_ms / 10).max(100).min(ttl_ms / 2),
        }
    }
}

/// The membership core of one node: the member set, its epoch and the ring built from it.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    epoch: u64,
    members: BTreeMap<NodeId, Member>,
    /// The ring's input: Active members with a non-zero weight, at their published weights.
    ring_weights: BTreeMap<NodeId, u32>,
    ring: Arc<Ring>,
    /// When the current outage began (its first `SourceDown`); `None` while the source is up.
    outage_since_ms: Option<u64>,
    /// `None`: a static cluster, never fenced.
    lease: Option<LeaseConfig>,
    /// Until when (driver's monotonic ms, exclusive) the lease is ours; 0: not held.
    lease_valid_until_ms: u64,
    /// Not before this instant (driver's monotonic ms) after a lease taken with no history.
    serve_from_ms: u64,
    /// Whether the node is fenced (a leased node starts fenced, silently: it has not served).
    fenced: bool,
    /// The newest `now_ms` any event carried (snapshots carry none).
    now_ms: u64,
    /// The source instance last reported, and until when shrinking snapshots are deferred.
    source_instance: Option<String>,
    hold_shrink_until_ms: u64,
    /// The epoch of the last [`Decision::ShrinkDeferred`] (once per epoch).
    deferred_epoch: u64,
}

impl Membership {
    /// The core of node `me`: no members, epoch 0 (any published epoch is newer), an empty
    /// ring (owning nothing).
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            epoch: 0,
            members: BTreeMap::new(),
            ring_weights: BTreeMap::new(),
            ring: Arc::new(empty_ring()),
            outage_since_ms: None,
            lease: None,
            lease_valid_until_ms: 0,
            serve_from_ms: 0,
            fenced: false,
            now_ms: 0,
            source_instance: None,
            hold_shrink_until_ms: 0,
            deferred_epoch: 0,
        }
    }

    /// The core of node `me` whose worker id and registration are leased from the source:
    /// fenced until its first successful [`Event::LeaseRound`], and again whenever the lease
    /// runs out.
    pub fn with_lease(me: NodeId, lease: LeaseConfig) -> Self {
        Self {
            lease: Some(lease),
            fenced: true,
            ..Self::new(me)
        }
    }

    /// Applies one event and returns what to do. Pure: no clock reads, no I/O.
    ///
    /// A [`Event::Snapshot`] newer than the current epoch replaces the member set and, if the
    /// ring's input changed, rebuilds the ring from it:
    ///
    /// - members with weight 0 are kept in the set but left off the ring (the ring cannot hold
    ///   them: [`RingError::ZeroWeight`]), exactly like Draining members;
    /// - if the weights would exceed the ring's point limit ([`RingError::TooManyPoints`]), the
    ///   points per unit of weight are lowered until they fit, and if even one point per unit
    ///   is too many every weight counts as 1. Both are derived from the snapshot alone, so
    ///   every core still builds the same ring.
    pub fn handle(&mut self, ev: Event) -> Vec<Decision> {
        match ev {
            Event::Snapshot(snapshot) => self.on_snapshot(snapshot).into_iter().collect(),
            Event::SourceDown { now_ms } => {
                self.observe(now_ms);
                let mut out = Vec::new();
                if self.outage_since_ms.is_none() {
                    self.outage_since_ms = Some(now_ms);
                    out.push(Decision::KeepServing { epoch: self.epoch });
                }
                out.extend(self.check_lease(now_ms));
                out
            }
            Event::SourceUp { now_ms } => {
                self.observe(now_ms);
                self.outage_since_ms = None;
                Vec::new()
            }
            Event::LeaseRound {
                sent_at_ms,
                now_ms,
                held,
                no_history,
            } => {
                self.observe(now_ms);
                if let Some(lease) = self.lease {
                    if held {
                        // Held when this round was sent: nobody else can have held the worker
                        // id since, whatever the source forgot.
                        let ours_throughout = self.lease_valid_until_ms > sent_at_ms;
                        if no_history && !ours_throughout {
                            self.serve_from_ms = self.serve_from_ms.max(now_ms + lease.ttl_ms);
                        }
                        // Rounds may finish out of order; a later-sent one never shortens it.
                        self.lease_valid_until_ms = (sent_at_ms
                            + lease.ttl_ms.saturating_sub(lease.margin_ms))
                        .max(self.lease_valid_until_ms);
                    } else {
                        // Another process holds it: stop now. It wrote a high-water mark, so
                        // the next take has a history.
                        self.lease_valid_until_ms = 0;
                        self.serve_from_ms = 0;
                    }
                }
                self.check_lease(now_ms).into_iter().collect()
            }
            Event::SourceInstance { id, now_ms } => {
                self.observe(now_ms);
                let changed = self.source_instance.as_ref().is_some_and(|old| *old != id);
                if changed {
                    let grace = self.lease.map_or(0, |l| l.ttl_ms);
                    self.hold_shrink_until_ms = now_ms + grace;
                }
                self.source_instance = Some(id);
                Vec::new()
            }
            Event::Tick { now_ms } => {
                self.observe(now_ms);
                self.check_lease(now_ms).into_iter().collect()
            }
        }
    }

    fn observe(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Fences or unfences on a change of [`Self::may_serve`] at `now_ms`.
    fn check_lease(&mut self, now_ms: u64) -> Option<Decision> {
        let fenced = !self.may_serve(now_ms);
        if fenced == self.fenced {
            return None;
        }
        self.fenced = fenced;
        Some(if fenced {
            Decision::Fenced { epoch: self.epoch }
        } else {
            Decision::Unfenced { epoch: self.epoch }
        })
    }

    /// Whether this node may issue ids and serve clients at `now_ms`: always in a static
    /// cluster, else while its lease lasts (and, after a take with no history, from
    /// [`Self::serve_from_ms`] on). Answers from the clock, not from the last decision, so a
    /// stalled driver cannot extend a lease.
    pub fn may_serve(&self, now_ms: u64) -> bool {
        self.lease.is_none() || (self.serve_from_ms <= now_ms && now_ms < self.lease_valid_until_ms)
    }

    /// From when (inclusive, driver's monotonic ms) this node may issue ids: 0 unless it took
    /// its lease with no history and is waiting out a TTL. Drivers copy it into the id gate
    /// (before [`Self::lease_valid_until_ms`]).
    pub fn serve_from_ms(&self) -> u64 {
        if self.lease.is_none() {
            0
        } else {
            self.serve_from_ms
        }
    }

    /// Until when (exclusive, driver's monotonic ms) this node may issue ids; `u64::MAX`
    /// without a lease. Drivers copy it into the id gate after every event.
    pub fn lease_valid_until_ms(&self) -> u64 {
        if self.lease.is_none() {
            u64::MAX
        } else {
            self.lease_valid_until_ms
        }
    }

    /// Whether the last decision fenced this node.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether snapshots that drop ring members are being deferred (within a TTL of a new
    /// source instance).
    pub fn holding_shrink(&self) -> bool {
        self.now_ms < self.hold_shrink_until_ms
    }

    fn on_snapshot(&mut self, snapshot: Snapshot) -> Option<Decision> {
        if snapshot.epoch <= self.epoch {
            return None; // stale or duplicate
        }
        let members: BTreeMap<NodeId, Member> =
            snapshot.members.into_iter().map(|m| (m.id, m)).collect();
        let weights: BTreeMap<NodeId, u32> = members
            .values()
            .filter(|m| m.state == MemberState::Active && m.weight > 0)
            .map(|m| (m.id, m.weight))
            .collect();
        if self.holding_shrink() {
            let missing: Vec<NodeId> = self
                .ring_weights
                .keys()
                .filter(|id| !weights.contains_key(id))
                .copied()
                .collect();
            if !missing.is_empty() {
                // Not adopted, epoch included: the same snapshot offered after the grace is
                // still newer, and is adopted then.
                if self.deferred_epoch == snapshot.epoch {
                    return None;
                }
                self.deferred_epoch = snapshot.epoch;
                return Some(Decision::ShrinkDeferred {
                    epoch: snapshot.epoch,
                    missing,
                    until_ms: self.hold_shrink_until_ms,
                });
            }
        }
        self.epoch = snapshot.epoch;
        self.members = members;
        if weights == self.ring_weights {
            return None; // same ring: keep it, no rebuild
        }
        // Unreachable in practice (zero weights are filtered, the point limit is respected);
        // if the ring still cannot be built, keep serving on the last one rather than panic.
        // The next snapshot retries, because `ring_weights` still describes the old ring.
        let ring = build_ring(&weights).ok()?;
        let joined = weights
            .keys()
            .filter(|id| !self.ring_weights.contains_key(id))
            .copied()
            .collect();
        let left = self
            .ring_weights
            .keys()
            .filter(|id| !weights.contains_key(id))
            .copied()
            .collect();
        self.ring = Arc::new(ring);
        self.ring_weights = weights;
        Some(Decision::RingChanged {
            epoch: self.epoch,
            joined,
            left,
        })
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The epoch of the newest snapshot applied (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The current ring. Clone the `Arc` to keep an old ring for [`moved_away`].
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// When the current outage of the source began (the `now_ms` of its first
    /// [`Event::SourceDown`]), or `None` while the source is reachable.
    pub fn outage_since_ms(&self) -> Option<u64> {
        self.outage_since_ms
    }

    /// A member of the current set (on the ring or not).
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// Every member of the current set, Draining and weight-0 ones included, sorted by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The node that owns `user` on the current ring; `None` while the ring is empty.
    pub fn owner(&self, user: UserId) -> Option<NodeId> {
        self.ring.owner(user)
    }

    /// Whether this node owns `user` on the current ring.
    pub fn is_local(&self, user: UserId) -> bool {
        self.owner(user) == Some(self.me)
    }

    /// Groups recipients by owning node: one entry per node, never one per recipient.
    ///
    /// Each node's list is sorted by id with duplicates removed, so a recipient listed twice
    /// is delivered once. Recipients with no owner (an empty ring) are left out: an empty plan
    /// for a non-empty input means there is no ring yet.
    pub fn plan(&self, recipients: &[UserId]) -> BTreeMap<NodeId, Vec<UserId>> {
        let mut plan: BTreeMap<NodeId, Vec<UserId>> = BTreeMap::new();
        for &user in recipients {
            if let Some(node) = self.ring.owner(user) {
                plan.entry(node).or_default().push(user);
            }
        }
        for users in plan.values_mut() {
            users.sort_unstable();
            users.dedup();
        }
        plan
    }
}

/// Users in `users` (e.g. those connected to `me`) whose owner is `me` under `old` but not
/// under `new`, with their new owner.
///
/// Users with no owner under `new` (an empty ring) are left out: there is no one to hand them
/// to. Passing the same ring twice returns nothing without looking anything up.
pub fn moved_away(
    old: &Ring,
    new: &Ring,
    me: NodeId,
    users: impl IntoIterator<Item = UserId>,
) -> Vec<(UserId, NodeId)> {
    if std::ptr::eq(old, new) {
        return Vec::new();
    }
    users
        .into_iter()
        .filter(|&user| old.owner(user) == Some(me))
        .filter_map(|user| match new.owner(user) {
            Some(owner) if owner != me => Some((user, owner)),
            _ => None,
        })
        .collect()
}

fn empty_ring() -> Ring {
    // No members: no weight to be zero, no points to exceed the limit.
    Ring::build(&BTreeMap::new(), ring::DEFAULT_VNODES_PER_WEIGHT)
        .expect("an empty ring always builds")
}

fn build_ring(weights: &BTreeMap<NodeId, u32>) -> Result<Ring, RingError> {
    let (weights, per_weight) = ring::params(weights);
    Ring::build(&weights, per_weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u32, weight: u32, state: MemberState) -> Member {
        Member {
            id: NodeId(id),
            mesh_addr: format!("10.0.0.{id}:7100"),
            client_addr: format!("10.0.0.{id}:7000"),
            weight,
            state,
        }
    }

    fn active(ids: impl IntoIterator<Item = u32>) -> Vec<Member> {
        ids.into_iter()
            .map(|id| member(id, 1, MemberState::Active))
            .collect()
    }

    fn snap(epoch: u64, members: Vec<Member>) -> Event {
        Event::Snapshot(Snapshot { epoch, members })
    }

    fn users(n: u64) -> impl Iterator<Item = UserId> {
        (0..n).map(|u| UserId(u * 7_919 + 13))
    }

    #[test]
    fn a_new_core_owns_nothing_and_takes_a_static_config_at_epoch_1() {
        let mut m = Membership::new(NodeId(1));
        assert_eq!(m.epoch(), 0);
        assert!(m.ring().is_empty());
        assert_eq!(m.owner(UserId(5)), None);
        assert!(!m.is_local(UserId(5)));
        assert!(m.plan(&[UserId(5), UserId(6)]).is_empty());
        assert_eq!(m.members().count(), 0);

        let d = m.handle(snap(1, active([2, 1])));
        assert_eq!(
            d,
            vec![Decision::RingChanged {
                epoch: 1,
                joined: vec![NodeId(1), NodeId(2)],
                left: vec![],
            }]
        );
        assert_eq!(m.epoch(), 1);
        assert_eq!(m.ring().members(), &[NodeId(1), NodeId(2)]);
        let ids: Vec<NodeId> = m.members().map(|m| m.id).collect();
        assert_eq!(ids, vec![NodeId(1), NodeId(2)], "members() is sorted by id");
        assert_eq!(
            m.member(NodeId(2)).map(|m| m.mesh_addr.as_str()),
            Some("10.0.0.2:7100")
        );
        let local = users(1_000).filter(|&u| m.is_local(u)).count();
        assert!(
            (400..600).contains(&local),
            "node 1 owns about half: {local}"
        );
    }

    #[test]
    fn stale_and_duplicate_snapshots_change_nothing() {
        let mut m = Membership::new(NodeId(1));
        assert!(!m.handle(snap(5, active(1..=3))).is_empty());
        let ring = Arc::clone(m.ring());
        // A duplicate (resync) and an overtaken one with a different member set.
        assert!(m.handle(snap(5, active(1..=3))).is_empty());
        assert!(m.handle(snap(4, active([1]))).is_empty());
        assert!(m.handle(snap(0, Vec::new())).is_empty());
        assert_eq!(m.epoch(), 5);
        assert!(Arc::ptr_eq(m.ring(), &ring));
        assert_eq!(m.members().count(), 3);
    }

    /// The documented choice: a newer epoch whose ring input is unchanged updates the epoch and
    /// the member details but emits no decision and does not rebuild the ring.
    #[test]
    fn a_newer_epoch_with_the_same_ring_updates_details_without_a_rebuild() {
        let mut m = Membership::new(NodeId(1));
        m.handle(snap(1, active(1..=3)));
        let ring = Arc::clone(m.ring());

        let mut moved = active(1..=3);
        moved[1].mesh_addr = "10.9.9.9:7100".into();
        // A weight-0 and a Draining member are not on the ring either: still the same ring.
        moved.push(member(4, 0, MemberState::Active));
        moved.push(member(5, 3, MemberState::Draining));
        assert!(m.handle(snap(2, moved)).is_empty());
        assert_eq!(m.epoch(), 2);
        assert!(Arc::ptr_eq(m.ring(), &ring), "no rebuild");
        assert_eq!(
            m.member(NodeId(2)).map(|m| m.mesh_addr.as_str()),
            Some("10.9.9.9:7100")
        );
        assert_eq!(m.members().count(), 5);
        // And the epoch it took still makes older snapshots stale.
        assert!(m.handle(snap(2, active([1]))).is_empty());
        assert!(Arc::ptr_eq(m.ring(), &ring));
    }

    #[test]
    fn a_weight_change_alone_rebuilds_with_empty_joined_and_left() {
        let mut m = Membership::new(NodeId(1));
        m.handle(snap(1, active(1..=2)));
        let old = Arc::clone(m.ring());
        let mut heavier = active(1..=2);
        heavier[1].weight = 3;
        assert_eq!(
            m.handle(snap(2, heavier)),
            vec![Decision::RingChanged {
                epoch: 2,
                joined: vec![],
                left: vec![],
            }]
        );
        assert!(!Arc::ptr_eq(m.ring(), &old));
        let share = users(20_000)
            .filter(|&u| m.owner(u) == Some(NodeId(2)))
            .count() as f64
            / 20_000.0;
        assert!((share - 0.75).abs() < 0.03, "weight 3 of 4 owns {share:.3}");
    }

    #[test]
    fn zero_weight_members_are_kept_but_own_nothing() {
        let mut m = Membership::new(NodeId(3));
        let mut ms = active(1..=2);
        ms.push(member(3, 0, MemberState::Active));
        let d = m.handle(snap(1, ms));
        assert_eq!(
            d,
            vec![Decision::RingChanged {
                epoch: 1,
                joined: vec![NodeId(1), NodeId(2)],
                left: vec![],
            }]
        );
        assert_eq!(m.member(NodeId(3)).map(|m| m.weight), Some(0));
        assert!(users(5_000).all(|u| !m.is_local(u)));

        // Only zero weights: an empty ring, not a panic.
        let d = m.handle(snap(2, vec![member(3, 0, MemberState::Active)]));
        assert_eq!(
            d,
            vec![Decision::RingChanged {
                epoch: 2,
                joined: vec![],
                left: vec![NodeId(1), NodeId(2)],
            }]
        );
        assert!(m.ring().is_empty());
        assert_eq!(m.owner(UserId(1)), None);
    }

    #[test]
    fn absurd_weights_degrade_deterministically_instead_of_failing() {
        // Fits: the default.
        let small: BTreeMap<NodeId, u32> = [(NodeId(1), 1), (NodeId(2), 4)].into();
        assert_eq!(
            ring::params(&small),
            (small.clone(), ring::DEFAULT_VNODES_PER_WEIGHT)
        );
        // Too many points at the default: fewer per weight, weights kept.
        let big: BTreeMap<NodeId, u32> = [(NodeId(1), 10_000), (NodeId(2), 6_384)].into();
        let (w, per) = ring::params(&big);
        assert_eq!(w, big);
        assert_eq!(per, 4_096);
        assert!(16_384 * u64::from(per) <= ring::MAX_POINTS);
        // Even one point per weight is too many: an even split.
        let absurd: BTreeMap<NodeId, u32> = [(NodeId(1), u32::MAX), (NodeId(2), 1)].into();
        let (w, per) = ring::params(&absurd);
        assert_eq!(w, [(NodeId(1), 1), (NodeId(2), 1)].into());
        assert_eq!(per, ring::DEFAULT_VNODES_PER_WEIGHT);

        let mut a = Membership::new(NodeId(1));
        let mut b = Membership::new(NodeId(2));
        let ms = vec![
            member(1, u32::MAX, MemberState::Active),
            member(2, 1, MemberState::Active),
        ];
        for core in [&mut a, &mut b] {
            let d = core.handle(snap(1, ms.clone()));
            assert!(matches!(d.as_slice(), [Decision::RingChanged { .. }]));
            assert_eq!(core.ring().members(), &[NodeId(1), NodeId(2)]);
        }
        assert!(users(2_000).all(|u| a.owner(u) == b.owner(u)));
    }

    #[test]
    fn keep_serving_once_per_outage() {
        let mut m = Membership::new(NodeId(1));
        m.handle(snap(3, active(1..=2)));
        let ring = Arc::clone(m.ring());
        assert_eq!(
            m.handle(Event::SourceDown { now_ms: 100 }),
            vec![Decision::KeepServing { epoch: 3 }]
        );
        assert!(m.handle(Event::SourceDown { now_ms: 200 }).is_empty());
        assert!(m.handle(Event::Tick { now_ms: 250 }).is_empty());
        assert_eq!(m.outage_since_ms(), Some(100));
        assert!(Arc::ptr_eq(m.ring(), &ring), "the ring is kept");
        assert_eq!(m.owner(UserId(9)), ring.owner(UserId(9)));

        assert!(m.handle(Event::SourceUp { now_ms: 300 }).is_empty());
        assert_eq!(m.outage_since_ms(), None);
        assert_eq!(
            m.handle(Event::SourceDown { now_ms: 400 }),
            vec![Decision::KeepServing { epoch: 3 }],
            "a new outage is reported again"
        );
        // Snapshots still apply during an outage (e.g. one that was in flight).
        assert!(!m.handle(snap(4, active(1..=3))).is_empty());
        assert_eq!(m.outage_since_ms(), Some(400));
    }

    fn round(sent_at_ms: u64, now_ms: u64, held: bool, no_history: bool) -> Event {
        Event::LeaseRound {
            sent_at_ms,
            now_ms,
            held,
            no_history,
        }
    }

    #[test]
    fn a_lease_taken_with_no_history_serves_only_a_ttl_after_the_take() {
        let lease = LeaseConfig::new(3_000);
        let mut m = Membership::with_lease(NodeId(1), lease);
        // The source had no mark: someone may still be inside a lease it forgot.
        assert!(m.handle(round(1_000, 1_010, true, true)).is_empty());
        assert_eq!(m.serve_from_ms(), 4_010);
        assert!(!m.may_serve(1_010));
        // Renewals keep the lease alive meanwhile but do not shorten the wait.
        assert!(m.handle(round(2_000, 2_005, true, false)).is_empty());
        assert!(m.handle(round(3_000, 3_005, true, false)).is_empty());
        assert!(!m.may_serve(4_009));
        assert!(m.handle(Event::Tick { now_ms: 4_009 }).is_empty());
        assert_eq!(
            m.handle(Event::Tick { now_ms: 4_010 }),
            vec![Decision::Unfenced { epoch: 0 }]
        );
        assert!(m.may_serve(4_010));

        // Losing the lease ends the wait too; a later take with a mark does not wait.
        let mut m = Membership::with_lease(NodeId(1), lease);
        m.handle(round(0, 5, true, true));
        m.handle(round(1_000, 1_005, false, false));
        assert_eq!(m.serve_from_ms(), 0);
        m.handle(round(2_000, 2_005, true, false));
        assert!(m.may_serve(2_005));
    }

    #[test]
    fn the_holder_that_retakes_its_own_lease_from_an_emptied_source_serves_on() {
        let lease = LeaseConfig::new(3_000);
        let mut m = Membership::with_lease(NodeId(1), lease);
        m.handle(round(0, 5, true, false));
        assert!(m.may_serve(5));
        // The source restarted empty; the next round takes the lease again, with no mark.
        // It was ours when the round was sent (valid until 2,700): nobody else held it.
        assert!(m.handle(round(1_000, 1_050, true, true)).is_empty());
        assert_eq!(m.serve_from_ms(), 0);
        assert!(m.may_serve(1_050));

        // A holder whose lease ran out before the round was sent waits like anyone.
        let mut m = Membership::with_lease(NodeId(1), lease);
        m.handle(round(0, 5, true, false));
        assert_eq!(
            m.handle(Event::Tick { now_ms: 2_700 }),
            vec![Decision::Fenced { epoch: 0 }]
        );
        assert!(m.handle(round(5_000, 5_020, true, true)).is_empty());
        assert!(!m.may_serve(5_020));
        assert_eq!(m.serve_from_ms(), 8_020);
        assert!(m.handle(round(8_000, 8_010, true, false)).is_empty());
        assert_eq!(
            m.handle(round(8_020, 8_025, true, false)),
            vec![Decision::Unfenced { epoch: 0 }]
        );
    }

    #[test]
    fn after_a_new_source_instance_a_snapshot_that_drops_members_waits_a_ttl() {
        let lease = LeaseConfig::new(3_000);
        let mut m = Membership::with_lease(NodeId(1), lease);
        let instance = |id: &str, now_ms| Event::SourceInstance {
            id: id.into(),
            now_ms,
        };
        assert!(m.handle(instance("a", 0)).is_empty());
        m.handle(snap(7, active(1..=3)));
        let ring = Arc::clone(m.ring());
        // The first instance seen is no restart; the same one again is none either.
        assert!(!m.holding_shrink());
        assert!(m.handle(instance("a", 1_000)).is_empty());
        assert!(!m.holding_shrink());

        // Restarted empty: node 1 re-registered first, the source publishes a one-node set.
        assert!(m.handle(instance("b", 2_000)).is_empty());
        assert!(m.holding_shrink());
        assert_eq!(
            m.handle(snap(8, active([1]))),
            vec![Decision::ShrinkDeferred {
                epoch: 8,
                missing: vec![NodeId(2), NodeId(3)],
                until_ms: 5_000,
            }]
        );
        assert_eq!(m.epoch(), 7, "not adopted");
        assert!(Arc::ptr_eq(m.ring(), &ring));
        assert!(m.handle(snap(8, active([1]))).is_empty(), "once per epoch");
        // Node 2 is back, node 3 not yet: still a shrink.
        assert!(matches!(
            m.handle(snap(9, active([1, 2]))).as_slice(),
            [Decision::ShrinkDeferred { epoch: 9, .. }]
        ));
        // Everyone back: adopted at once, the ring unchanged (no rebuild, no decision).
        assert!(m.handle(snap(10, active(1..=3))).is_empty());
        assert_eq!(m.epoch(), 10);
        assert!(Arc::ptr_eq(m.ring(), &ring));
        // A join during the grace is adopted too.
        assert!(matches!(
            m.handle(snap(11, active(1..=4))).as_slice(),
            [Decision::RingChanged { epoch: 11, .. }]
        ));

        // Node 3 really died with the restart: dropped once the grace is over.
        assert!(matches!(
            m.handle(snap(12, active([1, 2, 4]))).as_slice(),
            [Decision::ShrinkDeferred { epoch: 12, .. }]
        ));
        m.handle(Event::Tick { now_ms: 5_000 });
        assert!(!m.holding_shrink());
        assert_eq!(
            m.handle(snap(12, active([1, 2, 4]))),
            vec![Decision::RingChanged {
                epoch: 12,
                joined: vec![],
                left: vec![NodeId(3)],
            }]
        );
    }

    #[test]
    fn moved_away_lists_only_my_users_that_left_me() {
        let old = Ring::uniform([NodeId(1), NodeId(2)]).expect("ring");
        let new = Ring::uniform([NodeId(1), NodeId(2), NodeId(3)]).expect("ring");
        let all: Vec<UserId> = users(10_000).collect();
        let moved = moved_away(&old, &new, NodeId(1), all.iter().copied());
        assert!(!moved.is_empty());
        for &(u, to) in &moved {
            assert_eq!(old.owner(u), Some(NodeId(1)));
            assert_eq!(new.owner(u), Some(to));
            assert_eq!(to, NodeId(3));
        }
        let expected = all
            .iter()
            .filter(|&&u| old.owner(u) == Some(NodeId(1)) && new.owner(u) != Some(NodeId(1)))
            .count();
        assert_eq!(moved.len(), expected);

        assert!(moved_away(&old, &old, NodeId(1), all.iter().copied()).is_empty());
        let empty = Ring::uniform([]).expect("ring");
        assert!(moved_away(&old, &empty, NodeId(1), all.iter().copied()).is_empty());
    }

    #[test]
    fn plan_dedups_and_groups_by_owner() {
        let mut m = Membership::new(NodeId(1));
        m.handle(snap(1, active(1..=3)));
        let mut recipients: Vec<UserId> = users(300).collect();
        recipients.extend(users(50)); // listed twice
        let plan = m.plan(&recipients);
        assert!(plan.len() <= 3);
        assert_eq!(plan.values().map(Vec::len).sum::<usize>(), 300);
        for (node, us) in &plan {
            assert!(us.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
            assert!(us.iter().all(|&u| m.owner(u) == Some(*node)));
        }
    }
}
