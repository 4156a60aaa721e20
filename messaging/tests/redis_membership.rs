//! Dynamic membership through a real `redis-server` (started here on a free port): nodes
//! register and converge on one ring, a joining node takes about 1/N of the users (and their
//! clients are redirected), a node that leaves is dropped, and Redis going away and coming
//! back neither crashes a node nor stops routing. Redis comes back empty (a real
//! `redis-server` without persistence, killed and started again): no node ever adopts a ring
//! that lost members to the restart, the holders of the worker ids serve on, and nodes whose
//! leases ran out meanwhile issue no id for a full TTL after they take them back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{converge, free_port, next_matching, next_message, text};
use meshchat_client::{Client, ConnectOptions, Event, Events, Session};
use meshchat_idgen::ChatId;
use meshchat_messaging::RunningNode;
use meshchat_proto::client::ErrorCode;

const TTL: Duration = Duration::from_millis(3_000);

async fn node(dir: &std::path::Path, id: u32, redis_port: u16) -> RunningNode {
    common::start_node(|| {
        let mut c = common::config_in(dir);
        c.node_id = id;
        c.listen = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        c.cluster.mesh_listen = Some(format!("127.0.0.1:{}", free_port()).parse().expect("addr"));
        c.cluster.redis = Some(format!("redis://127.0.0.1:{redis_port}/"));
        // Generous TTL: under a loaded test run a heartbeat can be late without the member
        // flapping out of the ring.
        c.cluster.heartbeat = Duration::from_millis(200);
        c.cluster.member_ttl = TTL;
        c
    })
    .await
}

/// What [`Watch`] saw.
#[derive(Debug, Default)]
struct Seen {
    /// The smallest ring any node held.
    min_ring: AtomicUsize,
    /// Whether some node's gate was ever closed.
    closed: AtomicBool,
}

/// Watches every node's ring and lease gate every millisecond (observation only: nothing
/// waits on it) until dropped.
struct Watch {
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(nodes: &[&RunningNode]) -> Self {
        let seen = Arc::new(Seen {
            min_ring: AtomicUsize::new(usize::MAX),
            closed: AtomicBool::new(false),
        });
        let watched: Vec<_> = nodes
            .iter()
            .map(|n| (n.mesh.clone().expect("mesh"), n.node.clone()))
            .collect();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                for (mesh, node) in &watched {
                    s.min_ring
                        .fetch_min(mesh.ring().members().len(), Ordering::SeqCst);
                    if !node.lease_gate().allows() {
                        s.closed.store(true, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        Self { seen, task }
    }

    fn min_ring(&self) -> usize {
        self.seen.min_ring.load(Ordering::SeqCst)
    }

    fn closed(&self) -> bool {
        self.seen.closed.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(dir: &std::path::Path) -> ConnectOptions {
    ConnectOptions::new(meshchat_client::load_ca(&dir.join("ca.pem")).expect("ca"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_rehome_on_join_and_survive_a_redis_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut server = common::redis_server(port);
    let n1 = node(dir.path(), 1, port).await;
    let n2 = node(dir.path(), 2, port).await;
    let n3 = node(dir.path(), 3, port).await;
    let e1 = converge(&[&n1, &n2, &n3], &[1, 2, 3]).await;
    assert!(e1 >= 1);

    // Users register through node 1 and land on their homes.
    let mut users: Vec<(Client, Events, Session)> = Vec::new();
    for i in 0..16 {
        let (c, e) = Client::connect(&n1.addr.to_string(), options(dir.path()))
            .await
            .expect("connect");
        let s = c
            .register(&format!("r{i}"), "password-123")
            .await
            .expect("register");
        users.push((c, e, s));
    }
    let homes: std::collections::BTreeSet<String> = users.iter().map(|u| u.0.server()).collect();
    assert!(homes.len() >= 2, "16 users land on more than one node");
    let (a, b) = (0..users.len())
        .flat_map(|i| (0..users.len()).map(move |j| (i, j)))
        .find(|&(i, j)| users[i].0.server() != users[j].0.server())
        .expect("two homes");
    let chat = ChatId::direct(users[a].2.user, users[b].2.user);
    users[a]
        .0
        .send(chat, "via redis membership", None)
        .await
        .expect("send");
    assert_eq!(
        text(&next_message(&mut users[b].1).await),
        "via redis membership"
    );

    // A fourth node joins: everyone adopts a 4-member ring at a newer epoch, and the users
    // whose home moved are told where to go.
    let before = n1.mesh.as_ref().expect("mesh").ring();
    let n4 = node(dir.path(), 4, port).await;
    let e2 = converge(&[&n1, &n2, &n3, &n4], &[1, 2, 3, 4]).await;
    assert!(e2 > e1, "a join is a new epoch");
    let ring = n1.mesh.as_ref().expect("mesh").ring();
    let moving: Vec<usize> = (0..users.len())
        .filter(|&i| ring.owner(users[i].2.user) == Some(meshchat_idgen::NodeId(4)))
        .collect();
    for &i in &moving {
        let r = next_matching(&mut users[i].1, |e| match e {
            Event::Redirect(r) => Some(r),
            _ => None,
        })
        .await;
        assert_eq!(r.node_id, 4);
        assert_eq!(r.address, n4.addr.to_string());
        users[i]
            .0
            .follow_redirect(&r)
            .await
            .expect("follow the redirect");
        assert_eq!(users[i].0.server(), n4.addr.to_string());
    }
    // About 1/N of all users moved, all of them to the new node (over many ids; 16 real users
    // are too few to measure a fraction).
    let moved = (0..20_000u64)
        .map(meshchat_idgen::UserId)
        .filter(|&u| before.owner(u) != ring.owner(u))
        .inspect(|&u| assert_eq!(ring.owner(u), Some(meshchat_idgen::NodeId(4))))
        .count();
    assert!(
        moved as f64 <= 1.1 * 20_000.0 / 4.0,
        "a join moved {moved} of 20,000"
    );
    assert!(
        moved as f64 >= 0.9 * 20_000.0 / 4.0,
        "a join moved {moved} of 20,000"
    );

    // Redis goes away: no crash, and routing on the last ring continues.
    let all = [&n1, &n2, &n3, &n4];
    let watch = Watch::start(&all);
    drop(server);
    let (c, d) = (0..users.len())
        .flat_map(|i| (0..users.len()).map(move |j| (i, j)))
        .find(|&(i, j)| {
            !moving.contains(&i)
                && !moving.contains(&j)
                && users[i].0.server() != users[j].0.server()
        })
        .expect("two unmoved users on different nodes");
    let chat = ChatId::direct(users[c].2.user, users[d].2.user);
    users[c]
        .0
        .send(chat, "redis is down", None)
        .await
        .expect("send while redis is down");
    assert_eq!(text(&next_message(&mut users[d].1).await), "redis is down");

    // Redis comes back empty within the lease: nodes re-register one by one, the epoch keeps
    // growing, no node adopts a ring without the members still re-registering, and the
    // holders of the worker ids take them back and serve on.
    server = common::redis_server(port);
    let e3 = converge(&all, &[1, 2, 3, 4]).await;
    assert!(
        e3 >= e2,
        "epochs never go backwards after a Redis restart ({e3} < {e2})"
    );
    assert_eq!(watch.min_ring(), 4, "a node adopted a shrunken ring");
    assert!(!watch.closed(), "a node stopped serving");
    users[c]
        .0
        .send(chat, "redis is back", None)
        .await
        .expect("send after the restart");
    assert_eq!(text(&next_message(&mut users[d].1).await), "redis is back");

    // Redis goes away for longer than the lease: every node fences itself. Every member
    // still hears the others, so none closes its clients (no node could take them). It
    // comes back empty: each node takes its worker id back with no high-water mark on
    // record, and issues no id (no registration) until a TTL after that, while the rings
    // keep every member.
    let kept: Vec<_> = users
        .iter()
        .map(|u| u.0.conn().expect("connected"))
        .collect();
    drop(server);
    common::wait_for("every node fenced", Duration::from_secs(15), || {
        all.iter().all(|n| !n.node.lease_gate().allows())
    })
    .await;
    assert_eq!(
        common::code_of(users[c].0.send(chat, "while fenced", None).await),
        ErrorCode::Unavailable,
        "a fenced node refuses sends"
    );
    // Connected before Redis returns (a fenced node still completes handshakes), so the
    // registration below is one request inside the wait even on a slow machine.
    let (probe, _pe) = Client::connect(&n1.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    let back = tokio::time::Instant::now();
    server = common::redis_server(port);
    assert_eq!(
        common::code_of(probe.register("too-early", "password-123").await),
        ErrorCode::Unavailable,
        "no id while the lease is young"
    );
    let early = tokio::time::Instant::now();
    assert!(early < back + TTL, "the refusal came inside the wait");
    let first_serving = {
        let mut at = None;
        common::wait_for("a node serves again", Duration::from_secs(15), || {
            let now = tokio::time::Instant::now();
            if all.iter().any(|n| n.node.lease_gate().allows()) {
                at = Some(now);
            }
            at.is_some()
        })
        .await;
        at.expect("serving")
    };
    assert!(
        first_serving >= back + TTL,
        "a node served {:?} after Redis came back, inside the lease wait of {TTL:?}",
        first_serving - back
    );
    let e3 = converge(&all, &[1, 2, 3, 4]).await;
    assert_eq!(watch.min_ring(), 4, "a node adopted a shrunken ring");
    drop(watch);
    // Served again on the connections every client kept through the outage.
    common::wait_for("every node serves", Duration::from_secs(15), || {
        all.iter().all(|n| n.node.lease_gate().allows())
    })
    .await;
    for (u, conn) in users.iter().zip(&kept) {
        assert!(
            Arc::ptr_eq(conn, &u.0.conn().expect("connected")) && conn.is_open(),
            "a client was dropped by the outage"
        );
    }
    users[c]
        .0
        .send(chat, "after the outage", None)
        .await
        .expect("send after the outage");
    assert_eq!(
        text(&next_message(&mut users[d].1).await),
        "after the outage"
    );

    // A node leaves gracefully: the others drop it.
    n4.shutdown().await;
    let e4 = converge(&[&n1, &n2, &n3], &[1, 2, 3]).await;
    assert!(e4 > e3);
    drop(server);
}
