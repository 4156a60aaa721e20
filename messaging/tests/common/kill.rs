//! A node process killed with SIGKILL under traffic: the clients it served notice by
//! themselves (the liveness check), fail over through another node to their new home and
//! fill the gap from history, and every acknowledged message reaches every recipient. Real
//! processes (`meshchat-node run`), a real `redis-server`, one shared store (embedded, or a
//! Cassandra keyspace). The victim is the home of the first user, whichever node that is, so
//! the check does not depend on where random ids land on the ring.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_idgen::ChatId;
use meshchat_proto::client::ErrorCode;
use parking_lot::Mutex;

use super::{Proc, free_port, free_udp_port};

/// Starts `meshchat-node run` as node `id` in `dir` with Redis membership on port `redis`;
/// `store` is appended to its config (a `[storage]` section, or empty for the embedded store).
/// Returns once the node has adopted a ring.
pub fn spawn_node(dir: &std::path::Path, id: u32, redis: u16, store: &str) -> (Proc, String) {
    spawn_node_ttl(dir, id, redis, store, "3s")
}

/// [`spawn_node`] with `member_ttl` (a humantime duration, "3s") as given.
pub fn spawn_node_ttl(
    dir: &std::path::Path,
    id: u32,
    redis: u16,
    store: &str,
    member_ttl: &str,
) -> (Proc, String) {
    let client_port = free_udp_port();
    let mesh_port = free_udp_port();
    let cfg = dir.join(format!("node-{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "node_id = {id}\nlisten = \"127.0.0.1:{client_port}\"\ndata_dir = \"{}\"\n\
             [limits]\nsend_rate_per_sec = 10000\nsend_burst = 10000\n\
             [auth]\nattempts_per_source_per_min = 100000\nattempts_per_source_burst = 10000\n\
             logins_per_account_per_min = 100000\nlogins_per_account_burst = 10000\n\
             [cluster]\nmesh_listen = \"127.0.0.1:{mesh_port}\"\nredis = \"redis://127.0.0.1:{redis}/\"\n\
             heartbeat = \"300ms\"\nmember_ttl = \"{member_ttl}\"\n{store}",
            dir.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // The last lines the node logged, for the failure message when it never joins.
    let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let lines = tail.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ring adopted")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
            if tx.is_some() {
                let mut l = lines.lock();
                if l.len() == 40 {
                    l.pop_front();
                }
                l.push_back(line);
            }
        }
    });
    if let Err(e) = rx.recv_timeout(Duration::from_secs(20)) {
        let status = child.try_wait();
        let _ = child.kill();
        let _ = child.wait();
        let log = tail.lock().iter().cloned().collect::<Vec<_>>().join("\n");
        panic!(
            "node {id} did not join the ring ({e}; exit: {status:?}); its last log lines:\n{log}"
        );
    }
    (Proc(child), format!("127.0.0.1:{client_port}"))
}

/// Registers `name` through `addr`, retrying while its home says UNAVAILABLE: a new
/// cluster's worker ids are new to Redis, and each node issues ids (registers users) only a
/// lease TTL after it took its worker id. A node that is not the user's home registers the
/// user and redirects with a token; if the home is not serving yet, the attempt fails after
/// the user exists: the retry then logs in.
pub async fn register_when_served(
    addr: &str,
    opts: &ConnectOptions,
    name: &str,
) -> (Client, Events, Session) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut exists = false;
    loop {
        let (c, e) = Client::connect(addr, opts.clone()).await.expect("connect");
        let attempt = if exists {
            c.login(name, "password-123").await
        } else {
            c.register(name, "password-123").await
        };
        match attempt {
            Ok(s) => return (c, e, s),
            Err(err) if err.code() == Some(ErrorCode::Unavailable) => {}
            Err(err) if err.code() == Some(ErrorCode::UserExists) => exists = true,
            Err(err) => panic!("register {name}: {err}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three node processes in `dir` with Redis membership on port `redis_port`, one store
/// (`store`: see [`spawn_node`]), every member up and serving. Returns the processes, their
/// client addresses, and client options trusting the dev CA with every node as a seed.
pub async fn three_nodes(
    dir: &std::path::Path,
    redis_port: u16,
    store: &str,
    member_ttl: &str,
) -> ([Proc; 3], [String; 3], ConnectOptions) {
    // The first node creates the dev CA and token secret the others reuse.
    let (n1, a1) = spawn_node_ttl(dir, 1, redis_port, store, member_ttl);
    let (n2, a2) = spawn_node_ttl(dir, 2, redis_port, store, member_ttl);
    let (n3, a3) = spawn_node_ttl(dir, 3, redis_port, store, member_ttl);
    let opts = ConnectOptions::new(meshchat_client::load_ca(&dir.join("ca.pem")).expect("ca"));
    // Every node must see the full ring (all links up) before users register. A new
    // cluster's worker ids are new to Redis: each node issues ids (registers users) a lease
    // TTL after it took its worker id, and says UNAVAILABLE until then.
    let (probe, _pe, _) = register_when_served(&a1, &opts, "probe").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = probe.cluster().await.expect("cluster");
        if info.members.len() == 3 && info.members.iter().all(|m| m.state != "down") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster never formed: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut opts = opts;
    opts.seeds = vec![a1.clone(), a2.clone(), a3.clone()];
    ([n1, n2, n3], [a1, a2, a3], opts)
}

/// The users of `users` homed at `addr`.
pub fn homed_at(users: &[(Arc<Client>, Events, Session)], addr: &str) -> Vec<usize> {
    (0..users.len())
        .filter(|&i| users[i].0.server() == addr)
        .collect()
}

/// At least `min` users registered through `via`, and more until the first user's home
/// has one and another node has some (whichever nodes random ids land on).
pub async fn users_on_two_homes(
    via: &str,
    opts: &ConnectOptions,
    min: usize,
) -> Vec<(Arc<Client>, Events, Session)> {
    let mut users: Vec<(Arc<Client>, Events, Session)> = Vec::new();
    let mut n = 0;
    while users.len() < min || homed_at(&users, &users[0].0.server()).len() == users.len() {
        assert!(n < 200, "200 users all homed on one node");
        let (c, e, s) = register_when_served(via, opts, &format!("k{n}")).await;
        users.push((Arc::new(c), e, s));
        n += 1;
    }
    users
}

/// Three node processes on one store (`store`: see [`spawn_node`]); the home of the first
/// user is SIGKILLed under traffic, and every acked message still reaches its recipient.
/// Returns the nodes' data dir.
pub async fn sigkill_under_traffic_loses_no_acked_message(store: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let redis_port = free_port();
    let _redis = super::redis_server(redis_port);
    let (nodes, addrs, opts) = three_nodes(dir.path(), redis_port, store, "3s").await;
    let mut users = users_on_two_homes(&addrs[0], &opts, 6).await;
    let victim_addr = users[0].0.server();
    let victim = &nodes[addrs
        .iter()
        .position(|a| *a == victim_addr)
        .expect("a node")];
    let victims = homed_at(&users, &victim_addr);
    let senders: Vec<usize> = (0..users.len()).filter(|i| !victims.contains(i)).collect();
    let supervisors: Vec<_> = victims.iter().map(|&v| users[v].0.supervise()).collect();

    // Traffic: every sender sends to every victim, before, during and after the kill. A send
    // whose node is gone fails over by itself (send retries with the same client id).
    let acked: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for &s in &senders {
        let client = users[s].0.clone();
        let me = users[s].2.user;
        let to: Vec<_> = victims.iter().map(|&v| users[v].2.user).collect();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..30 {
                for &v in &to {
                    if let Ok(p) = client
                        .send(ChatId::direct(me, v), format!("m{n}"), None)
                        .await
                    {
                        acked.lock().entry(v.0).or_default().insert(p.message_id);
                    }
                }
                // Pacing, not synchronisation: spreads the sends over the kill.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Kill once some messages to the victims are acked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().values().map(BTreeSet::len).sum::<usize>() < senders.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no traffic before the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = tokio::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-KILL", &victim.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    for t in tasks {
        t.await.expect("sender");
    }
    // The victims' clients re-home by themselves: no reconnect by hand.
    let mut got: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for &v in &victims {
        let (client, events, session) = &mut users[v];
        let deadline = killed_at + Duration::from_secs(30);
        while client.server() == victim_addr || !client.conn().is_ok_and(|c| c.is_open()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "user {} never re-homed",
                session.user
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let want = acked
            .lock()
            .get(&session.user.0)
            .cloned()
            .unwrap_or_default();
        let mine = got.entry(session.user.0).or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !want.is_subset(mine) {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Event::Message(m))) => {
                    mine.insert(m.message_id);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        let missing: Vec<_> = want.difference(mine).collect();
        assert!(
            missing.is_empty(),
            "user {} misses {} of {} acked messages",
            session.user,
            missing.len(),
            want.len()
        );
        assert!(!want.is_empty());
    }
    for s in supervisors {
        s.abort();
    }
    drop(nodes);
    dir
}
