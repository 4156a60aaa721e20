//! A peer that dies hard (SIGKILL) and comes straight back says hello again while the other
//! node still holds the old, dead link (nothing has told it yet: the QUIC idle timeout is
//! far away). The new link must replace the old one at once: before, the old link's writer
//! kept taking envelopes off the shared queue and writing them into the dead connection, so
//! about half the pushes to the restarted node's users were lost without a trace. The
//! restarted node also learns the other node's presence from the snapshot on the new link.
//! Real processes (a static two-node dev cluster), real QUIC.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Proc, free_udp_port};
use meshchat_client::{ConnectOptions, Event};
use meshchat_idgen::ChatId;
use meshchat_messaging::dev::{DevCluster, DevStorage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_replaces_its_old_link_and_no_push_is_lost() {
    let dir = tempfile::tempdir().expect("dir");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_meshchat-node"));
    // Two free UDP ports 100 apart for each node (client, mesh): try a few bases.
    let base = (0..50)
        .map(|_| free_udp_port())
        .find(|&p| {
            p < 60_000
                && [p, p + 1, p + 100, p + 101]
                    .iter()
                    .all(|&q| std::net::UdpSocket::bind(("127.0.0.1", q)).is_ok())
        })
        .expect("a free port range");
    let dev = DevCluster::new(2, dir.path().to_owned(), base, None, DevStorage::Embedded);
    let mut children: Vec<Proc> = dev
        .start_processes(exe, |_| {})
        .expect("cluster starts")
        .into_iter()
        .map(Proc)
        .collect();
    let addrs: Vec<String> = dev.addresses().into_iter().map(|(_, a)| a).collect();
    let mut opts =
        ConnectOptions::new(meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("ca"));
    opts.seeds = addrs.clone();

    // A user homed on node 1 (the dialer, which we restart) and one on node 2.
    let mut users = common::one_user_homed_at_each(&addrs[1], &opts, &addrs)
        .await
        .into_iter();
    let (bob, mut bob_events, bob_s) = users.next().expect("a user on node 1");
    let (alice, _alice_events, alice_s) = users.next().expect("a user on node 2");
    let _supervisor = bob.supervise();
    let chat = ChatId::direct(alice_s.user, bob_s.user);
    alice.send(chat, "before", None).await.expect("send");

    // Node 1 dies hard and comes straight back (same id, same ports).
    children[0].0.kill().expect("kill");
    let _ = children[0].0.wait();
    children[0] = Proc(dev.spawn_node(exe, 0, |_| {}).expect("node 1 restarts"));

    // Bob is back (his client fails over by itself, to node 1 again).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let old_token = bob_s.token.clone();
    while !(bob.session().is_some_and(|s| s.token != old_token)
        && bob.conn().is_ok_and(|c| c.is_open()))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Drain what the gap fill brings, then every new message must arrive as a push.
    let mut got = BTreeSet::new();
    let mut want = BTreeSet::new();
    for n in 0..40 {
        let p = alice
            .send(chat, format!("after {n}"), None)
            .await
            .expect("send after the restart");
        want.insert(p.message_id);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !want.is_subset(&got) {
        match tokio::time::timeout_at(deadline, bob_events.next()).await {
            Ok(Some(Event::Message(m))) => {
                got.insert(m.message_id);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let missing = want.difference(&got).count();
    assert_eq!(missing, 0, "{missing} of 40 pushes lost after the restart");
    // The restarted node knew nobody's presence: node 2's snapshot, sent on the new link and
    // not into the dead one it replaced, tells it alice is online.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = bob.presence().await.expect("presence");
        if list.iter().any(|p| p.user_id == alice_s.user.0 && p.online) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted node never learned that alice is online: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(children);
}
