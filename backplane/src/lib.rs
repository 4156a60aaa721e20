//! # meshchat-backplane
//!
//! Owns how messaging nodes find and talk to each other: membership (who is in the cluster,
//! at which epoch), the consistent-hash ring (pure and deterministic: the same members give the
//! same ring on every node) and the QUIC mesh (one mutually authenticated connection per peer,
//! batched frames, bounded per-peer queues, reconnect with backoff).
//!
//! Not built yet: this crate is filled in by the mesh issue. Until then every user is homed on
//! the node it connects to.
