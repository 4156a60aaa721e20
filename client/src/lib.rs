//! # meshchat-client
//!
//! Owns the Rust client library and the `meshchat` CLI (`src/bin/meshchat.rs`).
//!
//! - [`client`]: [`Client`]: connect (following redirects), register/login/authenticate, send
//!   with retry that reuses the client message id, queries, channels, and reconnect that fills
//!   gaps from history; [`Events`]: pushes, deduplicated by message id.
//! - [`conn`]: one QUIC connection: request/reply matching, push sequence checking.
//! - `liveness`: whether a node went silent or dead; the checks of every connection of the
//!   process on one thread.
//! - [`typing`]: [`TypingTracker`]: who is typing where, from typing pushes, expiring by
//!   itself.
//! - [`error`] holds `ClientError`.

pub mod client;
pub mod conn;
pub mod error;
mod liveness;
pub mod typing;

pub use client::{Client, Events, Session};
pub use conn::{ConnectOptions, Event, ZeroRtt};
pub use error::ClientError;
pub use typing::TypingTracker;

/// Reads the CA certificates of a PEM file (for [`ConnectOptions::new`]).
pub fn load_ca(
    path: &std::path::Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, ClientError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| ClientError::Setup(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Setup(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Setup(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}
