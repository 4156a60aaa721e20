//! # meshchat-messaging
//!
//! Owns the messaging node, `meshchat-node`.
//!
//! - [`config`]: `NodeConfig` and its parts, with documented defaults; file + env + flags.
//! - [`server`]: start/run a node: QUIC endpoint, bounded accept loop, graceful shutdown.
//! - [`session`]: one task per connection: auth, request loop, pushes with sequence numbers.
//! - [`node`]: the chat service: every request handler and the send path.
//! - [`registry`]: user -> live connections, bounded per-connection push queues.
//! - [`router`]: where deliveries go: the one interface between the send path and the cluster.
//! - [`members`]: the per-node channel member cache (fan-out only; invalidated across the mesh).
//! - [`auth`]: argon2id password hashes and JWT tokens.
//! - [`tls`]: certificates (dev CA), rustls/quinn configs sized for chat.
//! - [`error`]: request errors and the one mapping to protocol error codes.
//! - [`convert`]: wire <-> domain conversions.
//! - [`dev`]: `meshchat-node dev`, a local cluster on loopback.

pub mod auth;
pub mod config;
pub mod convert;
pub mod dev;
pub mod error;
pub mod members;
pub mod node;
pub mod registry;
pub mod router;
pub mod server;
pub mod session;
pub mod tls;

pub use config::NodeConfig;
pub use server::{RunningNode, StartError, run, start};
