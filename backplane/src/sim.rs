//! A deterministic multi-node simulation of membership (test-only), in the style of
//! quinn-proto's `tests/util.rs`: N [`Membership`] cores, a simulated source of truth and a
//! simulated network, all driven by one loop over simulated time. No threads, no sleeps, no
//! real clock: the same test runs the same way every time.
//!
//! - [`Source`] models the Redis registry: a node's heartbeat (re)writes its entry with a TTL
//!   in simulated ms, entries expire when the TTL runs out, and every change to the member set
//!   bumps the epoch and publishes a [`Snapshot`]. Refreshing an unchanged entry is not a
//!   change.
//! - [`Network`] carries published snapshots to each node with a per-link delay (plus random
//!   jitter, which reorders them; so does changing the delay between two publishes); it can
//!   drop them (a per-link rate from a seeded generator, or "the next n") and partition a node
//!   from the source (both ways: its heartbeats fail and deliveries arriving meanwhile are
//!   lost).
//! - Every `resync_ms` the source re-sends its latest snapshot to every node (the driver's
//!   periodic poll), so lost deliveries and healed partitions converge even without a change.
//! - A node's driver reports [`Event::SourceDown`] on every failed heartbeat and
//!   [`Event::SourceUp`] on the first successful one after, as the real driver will.
//!
//! - The source also leases Snowflake worker ids (`SET NX PX ttl` with a per-process token);
//!   every successful heartbeat renews the node's lease, records the worker id's high-water
//!   mark and feeds [`Event::LeaseRound`] (after [`Event::SourceInstance`]).
//! - The source can restart empty ([`Source::wipe`]): entries, leases and marks are gone and
//!   its instance id changes, as with a Redis restarted without persistence.
//!
//! The harness checks the core's invariants on every event (epochs never go back, ignored
//! snapshots yield nothing, a `RingChanged` matches the ring it announces) and after every
//! step the fencing invariants: a live node that may serve holds its worker-id lease at the
//! source right now (unless the source lost it since the node's last round), and at most one
//! live node may serve per worker id, so no two processes ever issue ids with one worker id
//! even across a source that forgot its leases. It logs
//! decisions and ignored snapshots per node for the tests to assert on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meshchat_idgen::{NodeId, UserId};

use crate::membership::{
    Decision, Event, LeaseConfig, Member, MemberState, Membership, Snapshot, moved_away,
};
use crate::ring::{Ring, mix};

/// Timings of a simulation, in simulated ms.
#[derive(Debug, Clone, Copy)]
struct Config {
    /// How far one step advances the clock.
    step_ms: u64,
    /// How often each node heartbeats.
    heartbeat_ms: u64,
    /// How long an entry lives without a heartbeat.
    ttl_ms: u64,
    /// How often the source re-sends its latest snapshot to every node.
    resync_ms: u64,
    /// Link delay of new nodes.
    delay_ms: u64,
    /// Seed of the drop generator.
    seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            step_ms: 1,
            heartbeat_ms: 1_000,
            ttl_ms: 3_000,
            resync_ms: 2_000,
            delay_ms: 5,
            seed: 1,
        }
    }
}

/// The simulated source of truth (the Redis registry).
#[derive(Debug)]
struct Source {
    ttl_ms: u64,
    epoch: u64,
    /// Entries and when they expire.
    entries: BTreeMap<NodeId, (Member, u64)>,
    /// (time, node) of every expiry, for the tests.
    expired: Vec<(u64, NodeId)>,
    /// Worker-id leases: worker -> (holder's process token, expiry).
    leases: BTreeMap<u16, (usize, u64)>,
    /// Worker ids with a high-water mark (any holder ever renewed them since the last wipe).
    marks: BTreeSet<u16>,
    /// Changes on every wipe (the Redis run id).
    instance: u64,
    /// When the source last restarted empty.
    wiped_at: Option<u64>,
}

/// The lease script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseAnswer {
    held: bool,
    /// Taken with no high-water mark on record.
    no_history: bool,
}

impl Source {
    fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms,
            epoch: 0,
            entries: BTreeMap::new(),
            expired: Vec::new(),
            leases: BTreeMap::new(),
            marks: BTreeSet::new(),
            instance: 1,
            wiped_at: None,
        }
    }

    /// The lease script: take `worker` if free or expired, renew it if `token` holds it; a
    /// holder records the high-water mark.
    fn lease(&mut self, now: u64, worker: u16, token: usize) -> LeaseAnswer {
        match self.leases.get(&worker) {
            Some(&(holder, expires)) if holder != token && expires > now => LeaseAnswer {
                held: false,
                no_history: false,
            },
            current => {
                let taken =
                    !current.is_some_and(|&(holder, expires)| holder == token && expires > now);
                self.leases.insert(worker, (token, now + self.ttl_ms));
                let no_history = taken && !self.marks.contains(&worker);
                self.marks.insert(worker);
                LeaseAnswer {
                    held: true,
                    no_history,
                }
            }
        }
    }

    /// Restarts empty: every entry, lease and mark is gone, the instance changes. The epoch
    /// goes on from where it was (the real script takes the callers' epoch as a floor).
    fn wipe(&mut self, now: u64) {
        self.entries.clear();
        self.leases.clear();
        self.marks.clear();
        self.instance += 1;
        self.wiped_at = Some(now);
    }

    /// Whether `token` holds `worker`'s lease at `now`.
    fn holds(&self, now: u64, worker: u16, token: usize) -> bool {
        self.leases
            .get(&worker)
            .is_some_and(|&(holder, expires)| holder == token && expires > now)
    }

    /// Writes `m`'s entry with a fresh TTL (`SET node:<id> ... EX ttl`). Returns whether the
    /// member set changed (a new entry or different details), which bumps the epoch.
    fn heartbeat(&mut self, now: u64, m: &Member) -> bool {
        let expires = now + self.ttl_ms;
        match self.entries.get_mut(&m.id) {
            Some((current, at)) if current == m => {
                *at = expires;
                false
            }
            _ => {
                self.entries.insert(m.id, (m.clone(), expires));
                self.epoch += 1;
                true
            }
        }
    }

    /// Drops entries whose TTL ran out. Returns whether any did (one epoch for the sweep).
    fn expire(&mut self, now: u64) -> bool {
        let gone: Vec<NodeId> = self
            .entries
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(&id, _)| id)
            .collect();
        for &id in &gone {
            self.entries.remove(&id);
            self.expired.push((now, id));
        }
        if !gone.is_empty() {
            self.epoch += 1;
        }
        !gone.is_empty()
    }

    fn has(&self, id: NodeId) -> bool {
        self.entries.contains_key(&id)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            epoch: self.epoch,
            members: self.entries.values().map(|(m, _)| m.clone()).collect(),
        }
    }
}

/// One node's link to the source.
#[derive(Debug, Clone)]
struct Link {
    delay_ms: u64,
    /// Up to this much extra delay per delivery, at random: reorders deliveries.
    jitter_ms: u64,
    /// Deliveries dropped at random, per thousand.
    drop_per_mille: u64,
    /// Deliveries still to drop unconditionally.
    drop_next: u32,
    partitioned: bool,
}

#[derive(Debug)]
struct InFlight {
    at: u64,
    seq: u64,
    to: usize,
    snapshot: Snapshot,
    /// The source instance that published it (read together, as the real script does).
    instance: u64,
}

/// The simulated network between the source and the nodes.
#[derive(Debug)]
struct Network {
    links: Vec<Link>,
    in_flight: Vec<InFlight>,
    seq: u64,
    rng: u64,
    /// Per node: deliveries dropped on send.
    dropped: Vec<u32>,
    /// Per node: deliveries lost because they arrived while it was partitioned.
    lost_in_partition: Vec<u32>,
}

impl Network {
    fn new(seed: u64) -> Self {
        Self {
            links: Vec::new(),
            in_flight: Vec::new(),
            seq: 0,
            rng: seed,
            dropped: Vec::new(),
            lost_in_partition: Vec::new(),
        }
    }

    /// A deterministic generator (splitmix64 over a counter).
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(1);
        mix(self.rng)
    }

    fn send(&mut self, now: u64, to: usize, snapshot: Snapshot, instance: u64) {
        let link = &mut self.links[to];
        if link.drop_next > 0 {
            link.drop_next -= 1;
            self.dropped[to] += 1;
            return;
        }
        let (delay, jitter, rate) = (link.delay_ms, link.jitter_ms, link.drop_per_mille);
        if rate > 0 && self.next_random() % 1_000 < rate {
            self.dropped[to] += 1;
            return;
        }
        let delay = delay + self.next_random() % (jitter + 1);
        self.seq += 1;
        self.in_flight.push(InFlight {
            at: now + delay,
            seq: self.seq,
            to,
            snapshot,
            instance,
        });
    }

    /// Everything due by `now`, in arrival order (then send order).
    fn due(&mut self, now: u64) -> Vec<InFlight> {
        let (mut due, later): (Vec<_>, Vec<_>) =
            self.in_flight.drain(..).partition(|m| m.at <= now);
        self.in_flight = later;
        due.sort_by_key(|m| (m.at, m.seq));
        due
    }
}

/// An ignored snapshot: (its epoch, the core's epoch when it arrived).
type Ignored = (u64, u64);

/// One simulated node: its core and what its driver knows.
#[derive(Debug)]
struct Node {
    core: Membership,
    /// What it registers.
    me: Member,
    /// Its Snowflake worker id; its process token is its index.
    worker: u16,
    /// False once killed: no heartbeats, no deliveries, a frozen core.
    alive: bool,
    next_heartbeat: u64,
    last_heartbeat: u64,
    /// Whether its driver believes the source is down.
    source_down: bool,
    source_down_reports: u32,
    decisions: Vec<(u64, Decision)>,
    ignored: Vec<Ignored>,
}

impl Node {
    fn keep_serving(&self) -> Vec<u64> {
        self.decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::KeepServing { epoch } => Some(*epoch),
                _ => None,
            })
            .collect()
    }

    fn ring_changes(&self) -> Vec<(u64, Vec<NodeId>, Vec<NodeId>)> {
        self.decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::RingChanged {
                    epoch,
                    joined,
                    left,
                } => Some((*epoch, joined.clone(), left.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The whole simulated cluster.
#[derive(Debug)]
struct Sim {
    cfg: Config,
    now: u64,
    next_resync: u64,
    source: Source,
    net: Network,
    nodes: Vec<Node>,
}

impl Sim {
    fn new(cfg: Config) -> Self {
        Self {
            cfg,
            now: 0,
            next_resync: cfg.resync_ms,
            source: Source::new(cfg.ttl_ms),
            net: Network::new(cfg.seed),
            nodes: Vec::new(),
        }
    }

    /// Starts node `id` with `weight` (worker id = `id`); it registers at once. Returns its
    /// index.
    fn add_node(&mut self, id: u32, weight: u32) -> usize {
        self.add_process(id, weight, id as u16)
    }

    /// Starts a process as node `id` with worker id `worker` (another process may claim the
    /// same id or worker: a misconfiguration or a restart racing its predecessor).
    fn add_process(&mut self, id: u32, weight: u32, worker: u16) -> usize {
        let i = self.nodes.len();
        self.nodes.push(Node {
            core: Membership::with_lease(NodeId(id), LeaseConfig::new(self.cfg.ttl_ms)),
            worker,
            me: Member {
                id: NodeId(id),
                mesh_addr: format!("10.0.0.{id}:7100"),
                client_addr: format!("10.0.0.{id}:7000"),
                weight,
                state: MemberState::Active,
            },
            alive: true,
            next_heartbeat: self.now,
            last_heartbeat: 0,
            source_down: false,
            source_down_reports: 0,
            decisions: Vec::new(),
            ignored: Vec::new(),
        });
        self.net.links.push(Link {
            delay_ms: self.cfg.delay_ms,
            jitter_ms: 0,
            drop_per_mille: 0,
            drop_next: 0,
            partitioned: false,
        });
        self.net.dropped.push(0);
        self.net.lost_in_partition.push(0);
        self.heartbeat(i);
        i
    }

    /// The process dies: it stops heartbeating and hears nothing more.
    fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Cuts node `i` off from the source both ways.
    fn partition(&mut self, i: usize) {
        self.net.links[i].partitioned = true;
    }

    fn heal(&mut self, i: usize) {
        self.net.links[i].partitioned = false;
    }

    /// Node `i` starts draining: it re-registers as Draining at once.
    fn drain(&mut self, i: usize) {
        self.nodes[i].me.state = MemberState::Draining;
        self.heartbeat(i);
    }

    fn core(&self, i: usize) -> &Membership {
        &self.nodes[i].core
    }

    /// Feeds one event to node `i`'s core, checking the core's invariants, and logs the result.
    fn feed(&mut self, i: usize, ev: Event) {
        let now = self.now;
        let node = &mut self.nodes[i];
        let before = node.core.epoch();
        let old_ring = Arc::clone(node.core.ring());
        let offered = match &ev {
            Event::Snapshot(s) => Some(s.epoch),
            _ => None,
        };
        let decisions = node.core.handle(ev);
        let after = node.core.epoch();
        assert!(
            after >= before,
            "node {i}: epoch went back {before} -> {after}"
        );
        match offered {
            Some(e) if e <= before => {
                assert!(decisions.is_empty(), "node {i}: ignored snapshot decided");
                assert_eq!(after, before);
                assert!(Arc::ptr_eq(&old_ring, node.core.ring()));
                node.ignored.push((e, before));
            }
            Some(e) if after == before => {
                // Deferred: a shrink while the source may have lost registrations.
                assert!(
                    node.core.holding_shrink(),
                    "node {i}: newer epoch {e} ignored"
                );
                assert!(Arc::ptr_eq(&old_ring, node.core.ring()));
                assert!(
                    decisions.iter().all(
                        |d| matches!(d, Decision::ShrinkDeferred { epoch, .. } if *epoch == e)
                    ),
                    "node {i}: {decisions:?}"
                );
            }
            Some(e) => assert_eq!(after, e, "node {i}: a newer snapshot sets the epoch"),
            None => assert_eq!(after, before, "node {i}: only snapshots move the epoch"),
        }
        for d in &decisions {
            if let Decision::RingChanged {
                epoch,
                joined,
                left,
            } = d
            {
                let ring = node.core.ring();
                assert_eq!(*epoch, after);
                assert!(
                    !Arc::ptr_eq(&old_ring, ring),
                    "RingChanged without a new ring"
                );
                assert!(joined.iter().all(|n| ring.members().contains(n)));
                assert!(joined.iter().all(|n| !old_ring.members().contains(n)));
                assert!(left.iter().all(|n| !ring.members().contains(n)));
                assert!(left.iter().all(|n| old_ring.members().contains(n)));
            }
        }
        if decisions.is_empty() && offered.is_some_and(|e| e > before) {
            assert!(
                Arc::ptr_eq(&old_ring, node.core.ring()),
                "node {i}: the ring was rebuilt without a RingChanged"
            );
        }
        node.decisions
            .extend(decisions.into_iter().map(|d| (now, d)));
    }

    /// Sends the source's latest snapshot to every live node.
    fn publish(&mut self) {
        let snapshot = self.source.snapshot();
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                self.net
                    .send(self.now, i, snapshot.clone(), self.source.instance);
            }
        }
    }

    /// Node `i`'s driver heartbeats: through its link, which may be cut.
    fn heartbeat(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].next_heartbeat = now + self.cfg.heartbeat_ms;
        if self.net.links[i].partitioned {
            self.nodes[i].source_down = true;
            self.nodes[i].source_down_reports += 1;
            self.feed(i, Event::SourceDown { now_ms: now });
            return;
        }
        if self.nodes[i].source_down {
            self.nodes[i].source_down = false;
            self.feed(i, Event::SourceUp { now_ms: now });
        }
        self.nodes[i].last_heartbeat = now;
        let me = self.nodes[i].me.clone();
        let changed = self.source.heartbeat(now, &me);
        let answer = self.source.lease(now, self.nodes[i].worker, i);
        let instance = self.source.instance.to_string();
        self.feed(
            i,
            Event::SourceInstance {
                id: instance,
                now_ms: now,
            },
        );
        self.feed(
            i,
            Event::LeaseRound {
                sent_at_ms: now,
                now_ms: now,
                held: answer.held,
                no_history: answer.no_history,
            },
        );
        if changed {
            self.publish();
        }
    }

    /// Live nodes that may serve (issue ids) now.
    fn serving(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && self.core(i).may_serve(self.now))
            .collect()
    }

    /// Fencing: a live node that may serve holds its worker-id lease at the source now (or
    /// held it when the source last restarted empty and has not heard from it since), at most
    /// one live node serves per worker id, and decisions agree with the clock.
    fn check_fencing(&self) {
        let mut servers: BTreeMap<u16, usize> = BTreeMap::new();
        for i in self.serving() {
            let n = &self.nodes[i];
            if let Some(other) = servers.insert(n.worker, i) {
                panic!(
                    "t={}: nodes {other} and {i} both serve worker {}",
                    self.now, n.worker
                );
            }
            let unheard_since_wipe = self.source.wiped_at.is_some_and(|w| w >= n.last_heartbeat);
            assert!(
                self.source.holds(self.now, n.worker, i) || unheard_since_wipe,
                "t={}: node {i} serves without holding worker {}",
                self.now,
                n.worker
            );
            assert!(
                !n.core.is_fenced(),
                "t={}: node {i} serving but fenced",
                self.now
            );
        }
    }

    /// Advances the clock by one step and runs everything due.
    fn step(&mut self) {
        self.now += self.cfg.step_ms;
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive && self.nodes[i].next_heartbeat <= now {
                self.heartbeat(i);
            }
        }
        if self.source.expire(now) {
            self.publish();
        }
        if self.next_resync <= now {
            self.next_resync = now + self.cfg.resync_ms;
            self.publish();
        }
        for m in self.net.due(now) {
            if !self.nodes[m.to].alive {
                continue;
            }
            if self.net.links[m.to].partitioned {
                self.net.lost_in_partition[m.to] += 1;
                continue;
            }
            self.feed(
                m.to,
                Event::SourceInstance {
                    id: m.instance.to_string(),
                    now_ms: now,
                },
            );
            self.feed(m.to, Event::Snapshot(m.snapshot));
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                self.feed(i, Event::Tick { now_ms: now });
            }
        }
        self.check_fencing();
    }

    fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    /// Steps until `done` holds (checked before each step), for at most `max_ms`.
    fn run_until(&mut self, max_ms: u64, done: impl Fn(&Self) -> bool) -> bool {
        let end = self.now + max_ms;
        while !done(self) {
            if self.now >= end {
                return false;
            }
            self.step();
        }
        true
    }

    /// Indexes of nodes that are alive and can reach the source.
    fn reachable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].alive && !self.net.links[i].partitioned)
    }

    /// Every reachable node is at the source's epoch.
    fn converged(&self) -> bool {
        self.reachable()
            .all(|i| self.nodes[i].core.epoch() == self.source.epoch)
    }

    /// Asserts that the reachable nodes agree on the epoch, the members and the owner of
    /// every user in `users`.
    fn assert_agree(&self, users: &[UserId]) {
        let nodes: Vec<usize> = self.reachable().collect();
        let first = self.core(nodes[0]);
        for &i in &nodes[1..] {
            let core = self.core(i);
            assert_eq!(core.epoch(), first.epoch(), "node {i} epoch");
            assert!(core.members().eq(first.members()), "node {i} members");
            assert_eq!(
                core.ring().members(),
                first.ring().members(),
                "node {i} ring"
            );
            for &u in users {
                assert_eq!(core.owner(u), first.owner(u), "node {i} owner of {u}");
            }
        }
    }
}

fn sample_users(n: u64) -> Vec<UserId> {
    (0..n).map(|u| UserId(u * 104_729 + 7)).collect()
}

fn ids(ns: impl IntoIterator<Item = u32>) -> Vec<NodeId> {
    ns.into_iter().map(NodeId).collect()
}

/// Five nodes (ids 1..=5, weight 1) registered 100 ms apart, run until they agree and serve
/// (their worker ids are new to the source: each waits a TTL after its first round).
fn five_nodes(cfg: Config) -> Sim {
    let mut sim = Sim::new(cfg);
    for id in 1..=5 {
        sim.add_node(id, 1);
        sim.run_for(100);
    }
    assert!(sim.run_until(1_000, Sim::converged), "five nodes converge");
    assert!(
        sim.run_until(cfg.ttl_ms, |s| s.serving().len() == 5),
        "five nodes serve"
    );
    sim
}

#[test]
fn five_nodes_converge_on_one_epoch_and_one_owner_per_user() {
    let sim = five_nodes(Config::default());
    assert_eq!(sim.source.epoch, 5, "one epoch per registration");
    let users = sample_users(10_000);
    sim.assert_agree(&users);
    for i in 0..5 {
        let core = sim.core(i);
        assert_eq!(core.epoch(), 5);
        assert_eq!(core.ring().members(), ids(1..=5).as_slice());
        assert_eq!(core.members().count(), 5);
        // Registration order shows in the log: the ring grew one member per epoch it saw.
        let changes = sim.nodes[i].ring_changes();
        assert_eq!(changes.last().map(|c| c.0), Some(5));
        let all_joined: BTreeSet<NodeId> =
            changes.iter().flat_map(|c| c.1.iter().copied()).collect();
        assert_eq!(all_joined, ids(1..=5).into_iter().collect());
    }
    // Every user has exactly one owner, and every member owns a fair share.
    let mut load: BTreeMap<NodeId, u32> = BTreeMap::new();
    for &u in &users {
        let owner = sim.core(0).owner(u).expect("owner");
        *load.entry(owner).or_default() += 1;
        let locals = (0..5).filter(|&i| sim.core(i).is_local(u)).count();
        assert_eq!(locals, 1, "{u} is local on exactly one node");
    }
    assert_eq!(load.len(), 5);
    assert!(
        load.values().all(|&l| (1_800..2_200).contains(&l)),
        "{load:?}"
    );
}

#[test]
fn dropped_and_reordered_deliveries_still_converge_on_the_newest_epoch() {
    let mut sim = five_nodes(Config::default());
    // Nodes 0 and 1 lose half of everything; node 3 loses the next two deliveries; node 2
    // gets the next publish late, after the one that follows it.
    sim.net.links[0].drop_per_mille = 500;
    sim.net.links[1].drop_per_mille = 500;
    sim.net.links[3].drop_next = 2;
    sim.net.links[2].delay_ms = 800;
    sim.add_node(6, 1);
    let e1 = sim.source.epoch;
    sim.run_for(50);
    sim.net.links[2].delay_ms = 5;
    sim.add_node(7, 1);
    let e2 = sim.source.epoch;
    assert_eq!(e2, e1 + 1);

    // Node 2 adopts e2 first; e1 arrives ~750 ms later and is ignored.
    sim.run_for(20);
    assert_eq!(sim.core(2).epoch(), e2);
    sim.run_for(800);
    assert!(
        sim.nodes[2]
            .ignored
            .iter()
            .any(|&(e, at)| e == e1 && at == e2),
        "the overtaken snapshot was ignored: {:?}",
        sim.nodes[2].ignored
    );
    assert_eq!(sim.core(2).epoch(), e2);
    let epochs: Vec<u64> = sim.nodes[2].ring_changes().iter().map(|c| c.0).collect();
    assert!(!epochs.contains(&e1), "no decision for the stale epoch");
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");

    assert!(
        sim.run_until(10_000, Sim::converged),
        "resyncs repair the drops"
    );
    assert!(
        sim.net.dropped[0] + sim.net.dropped[1] > 0,
        "drops happened"
    );
    assert_eq!(sim.net.dropped[3], 2);
    let users = sample_users(10_000);
    sim.assert_agree(&users);
    for i in sim.reachable().collect::<Vec<_>>() {
        assert_eq!(sim.core(i).ring().members(), ids(1..=7).as_slice());
    }
    // Periodic resyncs are duplicates: ignored, and they made no decision (checked in feed).
    let dups = sim.nodes[4]
        .ignored
        .iter()
        .filter(|&&(e, at)| e == at)
        .count();
    assert!(dups > 0, "resyncs reached node 4 as duplicates");
}

#[test]
fn a_dead_node_expires_and_only_its_users_move() {
    let mut sim = five_nodes(Config::default());
    let users = sample_users(10_000);
    let old: Arc<Ring> = Arc::clone(sim.core(0).ring());
    let dead = NodeId(3);
    sim.kill(2);
    let last_heartbeat = sim.nodes[2].last_heartbeat;
    assert!(
        sim.run_until(10_000, |s| !s.source.has(dead) && s.converged()),
        "the source expires the dead node and survivors adopt it"
    );
    // The source waited out the TTL, not less, not more.
    assert_eq!(
        sim.source.expired,
        vec![(last_heartbeat + sim.cfg.ttl_ms, dead)]
    );
    sim.assert_agree(&users);

    let survivors = [0usize, 1, 3, 4];
    let new: Arc<Ring> = Arc::clone(sim.core(0).ring());
    assert_eq!(new.members(), ids([1, 2, 4, 5]).as_slice());
    for &i in &survivors {
        let changes = sim.nodes[i].ring_changes();
        let last = changes.last().expect("a ring change");
        assert_eq!((&last.1, &last.2), (&vec![], &vec![dead]));
    }

    let mut dead_users = 0;
    for &u in &users {
        let was = old.owner(u).expect("owner");
        let is = new.owner(u).expect("owner");
        if was == dead {
            dead_users += 1;
            assert_ne!(is, dead);
            assert!(new.members().contains(&is), "{u} has a live owner");
        } else {
            assert_eq!(is, was, "{u} was on a survivor and must not move");
        }
    }
    assert!(dead_users > 1_500, "the dead node owned {dead_users}");
    // Survivors hand off nothing; the dead node's users are exactly what it would have
    // handed off.
    for &i in &survivors {
        let me = sim.core(i).me();
        let mine = users.iter().copied().filter(|&u| old.owner(u) == Some(me));
        assert!(moved_away(&old, &new, me, mine).is_empty(), "node {me}");
    }
    let handed = moved_away(&old, &new, dead, users.iter().copied());
    assert_eq!(handed.len(), dead_users);
    assert!(handed.iter().all(|&(u, to)| new.owner(u) == Some(to)));
}

#[test]
fn a_join_moves_about_one_nth_and_moved_away_reports_exactly_those_users() {
    let mut sim = five_nodes(Config::default());
    let users = sample_users(20_000);
    let old: Arc<Ring> = Arc::clone(sim.core(0).ring());
    let joiner = NodeId(6);
    sim.add_node(6, 1);
    assert!(sim.run_until(1_000, Sim::converged));
    sim.assert_agree(&users);
    let new: Arc<Ring> = Arc::clone(sim.core(0).ring());
    assert_eq!(new.members(), ids(1..=6).as_slice());
    for i in 0..5 {
        let last = sim.nodes[i].ring_changes().pop().expect("a ring change");
        assert_eq!((last.1, last.2), (vec![joiner], vec![]));
    }

    let moved: BTreeSet<UserId> = users
        .iter()
        .copied()
        .filter(|&u| old.owner(u) != new.owner(u))
        .collect();
    let ideal = users.len() as f64 / 6.0;
    let n = moved.len() as f64;
    assert!(
        n <= 1.1 * ideal && n >= 0.9 * ideal,
        "moved {n} (ideal {ideal:.0})"
    );
    assert!(moved.iter().all(|&u| new.owner(u) == Some(joiner)));
    // The joiner now owns exactly the moved users.
    assert!(
        users
            .iter()
            .all(|&u| sim.core(5).is_local(u) == moved.contains(&u))
    );

    let mut reported = BTreeSet::new();
    for k in 1..=5 {
        let from_k = moved_away(&old, &new, NodeId(k), users.iter().copied());
        assert!(from_k.iter().all(|&(_, to)| to == joiner));
        let expected: BTreeSet<UserId> = moved
            .iter()
            .copied()
            .filter(|&u| old.owner(u) == Some(NodeId(k)))
            .collect();
        let got: BTreeSet<UserId> = from_k.iter().map(|&(u, _)| u).collect();
        assert_eq!(got.len(), from_k.len(), "no user reported twice");
        assert_eq!(got, expected, "node {k}");
        reported.extend(got);
    }
    assert_eq!(reported, moved);
}

#[test]
fn a_partitioned_node_keeps_serving_once_per_outage_and_catches_up_after_healing() {
    let mut sim = five_nodes(Config::default());
    let users = sample_users(10_000);
    let p = 2;
    let before_epoch = sim.core(p).epoch();
    let before_ring = Arc::clone(sim.core(p).ring());

    sim.partition(p);
    sim.add_node(6, 1);
    // Long enough for node 3's entry to expire at the source.
    sim.run_for(5_000);
    assert!(
        !sim.source.has(NodeId(3)),
        "the source expired the cut-off node"
    );
    assert!(
        sim.nodes[p].source_down_reports >= 4,
        "every heartbeat failed"
    );
    assert_eq!(
        sim.nodes[p].keep_serving(),
        vec![before_epoch],
        "once per outage"
    );
    assert_eq!(sim.core(p).epoch(), before_epoch);
    assert!(
        Arc::ptr_eq(sim.core(p).ring(), &before_ring),
        "the last ring is kept"
    );
    assert!(sim.core(p).outage_since_ms().is_some());
    assert!(
        sim.net.lost_in_partition[p] > 0,
        "deliveries were lost meanwhile"
    );
    // It still answers from its last ring, while the others moved on without it.
    assert!(users.iter().any(|&u| sim.core(p).is_local(u)));
    assert!(sim.converged());
    sim.assert_agree(&users);
    assert_eq!(
        sim.core(0).ring().members(),
        ids([1, 2, 4, 5, 6]).as_slice()
    );

    sim.heal(p);
    assert!(
        sim.run_until(3_000, |s| s.source.has(NodeId(3)) && s.converged()),
        "it re-registers and catches up"
    );
    assert!(sim.core(p).epoch() > before_epoch);
    assert_eq!(sim.core(p).epoch(), sim.source.epoch);
    assert_eq!(
        sim.core(p).outage_since_ms(),
        None,
        "SourceUp ended the outage"
    );
    sim.assert_agree(&users);
    assert_eq!(sim.core(p).ring().members(), ids(1..=6).as_slice());

    // A second outage is a new outage: one more KeepServing, at the new epoch.
    let second_epoch = sim.core(p).epoch();
    sim.partition(p);
    sim.run_for(1_500);
    sim.heal(p);
    assert!(sim.run_until(3_000, Sim::converged));
    assert_eq!(
        sim.nodes[p].keep_serving(),
        vec![before_epoch, second_epoch]
    );
}

#[test]
fn plan_groups_recipients_by_owner_one_entry_per_node() {
    let sim = five_nodes(Config::default());
    let recipients = sample_users(1_000);
    let plan = sim.core(0).plan(&recipients);
    assert!(plan.len() <= 5, "{} entries", plan.len());
    let mut seen = BTreeSet::new();
    for (node, group) in &plan {
        assert!(!group.is_empty());
        for &u in group {
            assert!(seen.insert(u), "{u} planned twice");
            assert_eq!(sim.core(0).owner(u), Some(*node));
        }
    }
    assert_eq!(seen, recipients.iter().copied().collect());
    // Any node plans the same fan-out.
    for i in 1..5 {
        assert_eq!(sim.core(i).plan(&recipients), plan, "node {i}");
    }
}

#[test]
fn draining_members_own_no_users_but_stay_members() {
    let mut sim = five_nodes(Config::default());
    let users = sample_users(10_000);
    let draining = NodeId(2);
    assert!(users.iter().any(|&u| sim.core(1).is_local(u)));
    sim.drain(1);
    assert!(sim.run_until(1_000, Sim::converged));
    sim.assert_agree(&users);
    for i in 0..5 {
        let core = sim.core(i);
        assert_eq!(core.members().count(), 5);
        assert_eq!(
            core.member(draining).map(|m| m.state),
            Some(MemberState::Draining)
        );
        assert_eq!(core.ring().members(), ids([1, 3, 4, 5]).as_slice());
        assert!(users.iter().all(|&u| core.owner(u) != Some(draining)));
        let last = sim.nodes[i].ring_changes().pop().expect("a ring change");
        assert_eq!((last.1, last.2), (vec![], vec![draining]));
    }
    assert!(users.iter().all(|&u| !sim.core(1).is_local(u)));
    // Its heartbeats keep it registered while it drains.
    sim.run_for(5_000);
    assert!(sim.source.has(draining));
    assert!(sim.core(0).member(draining).is_some());
}

/// Random kills, joins, partitions and lossy links over many seeds: whatever happened, once
/// the links heal, every reachable node ends on the source's epoch with the same ring.
#[test]
fn random_faults_always_converge() {
    let users = sample_users(2_000);
    let mut stale = 0;
    for seed in 1..=6u64 {
        let mut sim = Sim::new(Config {
            seed,
            ..Config::default()
        });
        for id in 1..=4 {
            sim.add_node(id, 1 + id % 2);
        }
        let mut next_id = 5;
        for round in 0..8u64 {
            let r = sim.net.next_random();
            let n = sim.nodes.len();
            let i = (r % n as u64) as usize;
            match (r >> 8) % 5 {
                0 => sim.partition(i),
                1 => sim.heal(i),
                2 if sim.reachable().count() > 2 => sim.kill(i),
                3 => {
                    sim.add_node(next_id, 1);
                    next_id += 1;
                }
                _ => sim.net.links[i].drop_per_mille = 300,
            }
            sim.net.links[i].delay_ms = 1 + (r >> 16) % 300;
            sim.net.links[i].jitter_ms = (r >> 20) % 1_500;
            sim.run_for(500 + (r >> 24) % 3_000);
            assert!(
                sim.nodes.iter().filter(|n| n.alive).count() >= 2,
                "seed {seed} round {round}"
            );
        }
        for i in 0..sim.nodes.len() {
            sim.heal(i);
            sim.net.links[i].drop_per_mille = 0;
        }
        assert!(
            sim.run_until(10_000, |s| {
                // Settled: the dead have expired and everyone live is registered.
                s.nodes.iter().all(|n| s.source.has(n.me.id) == n.alive) && s.converged()
            }),
            "seed {seed}: no convergence"
        );
        sim.assert_agree(&users);
        stale += sim
            .nodes
            .iter()
            .flat_map(|n| &n.ignored)
            .filter(|&&(e, at)| e < at)
            .count();
        let live: Vec<NodeId> = sim
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.me.id)
            .collect();
        assert_eq!(
            sim.core(sim.reachable().next().expect("a live node"))
                .ring()
                .members(),
            live.as_slice()
        );
    }
    assert!(stale > 0, "jitter reordered some deliveries");
}

/// The times at which node `i` was fenced and unfenced, in order.
fn fence_log(sim: &Sim, i: usize) -> Vec<(u64, bool)> {
    sim.nodes[i]
        .decisions
        .iter()
        .filter_map(|(t, d)| match d {
            Decision::Fenced { .. } => Some((*t, true)),
            Decision::Unfenced { .. } => Some((*t, false)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_partitioned_node_fences_itself_before_its_worker_id_can_be_taken() {
    let cfg = Config::default();
    let mut sim = five_nodes(cfg);
    let p = 2;
    let worker = sim.nodes[p].worker;
    let log = fence_log(&sim, p);
    assert!(
        log.len() == 1 && !log[0].1,
        "serving since its first round: {log:?}"
    );

    // Cut it off, and start a second process configured with the same worker id (a
    // replacement started while the old one is only unreachable).
    let cut_at = sim.now;
    sim.partition(p);
    let twin = sim.add_process(9, 1, worker);
    assert!(
        !sim.core(twin).may_serve(sim.now),
        "the lease is still held"
    );
    assert!(sim.run_until(10_000, |s| s.core(twin).may_serve(s.now)));
    let twin_from = sim.now;

    let log = fence_log(&sim, p);
    assert_eq!(log.len(), 2, "{log:?}");
    let fenced_at = log[1].0;
    assert!(log[1].1, "fenced");
    assert!(
        fenced_at < twin_from,
        "fenced at {fenced_at}, the twin took the worker at {twin_from}"
    );
    // Within one TTL of its last good round (heartbeats are 1 s apart).
    assert!(fenced_at <= cut_at + cfg.ttl_ms, "fenced at {fenced_at}");
    // Its last ring is kept (KeepServing), but it may not serve on it.
    assert!(sim.core(p).is_fenced());

    // Healed, it stays fenced: the twin holds the worker now.
    sim.heal(p);
    sim.run_for(3 * cfg.ttl_ms);
    assert!(sim.core(p).is_fenced());
    assert_eq!(fence_log(&sim, p).len(), 2);

    // The twin dies: the worker id comes back to it after the twin's lease expires.
    sim.kill(twin);
    assert!(sim.run_until(2 * cfg.ttl_ms, |s| !s.core(p).is_fenced()));
    assert!(sim.now >= twin_from + cfg.ttl_ms - cfg.heartbeat_ms);
}

#[test]
fn two_processes_with_one_node_id_never_serve_together() {
    let cfg = Config::default();
    let mut sim = Sim::new(cfg);
    let first = sim.add_node(1, 1);
    sim.add_node(2, 1);
    // A restart of node 1 that races its predecessor (same node id, same worker id).
    let second = sim.add_process(1, 1, 1);
    sim.run_for(2 * cfg.ttl_ms);
    assert!(sim.core(first).may_serve(sim.now));
    assert!(sim.core(second).is_fenced(), "never held the lease");
    assert!(fence_log(&sim, second).is_empty(), "it never served");

    sim.kill(first);
    assert!(sim.run_until(2 * cfg.ttl_ms, |s| s.core(second).may_serve(s.now)));
}

/// Ring sizes node `i` adopted at or after `since`.
fn ring_sizes_since(sim: &Sim, i: usize, since: u64) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut size = None;
    for (t, d) in &sim.nodes[i].decisions {
        if let Decision::RingChanged { joined, left, .. } = d {
            let s: usize = size.unwrap_or(0) + joined.len() - left.len();
            size = Some(s);
            if *t >= since {
                sizes.push(s);
            }
        }
    }
    sizes
}

#[test]
fn a_source_restarted_empty_shrinks_no_ring_and_the_holders_serve_on() {
    let cfg = Config::default();
    let mut sim = five_nodes(cfg);
    let users = sample_users(5_000);
    let before = Arc::clone(sim.core(0).ring());
    let epoch = sim.source.epoch;
    let logs: Vec<_> = (0..5).map(|i| fence_log(&sim, i)).collect();
    let wiped = sim.now;
    sim.source.wipe(wiped);
    // The nodes re-register one by one at their next heartbeats; every snapshot in between
    // lacks someone.
    assert!(sim.run_until(3 * cfg.heartbeat_ms, |s| {
        s.nodes.iter().all(|n| s.source.has(n.me.id)) && s.converged()
    }));
    assert!(sim.source.epoch > epoch, "epochs go on");
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(
            ring_sizes_since(&sim, i, wiped),
            Vec::<usize>::new(),
            "node {i} adopted no other ring (wiped at {wiped}): {:?}",
            sim.nodes[i].decisions
        );
        assert_eq!(sim.core(i).ring().members(), ids(1..=5).as_slice());
        assert!(
            sim.nodes[i]
                .decisions
                .iter()
                .any(|(t, d)| *t >= wiped && matches!(d, Decision::ShrinkDeferred { .. })),
            "node {i} saw a shrink and deferred it"
        );
        // Each retook its own lease with no history and, having held it throughout, served on.
        assert_eq!(&fence_log(&sim, i), log, "node {i}");
    }
    sim.assert_agree(&users);
    assert!(
        users
            .iter()
            .all(|&u| sim.core(0).owner(u) == before.owner(u))
    );

    // A member that died with the restart never re-registers: dropped once the grace ends.
    sim.source.wipe(sim.now);
    sim.kill(4);
    let wiped = sim.now;
    assert!(sim.run_until(3 * cfg.ttl_ms, |s| {
        s.reachable()
            .all(|i| s.core(i).ring().members() == ids(1..=4).as_slice())
    }));
    assert!(sim.now >= wiped + cfg.ttl_ms, "held for the grace");
    for i in 0..4 {
        assert_eq!(ring_sizes_since(&sim, i, wiped), vec![4], "node {i}");
    }
}

#[test]
fn a_process_that_takes_a_forgotten_worker_id_waits_out_the_old_holders_lease() {
    let cfg = Config::default();
    let mut sim = five_nodes(cfg);
    let old = 2;
    let worker = sim.nodes[old].worker;
    // A second process configured with the same worker id: refused while the lease is held.
    let twin = sim.add_process(9, 1, worker);
    sim.run_for(cfg.heartbeat_ms);
    assert!(sim.core(old).may_serve(sim.now));
    assert!(!sim.core(twin).may_serve(sim.now));

    // The source restarts empty and the twin's round reaches it first: it takes the worker id
    // with no history, while the old holder is still inside its lease.
    sim.source.wipe(sim.now);
    sim.heartbeat(twin);
    let taken = sim.now;
    assert!(sim.source.holds(sim.now, worker, twin));
    assert!(sim.core(old).may_serve(sim.now), "still inside its lease");
    assert!(!sim.core(twin).may_serve(sim.now), "waits a TTL");
    // The old holder learns at its next round that the lease is another's and stops; the
    // twin serves a full TTL after its take. At most one serves at any step (check_fencing).
    assert!(sim.run_until(2 * cfg.ttl_ms, |s| s.core(twin).may_serve(s.now)));
    assert_eq!(sim.now, taken + cfg.ttl_ms);
    assert!(sim.core(old).is_fenced());

    // A node cut off past its lease that comes back to a wiped source waits a TTL too.
    let p = 3;
    sim.partition(p);
    assert!(sim.run_until(2 * cfg.ttl_ms, |s| s.core(p).is_fenced()));
    sim.source.wipe(sim.now);
    sim.heal(p);
    assert!(sim.run_until(cfg.heartbeat_ms + 1, |s| s.source.holds(
        s.now,
        s.nodes[p].worker,
        p
    )));
    let retaken = sim.nodes[p].last_heartbeat;
    assert!(sim.run_until(2 * cfg.ttl_ms, |s| s.core(p).may_serve(s.now)));
    assert_eq!(sim.now, retaken + cfg.ttl_ms);
}
