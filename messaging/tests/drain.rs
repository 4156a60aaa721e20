//! Draining one node of a 3-node cluster with Redis membership (a real `redis-server` on a
//! free port), under traffic: `POST /drain` on its admin listener takes it off every ring,
//! its users are redirected to their next homes and follow, the node reports itself drained
//! once none is left, and every message acked meanwhile reaches its recipient (by push, or by
//! the gap fill a client runs after it moved). Which users live on the drained node is read
//! from the ring, whatever the ids; every wait is for a condition, with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{converge, free_port};
use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_idgen::ChatId;
use meshchat_messaging::RunningNode;
use parking_lot::Mutex;

async fn node(dir: &std::path::Path, id: u32, redis_port: u16) -> RunningNode {
    let mut c = common::redis_config(dir, id, redis_port);
    c.cluster.heartbeat = Duration::from_millis(200);
    c.cluster.member_ttl = Duration::from_secs(3);
    c.cluster.drain_timeout = Duration::from_secs(60);
    c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    meshchat_messaging::start(c).await.expect("node starts")
}

fn options(dir: &std::path::Path) -> ConnectOptions {
    ConnectOptions::new(meshchat_client::load_ca(&dir.join("ca.pem")).expect("ca"))
}

/// Reads a user's events: follows redirects (then fills the gap from history, as the
/// protocol asks of a client that moved) and records the ids of the messages it got, and
/// what failed (checked by the test, not panicked in this task).
fn reader(
    client: Arc<Client>,
    mut events: Events,
    got: Arc<Mutex<BTreeSet<u64>>>,
    failed: Arc<Mutex<Vec<String>>>,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Event::Message(m) => {
                    got.lock().insert(m.message_id);
                }
                Event::Redirect(r) => {
                    let moved = match client.follow_redirect(&r).await {
                        Ok(()) => client.fill_gaps().await.map(drop),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = moved {
                        failed
                            .lock()
                            .push(format!("redirect to {}: {e}", r.address));
                    }
                }
                _ => {}
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_moves_its_users_under_traffic_and_loses_no_acked_message() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _redis = common::redis_server(port);
    let nodes = [
        node(dir.path(), 1, port).await,
        node(dir.path(), 2, port).await,
        node(dir.path(), 3, port).await,
    ];
    converge(&nodes.iter().collect::<Vec<_>>(), &[1, 2, 3]).await;

    // Users register through node 1 and land on their homes. The drained node is the first
    // user's home; register until some other node is home to someone too.
    let ring = nodes[0].mesh.as_ref().expect("mesh").ring();
    let mut users: Vec<(Arc<Client>, Events, Session)> = Vec::new();
    for i in 0..64 {
        let (c, e) = Client::connect(&nodes[0].addr.to_string(), options(dir.path()))
            .await
            .expect("connect");
        let s = c
            .register(&format!("d{i}"), "password-123")
            .await
            .expect("register");
        users.push((Arc::new(c), e, s));
        let homes: BTreeSet<_> = users.iter().map(|u| ring.owner(u.2.user)).collect();
        if users.len() >= 9 && homes.len() >= 2 {
            break;
        }
    }
    let drained_id = ring.owner(users[0].2.user).expect("an owner");
    let drained = &nodes[(drained_id.0 - 1) as usize];
    let (movers, stayers): (Vec<_>, Vec<_>) = users
        .into_iter()
        .partition(|u| ring.owner(u.2.user) == Some(drained_id));
    let sender = stayers.first().expect("a user homed elsewhere");
    let mut received: BTreeMap<u64, Arc<Mutex<BTreeSet<u64>>>> = BTreeMap::new();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut targets = Vec::new();
    for (client, events, session) in movers {
        let got = Arc::new(Mutex::new(BTreeSet::new()));
        received.insert(session.user.0, got.clone());
        targets.push((client.clone(), session.user));
        reader(client, events, got, failed.clone());
    }
    assert_eq!(
        drained.node.registry().live_connections() as usize,
        targets.len()
    );

    // Traffic to every user of the drained node, before, during and after the drain.
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let traffic = {
        let (client, me) = (sender.0.clone(), sender.2.user);
        let users: Vec<_> = targets.iter().map(|t| t.1).collect();
        let acked = acked.clone();
        tokio::spawn(async move {
            for round in 0..60 {
                for &to in &users {
                    let chat = ChatId::direct(me, to);
                    let p = client
                        .send(chat, format!("round {round}"), None)
                        .await
                        .expect("send acked");
                    acked.lock().push((to.0, p.message_id));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    common::wait_for("traffic flows", Duration::from_secs(10), || {
        acked.lock().len() >= 3 * targets.len()
    })
    .await;

    let admin = drained.admin_addr.expect("admin listener");
    let (status, body) = meshchat_messaging::admin::call(admin, "POST", "/drain")
        .await
        .expect("drain call");
    assert_eq!(status, 202, "{body}");
    let (status, body) = meshchat_messaging::admin::call(admin, "GET", "/readyz")
        .await
        .expect("readyz");
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");

    // Off every ring; its users move; then it reports itself drained.
    let others: Vec<&RunningNode> = nodes
        .iter()
        .filter(|n| n.node.config().node_id != drained_id.0)
        .collect();
    let left: Vec<u32> = others.iter().map(|n| n.node.config().node_id).collect();
    let mut done = drained.drained();
    tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d))
        .await
        .expect("drained within 30 s")
        .expect("drain state");
    assert_eq!(drained.node.registry().live_connections(), 0);
    common::wait_for(
        "every ring without the drained node",
        Duration::from_secs(10),
        || {
            nodes.iter().all(|n| {
                let ring = n.mesh.as_ref().expect("mesh").ring();
                ring.members().iter().map(|m| m.0).collect::<Vec<_>>() == left
            })
        },
    )
    .await;
    for (client, user) in &targets {
        assert_ne!(
            client.server(),
            drained.addr.to_string(),
            "user {user:?} still there"
        );
    }

    traffic.await.expect("traffic task");
    assert!(failed.lock().is_empty(), "{:?}", failed.lock());
    // Every acked message reached its recipient (push or gap fill).
    let acked = acked.lock().clone();
    assert_eq!(acked.len(), 60 * targets.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let missing: Vec<_> = acked
            .iter()
            .filter(|(to, id)| !received[to].lock().contains(id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acked messages undelivered, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stayers);
    let [a, b, c] = nodes;
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// The last two active nodes asked to drain at once: Redis serializes the two claims, so one
/// drains and the other is refused (409): a cluster is never left with nobody to take users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_drains_asked_at_once_of_the_last_two_nodes_one_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _redis = common::redis_server(port);
    let nodes = [
        node(dir.path(), 1, port).await,
        node(dir.path(), 2, port).await,
    ];
    converge(&nodes.iter().collect::<Vec<_>>(), &[1, 2]).await;
    let drain = |n: &RunningNode| {
        let admin = n.admin_addr.expect("admin listener");
        async move {
            meshchat_messaging::admin::call(admin, "POST", "/drain")
                .await
                .expect("drain call")
        }
    };
    let (a, b) = tokio::join!(drain(&nodes[0]), drain(&nodes[1]));
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409], "{a:?} {b:?}");
    let (refused, drained) = if a.0 == 409 {
        (a, &nodes[1])
    } else {
        (b, &nodes[0])
    };
    assert!(refused.1.contains("no other active node"), "{}", refused.1);
    // The one that drains leaves every ring; the other keeps serving alone.
    let stays = nodes
        .iter()
        .find(|n| n.node.config().node_id != drained.node.config().node_id)
        .expect("the other node");
    let gone = drained.node.config().node_id;
    common::wait_for(
        "the drained node off the ring",
        Duration::from_secs(10),
        || {
            stays
                .mesh
                .as_ref()
                .expect("mesh")
                .ring()
                .members()
                .iter()
                .all(|m| m.0 != gone)
        },
    )
    .await;
    assert!(!stays.node.drain().is_draining());
    for n in nodes {
        n.shutdown().await;
    }
}
