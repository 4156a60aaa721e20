//! Draining one node of a 3-node cluster under traffic, with Redis membership (a real
//! `redis-server` on a free port) and with a static member list (the drain told through the
//! mesh): `POST /drain` on its admin listener takes it off every ring, its users are
//! redirected to their next homes and follow, the node reports itself drained once none is
//! left, and every message acked meanwhile reaches its recipient (by push, or by the gap fill
//! a client runs after it moved). A drained static member started again is put back on every
//! ring and gets its users back. Which users live on the drained node is read from the ring,
//! whatever the ids; every wait is for a condition, with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{converge, free_port};
use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_idgen::{ChatId, UserId};
use meshchat_messaging::RunningNode;
use parking_lot::Mutex;

async fn node(dir: &std::path::Path, id: u32, redis_port: u16) -> RunningNode {
    common::start_node(|| {
        let mut c = common::redis_config(dir, id, redis_port);
        c.cluster.heartbeat = Duration::from_millis(200);
        c.cluster.member_ttl = Duration::from_secs(3);
        c.cluster.drain_timeout = Duration::from_secs(60);
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c
    })
    .await
}

/// Nodes 1..=n with Redis membership on `redis_port`, once every one has adopted a ring of all.
async fn redis_nodes(dir: &std::path::Path, redis_port: u16, n: u32) -> Vec<RunningNode> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes.push(node(dir, id, redis_port).await);
    }
    let ids: Vec<u32> = (1..=n).collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &ids).await;
    nodes
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

/// What [`drain_one_under_traffic`] leaves: the drained node's id, its users (moved, their
/// readers still running), and the users homed elsewhere (kept connected).
struct Drained {
    id: u32,
    movers: Vec<(Arc<Client>, UserId)>,
    _stayers: Vec<(Arc<Client>, Events, Session)>,
}

/// Drains the home node of the first user registered through `nodes[0]`, under traffic to
/// every user homed there, and checks the drain: 202 then not ready, drained within 30 s with
/// no connection left, every ring without it, its users elsewhere, every acked message
/// received. The drained node is left running (drained) for the caller.
async fn drain_one_under_traffic(nodes: &[RunningNode], dir: &std::path::Path) -> Drained {
    // Users register through node 1 and land on their homes. The drained node is the first
    // user's home; register until some other node is home to someone too.
    let ring = nodes[0].mesh.as_ref().expect("mesh").ring();
    let mut users: Vec<(Arc<Client>, Events, Session)> = Vec::new();
    for i in 0..64 {
        let (c, e) = Client::connect(&nodes[0].addr.to_string(), options(dir))
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
    let (status, body) = post_drain(drained).await;
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
    // The node counts a user gone when the old connection closes, which the client does
    // right after its new one is authenticated and a moment before it records the new server.
    let there = drained.addr.to_string();
    common::wait_for(
        "every user of the drained node connected elsewhere",
        Duration::from_secs(10),
        || targets.iter().all(|(client, _)| client.server() != there),
    )
    .await;

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
    Drained {
        id: drained_id.0,
        movers: targets,
        _stayers: stayers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_moves_its_users_under_traffic_and_loses_no_acked_message() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _redis = common::redis_server(port);
    let nodes = redis_nodes(dir.path(), port, 3).await;
    let drained = drain_one_under_traffic(&nodes, dir.path()).await;
    drop(drained);
    for n in nodes {
        n.shutdown().await;
    }
}

/// `POST /drain` on `n`'s admin listener: (status, body).
async fn post_drain(n: &RunningNode) -> (u16, String) {
    let admin = n.admin_addr.expect("admin listener");
    meshchat_messaging::admin::call(admin, "POST", "/drain")
        .await
        .expect("drain call")
}

/// The ring's members on `node`.
fn ring_of(node: &RunningNode) -> Vec<u32> {
    let ring = node.mesh.as_ref().expect("mesh").ring();
    ring.members().iter().map(|m| m.0).collect()
}

/// A static cluster (no Redis): the drain goes to the peers through the mesh. While the
/// drained node still runs, another drain is refused; stopped, it stays off the others' rings;
/// started again, it is back on every ring and its users come home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_drains_through_the_mesh_and_comes_back_when_restarted() {
    let mut cluster = common::cluster::cluster_with(3, |c| {
        c.cluster.drain_timeout = Duration::from_secs(60);
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let drained = drain_one_under_traffic(&cluster.nodes, cluster.dir.path()).await;
    let i = drained.id as usize - 1;
    let left: Vec<u32> = (1..=3).filter(|&n| n != drained.id).collect();

    // While it runs (drained, not yet stopped), no other node may drain; the others say who
    // drains in /cluster and `status`.
    let other = &cluster.nodes[(i + 1) % 3];
    let admin = other.admin_addr.expect("admin listener");
    let (status, body) = post_drain(other).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!("node {} is draining", drained.id)),
        "{body}"
    );
    let (_, status) = meshchat_messaging::admin::status(admin)
        .await
        .expect("status");
    assert!(
        status.contains(&format!(
            "(static members kept off the ring): {}",
            drained.id
        )),
        "{status}"
    );

    // Stopped, it stays off the rings of the others.
    let config = cluster.nodes[i].node.config().clone();
    cluster.nodes.remove(i).shutdown().await;
    for n in &cluster.nodes {
        assert_eq!(ring_of(n), left);
    }

    // Started again (same id, ports and store): on every ring again, ready, and its users
    // are redirected home by the nodes that held them meanwhile.
    // Its sockets close as the stopped node's last connections finish closing: wait for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let back = loop {
        match meshchat_messaging::start(config.clone()).await {
            Ok(node) => break node,
            Err(e)
                if common::cluster::address_in_use(&e)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("drained node starts again: {e}"),
        }
    };
    cluster.nodes.insert(i, back);
    common::wait_for(
        "every ring with all three nodes again",
        Duration::from_secs(15),
        || cluster.nodes.iter().all(|n| ring_of(n) == [1, 2, 3]),
    )
    .await;
    let back = &cluster.nodes[i];
    assert!(!back.node.drain().is_draining());
    // On every ring, so ready (its lease and store were never in question).
    let admin = back.admin_addr.expect("admin listener");
    let (status, body) = meshchat_messaging::admin::call(admin, "GET", "/readyz")
        .await
        .expect("readyz");
    assert_eq!(status, 200, "{body}");
    let home = back.addr.to_string();
    common::wait_for(
        "the drained node's users home again",
        Duration::from_secs(20),
        || {
            drained
                .movers
                .iter()
                .all(|(client, _)| client.server() == home)
        },
    )
    .await;
    common::wait_for(
        "the restarted node counts its users",
        Duration::from_secs(10),
        || back.node.registry().live_connections() >= drained.movers.len() as u64,
    )
    .await;
    drop(drained);
    for n in cluster.nodes {
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
    let nodes = redis_nodes(dir.path(), port, 2).await;
    let (a, b) = tokio::join!(post_drain(&nodes[0]), post_drain(&nodes[1]));
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

/// The two members of a static cluster asked to drain at once: whatever each heard first, one
/// drains and the other keeps serving (the higher id withdraws a drain that would leave
/// nobody), so the cluster never ends with both stopping; the drain ends once the other has
/// confirmed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_static_members_asked_to_drain_at_once_one_keeps_serving() {
    let cluster = common::cluster::cluster_with(2, |c| {
        c.cluster.drain_timeout = Duration::from_secs(60);
        c.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let (a, b) = tokio::join!(post_drain(&cluster.nodes[0]), post_drain(&cluster.nodes[1]));
    assert!(a.0 == 202 || b.0 == 202, "{a:?} {b:?}");
    for r in [&a, &b] {
        assert!(r.0 == 202 || r.0 == 409, "{r:?}");
    }
    common::wait_for(
        "one member draining, the other serving alone on both rings",
        Duration::from_secs(10),
        || {
            let draining: Vec<bool> = cluster
                .nodes
                .iter()
                .map(|n| n.node.drain().is_draining())
                .collect();
            let Some(stays) = draining.iter().position(|d| !d) else {
                return false;
            };
            let want = vec![stays as u32 + 1];
            draining.iter().filter(|d| **d).count() == 1
                && cluster.nodes.iter().all(|n| ring_of(n) == want)
        },
    )
    .await;
    // The drain ends once the other said it took the node off its ring (it has no users);
    // the one that kept serving never ends a drain.
    let (gone, stays): (Vec<&RunningNode>, Vec<&RunningNode>) = cluster
        .nodes
        .iter()
        .partition(|n| n.node.drain().is_draining());
    let mut done = gone[0].drained();
    tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d))
        .await
        .expect("the drain ends within 10 s")
        .expect("drain state");
    assert!(!*stays[0].drained().borrow());
    for n in cluster.nodes {
        n.shutdown().await;
    }
}
