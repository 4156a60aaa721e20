//! # meshchat-proto
//!
//! Owns the wire contract between clients and nodes and between nodes:
//!
//! - `proto/client.proto` -> [`client`]: every client <-> node frame (hello, auth, send,
//!   pushes with per-connection sequence numbers, receipts, reactions, history, chat list,
//!   channels, redirects, errors with stable codes).
//! - `proto/mesh.proto` -> [`mesh`]: node <-> node frames (peer hello, batched envelopes).
//! - [`ids`]: wire <-> [`meshchat_idgen::ChatId`] conversions shared by node and client.
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
