//! A QUIC handshake between meshchat's client library and a node's client-facing config, in
//! memory: two quinn-proto endpoints hand each other their datagrams, no socket, no task.
//! What a full handshake (no resumption) costs the node (`server_side`: only the time spent in
//! the node's endpoint and connection is counted) and both ends together (`both_sides`), with
//! the client's cipher suite order as the parameter: the client library's (AES-128-GCM first)
//! and ring's default (AES-256-GCM first, also OpenSSL's), the baseline in the same run.
//!
//! `cargo bench -p meshchat-benches --bench handshake`

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshchat_messaging::config::NodeConfig;
use meshchat_messaging::tickets::TicketStore;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig,
    EndpointEvent, ServerConfig,
};

const SERVER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7400);
const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50_000);

/// The node's client-facing QUIC config with `identity`, its own ticket store.
fn node_config(identity: meshchat_messaging::tls::Identity) -> Arc<ServerConfig> {
    let config = NodeConfig::default();
    let tickets = Arc::new(TicketStore::new(config.transport.ticket_store_bytes));
    Arc::new(
        meshchat_messaging::tls::server_config(
            identity,
            meshchat_proto::CLIENT_ALPN,
            &config,
            &meshchat_messaging::tls::token_key(),
            &tickets,
        )
        .expect("server config"),
    )
}

/// A client config like the client library's (`meshchat_client::conn::client_config`: TLS 1.3,
/// its ALPN, the dev CA, no path MTU discovery), offering only the suites in `order`, in that
/// order, and without resumption: every handshake is a full one (the library would resume
/// with a ticket of an earlier connection).
fn client_config(dir: &std::path::Path, order: &[rustls::CipherSuite]) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for ca in meshchat_messaging::tls::load_certs(&dir.join(meshchat_messaging::tls::DEV_CA_CERT))
        .expect("ca")
    {
        roots.add(ca).expect("root");
    }
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| order.contains(&s.suite()));
    provider
        .cipher_suites
        .sort_by_key(|s| order.iter().position(|x| *x == s.suite()));
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![meshchat_proto::CLIENT_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut config = ClientConfig::new(Arc::new(crypto));
    // As the library's: no path MTU probes (each would be another ~1.3 KB of padding).
    let mut transport = quinn_proto::TransportConfig::default();
    transport.mtu_discovery_config(None);
    config.transport_config(Arc::new(transport));
    config
}

/// One side of the handshake: its endpoint and its one connection.
struct Side {
    endpoint: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    addr: SocketAddr,
    /// Time spent in this side's calls.
    spent: Duration,
}

impl Side {
    /// Sends this side's datagrams to `peer` until it has none; true if any was sent.
    fn send(&mut self, peer: &mut Side, now: Instant, buf: &mut Vec<u8>) -> bool {
        let mut sent = false;
        loop {
            buf.clear();
            let started = Instant::now();
            let transmit = self
                .conn
                .as_mut()
                .and_then(|(_, c)| c.poll_transmit(now, 1, buf));
            self.spent += started.elapsed();
            let Some(t) = transmit else {
                return sent;
            };
            sent = true;
            peer.receive(self.addr, BytesMut::from(&buf[..t.size]), now);
        }
    }

    /// Takes one datagram from `from`.
    fn receive(&mut self, from: SocketAddr, data: BytesMut, now: Instant) {
        let started = Instant::now();
        let mut response = Vec::new();
        match self
            .endpoint
            .handle(now, from, None, None, data, &mut response)
        {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let accepted = self
                    .endpoint
                    .accept(incoming, now, &mut response, None)
                    .expect("accepted");
                self.conn = Some(accepted);
            }
            Some(DatagramEvent::ConnectionEvent(_, event)) => {
                if let Some((_, c)) = self.conn.as_mut() {
                    c.handle_event(event);
                }
            }
            Some(DatagramEvent::Response(_)) => panic!("the node refused the handshake"),
            None => {}
        }
        self.pump(now);
        self.spent += started.elapsed();
    }

    /// Hands the connection's endpoint events to the endpoint and drains its events.
    fn pump(&mut self, now: Instant) {
        let Some((handle, conn)) = self.conn.as_mut() else {
            return;
        };
        while let Some(event) = conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(*handle, event) {
                conn.handle_event(back);
            }
        }
        while conn.poll().is_some() {}
        if let Some(at) = conn.poll_timeout()
            && at <= now
        {
            conn.handle_timeout(now);
        }
    }

    /// Forgets the connection, as a driver does once it is drained.
    fn forget(&mut self) {
        if let Some((handle, _)) = self.conn.take() {
            self.endpoint.handle_event(handle, EndpointEvent::drained());
        }
    }

    fn handshaking(&self) -> bool {
        self.conn.as_ref().is_none_or(|(_, c)| c.is_handshaking())
    }
}

/// One full handshake from the client's first datagram until neither side has anything
/// left to send (the node's session ticket and HANDSHAKE_DONE included); returns the time
/// the node's side spent and the time both spent.
fn handshake(server: &mut Side, client: &mut Side, config: &ClientConfig) -> (Duration, Duration) {
    let now = Instant::now();
    server.spent = Duration::ZERO;
    client.spent = Duration::ZERO;
    let started = Instant::now();
    let conn = client
        .endpoint
        .connect(now, config.clone(), SERVER, "localhost")
        .expect("connect");
    client.conn = Some(conn);
    client.spent += started.elapsed();
    let mut buf = Vec::with_capacity(1500);
    for _ in 0..32 {
        let a = client.send(server, now, &mut buf);
        let b = server.send(client, now, &mut buf);
        if !a && !b && !client.handshaking() && !server.handshaking() {
            break;
        }
    }
    assert!(
        !server.handshaking() && !client.handshaking(),
        "the handshake completes"
    );
    server.forget();
    client.forget();
    (server.spent, server.spent + client.spent)
}

fn handshakes(c: &mut Criterion) {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256 as AES_128, TLS13_AES_256_GCM_SHA384 as AES_256,
        TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
    };
    let dir = tempfile::tempdir().expect("dir");
    let identity = meshchat_messaging::tls::dev_identity(dir.path(), &[]).expect("dev identity");
    // A fresh pair of endpoints for each benchmark, the node's with a fresh ticket store: it
    // takes one ticket per handshake (never redeemed here), and one benchmark's must not
    // weigh on the next.
    let pair = || {
        let side = |config: Option<Arc<ServerConfig>>, addr| Side {
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), config, false, None),
            conn: None,
            addr,
            spent: Duration::ZERO,
        };
        (
            side(
                Some(node_config(meshchat_messaging::tls::Identity {
                    chain: identity.chain.clone(),
                    key: identity.key.clone_key(),
                })),
                SERVER,
            ),
            side(None, CLIENT),
        )
    };
    // The client library's order (meshchat_backplane::tls::provider), and ring's default,
    // AES-256 first (as OpenSSL's): the node honours the client's order.
    let library: Vec<_> = meshchat_backplane::tls::provider()
        .cipher_suites
        .iter()
        .map(|s| s.suite())
        .collect();
    let clients = [
        ("aes128_first", client_config(dir.path(), &library)),
        (
            "aes256_first",
            client_config(dir.path(), &[AES_256, AES_128, CHACHA]),
        ),
    ];
    let mut group = c.benchmark_group("handshake");
    for (name, config) in &clients {
        let (mut server, mut client) = pair();
        group.bench_with_input(
            BenchmarkId::new("server_side", name),
            config,
            |b, config| {
                b.iter_custom(|n| {
                    (0..n)
                        .map(|_| handshake(&mut server, &mut client, config).0)
                        .sum()
                });
            },
        );
        let (mut server, mut client) = pair();
        group.bench_with_input(BenchmarkId::new("both_sides", name), config, |b, config| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| handshake(&mut server, &mut client, config).1)
                    .sum()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);
