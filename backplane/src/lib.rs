//! # meshchat-backplane
//!
//! Owns how messaging nodes find and talk to each other.
//!
//! - [`ring`]: the consistent-hash ring (virtual nodes with a bucket index; pure and
//!   deterministic: the same members give the same ring on every node) and the rendezvous
//!   baseline it was measured against.
//! - [`membership`]: the sans-IO membership core: epoch-ordered snapshots of the member set in,
//!   ring decisions out (adopt a new ring, keep serving while the source is down), no clock.
//! - [`lease`]: the lease gate: whether this process may issue ids and serve (fencing); the
//!   membership driver sets it, the node checks it on every id and authentication.
//! - [`fanout`]: channel fan-out planning, pure: splits one push's recipients into those
//!   served here and one recipient list per owning peer node (one envelope per peer).
//! - `sim` (tests only): a deterministic multi-node simulation of membership cores, a
//!   TTL-based source of truth and a lossy, partitionable network on a simulated clock.
//!
//! The QUIC mesh transport, the rest of routing and the Redis driver of [`membership`] live in
//! `meshchat-messaging` (`mesh.rs`, `membership_redis.rs`) for now; moving the transport here
//! is planned.

pub mod fanout;
pub mod lease;
pub mod membership;
pub mod ring;
#[cfg(test)]
mod sim;

pub use ring::{Rendezvous, Ring, RingError};
