//! # meshchat-messaging
//!
//! Owns the messaging node, `meshchat-node`: client sessions and everything they ask for. The
//! cluster (ring, membership, the Redis driver, the lease gate, the node <-> node mesh) is
//! `meshchat-backplane`'s; a clustered node starts the mesh (`server::start_mesh`) and hands
//! it a delivery interface.
//!
//! - [`config`]: `NodeConfig` and its parts, with documented defaults; file + env + flags.
//! - [`server`]: start/run a node: QUIC endpoint, bounded accept loop, graceful shutdown.
//! - [`session`]: one task per connection (`session::machine`, the sans-IO state machine of its
//!   stream: auth, request dispatch, pushes with sequence numbers; the task drives it).
//! - [`node`]: the chat service: every request handler and the send path.
//! - [`registry`]: user -> live connections, bounded per-connection push queues.
//! - [`presence`]: who is online: this node's users (debounced changes) and the cluster's view.
//! - [`router`]: where deliveries go: a node alone's router, and [`router::NodeDelivery`], what
//!   this node hands the mesh (its connections, Redirect/Resync pushes, member cache).
//! - [`members`]: the per-node channel member cache (fan-out only; invalidated across the mesh).
//! - [`admission`]: handshake slots: Retry past a threshold, per-source caps, a short wait.
//! - [`auth`]: argon2id password hashes and JWT tokens.
//! - [`secret`]: secret files (token key, CA keys): owner-only, atomic, refused if exposed.
//! - [`certs`]: `meshchat-node certs`: a cluster's two CAs and every node's certificates.
//! - [`tls`]: certificates (dev CA), rustls/quinn configs sized for chat.
//! - [`error`]: request errors and the one mapping to protocol error codes.
//! - [`convert`]: wire <-> domain conversions.
//! - [`dev`]: `meshchat-node dev`, a local cluster on loopback.
//! - [`logging`]: text or JSON log lines, the filter reloadable at runtime.
//! - [`reload`]: what a SIGHUP changes without a restart (certificates, limits, log level).
//! - [`drain`]: taking a node out of the ring, its users redirected, then stopping it.
//! - [`admin`]: the admin HTTP listener: `/healthz`, `/readyz`, `/metrics`, `/cluster`.
//! - [`metrics`]: metric names, labels and recording (Prometheus exporter).

pub mod admin;
pub mod admission;
pub mod auth;
pub mod certs;
pub mod config;
pub mod convert;
pub mod dev;
pub mod drain;
pub mod error;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod registry;
pub mod reload;
pub mod router;
pub mod secret;
pub mod server;
pub mod session;
pub mod tickets;
pub mod tls;
pub mod typing;

pub use config::NodeConfig;
pub use server::{RunningNode, StartError, run, start};
