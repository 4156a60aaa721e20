//! Draining a node: out of the ring, its users sent to their next homes, then stopped.
//!
//! A drain (`POST /drain` on the admin listener, or `meshchat-node drain`) takes the node out
//! of every ring in one of two ways:
//! - **Redis membership**: one Redis script checks that another active node remains and
//!   registers this one as draining (so of two drains asked at once of the last two nodes,
//!   one is refused; every heartbeat after it keeps the registration draining), and every
//!   node (itself too) adopts a ring without it at the next epoch.
//! - **A static member list**: the node tells every peer through the mesh (`NodeState`,
//!   sent on every link and never dropped); each drops it from its ring, as it does itself.
//!   Refused while another running member is known to drain; of two drains asked within one
//!   round trip that would leave nobody, the higher id withdraws its own (and keeps
//!   serving). Each peer answers with its own state, saying it took the node off its ring;
//!   the drain ends only once every linked peer has. A peer that was down meanwhile hears it
//!   when its link comes back; a drained node that is started again says it no longer
//!   drains and is put back on every ring.
//!
//! Then the mesh's re-homing tells each user connected here to reconnect at its new home (a
//! `Redirect` push, paced at 400 a second). The node stays a member meanwhile: it keeps its
//! mesh links and its worker-id lease, so requests of users still here are served and routed
//! to the new homes. When no authenticated connection is left, or after
//! `cluster.drain_timeout`, the drain is done and the node stops as on SIGTERM
//! (deregistering on the way out, with Redis).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshchat_backplane::membership_redis::{DrainClaimError, RedisMembership};
use meshchat_backplane::mesh::{Mesh, StaticDrainError};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::node::Node;

/// Why a drain did not start.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// Not in a cluster (no `[cluster]`): there is no other node to send the users to.
    #[error("draining needs a cluster: this node has no [cluster] and nowhere to send its users")]
    NotClustered,
    /// Another member of a static cluster is draining (as it told this node).
    #[error("node {0} is draining: drain one node at a time (retry once it has stopped)")]
    OtherDraining(u32),
    /// No other node is on the ring (or registered and not draining, as Redis has it: of two
    /// drains asked at once of the last two active nodes, one is refused): nobody could take
    /// this node's users.
    #[error(
        "no other active node is on the ring to take this node's users (start one first, or \
         wait for the drain under way to finish)"
    )]
    NoOtherNode,
    /// The node does not hold its worker-id lease (Redis unreachable, or still starting):
    /// it could not tell the cluster it leaves.
    #[error(
        "the node does not hold its worker-id lease (Redis unreachable, or still starting): \
         the cluster cannot learn of a drain now; retry when /readyz is 200"
    )]
    NotServing,
    /// Redis did not answer the claim.
    #[error("redis: {0}; retry")]
    Redis(String),
}

/// How a drain request was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStarted {
    /// This request started it.
    Started,
    /// A drain was already under way.
    AlreadyDraining,
}

/// Who takes a node out of the other nodes' rings.
#[derive(Debug)]
pub enum DrainVia {
    /// Nobody: the node is not in a cluster.
    Nothing,
    /// Its Redis membership, which claims the drain and publishes it.
    Redis(RedisMembership),
    /// The mesh of a static cluster, which tells every peer.
    Mesh(Arc<Mesh>),
}

/// A node's drain: what publishes it, and whether it is done.
#[derive(Debug)]
pub struct Drain {
    via: DrainVia,
    done: watch::Sender<bool>,
}

impl Drain {
    /// A drain published through `via`.
    pub fn new(via: DrainVia) -> Self {
        Self {
            via,
            done: watch::channel(false).0,
        }
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        match &self.via {
            DrainVia::Nothing => false,
            DrainVia::Redis(m) => m.draining.is_set(),
            DrainVia::Mesh(mesh) => mesh.is_draining(),
        }
    }

    /// Whether every other node has taken this one off its ring, as far as this node can know:
    /// with Redis, the next ring round does it; in a static cluster, every peer linked now has
    /// said so ([`Mesh::drain_confirmed`]).
    fn confirmed(&self) -> bool {
        match &self.via {
            DrainVia::Mesh(mesh) => mesh.drain_confirmed(),
            DrainVia::Nothing | DrainVia::Redis(_) => true,
        }
    }

    /// Turns true when the drain is done: the node should stop now.
    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Starts draining `node`: with Redis, claimed there (refused unless another active node
    /// remains, atomically), off the ring at the next heartbeat; in a static cluster, told to
    /// every peer and off this node's ring at once. Done when its last user left, or after
    /// `timeout`. `others_on_ring`: the other nodes on this node's ring now.
    pub async fn start(
        node: &Arc<Node>,
        others_on_ring: usize,
        timeout: Duration,
    ) -> Result<DrainStarted, DrainError> {
        let drain = node.drain().clone();
        if matches!(drain.via, DrainVia::Nothing) {
            return Err(DrainError::NotClustered);
        }
        if drain.is_draining() {
            return Ok(DrainStarted::AlreadyDraining);
        }
        if others_on_ring == 0 {
            return Err(DrainError::NoOtherNode);
        }
        if !node.lease_gate().allows() {
            return Err(DrainError::NotServing);
        }
        match &drain.via {
            DrainVia::Nothing => return Err(DrainError::NotClustered),
            DrainVia::Redis(membership) => match membership.claim_drain().await {
                Ok(None) => return Ok(DrainStarted::AlreadyDraining),
                Ok(Some(_)) => {}
                Err(DrainClaimError::NoOtherActive) => return Err(DrainError::NoOtherNode),
                Err(DrainClaimError::NotRegistered) => return Err(DrainError::NotServing),
                Err(DrainClaimError::Redis(e)) => return Err(DrainError::Redis(e)),
            },
            DrainVia::Mesh(mesh) => match mesh.drain_static() {
                Ok(true) => {}
                Ok(false) => return Ok(DrainStarted::AlreadyDraining),
                Err(StaticDrainError::OtherDraining(n)) => {
                    return Err(DrainError::OtherDraining(n));
                }
                Err(StaticDrainError::NoOtherNode) => return Err(DrainError::NoOtherNode),
                Err(StaticDrainError::NotStatic) => return Err(DrainError::NotClustered),
            },
        }
        let users = node.registry().live_connections();
        info!(connections = users, ?timeout, "draining: leaving the ring");
        let node = Arc::downgrade(node);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(n) = node.upgrade() else { return };
                if !n.drain().is_draining() {
                    // A static member withdrew its drain (another drained at once and nobody
                    // would have been left): it keeps serving.
                    warn!("drain withdrawn: the node stays on the ring and keeps serving");
                    return;
                }
                let left = n.registry().live_connections();
                // A static member also waits until every linked peer said it took this node
                // off its ring: a peer that drained at the same moment may still route to it.
                if left == 0 && n.drain().confirmed() {
                    info!(
                        took_ms = started.elapsed().as_millis() as u64,
                        "drained: every user moved"
                    );
                    break;
                }
                if started.elapsed() >= timeout {
                    warn!(left, "drain timeout: stopping with users still connected");
                    break;
                }
            }
            drain.done.send_replace(true);
        });
        Ok(DrainStarted::Started)
    }
}
