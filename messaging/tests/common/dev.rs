//! `meshchat-node dev` as a newcomer runs it (the real binary, a fresh data dir, the printed
//! instructions), and the chat checks every store runs through it. `extra` holds the
//! storage flags (`--storage cassandra --cql ... --keyspace ...`, or nothing for the embedded
//! store).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Event, Session};
use meshchat_idgen::ChatId;

use super::free_udp_port;

/// Starts `meshchat-node dev` and returns it with everything it printed up to "Stop with
/// Ctrl-C" (the banner: printed once every node listens). The child keeps its stdout pipe
/// (the reader goes back into the `Child`), as a terminal would.
pub fn start_dev(
    nodes: u32,
    base_port: u16,
    data: &std::path::Path,
    extra: &[&str],
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args([
            "dev",
            "--nodes",
            &nodes.to_string(),
            "--base-port",
            &base_port.to_string(),
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        // Its log, beside the data dir: shown when the banner does not come.
        .stderr(std::fs::File::create(data.with_extension("log")).expect("dev log file"))
        .spawn()
        .expect("spawn meshchat-node dev");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut banner = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).expect("read") > 0 {
        banner.push_str(&line);
        if line.contains("Stop with Ctrl-C") {
            break;
        }
        line.clear();
    }
    child.stdout = Some(out.into_inner());
    if !banner.contains("Stop with Ctrl-C") {
        // It exited before it was up: why, from its log.
        let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
        banner.push_str(&format!(
            "\n(dev exited before its banner; its log:)\n{log}"
        ));
    }
    (child, banner)
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
pub async fn stop_dev(mut child: Child, within: Duration) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(st.success(), "dev exited with {st:?}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dev did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A base port for `n` dev nodes: client ports base..base+n and mesh ports
/// base+100..base+100+n (UDP) and admin ports base+200..base+200+n (TCP) all free.
pub fn free_dev_ports(n: u16) -> u16 {
    loop {
        let p = free_udp_port();
        if p < 60_000
            && (0..n).all(|i| {
                std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok()
                    && std::net::UdpSocket::bind(("127.0.0.1", p + 100 + i)).is_ok()
                    // `dev`'s admin listeners (TCP): an ephemeral port of some client's
                    // connection (a Cassandra driver's, say) may hold one.
                    && std::net::TcpListener::bind(("127.0.0.1", p + 200 + i)).is_ok()
            })
        {
            return p;
        }
    }
}

/// What a dev chat check left behind, for store-specific checks afterwards.
pub struct DevChat {
    /// Holds the data dir.
    pub dir: tempfile::TempDir,
    /// The data dir given to `dev`.
    pub data: std::path::PathBuf,
    /// The chat the message went through.
    pub chat: ChatId,
    /// The sender and the receiver.
    pub users: [Session; 2],
    /// The id of the message the receiver got.
    pub message_id: u64,
}

/// One dev node: the banner says how to connect, two users register and chat, SIGTERM stops
/// it cleanly.
pub async fn one_node_serves_two_users(extra: &[&str]) -> DevChat {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let port = free_dev_ports(1);
    let (child, banner) = start_dev(1, port, &data, extra);
    let addr = format!("127.0.0.1:{port}");
    assert!(banner.contains(&format!("node 1: {addr}")), "{banner}");
    let ca = data.join("ca.pem");
    assert!(
        banner.contains(&format!("--ca {}", ca.display())),
        "{banner}"
    );
    assert!(banner.contains("register alice"), "{banner}");

    let opts = ConnectOptions::new(meshchat_client::load_ca(&ca).expect("ca"));
    let (alice, _ae) = Client::connect(&addr, opts.clone()).await.expect("connect");
    let (bob, mut be) = Client::connect(&addr, opts).await.expect("connect");
    let a = alice
        .register("alice", "alicepass1")
        .await
        .expect("register");
    let b = bob.register("bob", "bobpass12").await.expect("register");
    let chat = ChatId::direct(a.user, b.user);
    alice.send(chat, "hello bob", None).await.expect("send");
    let message_id = match be.next_within(Duration::from_secs(5)).await {
        Some(Event::Message(m)) => {
            assert_eq!(&m.body[..], b"hello bob");
            m.message_id
        }
        other => panic!("expected the message, got {other:?}"),
    };

    stop_dev(child, Duration::from_secs(15)).await;
    DevChat {
        dir,
        data,
        chat,
        users: [a, b],
        message_id,
    }
}

/// Three dev nodes as three processes: one config each, users homed on different nodes chat
/// across the mesh, and SIGTERM stops every process (their ports are free again).
pub async fn three_nodes_route_between_them(extra: &[&str]) -> DevChat {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let base = free_dev_ports(3);
    let (child, banner) = start_dev(3, base, &data, extra);
    for i in 0..3 {
        assert!(
            banner.contains(&format!("127.0.0.1:{}", base + i)),
            "{banner}"
        );
    }
    assert!(data.join("node-2.toml").exists(), "one config per node");

    let opts = ConnectOptions::new(meshchat_client::load_ca(&data.join("ca.pem")).expect("ca"));
    let first = format!("127.0.0.1:{base}");
    // Register users through node 1 until two have different homes.
    let mut users = Vec::new();
    for i in 0..10 {
        let (c, e) = Client::connect(&first, opts.clone())
            .await
            .expect("connect");
        let s = c
            .register(&format!("u{i}"), "password-123")
            .await
            .expect("register");
        users.push((c.server(), c, e, s));
    }
    let (i, j) = (0..users.len())
        .flat_map(|i| (0..users.len()).map(move |j| (i, j)))
        .find(|&(i, j)| users[i].0 != users[j].0)
        .expect("users on two different nodes");
    let chat = ChatId::direct(users[i].3.user, users[j].3.user);
    // Retry until the mesh link between the two processes is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = None;
    let mut n = 0;
    while got.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no cross-node delivery"
        );
        users[i]
            .1
            .send(chat, format!("hello {n}"), None)
            .await
            .expect("send");
        n += 1;
        if let Some(Event::Message(m)) = users[j].2.next_within(Duration::from_millis(500)).await {
            got = Some(m);
        }
    }
    let got = got.expect("message");
    assert!(String::from_utf8_lossy(&got.body).starts_with("hello"));

    stop_dev(child, Duration::from_secs(30)).await;
    // Every node process is gone: their ports are free again.
    for i in 0..3 {
        assert!(
            std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok(),
            "node {} still holds its port",
            i + 1
        );
    }
    DevChat {
        dir,
        data,
        chat,
        users: [users[i].3.clone(), users[j].3.clone()],
        message_id: got.message_id,
    }
}
