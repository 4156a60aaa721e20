//! One mesh hop, node A to node B over loopback, side by side with the same hop through Redis
//! pub/sub and NATS core (servers from Debian, started here on free ports).
//!
//! Each message is 256 bytes; its first 8 bytes carry the send time (ns since a shared
//! `Instant`), so the receiver measures one-way latency on the same clock.
//!
//! - `hop/<peer>/one_at_a_time`: send one message, wait for it to arrive, repeat: the
//!   criterion time per iteration is the one-way latency; p50/p99 of every sample are printed
//!   from an HDR histogram after each group.
//! - `hop/<peer>/burst_1000`: send 1,000 messages back to back, wait for all: throughput with
//!   whatever batching each system does.
//!
//! The mesh side is the real `Mesh` (QUIC, mutual TLS, `PeerBatch` frames, per-peer queue and
//! writer task); node B's deliveries go to a recording sink instead of client connections.
//! Needs `redis-server` and `nats-server` on PATH (`.ci/test.sh` installs them); a peer whose
//! server is missing is reported and skipped, never faked.

// A bench binary reports percentiles and skipped peers on the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use hdrhistogram::Histogram;
use meshchat_backplane::delivery::{ConnId, Delivery, LocalDelivery, Router};
use meshchat_backplane::mesh::Mesh;
use meshchat_idgen::{ChannelId, NodeId, UserId};
use meshchat_messaging::config::{NodeConfig, StaticMember};
use tokio::sync::mpsc;

const SIZE: usize = 256;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn payload(base: Instant) -> Vec<u8> {
    let mut v = vec![b'x'; SIZE];
    v[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
    v
}

fn latency_ns(base: Instant, p: &[u8]) -> u64 {
    let mut t = [0u8; 8];
    t.copy_from_slice(&p[..8]);
    (base.elapsed().as_nanos() as u64).saturating_sub(u64::from_le_bytes(t))
}

/// Node B's side of the mesh: forwards each delivered push to the bench.
struct Sink(mpsc::UnboundedSender<Bytes>);

impl LocalDelivery for Sink {
    fn push_to(&self, _users: &[UserId], push: &Bytes, _skip: Option<ConnId>) -> Delivery {
        let _ = self.0.send(push.clone());
        Delivery {
            queued: 1,
            cut_off: 0,
        }
    }
    fn is_online(&self, _user: UserId) -> bool {
        false
    }
    // Nobody is connected to move or resync, and nothing is cached.
    fn redirect(&self, _user: UserId, _node: NodeId, _addr: String, _epoch: u64) {}
    fn resync(&self, _users: &[UserId]) {}
    fn invalidate_channel(&self, _channel: ChannelId) {}
    fn invalidate_all_channels(&self) {}
}

/// A publish/receive pair under test.
trait Hop {
    fn send(&mut self, rt: &tokio::runtime::Runtime, msg: Vec<u8>);
    fn recv(&mut self, rt: &tokio::runtime::Runtime) -> Vec<u8>;
}

struct MeshHop {
    a: Arc<Mesh>,
    rx: mpsc::UnboundedReceiver<Bytes>,
    to: UserId,
    _b: Arc<Mesh>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Hop for MeshHop {
    fn send(&mut self, _rt: &tokio::runtime::Runtime, msg: Vec<u8>) {
        self.a.deliver(&[self.to], &Bytes::from(msg), None);
    }
    fn recv(&mut self, rt: &tokio::runtime::Runtime) -> Vec<u8> {
        rt.block_on(self.rx.recv()).expect("mesh delivery").to_vec()
    }
}

fn mesh_hop(rt: &tokio::runtime::Runtime) -> MeshHop {
    let dir = tempfile::tempdir().expect("dir");
    let members: Vec<StaticMember> = (1..=2)
        .map(|id| StaticMember {
            id,
            mesh_addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            client_addr: format!("127.0.0.1:{}", free_port()),
            weight: 1,
            worker_id: None,
        })
        .collect();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut meshes = Vec::new();
    for m in &members {
        let mut c = NodeConfig {
            node_id: m.id,
            data_dir: dir.path().to_owned(),
            ..NodeConfig::default()
        };
        c.cluster.mesh_listen = Some(m.mesh_addr);
        c.cluster.members = members.clone();
        let sink: Arc<dyn LocalDelivery> = if m.id == 2 {
            Arc::new(Sink(tx.clone()))
        } else {
            Arc::new(Sink(mpsc::unbounded_channel().0))
        };
        let mesh = rt.block_on(async {
            meshchat_messaging::server::start_mesh(&c, sink, &stop_rx).expect("mesh")
        });
        meshes.push(mesh);
    }
    let (a, b) = (meshes[0].clone(), meshes[1].clone());
    rt.block_on(async {
        while !a.peer_up(NodeId(2)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // A user homed on node B.
    let to = (0..)
        .map(UserId)
        .find(|u| a.ring().owner(*u) == Some(NodeId(2)))
        .expect("a user on node 2");
    MeshHop {
        a,
        rx,
        to,
        _b: b,
        _dir: dir,
        _stop: stop,
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(cmd: &str, args: &[String], port: u16) -> Option<Server> {
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED peer {cmd}: cannot start it ({e}); install it (.ci/test.sh does)");
            return None;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            eprintln!("SKIPPED peer {cmd}: it did not listen within 10 s");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Server(child))
}

struct RedisHop {
    publisher: redis::aio::MultiplexedConnection,
    stream: redis::aio::PubSubStream,
    _server: Server,
}

impl Hop for RedisHop {
    fn send(&mut self, rt: &tokio::runtime::Runtime, msg: Vec<u8>) {
        let p = &mut self.publisher;
        rt.block_on(async {
            redis::cmd("PUBLISH")
                .arg("hop")
                .arg(msg)
                .query_async::<i64>(p)
                .await
                .expect("publish")
        });
    }
    fn recv(&mut self, rt: &tokio::runtime::Runtime) -> Vec<u8> {
        rt.block_on(self.stream.next())
            .expect("redis message")
            .get_payload_bytes()
            .to_vec()
    }
}

fn redis_hop(rt: &tokio::runtime::Runtime) -> Option<RedisHop> {
    let port = free_port();
    let server = start_server(
        "redis-server",
        &[
            "--port".into(),
            port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
        ],
        port,
    )?;
    rt.block_on(async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub.subscribe("hop").await.expect("subscribe");
        let publisher = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        Some(RedisHop {
            publisher,
            stream: pubsub.into_on_message(),
            _server: server,
        })
    })
}

struct NatsHop {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    _server: Server,
}

impl Hop for NatsHop {
    fn send(&mut self, rt: &tokio::runtime::Runtime, msg: Vec<u8>) {
        let c = &self.client;
        // No explicit flush: `flush()` waits for a server round trip, which would charge NATS
        // for a PING/PONG the others do not pay; the client's writer task sends the publish
        // as soon as it is idle.
        rt.block_on(async { c.publish("hop", Bytes::from(msg)).await.expect("publish") });
    }
    fn recv(&mut self, rt: &tokio::runtime::Runtime) -> Vec<u8> {
        rt.block_on(self.sub.next())
            .expect("nats message")
            .payload
            .to_vec()
    }
}

fn nats_hop(rt: &tokio::runtime::Runtime) -> Option<NatsHop> {
    let port = free_port();
    let server = start_server(
        "nats-server",
        &[
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        port,
    )?;
    rt.block_on(async {
        let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
            .await
            .expect("connect");
        let sub = client.subscribe("hop").await.expect("subscribe");
        client.flush().await.expect("flush");
        Some(NatsHop {
            client,
            sub,
            _server: server,
        })
    })
}

fn bench_peer(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, hop: &mut dyn Hop) {
    let base = Instant::now();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut g = c.benchmark_group(format!("hop/{name}"));
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_at_a_time", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                hop.send(rt, payload(base));
                let got = hop.recv(rt);
                let _ = hist.record(latency_ns(base, &got));
            }
            start.elapsed()
        })
    });
    g.throughput(Throughput::Elements(1_000));
    g.sample_size(20);
    g.bench_function("burst_1000", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..1_000 {
                    hop.send(rt, payload(base));
                }
                for _ in 0..1_000 {
                    hop.recv(rt);
                }
            }
            start.elapsed()
        })
    });
    g.finish();
    println!(
        "hop/{name}: one-way latency over {} messages: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        hist.len(),
        hist.value_at_quantile(0.50) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3
    );
}

fn hops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut mesh = mesh_hop(&rt);
    bench_peer(c, &rt, "mesh", &mut mesh);
    match redis_hop(&rt) {
        Some(mut r) => bench_peer(c, &rt, "redis_pubsub", &mut r),
        None => eprintln!("hop/redis_pubsub: SKIPPED (no redis-server)"),
    }
    match nats_hop(&rt) {
        Some(mut n) => bench_peer(c, &rt, "nats_core", &mut n),
        None => eprintln!("hop/nats_core: SKIPPED (no nats-server)"),
    }
}

criterion_group!(benches, hops);
criterion_main!(benches);
