//! # meshchat-backplane
//!
//! The Kafka-less backplane: owns how messaging nodes find and talk to each other. The node
//! that serves clients (`meshchat-messaging`) depends on this crate, never the reverse: it
//! hands the mesh a [`delivery::LocalDelivery`] and sends through a [`delivery::Router`].
//!
//! - [`ring`]: the consistent-hash ring (virtual nodes with a bucket index; pure and
//!   deterministic: the same members give the same ring on every node) and the rendezvous
//!   baseline it was measured against.
//! - [`membership`]: the sans-IO membership core: epoch-ordered snapshots of the member set in,
//!   ring decisions out (adopt a new ring, keep serving while the source is down), no clock.
//! - [`membership_redis`]: the Redis driver of [`membership`]: registration, the worker-id
//!   lease and its high-water mark, the member set with its epoch; applies rings to the mesh.
//! - [`lease`]: the lease gate: whether this process may issue ids and serve (fencing); the
//!   membership driver sets it, the node checks it on every id and authentication.
//! - [`fanout`]: channel fan-out planning, pure: splits one push's recipients into those
//!   served here and one recipient list per owning peer node (one envelope per peer).
//! - [`mesh`]: the node <-> node QUIC mesh: links (mutual TLS, hello, reconnect), bounded
//!   per-peer queues with their resync and channel-change lanes, and routing on the ring.
//! - [`delivery`]: the interfaces between the backplane and the node that serves clients:
//!   [`delivery::Router`] (the send path asks the cluster) and [`delivery::LocalDelivery`]
//!   (the mesh hands the node what is for its connections), so this crate needs nothing of it.
//! - [`tls`]: the certificate identity and crypto provider the mesh shares with the node.
//! - `sim` (tests only): a deterministic multi-node simulation of membership cores, a
//!   TTL-based source of truth and a lossy, partitionable network on a simulated clock.

pub mod bounded;
pub mod delivery;
pub mod fanout;
pub mod lease;
pub mod membership;
pub mod membership_redis;
pub mod mesh;
pub mod ring;
#[cfg(test)]
mod sim;
pub mod tls;

pub use ring::{Rendezvous, Ring, RingError};
