//! # meshchat-proto
//!
//! Owns the wire contract between clients and nodes and between nodes:
//!
//! - `proto/client.proto` -> [`client`]: every client <-> node frame (hello, auth, send,
//!   pushes with per-connection sequence numbers, receipts, reactions, history, chat list,
//!   channels, redirects, errors with stable codes).
//! - `proto/mesh.proto` -> [`mesh`]: node <-> node frames (peer hello, batched envelopes).
//! - [`ids`]: wire <-> [`meshchat_idgen::ChatId`] conversions shared by node and client.
//! - [`replay_safe`]: which requests may be served from 0-RTT early data.
//! - [`codec`]: the frame codec: a 4-byte big-endian length then the protobuf body, with a
//!   hard maximum checked before the body is read; a short buffer is "need more", not an error.
//!
//! Code is generated at build time by prost-build with protox (pure Rust): no system `protoc`.

pub mod codec;
pub mod ids;

/// Generated code, nested as the protobuf packages are (so cross-package references resolve).
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    pub mod meshchat {
        pub mod client {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/meshchat.client.v1.rs"));
            }
        }
        pub mod mesh {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/meshchat.mesh.v1.rs"));
            }
        }
    }
}

/// Client <-> node messages (`proto/client.proto`, package `meshchat.client.v1`).
pub use generated::meshchat::client::v1 as client;
/// Node <-> node messages (`proto/mesh.proto`, package `meshchat.mesh.v1`).
pub use generated::meshchat::mesh::v1 as mesh;

pub use codec::{CodecError, DEFAULT_MAX_FRAME, FrameCodec, LENGTH_PREFIX};

/// Protocol version spoken by this build (client and mesh).
pub const PROTOCOL_VERSION: u32 = 1;
/// ALPN id for client connections.
pub const CLIENT_ALPN: &[u8] = b"meshchat/1";
/// ALPN id for node <-> node connections.
pub const MESH_ALPN: &[u8] = b"meshchat-mesh/1";

/// Whether a request may be served from 0-RTT early data, which an attacker can replay (to
/// the same node or another, any number of times, before the client's own connection ends):
/// reads; `Authenticate` (the replayed connection can read nothing: it never completes its
/// handshake); sends, which are idempotent by `client_msg_id` (a replay is answered
/// `duplicate` and re-pushes the same message id, which clients drop); receipts, whose marks
/// never move back; typing indicators, which expire. Everything else changes state in a way a
/// replay could undo or repeat (a leave replayed after a rejoin, a reaction replayed after
/// it was changed) or costs a password hash: the node answers it `TOO_EARLY` in early data and
/// a client sends it only once the handshake is complete.
pub fn replay_safe(body: &client::client_frame::Body) -> bool {
    use client::client_frame::Body as B;
    match body {
        B::Hello(_)
        | B::Authenticate(_)
        | B::Ping(_)
        | B::PushAck(_)
        | B::History(_)
        | B::ChatList(_)
        | B::ResolveUser(_)
        | B::WhereIs(_)
        | B::Cluster(_)
        | B::ChannelList(_)
        | B::ChannelMembers(_)
        | B::Send(_)
        | B::Receipt(_)
        | B::Typing(_)
        | B::Presence(_) => true,
        B::Register(_)
        | B::Login(_)
        | B::ChangePassword(_)
        | B::Logout(_)
        | B::React(_)
        | B::Unreact(_)
        | B::ChannelCreate(_)
        | B::ChannelJoin(_)
        | B::ChannelLeave(_)
        | B::ChannelAdd(_)
        | B::ChannelRemove(_)
        | B::ChannelSetAdmin(_)
        | B::SetPresence(_) => false,
    }
}
