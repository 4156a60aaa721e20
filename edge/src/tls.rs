//! The TLS and QUIC transport a measurement server runs with: a self-signed certificate for
//! `localhost` and the client-facing transport settings of a meshchat node (one bidirectional
//! stream, no unidirectional streams, 128 KiB stream and 256 KiB connection windows, MTU
//! discovery off, no datagrams, a 16 KiB crypto buffer, a 60 s idle timeout:
//! `messaging/src/tls.rs`), so the endpoint loop and quinn's async layer are compared on
//! equal terms. Segmentation offload (GSO) is on for the loop ([`loop_transport`]) and off
//! for quinn's endpoint ([`node_transport`]), as the node has them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// ALPN of the measurement servers.
pub const ALPN: &[u8] = b"meshchat-edge-echo";

/// Why a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate could not be made.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("quic crypto: {0}")]
    Quic(String),
}

/// A self-signed certificate for `localhost`, and its key.
pub fn self_signed() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsSetupError> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    Ok((cert.cert.der().clone(), key.into()))
}

/// ring, with `TLS_AES_128_GCM_SHA256` first, as the node's provider
/// (`meshchat_backplane::tls::provider`, which says why).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The transport settings of a node's client-facing endpoint.
pub fn node_transport() -> quinn_proto::TransportConfig {
    let mut tc = quinn_proto::TransportConfig::default();
    tc.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((128u32 * 1024).into())
        .receive_window((256u32 * 1024).into())
        .send_window(256 * 1024)
        .max_idle_timeout(quinn_proto::IdleTimeout::try_from(Duration::from_secs(60)).ok())
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .crypto_buffer_size(16 * 1024)
        .enable_segmentation_offload(false)
        .mtu_discovery_config(None);
    tc
}

/// The node's transport settings as the endpoint loop runs them: GSO on (the loop has one
/// transmit buffer for all its connections; quinn's endpoint would keep one per connection).
pub fn loop_transport() -> quinn_proto::TransportConfig {
    let mut tc = node_transport();
    tc.enable_segmentation_offload(true);
    tc
}

/// A server config with `cert` and the node's transport settings, for the loop.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<quinn_proto::ServerConfig>, TlsSetupError> {
    let crypto = QuicServerConfig::try_from(server_tls(cert, key)?)
        .map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut server = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(loop_transport()));
    Ok(Arc::new(server))
}

/// [`server_config`] whose sessions let go of rustls after the handshake
/// ([`crate::lean`]); the counter counts the sessions that did.
pub fn lean_server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<quinn_proto::ServerConfig>, Arc<AtomicU64>), TlsSetupError> {
    let lean = crate::lean::LeanServerConfig::new(Arc::new(server_tls(cert, key)?))
        .map_err(TlsSetupError::Quic)?;
    let released = lean.released();
    let mut server = quinn_proto::ServerConfig::with_crypto(Arc::new(lean));
    server.transport_config(Arc::new(loop_transport()));
    Ok((Arc::new(server), released))
}

fn server_tls(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A client config that trusts `cert` only.
pub fn client_config(cert: CertificateDer<'static>) -> Result<quinn::ClientConfig, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(node_transport()));
    Ok(client)
}
