//! `meshchat-node dev` as a newcomer runs it: the real binary, a fresh data dir, the printed
//! instructions, two users chatting through it, and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Event};
use meshchat_idgen::ChatId;

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `meshchat-node dev` and returns it with everything it printed up to "Stop with
/// Ctrl-C" (the banner: printed once every node listens). The child keeps its stdout pipe
/// (the reader goes back into the `Child`), as a terminal would.
fn start_dev(nodes: u32, base_port: u16, data: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args([
            "dev",
            "--nodes",
            &nodes.to_string(),
            "--base-port",
            &base_port.to_string(),
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    (child, banner)
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
async fn stop_dev(mut child: std::process::Child, within: Duration) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_how_to_connect_and_serves_two_users() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let (child, banner) = start_dev(1, port, &data);
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
    alice
        .send(ChatId::direct(a.user, b.user), "hello bob", None)
        .await
        .expect("send");
    match be.next_within(Duration::from_secs(5)).await {
        Some(Event::Message(m)) => assert_eq!(&m.body[..], b"hello bob"),
        other => panic!("expected the message, got {other:?}"),
    }

    stop_dev(child, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_three_nodes_runs_three_processes_that_route_between_them() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    // Client ports base..base+2, mesh ports base+100..base+102: find a free block.
    let base = loop {
        let p = free_udp_port();
        if p < 60_000
            && (0..3).all(|i| {
                std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok()
                    && std::net::UdpSocket::bind(("127.0.0.1", p + 100 + i)).is_ok()
            })
        {
            break p;
        }
    };
    let (child, banner) = start_dev(3, base, &data);
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
    assert!(String::from_utf8_lossy(&got.expect("message").body).starts_with("hello"));

    stop_dev(child, Duration::from_secs(30)).await;
    // Every node process is gone: their ports are free again.
    for i in 0..3 {
        assert!(
            std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok(),
            "node {} still holds its port",
            i + 1
        );
    }
}

#[test]
fn migrate_dry_run_prints_the_cql_schema() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        "[storage]\nbackend = \"cassandra\"\n[storage.cassandra]\nkeyspace = \"chat_test\"\nreplication = { dc1 = 3 }\n",
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["migrate", "--dry-run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CREATE KEYSPACE IF NOT EXISTS chat_test"),
        "{text}"
    );
    assert!(text.contains("NetworkTopologyStrategy"), "{text}");
    assert!(
        text.contains("'dc1': 3") || text.contains("'dc1':3"),
        "{text}"
    );
    assert!(
        text.matches("CREATE TABLE IF NOT EXISTS").count() >= 8,
        "{text}"
    );
    // A bad consistency name is refused with the key named.
    std::fs::write(
        &cfg,
        "[storage]\nbackend = \"cassandra\"\n[storage.cassandra]\nconsistency = \"sometimes\"\n",
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["migrate", "--dry-run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run migrate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.cassandra.consistency"));
}
