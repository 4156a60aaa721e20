//! Where deliveries go: the one interface between the send path and the cluster.
//!
//! The send path hands a [`Router`] the recipients of one event and the event encoded once.
//! A node alone homes every user, so its [`LocalRouter`] pushes straight into this node's
//! [`Registry`]. In a cluster the mesh (`meshchat_backplane::mesh`) implements the same
//! trait: it groups the recipients by home node on the ring, delivers the local group through
//! [`NodeDelivery`], and sends one mesh frame per other node, never one per recipient.

use std::sync::Arc;

use bytes::Bytes;
use meshchat_backplane::delivery::{LocalDelivery, PresenceChange};
use meshchat_idgen::{ChannelId, NodeId, UserId};
use meshchat_proto::client::{self as pc, push};

// The interface itself is the backplane's (`meshchat_backplane::delivery`), so that the
// backplane never depends on this crate.
pub use meshchat_backplane::delivery::{Home, MemberView, Router};

use crate::members::MemberCache;
use crate::metrics::NodeMetrics;
use crate::node::encode_push;
use crate::registry::{ConnId, Delivery, Registry};

/// Every user is local: deliver through this node's registry.
#[derive(Debug, Clone)]
pub struct LocalRouter {
    registry: Arc<Registry>,
    metrics: NodeMetrics,
}

impl LocalRouter {
    /// A router over `registry`, recording delivery latency in `metrics`.
    pub fn new(registry: Arc<Registry>, metrics: NodeMetrics) -> Self {
        Self { registry, metrics }
    }
}

impl Router for LocalRouter {
    fn deliver(&self, recipients: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        let d = self.registry.push_to(recipients, push, skip);
        self.metrics.delivered(push, &d);
        d
    }
}

/// What this node hands the mesh: pushes for its own connections (the registry), the
/// `Redirect` and `Resync` pushes encoded here, and the channel member cache to invalidate.
#[derive(Debug, Clone)]
pub struct NodeDelivery {
    registry: Arc<Registry>,
    members: Arc<MemberCache>,
    metrics: NodeMetrics,
}

impl NodeDelivery {
    /// The mesh's way into `registry` and `members`, recording delivery latency in `metrics`.
    pub fn new(registry: Arc<Registry>, members: Arc<MemberCache>, metrics: NodeMetrics) -> Self {
        Self {
            registry,
            members,
            metrics,
        }
    }
}

impl LocalDelivery for NodeDelivery {
    fn push_to(&self, users: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        let d = self.registry.push_to(users, push, skip);
        self.metrics.delivered(push, &d);
        d
    }

    fn is_online(&self, user: UserId) -> bool {
        self.registry.is_online(user)
    }

    fn users(&self) -> Vec<UserId> {
        self.registry.users()
    }

    fn redirect(&self, user: UserId, node: NodeId, addr: String, epoch: u64) {
        let push = encode_push(push::Event::Redirect(pc::Redirect {
            node_id: node.0,
            address: addr,
            ring_epoch: epoch,
            token: String::new(),
        }));
        self.registry.push_to(&[user], &push, None);
    }

    fn resync(&self, users: &[UserId]) {
        self.registry.push_to(
            users,
            &encode_push(push::Event::Resync(pc::Resync {})),
            None,
        );
    }

    fn invalidate_channel(&self, channel: ChannelId) {
        self.members.invalidate(channel);
    }

    fn invalidate_all_channels(&self) {
        self.members.invalidate_all();
    }

    fn presence_snapshot(&self) -> Vec<PresenceChange> {
        self.registry.presence_online()
    }

    fn presence_from(&self, node: NodeId, full: bool, more: bool, changes: Vec<PresenceChange>) {
        self.registry
            .presence()
            .from_peer(node, full, more, changes, crate::auth::now_ms());
    }

    fn presence_node_gone(&self, node: NodeId) {
        self.registry
            .presence()
            .forget_node(node, crate::auth::now_ms());
    }

    fn homes_moved(
        &self,
        old: &meshchat_backplane::Ring,
        new: &meshchat_backplane::Ring,
        me: NodeId,
    ) {
        self.registry
            .presence()
            .reflip_where(crate::auth::now_ms(), |u| {
                new.owner(u) == Some(me) && old.owner(u) != Some(me)
            });
    }
}
