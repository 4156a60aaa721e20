//! A node process killed with SIGKILL under traffic: every acknowledged message reaches every
//! recipient after their clients re-home and fill the gap from history. Real processes
//! (`meshchat-node run`), a real `redis-server`, one shared store.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_idgen::ChatId;
use parking_lot::Mutex;

mod common;
use common::{Proc, free_port};

fn spawn_node(dir: &std::path::Path, id: u32, redis: u16) -> (Proc, String) {
    let client_port = free_port();
    let mesh_port = free_port();
    let cfg = dir.join(format!("node-{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "node_id = {id}\nlisten = \"127.0.0.1:{client_port}\"\ndata_dir = \"{}\"\n\
             [limits]\nsend_rate_per_sec = 10000\nsend_burst = 10000\n\
             [cluster]\nmesh_listen = \"127.0.0.1:{mesh_port}\"\nredis = \"redis://127.0.0.1:{redis}/\"\n\
             heartbeat = \"300ms\"\nmember_ttl = \"3s\"\n",
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
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ring adopted")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("node joined the ring");
    (Proc(child), format!("127.0.0.1:{client_port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_traffic_loses_no_acked_message() {
    let dir = tempfile::tempdir().expect("dir");
    let redis_port = free_port();
    let _redis = common::redis_server(redis_port);
    // The first node creates the dev CA and token secret the others reuse.
    let (n1, a1) = spawn_node(dir.path(), 1, redis_port);
    let (n2, a2) = spawn_node(dir.path(), 2, redis_port);
    let (n3, a3) = spawn_node(dir.path(), 3, redis_port);
    let opts =
        ConnectOptions::new(meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("ca"));
    // Every node must see the full ring (all links up) before users register.
    let (probe, _pe) = Client::connect(&a1, opts.clone()).await.expect("connect");
    probe
        .register("probe", "password-123")
        .await
        .expect("register");
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

    let mut users: Vec<(Arc<Client>, Events, Session)> = Vec::new();
    for i in 0..12 {
        let (c, e) = Client::connect(&a1, opts.clone()).await.expect("connect");
        let s = c
            .register(&format!("k{i}"), "password-123")
            .await
            .expect("register");
        users.push((Arc::new(c), e, s));
    }
    // The victim: node 2. Recipients homed there; senders homed elsewhere.
    let on = |addr: &str| -> Vec<usize> {
        (0..users.len())
            .filter(|&i| users[i].0.server() == addr)
            .collect()
    };
    let victims = on(&a2);
    let senders: Vec<usize> = (0..users.len()).filter(|i| !victims.contains(i)).collect();
    assert!(
        !victims.is_empty() && !senders.is_empty(),
        "users on node 2 and elsewhere"
    );

    // Traffic: every sender sends to every victim, before, during and after the kill.
    let acked: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for &s in &senders {
        let client = users[s].0.clone();
        let me = users[s].2.user;
        let to: Vec<_> = victims.iter().map(|&v| users[v].2.user).collect();
        let acked = acked.clone();
        let seed = a1.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..30 {
                for &v in &to {
                    match client
                        .send(ChatId::direct(me, v), format!("m{n}"), None)
                        .await
                    {
                        Ok(p) => {
                            acked.lock().entry(v.0).or_default().insert(p.message_id);
                        }
                        // Our own node may be the one that moved; come back through a seed.
                        Err(_) => {
                            let _ = client.reconnect_via(&seed).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = n2.0.id();
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    for t in tasks {
        t.await.expect("sender");
    }
    // The victims' clients lost their node: they come back through node 1, are redirected to
    // their new homes, and fill the gap from history.
    tokio::time::sleep(Duration::from_millis(3_500)).await; // the TTL: node 2 leaves the ring
    let mut got: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for &v in &victims {
        let (client, events, session) = &mut users[v];
        client
            .reconnect_via(&a1)
            .await
            .expect("re-home through node 1");
        assert_ne!(client.server(), a2, "re-homed away from the dead node");
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
    drop((n1, n3, a3));
}
