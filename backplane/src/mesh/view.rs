//! The member view and routing: the member set and ring every routing decision is made
//! from, adopting a new one (peers added and removed, users connected here whose home moved
//! told to reconnect there), where a user is homed, the send path's [`Router`] (recipients
//! homed here to this node, one envelope per other node), envelopes received from peers
//! (delivered here, or forwarded once to the owner), the resync of pushes that went to a
//! peer which then left the member set, and a static cluster's ring without its draining
//! members.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use meshchat_idgen::{ChannelId, NodeId, UserId};
use meshchat_proto::mesh::{self as pm, envelope};
use tracing::{Instrument, debug, info, info_span, warn};

use super::link::dial_loop;
use super::peer::{Missed, Peer, deliver_envelopes};
use super::{Mesh, MeshMember};

/// Redirects a node sends per [`REDIRECT_TICK`] after a ring change moved users it serves
/// (400 a second per node: a node that comes back takes about 800 handshakes a second from
/// two others, which one core of this project's machine absorbs beside the traffic).
const REDIRECTS_PER_TICK: usize = 40;
/// See [`REDIRECTS_PER_TICK`].
const REDIRECT_TICK: Duration = Duration::from_millis(100);
use crate::delivery::{ConnId, Delivery, Home, MemberView, PresenceChange, Router};
use crate::fanout;
use crate::ring::Ring;

/// A static cluster's ring input: the members not draining, by weight; all of them if that
/// would leave no weight (users always have a home).
fn static_ring_weights(
    members: &[MeshMember],
    draining: &std::collections::BTreeSet<NodeId>,
    running: impl Fn(NodeId) -> bool,
) -> BTreeMap<NodeId, u32> {
    let pick = |keep: &dyn Fn(NodeId) -> bool| -> BTreeMap<NodeId, u32> {
        members
            .iter()
            .filter(|m| keep(m.id))
            .map(|m| (m.id, m.weight))
            .collect()
    };
    let has_weight = |w: &BTreeMap<NodeId, u32>| w.values().any(|&w| w > 0);
    let active = pick(&|id| !draining.contains(&id));
    if has_weight(&active) {
        return active;
    }
    // Everyone drains: those still running keep the users (a drained member that stopped
    // cannot); if none, the whole list.
    let up = pick(&|id| running(id));
    if has_weight(&up) { up } else { pick(&|_| true) }
}

/// Whether `me`, draining, withdraws its drain: every member with weight drains (nobody
/// would take the users) and a lower id that is still running (`running`: linked now) drains
/// too; one that drained and stopped does not count. Every member applies it to what it has
/// heard, so of the members that drained at once only the lowest id goes on.
fn must_withdraw(
    me: NodeId,
    members: &[MeshMember],
    draining: &std::collections::BTreeSet<NodeId>,
    running: impl Fn(NodeId) -> bool,
) -> bool {
    draining.contains(&me)
        && members
            .iter()
            .all(|m| m.weight == 0 || draining.contains(&m.id))
        && draining.iter().any(|&id| id < me && running(id))
}

/// Why a node of a static cluster cannot start draining.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaticDrainError {
    /// The member list is not static: Redis membership drains through Redis.
    #[error("the member list is not static")]
    NotStatic,
    /// Another member said it drains and is still running: two at once could leave nobody
    /// to take the users.
    #[error("node {0} is draining: drain one node at a time")]
    OtherDraining(u32),
    /// No other member is left on the ring to take this node's users.
    #[error("no other node is on the ring to take this node's users")]
    NoOtherNode,
}

/// Forwarding bound for envelopes that reach a node that no longer owns their recipients.
const MAX_HOPS: u32 = 1;

/// What routing decisions are made from: one consistent member set.
pub(super) struct View {
    pub(super) epoch: u64,
    pub(super) ring: Arc<Ring>,
    pub(super) client_addrs: BTreeMap<NodeId, String>,
    pub(super) weights: BTreeMap<NodeId, u32>,
}

impl Mesh {
    /// Adopts a new member set and its ring (same ring on every node): adds and removes
    /// peers, and tells users connected here whose home moved to reconnect there (a redirect
    /// push). Returns how many users were told to move.
    pub fn apply(self: &Arc<Self>, epoch: u64, ring: &Arc<Ring>, members: &[MeshMember]) -> usize {
        let old_ring = {
            let mut v = self.view.write();
            let old_ring = v.ring.clone();
            v.epoch = epoch;
            v.ring = ring.clone();
            v.client_addrs = members
                .iter()
                .map(|m| (m.id, m.client_addr.clone()))
                .collect();
            v.weights = members.iter().map(|m| (m.id, m.weight)).collect();
            old_ring
        };
        let mut peers = self.peers.write();
        // What a departed peer may never have got: its queue and what it missed. Its link
        // hands over what it wrote lately when it ends (`run_link`).
        let mut orphaned = Missed::default();
        let mut gone = Vec::new();
        peers.retain(|id, p| {
            let keep = members.iter().any(|m| m.id == *id && m.mesh_addr == p.addr);
            if !keep {
                let _ = p.gone.send(true);
                info!(peer = id.0, "peer left the member set");
                gone.push(*id);
                for env in p.queue.lock().take_all() {
                    orphaned.add(&env);
                }
                orphaned.absorb(std::mem::take(&mut *p.missed.lock()));
            }
            keep
        });
        for m in members.iter().filter(|m| m.id != self.me) {
            if peers.contains_key(&m.id) {
                continue;
            }
            let peer = Arc::new(Peer::new(
                m.id,
                m.mesh_addr,
                self.peer_queue,
                self.peer_queue_bytes,
            ));
            if m.id > self.me {
                tokio::spawn(
                    dial_loop(
                        self.clone(),
                        self.endpoint.clone(),
                        peer.clone(),
                        self.stop.clone(),
                    )
                    .instrument(info_span!(parent: &self.span, "peer", id = m.id.0)),
                );
            }
            peers.insert(m.id, peer);
        }
        drop(peers);
        for node in gone {
            self.local.presence_node_gone(node);
        }
        self.local.homes_moved(&old_ring, ring, self.me);
        self.retarget(orphaned);
        // Re-home: users connected here whose owner is now another node.
        let moved: Vec<(UserId, NodeId, String)> = {
            let v = self.view.read();
            self.local
                .users()
                .into_iter()
                .filter_map(|user| {
                    let owner = ring.owner(user).unwrap_or(self.me);
                    (owner != self.me).then(|| {
                        let addr = v.client_addrs.get(&owner).cloned().unwrap_or_default();
                        (user, owner, addr)
                    })
                })
                .collect()
        };
        let moved_count = moved.len();
        self.redirect_paced(epoch, ring.clone(), moved);
        let moved = moved_count;
        info!(epoch, members = members.len(), moved, "ring adopted");
        moved
    }

    /// Tells `moved` users their new home, [`REDIRECTS_PER_TICK`] every [`REDIRECT_TICK`]:
    /// a node that joins (or comes back after a partition or a restart) would otherwise get
    /// every moved user's handshake at once from every other node (3,345 at once in a 10k
    /// partition run: its handshakes timed out and the clients churned). Until its redirect
    /// comes a user stays connected here: pushes from this node reach it, pushes from other
    /// nodes go to its new home, where it is not yet (the client's fill after following the
    /// redirect reads back as far as a resync's). Stops if the ring changes again (that
    /// change redirects whoever is still misplaced; a static cluster's drains change the ring
    /// under one epoch, so the ring itself is compared) or the node stops.
    fn redirect_paced(
        self: &Arc<Self>,
        epoch: u64,
        ring: Arc<Ring>,
        moved: Vec<(UserId, NodeId, String)>,
    ) {
        if moved.len() <= REDIRECTS_PER_TICK {
            for (user, owner, addr) in moved {
                self.local.redirect(user, owner, addr, epoch);
            }
            return;
        }
        let mesh = self.clone();
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(REDIRECT_TICK);
                for chunk in moved.chunks(REDIRECTS_PER_TICK) {
                    tick.tick().await;
                    if *mesh.stop.borrow() {
                        return; // the node stops: its clients go anyway
                    }
                    let moved_on = {
                        let v = mesh.view.read();
                        v.epoch != epoch || !Arc::ptr_eq(&v.ring, &ring)
                    };
                    if moved_on {
                        debug!(epoch, "ring changed again: paced redirects stop");
                        return;
                    }
                    for (user, owner, addr) in chunk {
                        mesh.local.redirect(*user, *owner, addr.clone(), epoch);
                    }
                }
                debug!(epoch, "paced redirects done");
            }
            .instrument(self.span.clone()),
        );
    }

    /// Starts this node's drain in a static cluster: every peer hears it (the `NodeState`
    /// lane) and drops this node from its ring, as this node does now; this node keeps its
    /// links and serves the users still here while the ring change redirects them. Returns
    /// false if it was draining already. Refused while another member drains (and is still
    /// linked: one that drained and stopped does not count), or when no other member would
    /// be left on the ring.
    pub fn drain_static(self: &Arc<Self>) -> Result<bool, StaticDrainError> {
        let statics = self.statics.as_ref().ok_or(StaticDrainError::NotStatic)?;
        {
            let mut draining = statics.draining.lock();
            if draining.contains(&self.me) {
                return Ok(false);
            }
            // A member that drained and stopped since (its link down) no longer holds users:
            // only one still running blocks this drain.
            if let Some(other) = draining.iter().find(|&&id| self.peer_up(id)) {
                return Err(StaticDrainError::OtherDraining(other.0));
            }
            // Someone must take the users now: a member that is linked, with weight, and
            // not draining.
            if !statics.members.iter().any(|m| {
                m.id != self.me && m.weight > 0 && !draining.contains(&m.id) && self.peer_up(m.id)
            }) {
                return Err(StaticDrainError::NoOtherNode);
            }
            draining.insert(self.me);
            self.draining.store(true, Ordering::SeqCst);
        }
        for p in self.peers.read().values() {
            p.confirms_drain.store(false, Ordering::SeqCst);
            p.state_owed.store(true, Ordering::SeqCst);
            p.ready.notify_one();
        }
        info!("draining: leaving every member's ring");
        if let Err(e) = self.apply_static() {
            warn!(error = %e, "ring without this node could not be built");
        }
        Ok(true)
    }

    /// Whether every peer linked now has said it took this draining node off its ring (its
    /// `NodeState.sees_your_drain`): until then a static drain must not end, or the node could
    /// stop while a peer (one that drained at the same moment, say) still routes to it.
    /// Peers not linked hear of the drain when their link comes up.
    pub fn drain_confirmed(&self) -> bool {
        // The confirmations first, the drain after: a withdrawal clears the drain before it
        // could leave a confirmation standing.
        let all = self
            .peers
            .read()
            .values()
            .all(|p| p.confirms_drain.load(Ordering::SeqCst) || !p.up.load(Ordering::SeqCst));
        all && self.is_draining()
    }

    /// Whether this node has heard that `peer` drains (what its `NodeState` to it says).
    pub(super) fn sees_drain_of(&self, peer: NodeId) -> bool {
        self.statics
            .as_ref()
            .is_some_and(|s| s.draining.lock().contains(&peer))
    }

    /// Whether this node is draining through the mesh (a static cluster's drain). Turns false
    /// again if the drain is withdrawn (two members drained at once and none would be left:
    /// the higher id withdraws).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The members of a static cluster that said they drain (this node too, if it does).
    pub fn draining_members(&self) -> Vec<NodeId> {
        self.statics
            .as_ref()
            .map(|s| s.draining.lock().iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether the member list is static (configured, not from Redis).
    pub fn is_static(&self) -> bool {
        self.statics.is_some()
    }

    /// Adopts a static cluster's ring: the configured members without those draining (all
    /// of them if every member drains, so users always have a home). Nothing happens when
    /// the ring would not change.
    pub(super) fn apply_static(self: &Arc<Self>) -> Result<(), crate::RingError> {
        let Some(statics) = &self.statics else {
            return Ok(());
        };
        let _in_order = statics.applying.lock();
        let draining = statics.draining.lock().clone();
        let active = static_ring_weights(&statics.members, &draining, |id| {
            id == self.me || self.peer_up(id)
        });
        // The same ring input as Redis membership builds (and clients predict).
        let (weights, per_weight) = crate::ring::params(&active);
        let ring = Ring::build(&weights, per_weight)?;
        {
            let v = self.view.read();
            if !v.ring.members().is_empty() && v.ring.members() == ring.members() {
                return Ok(());
            }
        }
        // Members off the ring are listed with weight 0 (what clients predict homes from),
        // and keep their links.
        let members: Vec<MeshMember> = statics
            .members
            .iter()
            .map(|m| MeshMember {
                weight: if active.contains_key(&m.id) {
                    m.weight
                } else {
                    0
                },
                ..m.clone()
            })
            .collect();
        self.apply(statics.epoch, &Arc::new(ring), &members);
        Ok(())
    }

    /// A peer's `NodeState`: in a static cluster, a member that drains leaves the ring, and one
    /// that no longer drains (restarted) comes back.
    fn peer_state(self: &Arc<Self>, from: NodeId, state: &pm::NodeState) {
        let Some(statics) = &self.statics else {
            return;
        };
        if !statics.members.iter().any(|m| m.id == from) {
            return;
        }
        let peer = self.peer(from);
        let (changed, withdrawn) = {
            let mut draining = statics.draining.lock();
            let changed = if state.draining {
                draining.insert(from)
            } else {
                draining.remove(&from)
            };
            // Drains asked of several members within one round trip can leave no member to
            // take the users: then every draining member but the lowest id withdraws its own
            // drain (each applies the same rule to what it has heard, so they agree once
            // they have heard each other).
            let running = |id: NodeId| id == self.me || self.peer_up(id);
            let withdrawn = must_withdraw(self.me, &statics.members, &draining, running)
                && draining.remove(&self.me);
            if withdrawn {
                self.draining.store(false, Ordering::SeqCst);
            }
            (changed, withdrawn)
        };
        if withdrawn {
            warn!(
                peer = from.0,
                "drain withdrawn: another member drains too and nobody would be left to take \
                 the users (the lower id drains)"
            );
            for p in self.peers.read().values() {
                p.state_owed.store(true, Ordering::SeqCst);
                p.ready.notify_one();
            }
        }
        // After the withdrawal decision: a drain withdrawn just now is not confirmed.
        if let Some(p) = &peer {
            p.confirms_drain.store(
                state.sees_your_drain && self.is_draining(),
                Ordering::SeqCst,
            );
        }
        let mut ring_ok = true;
        if changed || withdrawn {
            info!(peer = from.0, draining = state.draining, "peer drain state");
            if let Err(e) = self.apply_static() {
                warn!(error = %e, "ring could not be built");
                ring_ok = false;
            }
        }
        // Answered with this node's state once its ring is rebuilt: it now says whether this
        // node sees the peer drain (both ends also owe their state at every link up and end).
        if changed
            && ring_ok
            && let Some(p) = &peer
        {
            p.state_owed.store(true, Ordering::SeqCst);
            p.ready.notify_one();
        }
    }

    fn owner(&self, user: UserId) -> NodeId {
        self.view.read().ring.owner(user).unwrap_or(self.me)
    }

    /// Pushes that went to a peer which then left the member set (died): queued for it,
    /// dropped for it, or written into its link shortly before it ended. Its users now live
    /// elsewhere, where they may already be connected and done with their gap fill (they
    /// re-home on their own as soon as the ring moves, which can be before this node learns
    /// of it): their new owners tell them to fill their gaps again, here directly, on a peer
    /// through its resync lane.
    pub(super) fn retarget(&self, orphaned: Missed) {
        if orphaned.is_empty() {
            return;
        }
        if orphaned.all {
            warn!("pushes for a departed peer were lost: resyncing every user");
            self.local.resync(&self.local.users());
            for p in self.peers.read().values() {
                p.missed.lock().add_all();
                p.ready.notify_one();
            }
            return;
        }
        let mut here = Vec::new();
        let mut elsewhere: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for u in orphaned.users {
            match self.owner(UserId(u)) {
                owner if owner == self.me => here.push(UserId(u)),
                owner => elsewhere.entry(owner).or_default().push(u),
            }
        }
        info!(
            here = here.len(),
            elsewhere = elsewhere.values().map(Vec::len).sum::<usize>(),
            "pushes for a departed peer may be lost: resyncing their recipients"
        );
        if !here.is_empty() {
            self.local.resync(&here);
        }
        for (node, users) in elsewhere {
            match self.peer(node) {
                Some(peer) => {
                    peer.missed.lock().add_users(users);
                    peer.ready.notify_one();
                }
                None => warn!(
                    node = node.0,
                    users = users.len(),
                    "no peer entry for the new owner: these users fill at their next reconnect"
                ),
            }
        }
    }

    /// Handles one envelope from a peer.
    pub(super) fn receive(self: &Arc<Self>, from: NodeId, env: pm::Envelope) {
        let d = match env.body {
            Some(envelope::Body::Deliver(d)) => d,
            Some(envelope::Body::NodeState(state)) => {
                self.peer_state(from, &state);
                return;
            }
            Some(envelope::Body::Presence(p)) => {
                // A node that left the member set is forgotten; what its link still delivers
                // after that would leave ghosts online. The view is held while applying: a
                // removal (which forgets the node after changing the view) comes wholly
                // before or after.
                let view = self.view.read();
                if !view.client_addrs.contains_key(&from) {
                    return;
                }
                let changes = p
                    .entries
                    .into_iter()
                    .map(|e| PresenceChange {
                        user: UserId(e.user),
                        online: e.online,
                        at_ms: e.at_unix_ms,
                    })
                    .collect();
                self.local.presence_from(from, p.full, p.more, changes);
                drop(view);
                return;
            }
            Some(envelope::Body::ChannelChanged(c)) => {
                if c.all {
                    self.local.invalidate_all_channels();
                } else {
                    self.local.invalidate_channel(ChannelId(c.channel_id));
                }
                return;
            }
            Some(envelope::Body::Resync(r)) => {
                let users: Vec<UserId> = if r.all {
                    self.local.invalidate_all_channels();
                    self.local.users()
                } else {
                    r.users.into_iter().map(UserId).collect()
                };
                warn!(
                    users = users.len(),
                    all = r.all,
                    "a peer dropped envelopes for us: telling the users to fill their gaps"
                );
                self.local.resync(&users);
                return;
            }
            // UsersMoved comes with dynamic membership.
            _ => return,
        };
        let mut here = Vec::with_capacity(d.recipients.len());
        let mut elsewhere: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        for r in d.recipients {
            let user = UserId(r);
            let owner = self.owner(user);
            if owner == self.me || self.local.is_online(user) || env.hops >= MAX_HOPS {
                here.push(user);
            } else {
                elsewhere.entry(owner).or_default().push(r);
            }
        }
        if !here.is_empty() && self.local.push_to(&here, &d.push, None).queued == 0 {
            debug!(
                users = ?here,
                "push from a peer for users not connected here: they fill at connect"
            );
        }
        for (node, recipients) in elsewhere {
            if let Some(peer) = self.peer(node) {
                let epoch = self.current_epoch();
                for env in deliver_envelopes(epoch, env.hops + 1, recipients, &d.push) {
                    peer.enqueue(env);
                }
            }
        }
    }
}

impl Router for Mesh {
    fn deliver(&self, recipients: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        // One ring for the whole fan-out, and the epoch it belongs to: one lock instead of one
        // per recipient, and a ring change mid-way cannot split the recipients over two rings.
        let (ring, epoch) = {
            let v = self.view.read();
            (v.ring.clone(), v.epoch)
        };
        let me = self.me;
        // A user still connected here (before re-homing) is served here too.
        let plan = fanout::plan(
            me,
            recipients,
            |u| ring.owner(u).unwrap_or(me),
            |u| self.local.is_online(u),
        );
        let mut d = self.local.push_to(&plan.local, push, skip);
        for (node, users) in plan.remote {
            if let Some(peer) = self.peer(node) {
                for env in deliver_envelopes(epoch, 0, users, push) {
                    peer.enqueue(env);
                    d.queued += 1;
                }
            }
        }
        d
    }

    fn epoch(&self) -> u64 {
        self.current_epoch()
    }

    fn members(&self) -> Vec<MemberView> {
        let v = self.view.read();
        v.client_addrs
            .iter()
            .map(|(&node, addr)| MemberView {
                node,
                addr: addr.clone(),
                weight: v.weights.get(&node).copied().unwrap_or(1),
                state: if node == self.me {
                    "self"
                } else if self.peer_up(node) {
                    "up"
                } else {
                    "down"
                },
            })
            .collect()
    }

    fn channel_changed(&self, channel: ChannelId) {
        let peers: Vec<Arc<Peer>> = self.peers.read().values().cloned().collect();
        for peer in peers {
            peer.changed.lock().add(channel);
            peer.ready.notify_one();
        }
    }

    fn presence_changed(&self, changes: &[PresenceChange]) {
        let peers: Vec<Arc<Peer>> = self.peers.read().values().cloned().collect();
        for peer in peers {
            {
                let mut lane = peer.presence.lock();
                for c in changes {
                    lane.add(c);
                }
            }
            peer.ready.notify_one();
        }
    }

    fn home(&self, user: UserId) -> Home {
        let v = self.view.read();
        let owner = v.ring.owner(user).unwrap_or(self.me);
        if owner == self.me {
            Home::Local
        } else {
            Home::Remote {
                node: owner,
                addr: v.client_addrs.get(&owner).cloned().unwrap_or_default(),
                epoch: v.epoch,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn members(weights: &[(u32, u32)]) -> Vec<MeshMember> {
        weights
            .iter()
            .map(|&(id, weight)| MeshMember {
                id: NodeId(id),
                mesh_addr: "127.0.0.1:1".parse().expect("addr"),
                client_addr: String::new(),
                weight,
            })
            .collect()
    }

    fn set(ids: &[u32]) -> BTreeSet<NodeId> {
        ids.iter().map(|&i| NodeId(i)).collect()
    }

    fn all_up(_: NodeId) -> bool {
        true
    }

    #[test]
    fn a_static_ring_leaves_out_draining_members_but_never_every_member() {
        let m = members(&[(1, 1), (2, 1), (3, 2)]);
        let ids = |w: BTreeMap<NodeId, u32>| w.into_keys().map(|n| n.0).collect::<Vec<_>>();
        assert_eq!(ids(static_ring_weights(&m, &set(&[]), all_up)), [1, 2, 3]);
        assert_eq!(ids(static_ring_weights(&m, &set(&[2]), all_up)), [1, 3]);
        assert_eq!(
            static_ring_weights(&m, &set(&[1, 2]), all_up)[&NodeId(3)],
            2
        );
        // Everyone draining: the whole list, so users keep a home.
        assert_eq!(
            ids(static_ring_weights(&m, &set(&[1, 2, 3]), all_up)),
            [1, 2, 3]
        );
        // Only a weight-0 member left: as good as nobody.
        let m = members(&[(1, 1), (2, 0)]);
        assert_eq!(ids(static_ring_weights(&m, &set(&[1]), all_up)), [1, 2]);
    }

    #[test]
    fn of_drains_that_would_leave_nobody_only_the_lowest_id_goes_on() {
        let two = members(&[(1, 1), (2, 1)]);
        // Both drain: 2 withdraws, 1 does not.
        assert!(must_withdraw(NodeId(2), &two, &set(&[1, 2]), all_up));
        assert!(!must_withdraw(NodeId(1), &two, &set(&[1, 2]), all_up));
        // 2 has not heard of 1's drain yet: it goes on until it has.
        assert!(!must_withdraw(NodeId(2), &two, &set(&[2]), all_up));
        // Not draining: nothing to withdraw.
        assert!(!must_withdraw(NodeId(2), &two, &set(&[1]), all_up));
        // Three members, two drain: one is left to take the users, both go on.
        let three = members(&[(1, 1), (2, 1), (3, 1)]);
        assert!(!must_withdraw(NodeId(3), &three, &set(&[1, 3]), all_up));
        // All three: 2 and 3 withdraw.
        let all = set(&[1, 2, 3]);
        assert!(must_withdraw(NodeId(3), &three, &all, all_up));
        assert!(must_withdraw(NodeId(2), &three, &all, all_up));
        assert!(!must_withdraw(NodeId(1), &three, &all, all_up));
        // Node 1 drained and stopped (down): 2 and 3 drain at once; only 3 withdraws.
        let one_down = |id: NodeId| id != NodeId(1);
        assert!(must_withdraw(NodeId(3), &three, &all, one_down));
        assert!(!must_withdraw(NodeId(2), &three, &all, one_down));
    }

    #[test]
    fn when_everyone_drains_the_members_still_running_keep_the_users() {
        let m = members(&[(1, 1), (2, 1), (3, 1)]);
        let ids = |w: BTreeMap<NodeId, u32>| w.into_keys().map(|n| n.0).collect::<Vec<_>>();
        let one_down = |id: NodeId| id != NodeId(1);
        assert_eq!(
            ids(static_ring_weights(&m, &set(&[1, 2, 3]), one_down)),
            [2, 3]
        );
        assert_eq!(
            ids(static_ring_weights(&m, &set(&[1, 2, 3]), |_| false)),
            [1, 2, 3]
        );
    }
}
