//! # meshchat-backplane
//!
//! Owns how messaging nodes find and talk to each other.
//!
//! - [`ring`]: the consistent-hash ring (virtual nodes with a bucket index; pure and
//!   deterministic: the same members give the same ring on every node) and the rendezvous
//!   baseline it was measured against.
//!
//! Planned (mesh issue): membership (Redis registry, heartbeats, leased worker ids) as a
//! sans-IO core, the QUIC mesh (one mutually authenticated connection per peer, batched
//! frames, bounded per-peer queues, reconnect with backoff), and cross-node routing.

pub mod ring;

pub use ring::{Rendezvous, Ring, RingError};
