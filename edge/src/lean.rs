//! A server-side QUIC TLS session that lets go of rustls once the handshake is done.
//!
//! quinn-proto's own rustls session keeps the whole `rustls::quic::ServerConnection` for the
//! connection's life, although after the handshake (and the session tickets written right
//! after it) a server only needs the secrets for the next key update and what the handshake
//! told (ALPN, server name, the client's certificates). [`LeanSession`] runs the same rustls
//! handshake, then drops the connection and keeps only those: the packet keys quinn-proto
//! holds are the same as with its own session. Initial keys and Retry tags come from
//! quinn-proto's `QuicServerConfig` for the same rustls config.
//!
//! After the handshake a client has nothing to send in CRYPTO frames (QUIC has no TLS
//! KeyUpdate or renegotiation); any that arrives is a protocol violation. Key updates use the
//! kept secrets, as quinn-proto's session does, but the next key phase's packet keys are
//! expanded from them only when first used ([`LazyKey`]): quinn-proto holds that pair from the
//! handshake on, and most chat connections never update their keys.

use std::any::Any;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;

use quinn_proto::crypto::ServerConfig as _;
use quinn_proto::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn_proto::crypto::{
    self, CryptoError, ExportKeyingMaterialError, KeyPair, Keys, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::quic::{KeyChange, PacketKeySet, Secrets, Version};
use rustls_pki_types::CertificateDer;

/// A server config whose sessions drop rustls after the handshake.
pub struct LeanServerConfig {
    tls: Arc<rustls::ServerConfig>,
    /// quinn-proto's config for the same TLS: initial keys and Retry tags.
    quic: Arc<QuicServerConfig>,
    /// Sessions that have let go of rustls.
    released: Arc<AtomicU64>,
}

impl LeanServerConfig {
    /// Wraps `tls` (TLS 1.3 with a QUIC-capable cipher suite, as quinn-proto requires).
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Result<Self, String> {
        let quic = QuicServerConfig::try_from(tls.clone()).map_err(|e| e.to_string())?;
        // A config rustls' QUIC server refuses fails here, not at every handshake.
        rustls::quic::ServerConnection::new(tls.clone(), Version::V1, Vec::new())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            tls,
            quic: Arc::new(quic),
            released: Arc::default(),
        })
    }

    /// A counter of the sessions of this config that have let go of rustls (shared: it
    /// keeps counting after the config is handed to quinn-proto).
    pub fn released(&self) -> Arc<AtomicU64> {
        self.released.clone()
    }
}

fn version(v: u32) -> Result<Version, UnsupportedVersion> {
    // As quinn-proto reads QUIC versions for rustls.
    match v {
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        _ => Err(UnsupportedVersion),
    }
}

impl crypto::ServerConfig for LeanServerConfig {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.quic.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quic.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        quic_version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        // quinn-proto calls this only for a version `initial_keys` accepted, and rustls
        // accepts every version that maps; a config quinn-proto's `try_from` accepted is one
        // rustls' QUIC server accepts.
        let tls = version(quic_version)
            .map_err(|_| rustls::Error::General("unsupported QUIC version".into()))
            .and_then(|v| rustls::quic::ServerConnection::new(self.tls.clone(), v, encoded));
        Box::new(LeanSession {
            version: quic_version,
            quic: self.quic.clone(),
            state: match tls {
                Ok(tls) => State::Handshaking(Box::new(tls)),
                Err(e) => State::Failed(e.to_string()),
            },
            next: None,
            limits: KeyLimits::default(),
            got_handshake_data: false,
            released: self.released.clone(),
        })
    }
}

/// The tag length and AEAD limits of a phase's packet keys (they depend on the cipher suite
/// only), so quinn-proto can read them off the next phase's keys without expanding them.
#[derive(Clone, Copy, Default)]
struct KeyLimits {
    tag_len: usize,
    confidentiality: u64,
    integrity: u64,
}

/// Where [`LeanSession`] takes the next 1-RTT keys from.
enum Next {
    /// The secrets of the first key update, as the handshake gave them (until quinn-proto asks
    /// for that phase's keys, right after the handshake).
    First(Box<Secrets>),
    /// The phase handed out last: the next one steps from its secrets.
    After(Arc<NextPhase>),
}

/// One key phase's secrets and, once either key is first used, its expanded packet keys.
struct NextPhase {
    secrets: Secrets,
    keys: OnceLock<PacketKeySet>,
}

/// A packet key of the next key phase, expanded from the phase's secrets when a packet is
/// first sealed or opened with it (the key update), not when quinn-proto asks for it (the end
/// of the handshake). An idle connection then holds the phase's secrets and the two keys'
/// boxes (~300 B) instead of two expanded AES-GCM keys (~1.1 KB).
///
/// The trade-off (RFC 9001 section 9.5 says an endpoint SHOULD have the next receive keys
/// ready): the first packet that opens with the other key phase, real or injected, takes one
/// key expansion (a few microseconds) longer. For an injected packet that is one bit, its
/// unprotected key phase, told by timing once per phase and connection; every later packet is
/// timed alike. A real update is visible to an observer anyway (quinn-proto derives the
/// following phase's keys while it handles the packet that completes one).
struct LazyKey {
    phase: Arc<NextPhase>,
    /// Seals outgoing packets (else opens incoming ones).
    local: bool,
    limits: KeyLimits,
}

impl LazyKey {
    // The box itself: quinn-proto implements its `PacketKey` for rustls' boxed key.
    #[allow(clippy::borrowed_box)]
    fn key(&self) -> &Box<dyn rustls::quic::PacketKey> {
        let keys = self
            .phase
            .keys
            .get_or_init(|| self.phase.secrets.clone().next_packet_keys());
        if self.local {
            &keys.local
        } else {
            &keys.remote
        }
    }
}

impl crypto::PacketKey for LazyKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        crypto::PacketKey::encrypt(self.key(), packet, buf, header_len)
    }

    fn decrypt(
        &self,
        packet: u64,
        header: &[u8],
        payload: &mut BytesMut,
    ) -> Result<(), CryptoError> {
        crypto::PacketKey::decrypt(self.key(), packet, header, payload)
    }

    fn tag_len(&self) -> usize {
        self.limits.tag_len
    }

    fn confidentiality_limit(&self) -> u64 {
        self.limits.confidentiality
    }

    fn integrity_limit(&self) -> u64 {
        self.limits.integrity
    }
}

enum State {
    /// The handshake (and the tickets after it) in rustls.
    Handshaking(Box<rustls::quic::ServerConnection>),
    /// rustls let go of; what the handshake told, kept.
    Done {
        alpn: Option<Vec<u8>>,
        server_name: Option<String>,
        peer: Option<Vec<CertificateDer<'static>>>,
    },
    /// rustls refused to start a session (a misconfiguration): every handshake fails.
    Failed(String),
}

/// A server session that drops rustls after the handshake (see the module docs).
pub struct LeanSession {
    version: u32,
    quic: Arc<QuicServerConfig>,
    state: State,
    /// Where the next 1-RTT keys derive from.
    next: Option<Next>,
    /// The 1-RTT packet keys' tag length and AEAD limits (the same in every phase).
    limits: KeyLimits,
    got_handshake_data: bool,
    released: Arc<AtomicU64>,
}

impl LeanSession {
    fn tls(&self) -> Option<&rustls::quic::ServerConnection> {
        match &self.state {
            State::Handshaking(tls) => Some(tls),
            _ => None,
        }
    }
}

fn boxed(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

impl crypto::Session for LeanSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, _side: Side) -> Keys {
        // A server session exists only for a version its config's `initial_keys` accepted.
        self.quic
            .initial_keys(self.version, dst_cid)
            .unwrap_or_else(|_| unreachable!("session started for an accepted version"))
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        let (protocol, server_name) = match &self.state {
            State::Handshaking(tls) => (
                tls.alpn_protocol().map(<[u8]>::to_vec),
                tls.server_name().map(str::to_owned),
            ),
            State::Done {
                alpn, server_name, ..
            } => (alpn.clone(), server_name.clone()),
            State::Failed(_) => return None,
        };
        Some(Box::new(HandshakeData {
            protocol,
            server_name,
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        let chain: Vec<CertificateDer<'static>> = match &self.state {
            State::Handshaking(tls) => tls
                .peer_certificates()?
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            State::Done { peer, .. } => peer.clone()?,
            State::Failed(_) => return None,
        };
        Some(Box::new(chain))
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn crypto::PacketKey>)> {
        let keys = self.tls()?.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        None
    }

    fn is_handshaking(&self) -> bool {
        match &self.state {
            State::Handshaking(tls) => tls.is_handshaking(),
            State::Done { .. } => false,
            State::Failed(_) => true,
        }
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let tls = match &mut self.state {
            State::Handshaking(tls) => tls,
            State::Done { .. } => {
                return Err(TransportError {
                    code: TransportErrorCode::PROTOCOL_VIOLATION,
                    frame: None,
                    reason: "CRYPTO data after the handshake".into(),
                });
            }
            State::Failed(e) => {
                return Err(TransportError {
                    code: TransportErrorCode::INTERNAL_ERROR,
                    frame: None,
                    reason: format!("TLS session: {e}"),
                });
            }
        };
        tls.read_hs(buf).map_err(|e| match tls.alert() {
            Some(alert) => TransportError {
                code: TransportErrorCode::crypto(alert.into()),
                frame: None,
                reason: e.to_string(),
            },
            None => TransportError {
                code: TransportErrorCode::PROTOCOL_VIOLATION,
                frame: None,
                reason: format!("TLS error: {e}"),
            },
        })?;
        if !self.got_handshake_data
            && (tls.alpn_protocol().is_some()
                || tls.server_name().is_some()
                || !tls.is_handshaking())
        {
            // As quinn-proto's session: the ClientHello has been read.
            self.got_handshake_data = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let Some(raw) = self.tls().and_then(|t| t.quic_transport_parameters()) else {
            return Ok(None);
        };
        TransportParameters::read(Side::Server, &mut Cursor::new(raw))
            .map(Some)
            .map_err(Into::into)
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let State::Handshaking(tls) = &mut self.state else {
            return None;
        };
        let before = buf.len();
        match tls.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => return Some(boxed(keys)),
            Some(KeyChange::OneRtt { keys, next }) => {
                self.next = Some(Next::First(Box::new(next)));
                self.limits = KeyLimits {
                    tag_len: keys.local.packet.tag_len(),
                    confidentiality: keys.local.packet.confidentiality_limit(),
                    integrity: keys.local.packet.integrity_limit(),
                };
                return Some(boxed(keys));
            }
            None => {}
        }
        // Handshake over and nothing more to write (the tickets went out in an earlier call):
        // keep what the handshake told and let rustls go.
        if !tls.is_handshaking() && buf.len() == before {
            let peer = tls
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
            self.state = State::Done {
                alpn: tls.alpn_protocol().map(<[u8]>::to_vec),
                server_name: tls.server_name().map(str::to_owned),
                peer,
            };
            self.released.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        let secrets = match self.next.take()? {
            Next::First(secrets) => *secrets,
            Next::After(last) => {
                // The phase handed out last is now in use (a key update): step its secrets
                // past it. rustls steps them only together with that phase's keys, which are
                // expanded here and dropped (once per key update; the phase's own pair expands
                // them again if it has not yet).
                let mut secrets = last.secrets.clone();
                drop(secrets.next_packet_keys());
                secrets
            }
        };
        let phase = Arc::new(NextPhase {
            secrets,
            keys: OnceLock::new(),
        });
        self.next = Some(Next::After(phase.clone()));
        Some(KeyPair {
            local: Box::new(LazyKey {
                phase: phase.clone(),
                local: true,
                limits: self.limits,
            }),
            remote: Box::new(LazyKey {
                phase,
                local: false,
                limits: self.limits,
            }),
        })
    }

    fn is_valid_retry(
        &self,
        _orig_dst_cid: &ConnectionId,
        _header: &[u8],
        _payload: &[u8],
    ) -> bool {
        // Only a client checks Retry packets.
        false
    }

    /// Not offered: nothing in meshchat exports keying material, and after the handshake the
    /// secrets it derives from are gone.
    fn export_keying_material(
        &self,
        _output: &mut [u8],
        _label: &[u8],
        _context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        Err(ExportKeyingMaterialError)
    }
}
