//! Fencing and unique ids with Redis membership, against a real `redis-server` (started here
//! on a free port): a node cut off from Redis for longer than its lease stops issuing ids,
//! refuses requests and new clients (keeping the clients it has: no other node could take
//! them), and serves again on the same connections when Redis is back; two
//! processes configured with one worker id never both issue ids, and the one that takes the
//! worker id over issues ids above every id of the previous holder. Every wait is for a
//! condition, with a deadline.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{code_of, free_port, next_message, text};
use meshchat_client::{Client, ConnectOptions, Event};
use meshchat_idgen::ChatId;
use meshchat_messaging::RunningNode;
use meshchat_proto::client::ErrorCode;

const TTL: Duration = Duration::from_millis(1_500);

async fn node(dir: &std::path::Path, id: u32, worker: Option<u16>, redis_port: u16) -> RunningNode {
    common::start_node(|| {
        let mut c = common::redis_config(dir, id, redis_port);
        c.worker_id = worker;
        c.cluster.member_ttl = TTL;
        c
    })
    .await
}

fn options(dir: &std::path::Path) -> ConnectOptions {
    ConnectOptions::new(meshchat_client::load_ca(&dir.join("ca.pem")).expect("ca"))
}

fn serving(n: &RunningNode) -> bool {
    n.node.lease_gate().allows()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_past_its_lease_fences_itself_and_recovers() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let server = common::redis_server(port);
    let n = node(dir.path(), 1, None, port).await;
    common::wait_for("first lease", Duration::from_secs(10), || serving(&n)).await;

    let (alice, mut alice_events) = Client::connect(&n.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    let a = alice
        .register("alice", "password-123")
        .await
        .expect("register");
    let (bob, mut bob_events) = Client::connect(&n.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    let b = bob.register("bob", "password-123").await.expect("register");
    let chat = ChatId::direct(a.user, b.user);
    let conn = alice.conn().expect("connected");

    // Redis goes away: within one lease the node fences itself. It hears every other member
    // (it has none), so no node could take its clients: it keeps them, and refuses their
    // requests with UNAVAILABLE.
    let cut = tokio::time::Instant::now();
    drop(server);
    common::wait_for("fenced", Duration::from_secs(10), || !serving(&n)).await;
    let fenced_after = cut.elapsed();
    assert!(
        fenced_after < TTL + Duration::from_secs(5),
        "fenced {fenced_after:?} after the cut (lease {TTL:?})"
    );
    assert_eq!(
        code_of(alice.send(chat, "while fenced", None).await),
        ErrorCode::Unavailable
    );
    assert!(
        conn.is_open(),
        "a fenced node with no silent member keeps its clients"
    );

    // New clients are refused with UNAVAILABLE while fenced.
    let (carol, _carol_events) = Client::connect(&n.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    assert_eq!(
        code_of(carol.login("alice", "password-123").await),
        ErrorCode::Unavailable
    );

    // Redis is back (empty): the node takes its lease again and serves, on the connections
    // it kept.
    let _server = common::redis_server(port);
    common::wait_for("lease after redis is back", Duration::from_secs(10), || {
        serving(&n)
    })
    .await;
    alice
        .send(chat, "after recovery", None)
        .await
        .expect("send after recovery");
    assert!(
        Arc::ptr_eq(&conn, &alice.conn().expect("connected")),
        "served on the same connection"
    );
    assert_eq!(text(&next_message(&mut bob_events).await), "after recovery");
    // Nobody was disconnected.
    while let Some(e) = alice_events.next_within(Duration::ZERO).await {
        assert!(!matches!(e, Event::Disconnected { .. }), "{e:?}");
    }
    let (again, _e) = Client::connect(&n.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    again
        .login("alice", "password-123")
        .await
        .expect("login after recovery");
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_worker_id_never_both_issue_ids() {
    let dir = tempfile::tempdir().expect("dir");
    let other = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _server = common::redis_server(port);
    // Two nodes misconfigured with the same worker id (separate data dirs, so only the lease
    // can tell them apart).
    let a = node(dir.path(), 1, Some(7), port).await;
    common::wait_for("a holds worker 7", Duration::from_secs(10), || serving(&a)).await;
    // An id from a (alone on the ring, so the user's home is a).
    let (ca, _ea) = Client::connect(&a.addr.to_string(), options(dir.path()))
        .await
        .expect("connect");
    let last_of_a = ca
        .register("ua", "password-123")
        .await
        .expect("register")
        .user;
    let b = node(other.path(), 2, Some(7), port).await;

    // Across ten renewals of a's lease, b never holds it and cannot register anyone.
    let (cb, _eb) = Client::connect(&b.addr.to_string(), options(other.path()))
        .await
        .expect("connect");
    for i in 0..10 {
        assert_eq!(
            code_of(cb.register(&format!("b{i}"), "password-123").await),
            ErrorCode::Unavailable
        );
        assert!(serving(&a) && !serving(&b));
        // Nor does it link to the members as a node of the cluster (a replacement started
        // before the old process stopped would supersede its links again and again).
        assert!(
            b.mesh.as_ref().expect("mesh").peer_ids().is_empty(),
            "b links to peers without its lease"
        );
        let renewed = a.node.lease_gate().valid_until_ms();
        common::wait_for("a renews its lease", Duration::from_secs(10), || {
            a.node.lease_gate().valid_until_ms() != renewed
        })
        .await;
    }

    // a leaves: b takes worker 7 over, and its ids are above every id a issued.
    a.shutdown().await;
    common::wait_for("b takes worker 7 over", Duration::from_secs(10), || {
        serving(&b)
    })
    .await;
    let first_of_b = cb
        .register("ub", "password-123")
        .await
        .expect("register")
        .user;
    assert!(
        first_of_b.0 > last_of_a.0,
        "b's first id {first_of_b:?} is not above a's last {last_of_a:?}"
    );
    assert_eq!(first_of_b.0 >> 12 & 1023, 7, "worker bits");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_node_id_is_refused_on_one_store() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = common::config_in(dir.path());
    c.node_id = 5;
    let first = meshchat_messaging::start(c.clone()).await.expect("starts");
    let err = meshchat_messaging::start(c.clone())
        .await
        .expect_err("a second process with worker id 5 on this store");
    assert!(err.to_string().contains("worker id 5 is in use"), "{err}");
    first.shutdown().await;
    // Released with the first: the id can be used again.
    meshchat_messaging::start(c)
        .await
        .expect("starts again")
        .shutdown()
        .await;
}
