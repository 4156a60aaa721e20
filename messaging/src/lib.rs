//! # meshchat-messaging
//!
//! Owns the messaging node, `meshchat-node`: the client QUIC endpoint, authentication, one task
//! per connection, the connection registry (user -> live connections), the send and delivery
//! paths, queries, configuration (file + env + flags), Redis config and membership, metrics and
//! tracing.
//!
//! Not built yet: this crate is filled in by the node issue.
