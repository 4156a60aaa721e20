//! The admin HTTP listener against a real node: `/metrics` is scraped over TCP and parsed as
//! Prometheus text, and its counters match what the test did; `/readyz` flips to 503 when a
//! real Redis goes away (the node loses its worker-id lease) and back to 200 when it returns,
//! and to 503 while the embedded store cannot be read (another holder of SQLite's WAL read
//! locks) and back when it can, and while the reads of its client socket keep failing (its
//! descriptor made to name /dev/null) and back once they work; `meshchat-node check-config`
//! accepts a good file and names the key of a bad one. Every wait is for a condition, with a
//! deadline.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestNode, free_port};
use meshchat_idgen::ChatId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on the admin listener: (status, body).
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    meshchat_messaging::admin::call(admin, "GET", path)
        .await
        .expect("admin listener answers")
}

/// A started node's admin address.
fn admin_of(node: &TestNode) -> SocketAddr {
    node.running
        .as_ref()
        .and_then(|r| r.admin_addr)
        .expect("admin listener bound")
}

fn parse(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text format")
}

/// The value of the sample `name` whose labels include every `(key, value)` of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

/// Polls `path` until its status is `want`; panics after `within`. Returns the last body.
async fn wait_status(admin: SocketAddr, path: &str, want: u16, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get(admin, path).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: still {status} after {within:?}, want {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The descriptor of this process's UDP socket bound to `port` (its inode from
/// /proc/net/udp, then the descriptor that links to it).
fn udp_fd_of(port: u16) -> i32 {
    let inodes: Vec<String> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| cols.get(9).map(|i| format!("socket:[{i}]")))?
        })
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .find_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            inodes
                .iter()
                .any(|i| link.to_str() == Some(i))
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no descriptor of this process for UDP port {port}"))
}

/// A real fault on the client socket of a node with `loops` endpoint loops (one reads the
/// socket itself; several have a receiver that reads for them): its descriptor made to name
/// /dev/null while a datagram waits, so every read fails (`ENOTSOCK`). `/readyz` turns 503 with
/// the socket's line once the reads have failed for a second, `/metrics` counts them; with
/// the socket put back, the next read works, `/readyz` is 200 again and clients are served.
#[allow(unsafe_code)]
async fn readiness_follows_the_client_socket(loops: usize) {
    use std::os::fd::AsRawFd;
    let id = 20 + loops as u32;
    let node = TestNode::start_with(|c| {
        c.node_id = id;
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
        // The loop's socket, in the quinn pass of the suite too (`TEST_CLIENT_ENDPOINT`).
        c.transport.endpoint = meshchat_messaging::config::EndpointKind::Loop;
        c.transport.lean_tls = true;
        c.transport.loops = loops;
    })
    .await;
    let admin = admin_of(&node);
    wait_status(admin, "/readyz", 200, Duration::from_secs(10)).await;
    let addr = node.running.as_ref().expect("running").addr;
    let fd = udp_fd_of(addr.port());
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    // SAFETY: `saved` is a new descriptor the test owns and closes once, below; `fd` stays
    // open throughout (naming /dev/null, then the socket again), owned by the node. Both stay
    // close-on-exec, as the socket was (other tests of this process start processes).
    let saved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    assert!(saved >= 0, "{}", std::io::Error::last_os_error());
    let point_at = |target: i32| {
        // SAFETY: as above.
        let r = unsafe { libc::dup3(target, fd, libc::O_CLOEXEC) };
        assert!(r >= 0, "{}", std::io::Error::last_os_error());
    };
    point_at(null.as_raw_fd());
    let poke = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    poke.send_to(b"not a QUIC packet", addr).expect("send");

    // Until the socket's line is there (another reason alone, a slow storage probe on a busy
    // machine, is not what this waits for).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = get(admin, "/readyz").await;
        if status == 503 && body.contains("client socket:") {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no client socket line within 10 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains("client socket: every read failed for")
            && body.contains(&format!("os error {}", libc::ENOTSOCK)),
        "{body}"
    );
    let (_, metrics) = get(admin, "/metrics").await;
    let node_label = id.to_string();
    let errors = value(
        &parse(&metrics),
        "meshchat_endpoint_recv_errors_total",
        &[("node", node_label.as_str())],
    );
    assert!(errors.is_some_and(|n| n >= 2.0), "{errors:?}");

    point_at(saved);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::close(saved) }, 0);
    wait_status(admin, "/readyz", 200, Duration::from_secs(10)).await;
    let (alice, _events, a) = node.user("alice").await;
    alice
        .send(ChatId::direct(a.user, a.user), "still here", None)
        .await
        .expect("send after the socket came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_lone_loops_socket_whose_reads_keep_failing() {
    readiness_follows_the_client_socket(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_loop_groups_socket_whose_reads_keep_failing() {
    readiness_follows_the_client_socket(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_parsed_and_count_what_the_clients_did() {
    let node = TestNode::start_with(|c| {
        c.node_id = 11;
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = admin_of(&node);
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));

    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, mut be, b) = node.user("bob").await;
    alice
        .send(ChatId::direct(a.user, b.user), "hello", None)
        .await
        .expect("send");
    common::next_message(&mut be).await;
    let (stranger, _se) = node.client().await;
    assert!(stranger.login("alice", "wrong-password").await.is_err());

    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let m = parse(&body);
    let me = ("node", "11");
    let counts = [
        (
            "meshchat_requests_total",
            vec![me, ("type", "register"), ("outcome", "ok")],
            2.0,
        ),
        (
            "meshchat_requests_total",
            vec![me, ("type", "send"), ("outcome", "ok")],
            1.0,
        ),
        (
            "meshchat_requests_total",
            vec![me, ("type", "login"), ("outcome", "BAD_CREDENTIALS")],
            1.0,
        ),
        (
            "meshchat_auth_failures_total",
            vec![me, ("reason", "BAD_CREDENTIALS")],
            1.0,
        ),
        ("meshchat_messages_sent_total", vec![me], 1.0),
        (
            "meshchat_handshakes_total",
            vec![me, ("outcome", "ok")],
            3.0,
        ),
        (
            "meshchat_connections",
            vec![me, ("state", "established")],
            3.0,
        ),
        (
            "meshchat_connections",
            vec![me, ("state", "authenticated")],
            2.0,
        ),
        (
            "meshchat_request_duration_seconds",
            vec![me, ("type", "send")],
            1.0,
        ),
        (
            "meshchat_storage_duration_seconds",
            vec![me, ("op", "append")],
            1.0,
        ),
        // One message, queued on bob's connection (alice's own is skipped).
        ("meshchat_delivery_latency_seconds", vec![me], 1.0),
        ("meshchat_ready", vec![me], 1.0),
        ("meshchat_lease_held", vec![me], 1.0),
        ("meshchat_store_queue_depth", vec![me], 0.0),
    ];
    for (name, labels, want) in counts {
        assert_eq!(value(&m, name, &labels), Some(want), "{name} {labels:?}");
    }
    // The endpoint loops (the default; none on quinn's endpoint) hold the three connections
    // between them, and say what they dropped.
    let per_loop: Vec<f64> = m
        .samples
        .iter()
        .filter(|s| s.metric == "meshchat_endpoint_loop_connections")
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => Some(v),
            _ => None,
        })
        .collect();
    if std::env::var("TEST_CLIENT_ENDPOINT").is_ok_and(|v| v == "quinn") {
        assert!(per_loop.is_empty(), "no loop series on quinn: {per_loop:?}");
        assert_eq!(
            value(&m, "meshchat_endpoint_recv_errors_total", &[me]),
            None,
            "no socket reads of ours on quinn"
        );
    } else {
        let loops = std::env::var("TEST_CLIENT_LOOPS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2usize);
        assert_eq!(per_loop.len(), loops, "one series per loop");
        assert_eq!(per_loop.iter().sum::<f64>(), 3.0, "{per_loop:?}");
        assert_eq!(
            value(&m, "meshchat_endpoint_recv_errors_total", &[me]),
            Some(0.0)
        );
        for reason in ["socket_full", "send_error", "loop_queue_full"] {
            assert!(
                value(
                    &m,
                    "meshchat_endpoint_datagrams_dropped_total",
                    &[me, ("reason", reason)]
                )
                .is_some(),
                "{reason}"
            );
        }
    }
    // The push to bob was written; the first counter may also hold other pushes (none here).
    assert!(value(&m, "meshchat_pushes_total", &[me]).is_some_and(|v| v >= 1.0));
    assert!(value(&m, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));
    // The development certificate is good for a long time yet (no mesh: no mesh series).
    assert!(
        value(
            &m,
            "meshchat_certificate_expiry_seconds",
            &[me, ("cert", "client")]
        )
        .is_some_and(|v| v > 30.0 * 86_400.0)
    );
    assert_eq!(
        value(
            &m,
            "meshchat_certificate_expiry_seconds",
            &[me, ("cert", "mesh")]
        ),
        None
    );
    // Only this node's series: no other node label leaks in.
    assert!(
        m.samples
            .iter()
            .all(|s| s.labels.get("node").is_none_or(|n| n == "11"))
    );

    let (status, cluster) = get(admin, "/cluster").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&cluster).expect("JSON");
    assert_eq!(v["node_id"], 11);
    assert_eq!(v["connections"]["authenticated"], 2);
    assert_eq!(v["lease"]["held"], true);
    // `meshchat-node status` reads the same two routes.
    let (ready, status) = meshchat_messaging::admin::status(admin)
        .await
        .expect("status");
    assert!(ready, "{status}");
    assert!(status.starts_with("node 11 "), "{status}");
    assert!(status.contains("\nready\n"), "{status}");
    assert!(
        status.contains("3 established, 2 authenticated"),
        "{status}"
    );
    drop((alice, stranger));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_when_the_worker_id_lease_is_lost_and_taken_back() {
    let port = free_port();
    let server = common::redis_server(port);
    let node = TestNode::start_with(|c| {
        let dir = c.data_dir.clone();
        *c = common::redis_config(&dir, 12, port);
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = admin_of(&node);
    wait_status(admin, "/readyz", 200, Duration::from_secs(10)).await;

    // Redis goes away: the lease runs out and the node is fenced, so not ready.
    drop(server);
    let body = wait_status(admin, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(body.contains("lease"), "{body}");
    let m = parse(&get(admin, "/metrics").await.1);
    assert_eq!(
        value(&m, "meshchat_lease_held", &[("node", "12")]),
        Some(0.0)
    );
    assert_eq!(value(&m, "meshchat_ready", &[("node", "12")]), Some(0.0));
    // Still alive: liveness is not readiness.
    assert_eq!(get(admin, "/healthz").await.0, 200);
    // No drain without the admin header (what a web page could send), nor with no other
    // node to take the users.
    let mut raw = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    raw.write_all(b"POST /drain HTTP/1.0\r\nHost: admin\r\n\r\n")
        .await
        .expect("request written");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.expect("answer read");
    assert!(answer.starts_with("HTTP/1.0 403"), "{answer}");
    let (status, body) = meshchat_messaging::admin::call(admin, "POST", "/drain")
        .await
        .expect("drain call");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("no other active node"), "{body}");

    // Redis is back (empty): the node takes its lease again (after one TTL) and is ready.
    let _server = common::redis_server(port);
    wait_status(admin, "/readyz", 200, Duration::from_secs(15)).await;
    let m = parse(&get(admin, "/metrics").await.1);
    assert_eq!(
        value(&m, "meshchat_lease_held", &[("node", "12")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "meshchat_ring_members", &[("node", "12")]),
        Some(1.0)
    );
}

/// SQLite's WAL read-mark locks (`WAL_READ_LOCK(0..5)`: bytes 123..128 of the `-shm` file,
/// `sqlite3.c` `WALINDEX_LOCK_OFFSET` + 3), held for writing by an open file description lock:
/// unlike a process's own record locks, it conflicts with SQLite's locks in this process too,
/// so no connection of the node can start a read while it is held. This is what a stuck
/// process sharing the store (or a backup tool holding it) does to the node.
///
/// Closing any descriptor of a file drops every POSIX record lock this process holds on it,
/// SQLite's own included: the file stays open until the node has stopped.
struct ReadersLockedOut(std::fs::File);

fn wal_read_locks(kind: i32) -> nix::libc::flock {
    nix::libc::flock {
        l_type: kind as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 123,
        l_len: 5,
        l_pid: 0,
    }
}

impl ReadersLockedOut {
    /// Takes the locks, retrying while a read in progress holds one (for up to 10 s).
    fn take(shm: &std::path::Path) -> Self {
        use nix::fcntl::{FcntlArg, fcntl};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shm)
            .expect("open the store's -shm file");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let lock = wal_read_locks(nix::libc::F_WRLCK);
        while let Err(e) = fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)) {
            assert!(
                std::time::Instant::now() < deadline,
                "WAL read locks not taken in 10 s: {e}"
            );
            std::thread::yield_now();
        }
        Self(file)
    }

    /// Releases the locks; the file stays open.
    fn release(&self) {
        use nix::fcntl::{FcntlArg, fcntl};
        fcntl(
            &self.0,
            FcntlArg::F_OFD_SETLK(&wal_read_locks(nix::libc::F_UNLCK)),
        )
        .expect("WAL read locks released");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_when_the_store_cannot_be_read() {
    let mut node = TestNode::start_with(|c| {
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = admin_of(&node);
    wait_status(admin, "/readyz", 200, Duration::from_secs(10)).await;
    let shm = node
        .config
        .data_dir
        .join(format!("{}-shm", meshchat_storage::embedded::DB_FILE));
    let locked = tokio::task::spawn_blocking(move || ReadersLockedOut::take(&shm))
        .await
        .expect("lock task");
    let body = wait_status(admin, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(body.contains("storage"), "{body}");
    assert_eq!(get(admin, "/healthz").await.0, 200, "alive, only not ready");
    locked.release();
    wait_status(admin, "/readyz", 200, Duration::from_secs(15)).await;
    node.stop().await;
    drop(locked);
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_key_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |body: &str| {
        let file = dir.path().join("node.toml");
        std::fs::write(&file, body).expect("config written");
        std::process::Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
            .arg("check-config")
            .arg(&file)
            .env_remove("RUST_LOG")
            .output()
            .expect("meshchat-node runs")
    };
    let data = dir.path().join("data");
    let good = run(&format!(
        "node_id = 3\ndata_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:9400\"\n",
        data.display().to_string()
    ));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        stdout.contains("ok") && stdout.contains("node 3"),
        "{stdout}"
    );
    assert!(stdout.contains("http://127.0.0.1:9400/"), "{stdout}");

    // A range serde cannot check, a type error, an unknown key, a missing file: each named.
    for (body, key) in [
        ("[limits]\nmax_frame_bytes = 0\n", "max_frame_bytes"),
        ("[limits]\nauth_timeout = \"soon\"\n", "auth_timeout"),
        ("[limits]\nmax_frams_bytes = 10\n", "max_frams_bytes"),
        (
            "[tls]\ncert = \"/nonexistent/node.pem\"\nkey = \"/nonexistent/node.key\"\n",
            "tls.cert",
        ),
    ] {
        let out = run(body);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body:?} accepted");
        assert!(
            stderr.contains(key),
            "{key:?} not named for {body:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_view_and_status_show_every_peers_link_and_queue() {
    let cl = common::cluster::cluster_with(3, |c| {
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = cl.nodes[0].admin_addr.expect("admin listener bound");
    let (status, cluster) = get(admin, "/cluster").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&cluster).expect("JSON");
    let peers = v["peers"].as_array().expect("peers");
    let ids: Vec<u64> = peers.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids, [2, 3], "{cluster}");
    for p in peers {
        assert_eq!(p["up"], true, "{p}");
        // Links up: nothing waits for them.
        assert_eq!(
            (p["queued"].as_u64(), p["queued_bytes"].as_u64()),
            (Some(0), Some(0)),
            "{p}"
        );
    }
    let (_, status) = meshchat_messaging::admin::status(admin)
        .await
        .expect("status");
    assert!(
        status.contains("peer 2: up (queued 0 envelopes, 0 bytes; sent "),
        "{status}"
    );
    assert!(
        status.contains("peer 3: up (queued 0 envelopes, 0 bytes; sent "),
        "{status}"
    );
}
