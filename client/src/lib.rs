//! # meshchat-client
//!
//! Owns the Rust client library (connect with redirects, auth, send with retry, an event stream
//! of pushes, history and channel queries, reconnect with gap fill) and the `meshchat` CLI.
//!
//! Not built yet: this crate is filled in by the node issue.
