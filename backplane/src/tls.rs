//! The TLS pieces the mesh shares with the node's client endpoint: a certificate chain with
//! its key, the one crypto provider of the tree (ring), the check that binds a node id to its
//! mesh certificate, and the errors of setting either up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use meshchat_idgen::NodeId;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The process-wide crypto provider: ring, with `TLS_AES_128_GCM_SHA256` as its first cipher
/// suite (ring's default puts `TLS_AES_256_GCM_SHA384` first).
///
/// The key schedule of a handshake then runs SHA-256 (on the CPU's SHA extensions where it
/// has them) instead of SHA-512 in software: that was a tenth of a node's CPU in a ramp of
/// handshakes (docs/PERFORMANCE.md, "Handshakes: AES-128 first"). Both ends of the mesh and
/// meshchat's client library offer it first; the client-facing node honours a client's own
/// order (rustls' default), so a client without AES instructions that asks for ChaCha20 first
/// still gets it (docs/SECURITY.md).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Whether `cert` names node `id` (a DNS name `node-<id>`). Only the name is read: whether the
/// certificate chains to the cluster's CA is the handshake's business.
pub fn names_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(crate::mesh::mesh_name(id)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

/// Errors setting TLS or the endpoint up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A PEM file did not hold what it should.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// The transport config was refused.
    #[error("quic config: {0}")]
    Quic(String),
    /// The socket could not be set up.
    #[error("udp socket {addr}: {source}")]
    Socket {
        /// Address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}
