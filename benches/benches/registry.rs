//! The connection registry ([`Registry`]) with 100k users online, one connection each:
//!
//! - `registry/is_online`: 1,024 lookups per iteration, half of them online, rotating through
//!   65,536 ids so the map is not all in cache;
//! - `registry/push_to_1` and `registry/push_to_100`: one push to 1 or 100 users (a direct
//!   message, a channel's local share), rotating through all 100k users.
//!
//! Each runs on one thread (`1_thread`) and again while a second thread connects and
//! disconnects other users in the same map (`2_threads_churn`): the contention a node sees
//! while clients come and go. The churn thread's rate is printed after each contended bench.
//!
//! Handles are real: two loopback QUIC connections (dev CA, client ALPN) cloned into every
//! `ConnHandle` under distinct `ConnId`s, and outboxes of the default `limits.outbound_queue`
//! and `limits.outbound_queue_bytes`.
//! Push benches drain the outboxes they filled every `CHUNK` pushes with the clock stopped,
//! so no queue fills (a full one would cut a connection off) and memory stays flat.

// A bench binary reports the churn rate on the terminal.
#![allow(clippy::print_stdout)]

use std::cell::Cell;
use std::collections::VecDeque;
use std::hint::black_box;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshchat_idgen::UserId;
use meshchat_messaging::NodeConfig;
use meshchat_messaging::registry::{ConnControl, ConnHandle, ConnId, Outbox, Registry};
use meshchat_messaging::tls;
use meshchat_proto::CLIENT_ALPN;

/// Users online, one connection each.
const USERS: usize = 100_000;
/// Lookups per `is_online` iteration.
const LOOKUPS: usize = 1_024;
/// Ids the lookups rotate through: half online, half not.
const PROBES: usize = 65_536;
/// Pushes between two (untimed) drains of the outboxes they filled. At 100 recipients a
/// chunk reaches 25,600 users, so no outbox holds more than one push.
const CHUNK: u64 = 256;
/// Connections the churn thread keeps open at once.
const CHURN_LIVE: usize = 64;

/// Registered user `i` (scattered ids, like real ones). Ids from `USERS` up are offline;
/// churn uses ids from `2 * USERS` up, so it never changes what the measured thread sees.
fn user(i: usize) -> UserId {
    UserId(i as u64 * 2_654_435_761 + 17)
}

struct Fixture {
    registry: Registry,
    /// Outbox of `user(i)`.
    outboxes: Vec<Arc<Outbox>>,
    /// Client ends of the loopback connections every handle clones.
    conns: Vec<quinn::Connection>,
    outbound_queue: usize,
    outbound_queue_bytes: usize,
    _server_conns: Vec<quinn::Connection>,
    _endpoints: [quinn::Endpoint; 2],
    _dir: tempfile::TempDir,
    /// Last: drives the endpoints until everything above is dropped.
    _rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let (endpoints, conns, server_conns) = rt.block_on(loopback(dir.path(), 2));
        let outbound_queue = NodeConfig::default().limits.outbound_queue;
        let outbound_queue_bytes = NodeConfig::default().limits.outbound_queue_bytes;
        let registry = Registry::new();
        let outboxes: Vec<Arc<Outbox>> = (0..USERS)
            .map(|i| {
                let outbox = Outbox::new(outbound_queue, outbound_queue_bytes);
                registry.insert(
                    user(i),
                    ConnHandle {
                        id: registry.next_conn_id(),
                        outbox: outbox.clone(),
                        conn: ConnControl::Quinn(conns[i % conns.len()].clone()),
                        visible: false,
                    },
                );
                outbox
            })
            .collect();
        Self {
            registry,
            outboxes,
            conns,
            outbound_queue,
            outbound_queue_bytes,
            _server_conns: server_conns,
            _endpoints: endpoints,
            _dir: dir,
            _rt: rt,
        }
    }

    fn handle(&self, id: ConnId) -> ConnHandle {
        ConnHandle {
            id,
            outbox: Outbox::new(self.outbound_queue, self.outbound_queue_bytes),
            conn: ConnControl::Quinn(self.conns[id.0 as usize % self.conns.len()].clone()),
            visible: false,
        }
    }

    /// Connects and disconnects churn users until `stop`; returns inserts + removes made.
    fn churn(&self, stop: &AtomicBool) -> u64 {
        let mut live: VecDeque<(UserId, ConnId)> = VecDeque::with_capacity(CHURN_LIVE + 1);
        let mut ops = 0u64;
        let mut j = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let u = user(2 * USERS + j % USERS);
            let id = self.registry.next_conn_id();
            self.registry.insert(u, self.handle(id));
            live.push_back((u, id));
            if live.len() > CHURN_LIVE
                && let Some((u, id)) = live.pop_front()
            {
                self.registry.remove(u, id);
                ops += 1;
            }
            ops += 1;
            j += 1;
        }
        for (u, id) in live {
            self.registry.remove(u, id);
        }
        ops
    }
}

/// Client and server ends of `n` loopback QUIC connections to a node-configured server.
async fn loopback(
    dir: &std::path::Path,
    n: usize,
) -> (
    [quinn::Endpoint; 2],
    Vec<quinn::Connection>,
    Vec<quinn::Connection>,
) {
    let identity = tls::dev_identity(dir, &[]).expect("dev identity");
    let sc = tls::server_config(
        identity,
        CLIENT_ALPN,
        &NodeConfig::default(),
        &tls::token_key(),
        &std::sync::Arc::new(meshchat_messaging::tickets::TicketStore::new(0)),
    )
    .expect("server config");
    let server = quinn::Endpoint::server(sc, ([127, 0, 0, 1], 0).into()).expect("server");
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(&dir.join(tls::DEV_CA_CERT)).expect("dev CA") {
        roots.add(c).expect("CA cert");
    }
    let mut client_tls = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("QUIC client"),
    ));
    let mut transport = quinn::TransportConfig::default();
    // The server's idle timeout is 60 s; a bench run is longer.
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    cc.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("client");
    client.set_default_client_config(cc);
    let addr = server.local_addr().expect("server addr");
    let mut conns = Vec::new();
    let mut server_conns = Vec::new();
    for _ in 0..n {
        let (c, s) = tokio::join!(
            async {
                client
                    .connect(addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake")
            },
            async {
                server
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("accept")
            }
        );
        conns.push(c);
        server_conns.push(s);
    }
    ([server, client], conns, server_conns)
}

/// Inserts + removes the churn thread made, and over how long, across a bench's samples.
#[derive(Default)]
struct ChurnRate {
    ops: Cell<u64>,
    time: Cell<Duration>,
}

impl ChurnRate {
    fn report(&self, name: &str) {
        let secs = self.time.get().as_secs_f64();
        if secs > 0.0 {
            println!(
                "{name}: churn thread made {:.0} inserts+removes/s",
                self.ops.get() as f64 / secs
            );
        }
    }
}

/// Runs `timed` here, alone or (with `churn`) while another thread connects and disconnects
/// users in the same registry.
fn run<R>(fx: &Fixture, churn: Option<&ChurnRate>, timed: impl FnOnce() -> R) -> R {
    let Some(rate) = churn else {
        return timed();
    };
    let stop = AtomicBool::new(false);
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        let churner = s.spawn(|| {
            started.wait();
            let t = Instant::now();
            let ops = fx.churn(&stop);
            (ops, t.elapsed())
        });
        started.wait();
        let r = timed();
        stop.store(true, Ordering::Relaxed);
        let (ops, t) = churner.join().expect("churn thread");
        rate.ops.set(rate.ops.get() + ops);
        rate.time.set(rate.time.get() + t);
        r
    })
}

/// The next `len` indices from `cursor` in `0..total`, wrapping to 0 at the end.
fn next_range(cursor: &mut usize, len: usize, total: usize) -> Range<usize> {
    if *cursor + len > total {
        *cursor = 0;
    }
    let r = *cursor..*cursor + len;
    *cursor += len;
    r
}

/// Benches `timed` (runs `iters` iterations and returns the time they took) as
/// `<group>/1_thread` and again as `<group>/2_threads_churn`, with `elements` per iteration.
fn alone_and_under_churn(
    c: &mut Criterion,
    fx: &Fixture,
    group: &str,
    elements: usize,
    mut timed: impl FnMut(u64) -> Duration,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(elements as u64));
    for (name, churn) in [
        ("1_thread", None),
        ("2_threads_churn", Some(ChurnRate::default())),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| run(fx, churn.as_ref(), || timed(iters)))
        });
        if let Some(rate) = &churn {
            rate.report(&format!("{group}/{name}"));
        }
    }
    g.finish();
}

fn is_online(c: &mut Criterion, fx: &Fixture) {
    // Alternating online and offline ids, scattered over the whole registry.
    let probes: Vec<UserId> = (0..PROBES)
        .map(|k| {
            let i = k * 97 % USERS;
            if k.is_multiple_of(2) {
                user(i)
            } else {
                user(USERS + i)
            }
        })
        .collect();
    let mut cursor = 0;
    alone_and_under_churn(c, fx, "registry/is_online", LOOKUPS, |iters| {
        let start = Instant::now();
        for _ in 0..iters {
            let r = next_range(&mut cursor, LOOKUPS, PROBES);
            let online = probes[r].iter().filter(|&&u| fx.registry.is_online(u));
            black_box(online.count());
        }
        start.elapsed()
    });
}

fn push_to(c: &mut Criterion, fx: &Fixture, recipients: usize) {
    let users: Vec<UserId> = (0..USERS).map(user).collect();
    let push = Bytes::from(vec![7u8; 64]);
    let mut drained = Vec::new();
    let mut cursor = 0;
    let group = format!("registry/push_to_{recipients}");
    alone_and_under_churn(c, fx, &group, recipients, |iters| {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            let n = CHUNK.min(iters - done);
            let first = cursor;
            let start = Instant::now();
            let mut queued = 0;
            for _ in 0..n {
                let r = next_range(&mut cursor, recipients, USERS);
                queued += fx.registry.push_to(&users[r], &push, None).queued;
            }
            total += start.elapsed();
            assert_eq!(queued, n as usize * recipients, "a push was not queued");
            // Replay the same ranges to empty exactly the outboxes just filled.
            let mut replay = first;
            for _ in 0..n {
                for o in &fx.outboxes[next_range(&mut replay, recipients, USERS)] {
                    o.drain_into(usize::MAX, &mut drained);
                }
            }
            drained.clear();
            done += n;
        }
        total
    });
}

fn registry(c: &mut Criterion) {
    let setup = Instant::now();
    let fx = Fixture::new();
    println!(
        "registry: {USERS} users over {} QUIC connections set up in {:.0?}",
        fx.conns.len(),
        setup.elapsed()
    );
    is_online(c, &fx);
    push_to(c, &fx, 1);
    push_to(c, &fx, 100);
}

criterion_group!(benches, registry);
criterion_main!(benches);
