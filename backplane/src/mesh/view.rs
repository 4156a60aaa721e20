//! The member view and routing: the member set and ring every routing decision is made
//! from, adopting a new one (peers added and removed, users connected here whose home moved
//! told to reconnect there), where a user is homed, the send path's [`Router`] (recipients
//! homed here to this node, one envelope per other node), envelopes received from peers
//! (delivered here, or forwarded once to the owner), and the resync of pushes that went to a
//! peer which then left the member set.

use std::collections::BTreeMap;
use std::sync::Arc;
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
        self.redirect_paced(epoch, moved);
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
    /// change redirects whoever is still misplaced) or the node stops.
    fn redirect_paced(self: &Arc<Self>, epoch: u64, moved: Vec<(UserId, NodeId, String)>) {
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
                    if mesh.current_epoch() != epoch {
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
    pub(super) fn receive(&self, from: NodeId, env: pm::Envelope) {
        let d = match env.body {
            Some(envelope::Body::Deliver(d)) => d,
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
