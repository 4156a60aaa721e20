//! # meshchat-proto
//!
//! Owns the wire contract between clients and nodes and between nodes:
//!
//! - `proto/client.proto` -> [`client`]: every client <-> node frame (hello, auth, send,
//!   pushes with per-connection sequence numbers, receipts, reactions, history, chat list,
//!   channels, redirects, errors with stable codes).
//! - `proto/mesh.proto` -> [`mesh`]: node <-> node frames (peer hello, batched envelopes).
//! - [`codec`]: the frame codec: a 4-byte big-endian length then the protobuf body, with a
//!   hard maximum checked before the body is read; a short buffer is "need more", not an error.
//!
//! Code is generated at build time by prost-build with protox (pure Rust): no system `protoc`.

pub mod codec;

/// Client <-> node messages (`proto/client.proto`, package `meshchat.client.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod client {
    include!(concat!(env!("OUT_DIR"), "/meshchat.client.v1.rs"));
}

/// Node <-> node messages (`proto/mesh.proto`, package `meshchat.mesh.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod mesh {
    include!(concat!(env!("OUT_DIR"), "/meshchat.mesh.v1.rs"));
}

pub use codec::{CodecError, DEFAULT_MAX_FRAME, FrameCodec, LENGTH_PREFIX};

/// Protocol version spoken by this build (client and mesh).
pub const PROTOCOL_VERSION: u32 = 1;
/// ALPN id for client connections.
pub const CLIENT_ALPN: &[u8] = b"meshchat/1";
/// ALPN id for node <-> node connections.
pub const MESH_ALPN: &[u8] = b"meshchat-mesh/1";
