//! QUIC connection migration over real QUIC across a 3-node static cluster: a client moves to
//! a new local UDP socket mid-conversation (a phone going from Wi-Fi to cellular) and keeps
//! its connection, its session, its push sequence and the request it had in flight; the node
//! validates the new path (PATH_CHALLENGE), and nothing is lost or duplicated either way.

mod common;

use common::cluster::cluster;
use common::{next_matching, text};
use meshchat_client::{Client, Event};
use meshchat_idgen::ChatId;
use meshchat_proto::client::Direction;

/// Bob's next message id; fails on a push gap, a disconnect of his connection or a
/// redirect. (The close of the connection his registration was redirected from is not his.)
async fn take(client: &Client, events: &mut meshchat_client::Events, got: &mut Vec<u64>) {
    let id = next_matching(events, |e| match e {
        Event::Message(m) => Some(Ok(m.message_id)),
        Event::Gap { expected, got } => Some(Err(format!("gap {expected}..{got}"))),
        Event::Disconnected { code, reason } if !client.conn().is_ok_and(|c| c.is_open()) => {
            Some(Err(format!("disconnected ({code}: {reason})")))
        }
        Event::Redirect(r) => Some(Err(format!("redirected to {}", r.address))),
        _ => None,
    })
    .await
    .unwrap_or_else(|e| panic!("bob: {e}"));
    got.push(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changes_its_address_keeps_its_session_and_loses_nothing() {
    let cl = cluster(3).await;
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Alice homed on node 1, Bob on node 2: Bob's pushes cross the mesh.
    let mut users = common::one_user_homed_at_each(&addrs[0], &cl.options(), &addrs[..2]).await;
    let (bob, mut bob_events, bob_s) = users.pop().expect("bob");
    let (alice, mut alice_events, alice_s) = users.pop().expect("alice");
    let chat = ChatId::direct(alice_s.user, bob_s.user);

    // Every message Alice sends, and every event Bob gets, in order.
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for i in 0..5 {
        let p = alice
            .send(chat, format!("before {i}"), None)
            .await
            .expect("send");
        sent.push(p.message_id);
        take(&bob, &mut bob_events, &mut got).await;
    }

    let conn_before = bob.conn().expect("connected");
    let auths = bob.authentications();
    let old_local = bob.endpoint().local_addr().expect("local addr");
    let challenges = conn_before.stats().frame_rx.path_challenge;

    // A request sent around the address change (it may leave before or after the rebind).
    let in_flight = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.history(chat, 0, Direction::Backward, 50).await })
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("new socket");
    bob.rebind(socket).expect("rebind");
    let new_local = bob.endpoint().local_addr().expect("local addr");
    assert_ne!(new_local, old_local);

    // Pushes keep coming, in sequence (a gap or a second connection would fail `take`).
    for i in 0..5 {
        let p = alice
            .send(chat, format!("after {i}"), None)
            .await
            .expect("send");
        sent.push(p.message_id);
        take(&bob, &mut bob_events, &mut got).await;
    }
    assert_eq!(got, sent, "every message once, in order");
    let page = in_flight
        .await
        .expect("task")
        .expect("the in-flight request is answered");
    assert!(page.messages.len() >= 5, "{} messages", page.messages.len());

    // Bob's sends reach Alice from the new address.
    let back = bob
        .send(chat, "from the new address", None)
        .await
        .expect("send");
    let m = common::next_message(&mut alice_events).await;
    assert_eq!(
        (m.message_id, text(&m)),
        (back.message_id, "from the new address".into())
    );

    // The same connection and session throughout; the node validated the new path.
    let conn_after = bob.conn().expect("connected");
    assert!(
        std::sync::Arc::ptr_eq(&conn_before, &conn_after),
        "no reconnect"
    );
    assert!(conn_after.is_open());
    assert_eq!(bob.authentications(), auths, "no new authentication");
    assert!(
        conn_after.stats().frame_rx.path_challenge > challenges,
        "the node challenged the new path"
    );
}
