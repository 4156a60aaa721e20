//! The TLS pieces the mesh shares with the node's client endpoint: a certificate chain with
//! its key, and the one crypto provider of the tree (ring).

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The process-wide crypto provider: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}
