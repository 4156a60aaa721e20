//! Draining a node: out of the ring, its users sent to their next homes, then stopped.
//!
//! A drain (`POST /drain` on the admin listener, or `meshchat-node drain`) needs Redis
//! membership: one Redis script checks that another active node remains and registers this
//! one as draining (so of two drains asked at once of the last two nodes, one is refused;
//! every heartbeat after it keeps the registration draining), every node (itself too)
//! adopts a ring without it at the next epoch, and the mesh's re-homing tells each user
//! connected here to reconnect at its new home (a `Redirect` push, paced at 400 a second).
//! The node stays a member meanwhile: it keeps its mesh links and its worker-id lease, so
//! requests of users still here are served and routed to the new homes. When no
//! authenticated connection is left, or after `cluster.drain_timeout`, the drain is done and
//! the node stops as on SIGTERM (deregistering on the way out). A static cluster cannot
//! drain: its ring is every node's config.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshchat_backplane::membership_redis::{DrainClaimError, RedisMembership};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::node::Node;

/// Why a drain did not start.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// No Redis membership: nothing can take this node out of the other nodes' rings.
    #[error(
        "draining needs Redis membership (cluster.redis): a static cluster's ring is every \
         node's config; remove this node from every member list and restart them instead"
    )]
    NotClustered,
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

/// A node's drain: its Redis membership (which claims the drain and publishes it), and
/// whether it is done.
#[derive(Debug)]
pub struct Drain {
    membership: Option<RedisMembership>,
    done: watch::Sender<bool>,
}

impl Drain {
    /// A drain claimed and published through `membership` (`None`: the node cannot drain).
    pub fn new(membership: Option<RedisMembership>) -> Self {
        Self {
            membership,
            done: watch::channel(false).0,
        }
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.membership
            .as_ref()
            .is_some_and(|m| m.draining.is_set())
    }

    /// Turns true when the drain is done: the node should stop now.
    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Starts draining `node`: claimed in Redis (refused unless another active node remains,
    /// atomically), off the ring at the next heartbeat; done when its last user left, or
    /// after `timeout`. `others_on_ring`: the other nodes on this node's ring now.
    pub async fn start(
        node: &Arc<Node>,
        others_on_ring: usize,
        timeout: Duration,
    ) -> Result<DrainStarted, DrainError> {
        let drain = node.drain().clone();
        let membership = drain.membership.as_ref().ok_or(DrainError::NotClustered)?;
        if membership.draining.is_set() {
            return Ok(DrainStarted::AlreadyDraining);
        }
        if others_on_ring == 0 {
            return Err(DrainError::NoOtherNode);
        }
        if !node.lease_gate().allows() {
            return Err(DrainError::NotServing);
        }
        match membership.claim_drain().await {
            Ok(None) => return Ok(DrainStarted::AlreadyDraining),
            Ok(Some(_)) => {}
            Err(DrainClaimError::NoOtherActive) => return Err(DrainError::NoOtherNode),
            Err(DrainClaimError::NotRegistered) => return Err(DrainError::NotServing),
            Err(DrainClaimError::Redis(e)) => return Err(DrainError::Redis(e)),
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
                let left = n.registry().live_connections();
                if left == 0 {
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
