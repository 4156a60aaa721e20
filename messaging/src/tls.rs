//! TLS and QUIC endpoint setup: certificates (from files, or development CAs generated once
//! into the data dir: one for the client-facing certificate, another for the mesh), the rustls server config (TLS 1.3 only, ring provider, our ALPN), the
//! QUIC transport sized for chat, and the UDP socket with large kernel buffers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::info;

// Shared with the mesh's endpoint (`meshchat_backplane::tls`).
use meshchat_backplane::mesh::mesh_name;
pub use meshchat_backplane::tls::{Identity, TlsError, names_node, provider};
use meshchat_idgen::NodeId;

use crate::config::{EndpointKind, LimitsConfig, NodeConfig, TransportSettings};

/// File name of the development CA certificate in the data dir (clients trust this).
pub const DEV_CA_CERT: &str = "ca.pem";
const DEV_CA_KEY: &str = "ca.key";
/// File name of the development mesh CA certificate in the data dir (nodes trust this).
pub const DEV_MESH_CA_CERT: &str = "mesh-ca.pem";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads a PEM chain and key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            what: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            what: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            what: "no certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        what: e.to_string(),
    })?;
    Ok(Identity { chain, key })
}

/// When `cert` expires (its notAfter), in Unix seconds; `None` if it does not parse.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// Loads every certificate of a PEM file (a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate".into(),
        });
    }
    Ok(certs)
}

/// A development CA: its certificate and key files in the data dir, and its name.
struct DevCa {
    cert: &'static str,
    key: &'static str,
    name: &'static str,
}

/// The client-facing development CA: what clients of a dev node trust.
const CLIENT_CA: DevCa = DevCa {
    cert: DEV_CA_CERT,
    key: DEV_CA_KEY,
    name: "meshchat development CA",
};

/// The mesh's development CA: it signs only node identities for the mesh (mutual TLS), so a
/// client-facing certificate, or its leaked key, never gets a node onto the mesh.
const MESH_CA: DevCa = DevCa {
    cert: DEV_MESH_CA_CERT,
    key: "mesh-ca.key",
    name: "meshchat development mesh CA",
};

/// A development CA in `dir`: its key created on first use (owner-only, atomically) and its
/// certificate next to it, then reused, so every node of a dev cluster and every client
/// trusts the same root.
fn dev_ca(dir: &Path, ca: &DevCa) -> Result<Issuer<'static, KeyPair>, TlsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(ca.cert);
    let key_path = dir.join(ca.key);
    // Generated first (it may fail): only a whole key is ever written.
    let fresh = KeyPair::generate()?.serialize_pem().into_bytes();
    let key_pem =
        crate::secret::read_or_create(&key_path, || fresh).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            what: e.to_string(),
        })?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| TlsError::Pem {
        path: key_path.clone(),
        what: "not a PEM key".into(),
    })?;
    let key = KeyPair::from_pem(&key_pem)?;
    if !cert_path.exists() {
        // Always from the key on disk: a certificate is never paired with another key.
        let cert = ca_params(ca.name)?.self_signed(&key)?;
        write_new(&cert_path, cert.pem().as_bytes())?;
        info!(path = %cert_path.display(), "generated {}", ca.name);
    }
    // The issuer is the CA's subject name and key: rebuilding the same parameters names the
    // same CA (the key identifier is derived from the key) without parsing the certificate.
    Ok(Issuer::new(ca_params(ca.name)?, key))
}

/// A CA certificate's parameters: `name`, may sign certificates and CRLs (also used by
/// [`crate::certs`]).
pub(crate) fn ca_params(name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Writes a public file atomically (temp + rename); if another process created it first,
/// keeps theirs.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    if path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(());
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn signed_identity(
    dir: &Path,
    issuer: &Issuer<'static, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> Result<Identity, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem {
            path: dir.to_owned(),
            what: e.to_owned(),
        })?,
    })
}

/// A client-facing node certificate signed by the development CA in `dir`, valid for
/// `localhost`, 127.0.0.1, ::1 and `extra_names`.
pub fn dev_identity(dir: &Path, extra_names: &[String]) -> Result<Identity, TlsError> {
    let issuer = dev_ca(dir, &CLIENT_CA)?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(extra_names.iter().cloned());
    names.sort();
    names.dedup();
    signed_identity(
        dir,
        &issuer,
        names,
        "meshchat node",
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
    )
}

/// A mesh certificate for node `id`, signed by the development mesh CA in `dir`: its one
/// name is `node-<id>`, which the peers check against the id the node claims.
pub fn dev_mesh_identity(dir: &Path, id: u32) -> Result<Identity, TlsError> {
    let issuer = dev_ca(dir, &MESH_CA)?;
    signed_identity(
        dir,
        &issuer,
        vec![mesh_name(NodeId(id))],
        &mesh_name(NodeId(id)),
        // A node both dials and accepts in the mesh.
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )
}

/// Loads an operator's certificate and key, refusing a key that other users can read.
fn load_private_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    crate::secret::check_private(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        what: e.to_string(),
    })?;
    load_identity(cert, key)
}

/// The node's client-facing identity from config: files if given, else the development CA.
pub fn node_identity(config: &NodeConfig) -> Result<Identity, TlsError> {
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => load_private_identity(cert, key),
        _ => {
            let names = dev_name(&config.advertised())
                .into_iter()
                .collect::<Vec<_>>();
            dev_identity(&config.data_dir, &names)
        }
    }
}

/// The name a development certificate adds for an advertised `host:port`: its host, unless
/// that is an unspecified address (`0.0.0.0`, `::`), which no client dials.
fn dev_name(advertised: &str) -> Option<String> {
    let (host, _) = advertised.rsplit_once(':')?;
    let host = host.trim_matches(|c| c == '[' || c == ']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.to_canonical().is_unspecified() => None,
        _ if host.is_empty() => None,
        _ => Some(host.to_owned()),
    }
}

/// The node's mesh identity and the CA certificates its peers' certificates must chain to:
/// `cluster.cert`, `cluster.key` and `cluster.ca` if given (the certificate must name
/// `node-<id>`), else the development mesh CA in the data dir.
pub fn mesh_identity(
    config: &NodeConfig,
) -> Result<(Identity, Vec<CertificateDer<'static>>), TlsError> {
    let c = &config.cluster;
    let id = NodeId(config.node_id);
    match (&c.ca, &c.cert, &c.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let identity = load_private_identity(cert, key)?;
            if !names_node(&identity.chain[0], id) {
                return Err(TlsError::Pem {
                    path: cert.clone(),
                    what: format!(
                        "the mesh certificate does not name {} (peers bind a node's id to the DNS name \
                         node-<id> in its certificate)",
                        mesh_name(id)
                    ),
                });
            }
            Ok((identity, load_certs(ca)?))
        }
        _ => {
            let identity = dev_mesh_identity(&config.data_dir, config.node_id)?;
            let roots = load_certs(&config.data_dir.join(DEV_MESH_CA_CERT))?;
            Ok((identity, roots))
        }
    }
}

/// QUIC transport sized for chat. quinn's defaults are for bulk transfer (1.25 MB stream
/// windows, 100 + 100 streams); a chat connection needs one bidirectional stream and windows
/// that hold a few frames.
pub fn transport(
    t: &TransportSettings,
    limits: &LimitsConfig,
) -> Result<quinn::TransportConfig, TlsError> {
    let mut tc = quinn::TransportConfig::default();
    tc.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(t.stream_receive_window.into())
        .receive_window(t.receive_window.into())
        .send_window(t.send_window)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout)
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        ))
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .crypto_buffer_size(16 * 1024)
        // The handshake's connection id and one spare, so a client can move to another
        // network on purpose (a NAT rebinding needs none); quinn-proto's default of 8 (5 with
        // quinn's clients) costs the endpoint a routing entry each (vendor/quinn-proto patch).
        .issued_cid_limit(2)
        // GSO on the loop (one transmit buffer for all its connections); quinn's endpoint
        // would keep a buffer of that many datagrams per connection.
        .enable_segmentation_offload(t.endpoint == EndpointKind::Loop);
    if !t.mtu_discovery {
        tc.mtu_discovery_config(None);
    }
    Ok(tc)
}

/// A key for QUIC Retry and address-validation tokens, made once per process: a reload keeps
/// it, so tokens handed out just before it stay valid.
pub fn token_key() -> Arc<ring::hkdf::Prk> {
    let mut secret = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    Arc::new(ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&secret))
}

/// The client-facing TLS config: TLS 1.3 only, `alpn`, tickets from `tickets` (none if its
/// budget is 0). Cipher suites in [`provider`]'s order, but a client's own order wins
/// (rustls' default): see `meshchat_backplane::tls::provider`.
fn server_tls(
    identity: Identity,
    alpn: &[u8],
    tickets: &Arc<crate::tickets::TicketStore>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    // Resumption with 0-RTT by single-use tickets held on this node (crate::tickets: rustls
    // gives early data only to stored tickets). QUIC requires early data to be either off or
    // unbounded at the TLS layer (flow control bounds it). Which requests are served from
    // early data is the session's rule (replay-safe ones only).
    if tickets.budget() > 0 {
        tls.session_storage = tickets.clone();
        tls.send_tls13_tickets = 1;
        tls.max_early_data_size = u32::MAX;
        tls.send_half_rtt_data = true;
    } else {
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;
    }
    Ok(tls)
}

/// The client-facing QUIC server config, its tokens made with `token_key`.
pub fn server_config(
    identity: Identity,
    alpn: &[u8],
    config: &NodeConfig,
    token_key: &Arc<ring::hkdf::Prk>,
    tickets: &Arc<crate::tickets::TicketStore>,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_tls(identity, alpn, tickets)?;
    // With `transport.lean_tls`, a connection lets go of rustls once its handshake and
    // tickets are done and keeps only the secrets of the next key update (meshchat_edge::lean).
    let crypto: Arc<dyn quinn::crypto::ServerConfig> = if config.transport.lean_tls {
        Arc::new(meshchat_edge::lean::LeanServerConfig::new(Arc::new(tls)).map_err(TlsError::Quic)?)
    } else {
        Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls)
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        )
    };
    let mut sc = quinn::ServerConfig::new(crypto, token_key.clone());
    sc.transport_config(Arc::new(transport(&config.transport, &config.limits)?));
    // Handshakes beyond this are refused at the QUIC layer instead of queueing without bound.
    sc.max_incoming(config.limits.max_concurrent_handshakes.max(1));
    Ok(sc)
}

/// A UDP socket bound to `addr` with the requested kernel buffers (capped by the kernel's
/// `net.core.rmem_max` / `wmem_max`).
pub fn udp_socket(
    addr: SocketAddr,
    t: &TransportSettings,
) -> Result<std::net::UdpSocket, TlsError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TlsError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Best effort: an unprivileged process gets what the kernel allows.
    socket.set_recv_buffer_size(t.udp_recv_buffer).ok();
    socket.set_send_buffer_size(t.udp_send_buffer).ok();
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// Keep-alive interval clients should use for a node idle timeout (a third of it).
pub fn keep_alive_for(idle: Duration) -> Duration {
    (idle / 3).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_expiry_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        let id = dev_identity(dir.path(), &[]).expect("dev identity");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let left = not_after_unix(&id.chain[0]).expect("parses") - now;
        assert!(left > 86_400, "{left}");
        assert_eq!(not_after_unix(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    /// Runs a QUIC-TLS handshake in memory between a client offering `suites` (in that
    /// order) and the node's client-facing TLS config; returns the suite they agree on.
    fn negotiated(suites: &[rustls::CipherSuite]) -> rustls::CipherSuite {
        use rustls::quic::{ClientConnection, Connection, ServerConnection, Version};
        let dir = tempfile::tempdir().expect("dir");
        let identity = dev_identity(dir.path(), &[]).expect("dev identity");
        let mut roots = rustls::RootCertStore::empty();
        for ca in load_certs(&dir.path().join(DEV_CA_CERT)).expect("ca") {
            roots.add(ca).expect("root");
        }
        let mut offered = rustls::crypto::ring::default_provider();
        offered
            .cipher_suites
            .retain(|s| suites.contains(&s.suite()));
        offered
            .cipher_suites
            .sort_by_key(|s| suites.iter().position(|x| *x == s.suite()));
        let mut client_tls = rustls::ClientConfig::builder_with_provider(Arc::new(offered))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"test".to_vec()];
        let tickets = Arc::new(crate::tickets::TicketStore::new(0));
        let server_tls = server_tls(identity, b"test", &tickets).expect("server tls");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = Connection::Client(
            ClientConnection::new(Arc::new(client_tls), Version::V1, name, vec![0])
                .expect("client"),
        );
        let mut server = Connection::Server(
            ServerConnection::new(Arc::new(server_tls), Version::V1, vec![0]).expect("server"),
        );
        // Each side's handshake bytes go to the other (rustls tracks the encryption level),
        // until neither has anything to say: a full handshake takes three flights.
        for _ in 0..8 {
            let mut flight = Vec::new();
            client.write_hs(&mut flight);
            if !flight.is_empty() {
                server.read_hs(&flight).expect("server reads");
            }
            let mut flight = Vec::new();
            server.write_hs(&mut flight);
            if !flight.is_empty() {
                client.read_hs(&flight).expect("client reads");
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking(), "the handshake completes");
        let Connection::Server(server) = server else {
            unreachable!("made as a server")
        };
        server
            .negotiated_cipher_suite()
            .expect("a suite was agreed")
            .suite()
    }

    #[test]
    fn the_node_and_its_clients_agree_on_aes_128_gcm_and_a_clients_own_order_wins() {
        use rustls::CipherSuite::{
            TLS13_AES_128_GCM_SHA256 as AES_128, TLS13_AES_256_GCM_SHA384 as AES_256,
            TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
        };
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours.first(), Some(&AES_128), "{ours:?}");
        assert!(
            ours.contains(&AES_256) && ours.contains(&CHACHA),
            "{ours:?}"
        );
        // meshchat's client library offers the provider's order.
        assert_eq!(negotiated(&ours), AES_128);
        // A client without AES instructions asks for ChaCha20 first and gets it; one that
        // prefers AES-256 (OpenSSL's order) gets that.
        assert_eq!(negotiated(&[CHACHA, AES_128, AES_256]), CHACHA);
        assert_eq!(negotiated(&[AES_256, CHACHA, AES_128]), AES_256);
    }

    #[test]
    fn a_dev_certificate_never_names_an_unspecified_address() {
        assert_eq!(dev_name("0.0.0.0:7400"), None);
        assert_eq!(dev_name("[::]:7400"), None);
        assert_eq!(dev_name(":7400"), None);
        assert_eq!(
            dev_name("chat1.example.net:7400").as_deref(),
            Some("chat1.example.net")
        );
        assert_eq!(dev_name("10.0.0.1:7400").as_deref(), Some("10.0.0.1"));
        assert_eq!(
            dev_name("[2001:db8::1]:7400").as_deref(),
            Some("2001:db8::1")
        );
    }
}
