//! A flood of QUIC Initials from spoofed sources does not lock legitimate clients out.
//!
//! The flood is real QUIC: each Initial is a fresh client connection attempt made with
//! quinn-proto (so the node must treat it as a real handshake), sent from one of 1,000
//! loopback addresses that never answer anything (the node's replies pile up unread), which
//! is what a spoofed source looks like to the node. Ten times the node's handshake capacity
//! arrives in each of three waves while legitimate clients connect and authenticate.
//!
//! Before address validation, per-source caps and the handshake deadline, the first 1,024
//! spoofed Initials held every handshake slot for the 60 s idle timeout and every legitimate
//! client was refused.

#![allow(clippy::print_stderr)] // the measurement is the point: it goes to the test output

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshchat_idgen::UserId;
use meshchat_messaging::auth::Auth;

/// Spoofed source addresses.
const SOURCES: usize = 1_000;
/// Waves of the flood, and legitimate clients connecting during each.
const WAVES: usize = 3;
const CLIENTS_PER_WAVE: usize = 40;

/// `n` Initial datagrams of `n` fresh connection attempts to `server` (real ClientHellos for
/// the node's ALPN, padded to 1,200 bytes as QUIC requires).
fn initials(
    server: SocketAddr,
    ca: &[rustls_pki_types::CertificateDer<'static>],
    n: usize,
) -> Vec<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(meshchat_messaging::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![meshchat_proto::CLIENT_ALPN.to_vec()];
    let config = quinn_proto::ClientConfig::new(Arc::new(
        quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    ));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), server, "localhost")
                .expect("connect");
            let mut buf = Vec::with_capacity(1_500);
            let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
            buf.truncate(t.size);
            buf
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_handshake_flood_of_ten_times_capacity_does_not_lock_clients_out() {
    raise_fd_limit();
    let node = common::TestNode::start().await;
    let capacity = node.config.limits.max_concurrent_handshakes;
    let server: SocketAddr = node.addr().parse().expect("addr");
    let ca = meshchat_messaging::tls::load_certs(&node.dir.path().join("ca.pem")).expect("ca");

    // Built before the clock starts: 3 waves of 10 x capacity.
    let per_wave = 10 * capacity;
    let waves: Vec<Vec<Vec<u8>>> = tokio::task::spawn_blocking(move || {
        (0..WAVES)
            .map(|_| initials(server, &ca, per_wave))
            .collect()
    })
    .await
    .expect("initials");
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|i| UdpSocket::bind(format!("127.3.{}.{}:0", i / 250, i % 250 + 1)).expect("source"))
        .collect();

    // Legitimate users: tokens minted with the cluster's secret (no password hashing in the
    // measurement).
    let secret = Auth::load_or_create_secret(&node.dir.path().join("token.key")).expect("secret");
    let auth = Arc::new(Auth::new(&secret, Duration::from_secs(3600), 1));

    // Baseline, same run: the same number of clients with no flood.
    let (mut baseline, failed) = connect_round(&node, &auth, 0).await;
    assert!(failed.is_empty(), "baseline failures: {failed:?}");
    baseline.sort();

    // How many spoofed Initials are out: the legitimate clients of a wave connect once a
    // quarter of it has been sent, so the flood is in full swing (a condition, not a delay).
    let sent_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent_so_far.clone();
    let flood = std::thread::spawn(move || {
        let mut sent = 0usize;
        for wave in waves {
            let start = Instant::now();
            for (k, datagram) in wave.iter().enumerate() {
                let _ = sockets[k % SOURCES].send_to(datagram, server);
                sent += 1;
                counter.store(sent, std::sync::atomic::Ordering::Relaxed);
                // Paced at ~10,000 datagrams/s: a burst would mostly die in the node's socket
                // buffer, which measures the kernel, not the node. Pacing, not waiting.
                if k % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            // Each wave takes ~1 s; the next starts 2 s after this one did.
            let left = Duration::from_secs(2).saturating_sub(start.elapsed());
            std::thread::sleep(left);
        }
        sent
    });

    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for wave in 0..WAVES {
        let due = wave * per_wave + per_wave / 4;
        common::wait_for("the wave is under way", Duration::from_secs(30), || {
            sent_so_far.load(std::sync::atomic::Ordering::Relaxed) >= due
        })
        .await;
        let (ok, failed) = connect_round(&node, &auth, 1 + wave).await;
        latencies.extend(ok);
        failures.extend(failed);
    }
    let sent = tokio::task::spawn_blocking(move || flood.join().expect("flood"))
        .await
        .expect("join");
    latencies.sort();
    let total = WAVES * CLIENTS_PER_WAVE;
    eprintln!(
        "spoofed Initials sent: {sent} ({per_wave} per wave, capacity {capacity}); legitimate \
         clients: {}/{total} connected and authenticated; p50 {:?}, p99 {:?}, max {:?}; \
         baseline without flood ({} clients): p50 {:?}, p99 {:?}",
        latencies.len(),
        pct(&latencies, 0.50),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        baseline.len(),
        pct(&baseline, 0.50),
        pct(&baseline, 0.99),
    );
    assert!(
        failures.is_empty(),
        "{} of {total} legitimate clients failed: {failures:?}",
        failures.len()
    );
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or_default()
}

/// `CLIENTS_PER_WAVE` clients connecting and authenticating at once (users numbered from
/// `round`); the time each took, and what failed.
async fn connect_round(
    node: &common::TestNode,
    auth: &Arc<Auth>,
    round: usize,
) -> (Vec<Duration>, Vec<String>) {
    let mut joins = tokio::task::JoinSet::new();
    for c in 0..CLIENTS_PER_WAVE {
        let opts = node.options();
        let addr = node.addr();
        let auth = auth.clone();
        joins.spawn(async move {
            let user = UserId(1_000_000 + (round * CLIENTS_PER_WAVE + c) as u64);
            let (token, _) = auth.mint(user, "flooded").expect("token");
            let start = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(15), async {
                let (client, _events) = meshchat_client::Client::connect(&addr, opts).await?;
                client.authenticate(&token).await?;
                client.close();
                Ok::<_, meshchat_client::ClientError>(())
            })
            .await;
            (start.elapsed(), result)
        });
    }
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    while let Some(j) = joins.join_next().await {
        match j.expect("task") {
            (took, Ok(Ok(()))) => ok.push(took),
            (took, other) => failed.push(format!("{took:?}: {other:?}")),
        }
    }
    (ok, failed)
}

/// Enough file descriptors for 1,000 source sockets, raised in this process only.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}
