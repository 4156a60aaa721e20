//! The `meshchat` CLI against a 3-node cluster, as `meshchat-node dev --nodes 3` tells a
//! newcomer to run it: every command names node 1 (`--server`), whatever node is the user's
//! home. `listen` through a node that is not the user's home follows the redirect once and
//! then stays put: no "disconnected ... reconnecting" loop (issue 17's defect, where the
//! redirecting connection's close was taken for the session's own), and messages arrive.
//! Real nodes in this process (a static member list, free UDP ports), the real binary.

use std::process::{Command, Stdio};
use std::time::Duration;

use meshchat_messaging::config::StaticMember;

const CLI: &str = env!("CARGO_BIN_EXE_meshchat");

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free UDP port")
}

// A plain test: the CLI runs as blocking child processes on this thread, the nodes on a
// runtime of their own.
#[test]
fn listen_through_a_node_that_is_not_home_does_not_reconnect_in_a_loop() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("node");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_udp_port(), free_udp_port())).collect();
    let members: Vec<StaticMember> = (0..3)
        .map(|i| StaticMember {
            id: i as u32 + 1,
            mesh_addr: format!("127.0.0.1:{}", ports[i].1).parse().expect("addr"),
            client_addr: format!("127.0.0.1:{}", ports[i].0),
            weight: 1,
            worker_id: None,
        })
        .collect();
    let nodes = rt.block_on(async {
        let mut nodes = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let mut c = meshchat_messaging::NodeConfig {
                node_id: m.id,
                listen: format!("127.0.0.1:{}", ports[i].0).parse().expect("addr"),
                data_dir: data.clone(),
                ..Default::default()
            };
            c.limits.send_rate_per_sec = 1000;
            c.auth.attempts_per_source_burst = 1000;
            c.auth.attempts_per_source_per_min = 10_000;
            c.cluster.mesh_listen = Some(m.mesh_addr);
            c.cluster.members = members.clone();
            nodes.push(meshchat_messaging::start(c).await.expect("node starts"));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !nodes.iter().all(|n| {
            let mesh = n.mesh.as_ref().expect("mesh");
            members
                .iter()
                .filter(|m| m.id != mesh.me().0)
                .all(|m| mesh.peer_up(meshchat_idgen::NodeId(m.id)))
        }) {
            assert!(tokio::time::Instant::now() < deadline, "mesh links");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nodes
    });
    let node1 = members[0].client_addr.clone();
    let ca = data.join("ca.pem");
    let cli = |user: &str| {
        let mut c = Command::new(CLI);
        c.arg("--server")
            .arg(&node1)
            .arg("--ca")
            .arg(&ca)
            .arg("--home")
            .arg(dir.path().join(format!("home-{user}")))
            .env("MESHCHAT_PASSWORD", "secret-password")
            .stdin(Stdio::null());
        c
    };
    let ok = |user: &str, args: &[&str]| {
        let out = cli(user)
            .arg("--json")
            .args(args)
            .output()
            .expect("run meshchat");
        assert!(
            out.status.success(),
            "meshchat {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok("ann", &["register", "ann"]);
    // A listener whose home is not node 1 (registered until one lands elsewhere).
    let listener = (0..60)
        .map(|i| format!("l{i}"))
        .find(|name| {
            ok(name, &["register", name]);
            let at: serde_json::Value =
                serde_json::from_str(ok(name, &["whereis", name]).trim()).expect("JSON");
            at["node"].as_u64() != Some(1)
        })
        .expect("a user homed on node 2 or 3 among 60");

    // Listen through node 1 for a bounded window (the loop printed ~5 lines a second), with
    // a message arriving during it.
    let mut listen = cli(&listener)
        .args(["listen", "--timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    // Its stderr, line by line, from a thread: a listener that never says a word fails the
    // test at the deadline instead of hanging it.
    let stderr = listen.stderr.take().expect("stderr");
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("listen says it is listening");
    assert!(first.starts_with("listening on"), "{first}");
    assert!(
        !first.contains(&node1),
        "listening at its home, not node 1: {first}"
    );
    ok("ann", &["send", &listener, "through the home"]);
    let out = listen
        .wait_with_output()
        .expect("listen ends at its timeout");
    reader.join().expect("stderr reader");
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(out.status.success(), "{rest:?}");
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("reconnecting") || l.contains("disconnected")),
        "the listener reconnected: {rest:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("through the home"), "{stdout}");
    rt.block_on(async {
        for n in nodes {
            n.shutdown().await;
        }
    });
}
