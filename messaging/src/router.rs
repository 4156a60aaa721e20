//! Where deliveries go: the one interface between the send path and the cluster.
//!
//! The send path hands a [`Router`] the recipients of one event and the event encoded once.
//! Today every user is homed on the node it connects to, so [`LocalRouter`] pushes straight
//! into this node's [`Registry`]. The mesh (issue 5) implements the same trait: it groups the
//! recipients by home node on the ring, delivers the local group through the registry, and
//! sends one mesh frame per other node, never one per recipient.

use std::sync::Arc;

use bytes::Bytes;
use meshchat_idgen::{ChannelId, NodeId, UserId};

use crate::registry::{ConnId, Delivery, Registry};

/// Where a user is homed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// On this node.
    Local,
    /// On another node: clients of this user are redirected there.
    Remote {
        /// The home node.
        node: NodeId,
        /// The address its clients dial.
        addr: String,
        /// Ring epoch of this decision.
        epoch: u64,
    },
}

/// One member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Node id.
    pub node: NodeId,
    /// Client address.
    pub addr: String,
    /// Ring weight.
    pub weight: u32,
    /// "self", "up" or "down" (this node's link to it).
    pub state: &'static str,
}

/// Delivers pushes to users wherever their connections live.
pub trait Router: Send + Sync + 'static {
    /// Pushes `push` (a `Push` body without its sequence number) to every live connection of
    /// `recipients`, except the connection `skip` (the sender's own device).
    fn deliver(&self, recipients: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery;

    /// The ring epoch routing decisions are made at (0 without a ring).
    fn epoch(&self) -> u64 {
        0
    }

    /// Where `user` is homed.
    fn home(&self, _user: UserId) -> Home {
        Home::Local
    }

    /// A channel's members changed here: tell the nodes that cache its member list.
    fn channel_changed(&self, _channel: ChannelId) {}

    /// The cluster's members as this node sees them; empty for a node alone.
    fn members(&self) -> Vec<MemberView> {
        Vec::new()
    }
}

/// Every user is local: deliver through this node's registry.
#[derive(Debug, Clone)]
pub struct LocalRouter {
    registry: Arc<Registry>,
}

impl LocalRouter {
    /// A router over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Router for LocalRouter {
    fn deliver(&self, recipients: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery {
        self.registry.push_to(recipients, push, skip)
    }
}
