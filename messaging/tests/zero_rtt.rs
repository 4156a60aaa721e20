//! 0-RTT resumption over real QUIC across a 3-node static cluster: a returning client resumes
//! at its home node and its first requests are answered from early data; a request a replay
//! could harm is refused there (`TOO_EARLY`) and served once the handshake is complete; a
//! node that does not hold the ticket (another node issued it) rejects the early data and the
//! client sends it again.
//!
//! A relay holds the node's answers until the node has read the early requests, so the
//! client's handshake cannot have completed when they are served: no race with a fast
//! loopback decides what the tests see.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::cluster::cluster;
use common::relay::Relay;
use common::{next_message, text, wait_for};
use meshchat_client::conn::{Conn, client_endpoint};
use meshchat_client::{Client, ConnectOptions, ZeroRtt};
use meshchat_idgen::ChatId;
use meshchat_proto::client::{self as pb, ClientFrame, ErrorCode, client_frame, server_frame};

fn endpoint(opts: &ConnectOptions) -> quinn::Endpoint {
    client_endpoint(opts, "127.0.0.1:0".parse().expect("addr")).expect("client endpoint")
}

/// A client on `endpoint` that talks to `server` once after its handshake: the endpoint then
/// holds that node's session ticket (sent when the handshake completes, ahead of the reply).
async fn take_ticket(endpoint: &quinn::Endpoint, server: &str, opts: &ConnectOptions) -> Client {
    let (c, _) = Client::connect_with(endpoint.clone(), server, opts.clone())
        .await
        .expect("connect");
    c.ping().await.expect("ping");
    c
}

/// A connection from `ep` (which holds a ticket of the node at `node`) in 0-RTT, through a
/// relay that holds the node's answers until it is opened: the relay, the connection, and
/// the receiver of its events.
async fn early_conn(
    ep: &quinn::Endpoint,
    node: std::net::SocketAddr,
    opts: &ConnectOptions,
) -> (
    Relay,
    std::sync::Arc<Conn>,
    tokio::sync::mpsc::Receiver<meshchat_client::Event>,
) {
    let relay = Relay::shut(node).await;
    let (events, events_rx) = tokio::sync::mpsc::channel(64);
    let conn = Conn::open(ep, &relay.addr.to_string(), opts, events)
        .await
        .expect("0-RTT connection");
    assert_eq!(conn.zero_rtt(), ZeroRtt::Pending);
    (relay, conn, events_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_resumes_at_its_home_and_is_answered_from_early_data() {
    let cl = cluster(3).await;
    let opts = cl.options();
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Alice homed on node 2, Bob on node 3.
    let mut users = common::one_user_homed_at_each(&addrs[0], &opts, &addrs[1..]).await;
    let (bob, _bob_events, bob_s) = users.pop().expect("bob");
    let (_alice_first, _, alice_s) = users.pop().expect("alice");
    let chat = ChatId::direct(alice_s.user, bob_s.user);

    // Alice's new device talks to node 2 first: a full handshake, and node 2's ticket.
    let ep = endpoint(&opts);
    let first = take_ticket(&ep, &addrs[1], &opts).await;
    assert_eq!(
        first.conn().expect("conn").zero_rtt(),
        ZeroRtt::NotTried,
        "no ticket yet: a full handshake"
    );
    first.close();

    let (held, bytes) = cl.nodes[1].tickets();
    assert!(held >= 1, "node 2 holds the ticket it issued");
    // What a held ticket costs the node (docs/OPERATIONS.md sizes the store by it).
    assert!(
        bytes / held < 512,
        "{held} tickets counted at {bytes} bytes: over 512 each"
    );

    // She comes back to node 2 through a relay that holds node 2's answers.
    let relay = Relay::shut(cl.nodes[1].addr).await;
    let node2 = cl.nodes[1].node.clone();
    let (served, refused) = node2.early_requests();
    let resuming = tokio::spawn({
        let (ep, opts, server, token) = (
            ep.clone(),
            opts.clone(),
            relay.addr.to_string(),
            alice_s.token.clone(),
        );
        async move { Client::connect_authenticated(ep, &server, opts, &token).await }
    });
    // The hello and the authentication are read, and answered, before the client can have
    // finished its handshake (it has not heard from node 2 yet).
    // (Alice's first device is on node 2 too: two connections once this one is registered.)
    wait_for(
        "node 2 serves the hello and the authentication from early data",
        Duration::from_secs(10),
        || {
            node2.early_requests().0 >= served + 2
                && node2.registry().connections_of(alice_s.user) == 2
        },
    )
    .await;
    // Registered, but not shown online until its handshake completes: early data can be
    // replayed, and a replay must not show alice online (her first device does).
    assert_eq!(node2.registry().visible_connections(alice_s.user), 1);
    // A message sent meanwhile is pushed to the connection still in its handshake (the
    // client reads it once it has the keys): no gap between AuthOk and the first push.
    let early_push = bob
        .send(chat, "while you resumed", None)
        .await
        .expect("bob sends");
    relay.open();
    let (alice, mut alice_events, s) = resuming
        .await
        .expect("join")
        .expect("resumed with node 2's ticket");
    assert_eq!(s.user, alice_s.user);
    let conn = alice.conn().expect("conn");
    assert_eq!(conn.zero_rtt(), ZeroRtt::Accepted);
    conn.handshake_complete().await;
    assert_eq!(node2.early_requests().1, refused, "nothing refused");
    wait_for(
        "the resumed connection shows alice online once its handshake is complete",
        Duration::from_secs(10),
        || node2.registry().visible_connections(alice_s.user) == 2,
    )
    .await;
    // Single use: the ticket went, and the new connection gets the next one (issued when
    // the node sees the client's Finished).
    wait_for(
        "one ticket taken, one issued",
        Duration::from_secs(10),
        || cl.nodes[1].tickets().0 == held,
    )
    .await;

    let m = next_message(&mut alice_events).await;
    assert_eq!(
        (m.message_id, text(&m)),
        (early_push.message_id, "while you resumed".into())
    );
    // Later pushes reach it too, and it sends.
    let p = bob
        .send(chat, "after the resume", None)
        .await
        .expect("bob sends");
    let m = next_message(&mut alice_events).await;
    assert_eq!(
        (m.message_id, text(&m)),
        (p.message_id, "after the resume".into())
    );
    alice.send(chat, "back", None).await.expect("alice sends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_replay_could_harm_is_refused_in_early_data_and_served_after_the_handshake() {
    let cl = cluster(3).await;
    let opts = cl.options();
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    let (c, _) = Client::connect(&addrs[0], opts.clone())
        .await
        .expect("connect");
    c.register("carol", "password-123").await.expect("register");
    c.close();
    let ep = endpoint(&opts);
    take_ticket(&ep, &addrs[0], &opts).await.close();

    let node1 = cl.nodes[0].node.clone();
    let (served, refused) = node1.early_requests();
    let (relay, conn, _events_rx) = early_conn(&ep, cl.nodes[0].addr, &opts).await;
    let login = client_frame::Body::Login(pb::Login {
        user_name: "carol".into(),
        password: "password-123".into(),
    });
    // The client library holds a login back until the handshake is complete...
    let held = tokio::spawn({
        let conn = conn.clone();
        let login = login.clone();
        async move { conn.request(login).await }
    });
    // ...a client that sends one in early data anyway is refused, and the connection stays.
    let mut raw = BytesMut::new();
    meshchat_proto::codec::encode_into(
        &ClientFrame {
            request_id: 1_000_000,
            body: Some(login),
        },
        1 << 20,
        &mut raw,
    )
    .expect("encode");
    let reply = conn.expect_reply(1_000_000);
    conn.send_raw(&raw).await.expect("write in early data");
    wait_for(
        "node 1 refuses the login read from early data",
        Duration::from_secs(10),
        || node1.early_requests().1 > refused,
    )
    .await;
    relay.open();
    let reply = tokio::time::timeout(Duration::from_secs(10), reply)
        .await
        .expect("a reply in time")
        .expect("a reply");
    match reply.body {
        Some(server_frame::Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooEarly as i32, "{e:?}");
        }
        other => panic!("expected TOO_EARLY, got {other:?}"),
    }
    // The held login went after the handshake: served (at carol's home or redirected there).
    match held.await.expect("join").expect("login answered") {
        server_frame::Body::AuthOk(_) | server_frame::Body::Redirect(_) => {}
        other => panic!("login after the handshake: {other:?}"),
    }
    assert!(conn.is_handshaken());
    assert_eq!(
        node1.early_requests().1,
        refused + 1,
        "only the raw login was read from early data"
    );
    assert_eq!(node1.early_requests().0, served, "nothing else was early");
}

/// The requests the issue names as replay-safe, a send (idempotent by `client_msg_id`) and a
/// read, are served from early data: a resuming client writes hello, authentication, a send
/// and a history read in its first flight; node 2 stores and delivers the message before the
/// client can have finished its handshake, and every reply arrives once it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_and_a_read_in_the_first_flight_are_served_from_early_data() {
    let cl = cluster(3).await;
    let opts = cl.options();
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Alice homed on node 2, Bob on node 3.
    let mut users = common::one_user_homed_at_each(&addrs[0], &opts, &addrs[1..]).await;
    let (_bob, mut bob_events, bob_s) = users.pop().expect("bob");
    let (_alice_first, _, alice_s) = users.pop().expect("alice");
    let chat = ChatId::direct(alice_s.user, bob_s.user);
    let ep = endpoint(&opts);
    take_ticket(&ep, &addrs[1], &opts).await.close();

    let node2 = cl.nodes[1].node.clone();
    let (served, refused) = node2.early_requests();
    let (relay, conn, _events_rx) = early_conn(&ep, cl.nodes[1].addr, &opts).await;
    let wire_chat = Some(meshchat_proto::ids::chat_to_wire(chat));
    let first_flight = [
        client_frame::Body::Hello(pb::Hello {
            protocol_version: meshchat_proto::PROTOCOL_VERSION,
            client_name: "early".into(),
            hide_presence: false,
        }),
        client_frame::Body::Authenticate(pb::Authenticate {
            token: alice_s.token.clone(),
        }),
        client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "early-1".into(),
            chat: wire_chat,
            body: "sent in 0-RTT".into(),
            reply_to: 0,
        }),
        client_frame::Body::History(pb::HistoryQuery {
            chat: wire_chat,
            ..Default::default()
        }),
    ];
    let mut raw = BytesMut::new();
    let mut replies = Vec::new();
    for (i, body) in first_flight.into_iter().enumerate() {
        let rid = 2_000_000 + i as u64;
        replies.push(conn.expect_reply(rid));
        meshchat_proto::codec::encode_into(
            &ClientFrame {
                request_id: rid,
                body: Some(body),
            },
            1 << 20,
            &mut raw,
        )
        .expect("encode");
    }
    conn.send_raw(&raw).await.expect("write in early data");
    // Node 2 serves all four before the client can have its handshake (nothing of node 2's
    // has reached it), and the message reaches bob on node 3.
    wait_for(
        "node 2 serves the four requests from early data",
        Duration::from_secs(10),
        || node2.early_requests().0 >= served + 4,
    )
    .await;
    let m = next_message(&mut bob_events).await;
    assert_eq!(text(&m), "sent in 0-RTT");
    assert!(
        !conn.is_handshaken(),
        "the relay still holds node 2's answers"
    );
    relay.open();
    let mut bodies = Vec::new();
    for reply in replies {
        let f = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .expect("a reply in time")
            .expect("a reply");
        bodies.push(f.body.expect("a body"));
    }
    assert!(
        matches!(bodies[0], server_frame::Body::HelloOk(_)),
        "{:?}",
        bodies[0]
    );
    assert!(
        matches!(bodies[1], server_frame::Body::AuthOk(_)),
        "{:?}",
        bodies[1]
    );
    match &bodies[2] {
        server_frame::Body::Processed(p) => {
            assert_eq!((p.message_id, p.duplicate), (m.message_id, false));
        }
        other => panic!("the send: {other:?}"),
    }
    // The read runs beside the send (a connection's requests run concurrently): its page may
    // or may not hold the message, but it is answered.
    assert!(
        matches!(bodies[3], server_frame::Body::HistoryPage(_)),
        "{:?}",
        bodies[3]
    );
    // The client learns the early data was accepted once its handshake is complete (the
    // replies may be read before it notices).
    conn.handshake_complete().await;
    assert_eq!(conn.zero_rtt(), ZeroRtt::Accepted);
    assert_eq!(node2.early_requests().1, refused, "nothing refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_the_node_does_not_hold_costs_a_round_trip_and_nothing_else() {
    let cl = cluster(3).await;
    let opts = cl.options();
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Dave homed on node 2, Erin on node 3.
    let mut users = common::one_user_homed_at_each(&addrs[0], &opts, &addrs[1..]).await;
    let (erin, _erin_events, erin_s) = users.pop().expect("erin");
    let (_dave_first, _, dave_s) = users.pop().expect("dave");
    let chat = ChatId::direct(dave_s.user, erin_s.user);

    // A ticket from node 1, offered to node 2 (all nodes are 127.0.0.1 to the client):
    // node 2 never issued it, so it rejects the early data; the hello and the
    // authentication written there are sent again once the handshake is complete.
    let ep = endpoint(&opts);
    take_ticket(&ep, &addrs[0], &opts).await.close();
    let (dave, mut dave_events, s) =
        Client::connect_authenticated(ep.clone(), &addrs[1], opts.clone(), &dave_s.token)
            .await
            .expect("resumed despite a rejected ticket");
    assert_eq!(s.user, dave_s.user);
    assert_eq!(dave.conn().expect("conn").zero_rtt(), ZeroRtt::Rejected);
    assert_eq!(
        cl.nodes[1].node.early_requests(),
        (0, 0),
        "nothing was read from the rejected early data"
    );

    // The connection is whole: pushes reach it, and it sends.
    let p = erin
        .send(chat, "hello dave", None)
        .await
        .expect("erin sends");
    let m = next_message(&mut dave_events).await;
    assert_eq!(
        (m.message_id, text(&m)),
        (p.message_id, "hello dave".into())
    );
    dave.send(chat, "hi", None).await.expect("dave sends");
}
