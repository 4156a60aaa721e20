//! The two interfaces between the backplane and the node that serves clients, so that this
//! crate never depends on the node's:
//!
//! - [`Router`]: what the send path asks of the cluster: deliver a push to users wherever
//!   their connections live, where a user is homed, who the members are. The mesh implements
//!   it; a node alone uses a router over its own connections.
//! - [`LocalDelivery`]: what the mesh asks of the node it runs in: push to the connections
//!   it holds, tell users to move or to fill a gap (the node encodes those pushes), and drop
//!   cached channel member lists.
//!
//! With them, the ids and counts both sides share: [`ConnId`], [`Delivery`], [`Home`],
//! [`MemberView`].

use bytes::Bytes;
use meshchat_idgen::{ChannelId, NodeId, UserId};

/// A connection's id, unique within a node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Outcome counts of one fan-out, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Connections the push was queued on.
    pub queued: usize,
    /// Connections cut off as slow readers.
    pub cut_off: usize,
}

/// One user's presence on one node: what a node tells its peers when a user's last visible
/// connection there goes (`online: false`, with when) or the first comes (`online: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceChange {
    /// The user.
    pub user: UserId,
    /// Whether the user has a visible connection on the node.
    pub online: bool,
    /// When this state began on the node (Unix ms): online, the first visible connection;
    /// offline, the end of the last one (the user's last seen). Of two states of a user, the
    /// later one is the newer.
    pub at_ms: u64,
}

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

    /// Users' presence on this node changed: tell every peer (coalesced per user, never
    /// dropped; a link that comes up gets [`LocalDelivery::presence_snapshot`] instead).
    fn presence_changed(&self, _changes: &[PresenceChange]) {}
}

/// Where the mesh hands what is for this node: pushes for users connected here, the
/// `Redirect` and `Resync` pushes it asks for, and invalidations of the channel member cache.
/// The node's registry and cache in a node; anything that records them in a bench or test.
pub trait LocalDelivery: Send + Sync + 'static {
    /// Queues `push` on every live connection of `users` on this node, except `skip`.
    fn push_to(&self, users: &[UserId], push: &Bytes, skip: Option<ConnId>) -> Delivery;
    /// Whether `user` has a live connection on this node.
    fn is_online(&self, user: UserId) -> bool;
    /// Every user with a live connection here (for re-homing after a ring change).
    fn users(&self) -> Vec<UserId> {
        Vec::new()
    }
    /// Tells `user`'s connections here that their home is now `node`, whose clients dial
    /// `addr` (a `Redirect` push at ring `epoch`).
    fn redirect(&self, user: UserId, node: NodeId, addr: String, epoch: u64);
    /// Tells the connections of `users` here to fill their gaps from history (a `Resync`
    /// push): pushes meant for them may have been lost.
    fn resync(&self, users: &[UserId]);
    /// A peer changed `channel`'s members: drop its cached member list.
    fn invalidate_channel(&self, channel: ChannelId);
    /// Drop every cached member list (a link came up, or a peer owed too many changes to list).
    fn invalidate_all_channels(&self);
    /// Every user shown online on this node now, for a peer's snapshot.
    fn presence_snapshot(&self) -> Vec<PresenceChange> {
        Vec::new()
    }
    /// Presence from peer `node`: with `full`, a snapshot starts, replacing every state it told
    /// before; while `more`, the snapshot continues in the next calls (apply it whole).
    fn presence_from(
        &self,
        _node: NodeId,
        _full: bool,
        _more: bool,
        _changes: Vec<PresenceChange>,
    ) {
    }
    /// Peer `node` left the member set: nobody is online there any more.
    fn presence_node_gone(&self, _node: NodeId) {}
    /// The ring changed from `old` to `new`: users now homed at `me` and not before are this
    /// node's to push presence for (a flip seen while their home was another node, say the one
    /// leaving, was that node's to push and may never have been).
    fn homes_moved(&self, _old: &crate::Ring, _new: &crate::Ring, _me: NodeId) {}
}
