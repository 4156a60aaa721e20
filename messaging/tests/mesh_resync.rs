//! A push dropped between nodes is not lost invisibly: with a peer queue of one envelope, a
//! burst of sends to a user on the other node overflows it; the sending node tells the peer
//! which users missed envelopes (ahead of its next batch, outside the queue's bound), the peer
//! pushes them `Resync`, and the client fills the gap from history while it stays online.
//! Every acked message reaches the recipient, and every drop was followed by a resync.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::free_udp_port;
use meshchat_client::{ConnectOptions, Event};
use meshchat_idgen::{ChatId, NodeId};
use meshchat_messaging::config::StaticMember;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_mesh_envelopes_are_resynced_while_the_recipient_stays_online() {
    let dir = tempfile::tempdir().expect("dir");
    let members: Vec<StaticMember> = (1..=2)
        .map(|id| StaticMember {
            id,
            mesh_addr: format!("127.0.0.1:{}", free_udp_port())
                .parse()
                .expect("addr"),
            client_addr: format!("127.0.0.1:{}", free_udp_port()),
            weight: 1,
            worker_id: None,
        })
        .collect();
    let mut nodes = Vec::new();
    for m in &members {
        let mut c = common::config_in(dir.path());
        c.node_id = m.id;
        c.listen = m.client_addr.parse().expect("addr");
        c.cluster.mesh_listen = Some(m.mesh_addr);
        c.cluster.members = members.clone();
        c.cluster.peer_queue = 1;
        nodes.push(meshchat_messaging::start(c).await.expect("node starts"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !nodes[0].mesh.as_ref().expect("mesh").peer_up(NodeId(2)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mesh link never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opts =
        ConnectOptions::new(meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("ca"));
    let addrs: Vec<String> = members.iter().map(|m| m.client_addr.clone()).collect();

    // One user homed on each node.
    let mut users = common::one_user_homed_at_each(&addrs[0], &opts, &addrs)
        .await
        .into_iter();
    let (alice, _ae, alice_s) = users.next().expect("a user on node 1");
    let (bob, mut bob_events, bob_s) = users.next().expect("a user on node 2");
    let chat = ChatId::direct(alice_s.user, bob_s.user);

    // A burst: 300 sends at once from node 1 to bob on node 2.
    let mut sends = tokio::task::JoinSet::new();
    for n in 0..300 {
        let alice = alice.clone();
        sends.spawn(async move { alice.send(chat, format!("burst {n}"), None).await });
    }
    let mut want = BTreeSet::new();
    while let Some(r) = sends.join_next().await {
        want.insert(r.expect("task").expect("send").message_id);
    }

    // Bob stays online: whatever the queue dropped comes back through Resync + gap fill.
    let mut got = BTreeSet::new();
    let mut resyncs = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !want.is_subset(&got) {
        match tokio::time::timeout_at(deadline, bob_events.next()).await {
            Ok(Some(Event::Message(m))) => {
                got.insert(m.message_id);
            }
            Ok(Some(Event::Resync)) => {
                resyncs += 1;
                bob.fill_gaps().await.expect("fill");
            }
            // The registration's first connection (redirected) ends too: only a close of the
            // current one matters.
            Ok(Some(Event::Disconnected { code, reason })) => assert!(
                bob.conn().is_ok_and(|c| c.is_open()),
                "bob was disconnected ({code}: {reason}): the test needs him online"
            ),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let missing = want.difference(&got).count();
    let dropped = nodes[0]
        .mesh
        .as_ref()
        .expect("mesh")
        .peer_stats(NodeId(2))
        .expect("peer")
        .dropped;
    assert_eq!(
        missing, 0,
        "{missing} of 300 acked messages never reached bob ({dropped} envelopes dropped, {resyncs} resyncs)"
    );
    assert!(
        dropped == 0 || resyncs > 0,
        "{dropped} envelopes dropped but bob was never told"
    );
    for n in nodes {
        n.shutdown().await;
    }
}
