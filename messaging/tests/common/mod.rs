//! Shared helpers for the node's integration tests: a real node on 127.0.0.1 with a real
//! embedded store in a temp dir, and real QUIC clients.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod cassandra;
pub mod cluster;
pub mod dev;
pub mod kill;
pub mod relay;

use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_messaging::{NodeConfig, RunningNode};
use meshchat_proto::client::ErrorCode;

pub struct TestNode {
    pub running: Option<RunningNode>,
    pub dir: tempfile::TempDir,
    pub config: NodeConfig,
}

pub fn config_in(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_owned(),
        ..NodeConfig::default()
    };
    c.limits.send_rate_per_sec = 10_000;
    c.limits.send_burst = 10_000;
    // Every test client comes from 127.0.0.1: the password-attempt limits are for strangers.
    c.auth.attempts_per_source_per_min = 100_000;
    c.auth.attempts_per_source_burst = 10_000;
    c.auth.logins_per_account_per_min = 100_000;
    c.auth.logins_per_account_burst = 10_000;
    c.shutdown_grace = Duration::from_secs(3);
    // The suite's nodes run the default client endpoint (meshchat's endpoint loops, lean TLS
    // sessions) unless `TEST_CLIENT_ENDPOINT=quinn` asks for quinn's endpoint with rustls
    // kept whole (the suite's second pass, `.ci/test.sh`). Two loops whatever the machine's
    // cores (`TEST_CLIENT_LOOPS=N` for another count), so the group path, datagrams handed
    // to the loop their connection id names, always runs.
    match std::env::var("TEST_CLIENT_ENDPOINT").as_deref() {
        Ok("quinn") => {
            c.transport.endpoint = meshchat_messaging::config::EndpointKind::Quinn;
            c.transport.lean_tls = false;
        }
        _ => {
            c.transport.endpoint = meshchat_messaging::config::EndpointKind::Loop;
            c.transport.loops = std::env::var("TEST_CLIENT_LOOPS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(2);
            c.transport.lean_tls = true;
        }
    }
    c
}

/// Starts a node from `config()`. A port found free can be taken by another test's socket
/// before the node binds it: then the node starts again from a new `config()` (new free
/// ports), a few times.
pub async fn start_node(mut config: impl FnMut() -> NodeConfig) -> RunningNode {
    for _ in 0..5 {
        match meshchat_messaging::start(config()).await {
            Ok(node) => return node,
            Err(e) if cluster::address_in_use(&e) => {
                tracing::warn!(error = %e, "a port was taken before the node bound it: again");
            }
            Err(e) => panic!("node starts: {e}"),
        }
    }
    panic!("5 tries to start a node each met a port taken before it was bound");
}

/// A node config with Redis membership on `redis_port` (heartbeat 100 ms, TTL 1.5 s), on
/// free client and mesh ports.
pub fn redis_config(dir: &std::path::Path, id: u32, redis_port: u16) -> NodeConfig {
    let mut c = config_in(dir);
    c.node_id = id;
    c.listen = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    c.cluster.mesh_listen = Some(
        format!("127.0.0.1:{}", free_udp_port())
            .parse()
            .expect("addr"),
    );
    c.cluster.redis = Some(format!("redis://127.0.0.1:{redis_port}/"));
    c.cluster.heartbeat = Duration::from_millis(100);
    c.cluster.member_ttl = Duration::from_millis(1_500);
    c
}

impl TestNode {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config_in(dir.path());
        tweak(&mut config);
        let running = meshchat_messaging::start(config.clone())
            .await
            .expect("node starts");
        // Later restarts reuse the port.
        config.listen = running.addr;
        Self {
            running: Some(running),
            dir,
            config,
        }
    }

    pub fn addr(&self) -> String {
        self.running.as_ref().expect("running").addr.to_string()
    }

    pub fn options(&self) -> ConnectOptions {
        let ca = meshchat_client::load_ca(&self.dir.path().join("ca.pem")).expect("dev CA");
        ConnectOptions::new(ca)
    }

    pub async fn client(&self) -> (Client, Events) {
        self.client_with(self.options()).await
    }

    pub async fn client_with(&self, opts: ConnectOptions) -> (Client, Events) {
        Client::connect(&self.addr(), opts).await.expect("connect")
    }

    /// A newly registered user on a new connection.
    pub async fn user(&self, name: &str) -> (Client, Events, Session) {
        let (c, e) = self.client().await;
        let s = c.register(name, "password-123").await.expect("register");
        (c, e, s)
    }

    /// Another device of an existing user (token authentication).
    pub async fn device(&self, session: &Session) -> (Client, Events) {
        let (c, e) = self.client().await;
        c.authenticate(&session.token).await.expect("authenticate");
        (c, e)
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        let running = meshchat_messaging::start(self.config.clone())
            .await
            .expect("node restarts");
        self.running = Some(running);
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next message push within 5 s, skipping other events.
pub async fn next_message(events: &mut Events) -> meshchat_proto::client::Message {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next_within(left).await {
            Some(Event::Message(m)) => return m,
            Some(_) => continue,
            None => panic!("no message push within 5 s"),
        }
    }
}

/// The next event matching `pick` within 5 s.
pub async fn next_matching<T>(events: &mut Events, pick: impl FnMut(Event) -> Option<T>) -> T {
    next_matching_within(events, Duration::from_secs(5), pick).await
}

/// The next event matching `pick` within `within`.
pub async fn next_matching_within<T>(
    events: &mut Events,
    within: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next_within(left).await {
            Some(ev) => {
                if let Some(t) = pick(ev) {
                    return t;
                }
            }
            None => panic!("expected event did not arrive within {within:?}"),
        }
    }
}

/// Asserts no message push arrives within `wait`.
pub async fn no_message(events: &mut Events, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next_within(left).await {
            Some(Event::Message(m)) => panic!("unexpected message {m:?}"),
            Some(_) => continue,
            None => return,
        }
    }
}

/// Registers users through `via` until one is homed at each address of `homes` (whichever
/// way the random ids land on the ring; bounded at 200 users; an address listed twice gets
/// two users). Returns them in `homes` order.
pub async fn one_user_homed_at_each(
    via: &str,
    opts: &ConnectOptions,
    homes: &[String],
) -> Vec<(std::sync::Arc<Client>, Events, Session)> {
    users_homed_at_each("h", via, opts, homes).await
}

/// [`one_user_homed_at_each`] with user names `<prefix><i>` (to call it again on one store).
pub async fn users_homed_at_each(
    prefix: &str,
    via: &str,
    opts: &ConnectOptions,
    homes: &[String],
) -> Vec<(std::sync::Arc<Client>, Events, Session)> {
    let mut found: Vec<Option<(std::sync::Arc<Client>, Events, Session)>> =
        homes.iter().map(|_| None).collect();
    for i in 0..200 {
        if found.iter().all(Option::is_some) {
            break;
        }
        let (c, e) = Client::connect(via, opts.clone()).await.expect("connect");
        let s = c
            .register(&format!("{prefix}{i}"), "password-123")
            .await
            .expect("register");
        // The first free slot of that home (a home may be listed more than once).
        if let Some(k) = (0..homes.len()).find(|&k| homes[k] == c.server() && found[k].is_none()) {
            found[k] = Some((std::sync::Arc::new(c), e, s));
        }
    }
    found
        .into_iter()
        .zip(homes)
        .map(|(u, h)| u.unwrap_or_else(|| panic!("no user homed at {h} among 200")))
        .collect()
}

pub fn text(m: &meshchat_proto::client::Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

pub fn code_of<T: std::fmt::Debug>(r: Result<T, meshchat_client::ClientError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a node error: {e:?}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// A free UDP port on loopback, found by binding UDP (QUIC listens on UDP; a free TCP port
/// says nothing about UDP).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free UDP port")
}

/// A static member list of `n` nodes (ids 1..=n) on loopback, each on a free client and a
/// free mesh port.
pub fn static_members(n: u32) -> Vec<meshchat_messaging::config::StaticMember> {
    (1..=n)
        .map(|id| meshchat_messaging::config::StaticMember {
            id,
            mesh_addr: format!("127.0.0.1:{}", free_udp_port())
                .parse()
                .expect("addr"),
            client_addr: format!("127.0.0.1:{}", free_udp_port()),
            weight: 1,
            worker_id: None,
        })
        .collect()
}

/// A free TCP port on loopback (for TCP servers such as Redis).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real `redis-server` on `port`, without persistence, ready to serve.
pub fn redis_server(port: u16) -> Proc {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (.ci/test.sh installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

/// Waits until every node sees exactly `ids` as members with every link up, and serves (a
/// worker id new to Redis is usable a TTL after it was taken).
pub async fn converge(nodes: &[&RunningNode], ids: &[u32]) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ok = nodes.iter().all(|n| {
            if !n.node.lease_gate().allows() {
                return false;
            }
            let mesh = n.mesh.as_ref().expect("mesh");
            let ring = mesh.ring();
            let members: Vec<u32> = ring.members().iter().map(|m| m.0).collect();
            members == ids
                && ids
                    .iter()
                    .filter(|&&p| p != mesh.me().0)
                    .all(|&p| mesh.peer_up(meshchat_idgen::NodeId(p)))
        });
        let epochs: Vec<u64> = nodes
            .iter()
            .map(|n| n.mesh.as_ref().expect("mesh").current_epoch())
            .collect();
        if ok && epochs.windows(2).all(|w| w[0] == w[1]) {
            return epochs[0];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence on {ids:?}: epochs {epochs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
