//! Nodes in a static cluster over a real QUIC mesh (mutual TLS with the dev CA), one shared
//! embedded store in a temp dir, real clients following redirects; and a full peer queue
//! whose dropped pushes are resynced.

mod common;

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use common::cluster::{Cluster, cluster, cluster_with};
use common::{next_message, text};
use meshchat_backplane::delivery::Router;
use meshchat_client::{Client, Event, Events, Session};
use meshchat_idgen::{ChannelId, ChatId, NodeId};
use meshchat_proto::client::{self as pb, push};
use meshchat_proto::mesh as pb_mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_homed_on_different_nodes_chat_both_ways() {
    let cl = cluster(3).await;
    let mut users = Vec::new();
    for i in 0..12 {
        let u = cl.user(&format!("user{i}")).await;
        let home = cl.home_of(&u.0);
        assert_eq!(
            cl.mesh(home).ring().owner(u.2.user),
            Some(home),
            "the client ended up on its ring owner"
        );
        users.push((u, home));
    }
    // Two users with different homes.
    let (a_idx, b_idx) = (0..users.len())
        .flat_map(|i| (0..users.len()).map(move |j| (i, j)))
        .find(|&(i, j)| users[i].1 != users[j].1)
        .expect("12 users spread over 3 nodes");
    let (a_home, b_home) = (users[a_idx].1, users[b_idx].1);
    let a_user = users[a_idx].0.2.user;
    let b_user = users[b_idx].0.2.user;
    let chat = ChatId::direct(a_user, b_user);
    users[a_idx]
        .0
        .0
        .send(chat, "across the mesh", None)
        .await
        .expect("send");
    let m = next_message(&mut users[b_idx].0.1).await;
    assert_eq!(text(&m), "across the mesh");
    users[b_idx]
        .0
        .0
        .send(chat, "and back", None)
        .await
        .expect("send");
    let m = next_message(&mut users[a_idx].0.1).await;
    assert_eq!(text(&m), "and back");
    // Another device of the same user, connecting through any node, lands on the home too
    // and gets the user's pushes there.
    for entry in &cl.nodes {
        let (dev, _de) = Client::connect(&entry.addr.to_string(), cl.options())
            .await
            .expect("connect");
        dev.authenticate(&users[b_idx].0.2.token)
            .await
            .expect("authenticate");
        assert_eq!(
            cl.home_of(&dev),
            b_home,
            "a device follows the redirect home"
        );
    }

    // whereis and cluster report the routing any node sees.
    let asked = &users[a_idx].0.0;
    let home = asked
        .where_is(&format!("user{b_idx}"))
        .await
        .expect("whereis");
    assert_eq!(home.node_id, b_home.0);
    assert_eq!(home.ring_epoch, 1);
    let info = asked.cluster().await.expect("cluster");
    assert_eq!(info.members.len(), 3);
    assert!(
        info.members
            .iter()
            .all(|m| m.state == "up" || m.state == "self")
    );
    assert!(
        cl.mesh(a_home)
            .peer_stats(b_home)
            .expect("peer")
            .envelopes_sent
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_spanning_all_nodes_costs_one_frame_per_node() {
    let cl = cluster(3).await;
    // Three members on each node.
    let mut by_home: std::collections::BTreeMap<NodeId, Vec<(Client, Events, Session)>> =
        Default::default();
    let mut i = 0;
    while by_home.len() < 3 || by_home.values().any(|v| v.len() < 3) {
        let u = cl.user(&format!("m{i}")).await;
        i += 1;
        let home = cl.home_of(&u.0);
        let slot = by_home.entry(home).or_default();
        if slot.len() < 3 {
            slot.push(u);
        }
        assert!(i < 200, "could not place three users per node");
    }
    let sender_home = NodeId(1);
    let ch = by_home[&sender_home][0]
        .0
        .channel_create("all")
        .await
        .expect("create");
    for (home, us) in by_home.iter() {
        for (k, u) in us.iter().enumerate() {
            if *home == sender_home && k == 0 {
                continue;
            }
            u.0.channel_join("all").await.expect("join");
        }
    }
    // Let join events settle, then count envelopes for exactly one channel message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mesh = cl.mesh(sender_home);
    let sent = |peer: u32| mesh.peer_stats(NodeId(peer)).expect("peer").envelopes_sent;
    let before = (sent(2), sent(3));
    let chat = ChatId::Channel(ChannelId(ch.channel_id));
    by_home[&sender_home][0]
        .0
        .send(chat, "to everyone", None)
        .await
        .expect("send");
    for (home, us) in by_home.iter_mut() {
        for (k, u) in us.iter_mut().enumerate() {
            if *home == sender_home && k == 0 {
                continue;
            }
            // Skip join events; the message must arrive.
            let m = next_message(&mut u.1).await;
            assert_eq!(text(&m), "to everyone");
        }
    }
    let after = (sent(2), sent(3));
    assert_eq!(
        after.0 - before.0,
        1,
        "one envelope to node 2 for three members there"
    );
    assert_eq!(
        after.1 - before.1,
        1,
        "one envelope to node 3 for three members there"
    );
}

/// Dials `cl`'s node `to` on its mesh endpoint with `identity`, trusting the cluster's mesh
/// CA, and says hello as node `claim`. Ok with the peer's answer if it accepted the link.
async fn dial_mesh_as(
    cl: &Cluster,
    to: u32,
    identity: meshchat_messaging::tls::Identity,
    claim: u32,
) -> Result<pb_mesh::PeerHelloOk, String> {
    use futures::StreamExt;
    let roots = meshchat_messaging::tls::load_certs(
        &cl.dir
            .path()
            .join(meshchat_messaging::tls::DEV_MESH_CA_CERT),
    )
    .expect("mesh ca");
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(meshchat_messaging::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(store)
        .with_client_auth_cert(identity.chain, identity.key)
        .expect("client cert");
    tls.alpn_protocols = vec![meshchat_proto::MESH_ALPN.to_vec()];
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    )));
    let node = &cl.nodes[to as usize - 1];
    let mesh_addr = node.node.config().cluster.mesh_listen.expect("mesh addr");
    let outcome = async {
        let conn = endpoint
            .connect(mesh_addr, &format!("node-{to}"))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the client may finish before the server checks its certificate; the
        // refusal then arrives as the connection closing.
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut buf = bytes::BytesMut::new();
        meshchat_proto::codec::encode_into(
            &pb_mesh::PeerHello {
                cluster_id: node.node.config().cluster.cluster_id.clone(),
                node_id: claim,
                protocol_version: meshchat_proto::PROTOCOL_VERSION,
                ring_epoch: 1,
            },
            4096,
            &mut buf,
        )
        .map_err(|e| e.to_string())?;
        send.write_all(&buf).await.map_err(|e| e.to_string())?;
        let mut reader = tokio_util::codec::FramedRead::new(
            recv,
            meshchat_proto::FrameCodec::<pb_mesh::PeerHelloOk, pb_mesh::PeerHello>::new(4096),
        );
        match reader.next().await {
            Some(Ok(ok)) => Ok(ok),
            other => Err(format!(
                "no hello answer ({other:?}); closed: {:?}",
                conn.close_reason()
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), outcome)
        .await
        .expect("answered or refused promptly")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let cl = cluster(2).await;
    let rogue_dir = tempfile::tempdir().expect("dir");
    // A mesh certificate of the right shape (it names node-1) from another mesh CA.
    let rogue =
        meshchat_messaging::tls::dev_mesh_identity(rogue_dir.path(), 1).expect("rogue identity");
    let result = dial_mesh_as(&cl, 2, rogue, 1).await;
    assert!(
        result.is_err(),
        "a foreign certificate must not get a mesh link: {result:?}"
    );
    assert!(cl.mesh(NodeId(2)).peer_up(NodeId(1)), "the real link stays");
}

/// The client-facing certificate is signed by another CA than the mesh's: a node's client
/// certificate (or its leaked key) does not get onto the mesh, even when it names the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_facing_certificate_does_not_get_onto_the_mesh() {
    let cl = cluster(2).await;
    let client_facing =
        meshchat_messaging::tls::dev_identity(cl.dir.path(), &["node-1".into()]).expect("id");
    let result = dial_mesh_as(&cl, 2, client_facing, 1).await;
    assert!(result.is_err(), "refused: {result:?}");
}

/// A node holding a certificate of the cluster's own mesh CA can only be the node its
/// certificate names: one that names node-7 and says hello as node 1 is refused, while the
/// same hello from a certificate naming node-1 is answered (so the refusal is the name's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_an_id_its_certificate_does_not_name_is_refused() {
    let cl = cluster(2).await;
    let dir = cl.dir.path();
    let seven = meshchat_messaging::tls::dev_mesh_identity(dir, 7).expect("node-7 cert");
    let refused = dial_mesh_as(&cl, 2, seven, 1).await;
    let reason = format!("{refused:?}");
    assert!(
        reason.contains("certificate does not name"),
        "refused for its name: {reason}"
    );
    assert!(cl.mesh(NodeId(2)).peer_up(NodeId(1)), "the real link stays");

    let one = meshchat_messaging::tls::dev_mesh_identity(dir, 1).expect("node-1 cert");
    let answered = dial_mesh_as(&cl, 2, one, 1).await.expect("hello answered");
    assert_eq!(answered.node_id, 2);
}

/// A push dropped between nodes is not lost invisibly: with a peer queue of one envelope, a
/// burst of sends to a user on the other node overflows it; the sending node tells the peer
/// which users missed envelopes (ahead of its next batch, outside the queue's bound), the peer
/// pushes them `Resync`, and the client fills the gap from history while it stays online.
/// Every acked message reaches the recipient, and every drop was followed by a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_mesh_envelopes_are_resynced_while_the_recipient_stays_online() {
    let c = cluster_with(2, |cfg| cfg.cluster.peer_queue = 1).await;
    let ((alice, _ae, _), (bob, mut bob_events, _), chat) = c.pair().await;

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
            // Only a close of the current connection matters (a replaced one is not
            // reported: connections_the_client_replaces_end_without_a_disconnected_event).
            Ok(Some(Event::Disconnected { code, reason })) => assert!(
                bob.conn().is_ok_and(|c| c.is_open()),
                "bob was disconnected ({code}: {reason}): the test needs him online"
            ),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let missing = want.difference(&got).count();
    let dropped = c.nodes[0]
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
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// Two nodes and a user homed on each; returns the cluster, both clients (kept alive), and
/// the events and session of bob, the user on node 2.
async fn two_nodes_with_bob_on_node_2() -> (Cluster, Vec<Arc<Client>>, Events, Session) {
    let c = cluster(2).await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.to_string()).collect();
    let mut users = common::one_user_homed_at_each(&addrs[0], &c.options(), &addrs)
        .await
        .into_iter();
    let (alice, _, _) = users.next().expect("a user on node 1");
    let (bob, bob_events, bob_s) = users.next().expect("a user on node 2");
    (c, vec![alice, bob], bob_events, bob_s)
}

/// A channel delivery to more users of one node than one mesh frame can name (150k
/// recipients, about 1.35 MB of ids; the frame is 1 MiB) used to make one envelope too large
/// for any batch, and the whole batch was dropped. It is now split across envelopes: nothing
/// is dropped, and a real member named last gets the push over the real QUIC link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_to_150k_users_of_one_node_is_split_across_envelopes() {
    use meshchat_idgen::UserId;
    let (c, _users, mut bob_events, bob_s) = two_nodes_with_bob_on_node_2().await;
    let mesh1 = c.mesh(NodeId(1));
    let ring = mesh1.ring();
    // Offline users homed on node 2, with 9-byte varint ids like real Snowflakes.
    let mut recipients: Vec<UserId> = (0u64..)
        .map(|k| UserId((1 << 60) + k))
        .filter(|u| ring.owner(*u) == Some(NodeId(2)))
        .take(150_000)
        .collect();
    recipients.push(bob_s.user);
    let before = mesh1.peer_stats(NodeId(2)).expect("peer");
    let push = meshchat_messaging::node::encode_push(push::Event::Message(pb::Message {
        message_id: 4242,
        chat: Some(meshchat_proto::ids::chat_to_wire(ChatId::direct(
            bob_s.user, bob_s.user,
        ))),
        body: "to a huge channel".into(),
        ..Default::default()
    }));
    let d = Router::deliver(&**mesh1, &recipients, &push, None);
    assert!(d.queued >= 6, "{} envelopes for 150k recipients", d.queued);

    let m = next_message(&mut bob_events).await;
    assert_eq!((m.message_id, text(&m)), (4242, "to a huge channel".into()));
    let after = mesh1.peer_stats(NodeId(2)).expect("peer");
    assert_eq!(after.dropped, before.dropped, "no envelope dropped");
    assert!(after.envelopes_sent - before.envelopes_sent >= 6);
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// An envelope too large for a mesh frame (a 1.1 MB push) is refused when it is queued, and
/// its recipients are resynced: it cannot take the batch around it down (the message queued
/// right after it still arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_envelope_is_refused_at_the_queue_not_with_its_batch() {
    let (c, _users, mut bob_events, bob_s) = two_nodes_with_bob_on_node_2().await;
    let chat = Some(meshchat_proto::ids::chat_to_wire(ChatId::direct(
        bob_s.user, bob_s.user,
    )));
    let message = |id: u64, body: Vec<u8>| {
        meshchat_messaging::node::encode_push(push::Event::Message(pb::Message {
            message_id: id,
            chat,
            body: body.into(),
            ..Default::default()
        }))
    };
    let mesh1 = c.mesh(NodeId(1));
    let before = mesh1.peer_stats(NodeId(2)).expect("peer");
    Router::deliver(
        &**mesh1,
        &[bob_s.user],
        &message(1, vec![b'x'; 1_100_000]),
        None,
    );
    Router::deliver(
        &**mesh1,
        &[bob_s.user],
        &message(2, b"small".to_vec()),
        None,
    );

    let (mut resynced, mut got) = (false, false);
    while !(resynced && got) {
        match bob_events.next_within(Duration::from_secs(5)).await {
            Some(Event::Resync) => resynced = true,
            Some(Event::Message(m)) => {
                assert_eq!(m.message_id, 2, "only the small message is pushed");
                got = true;
            }
            Some(_) => {}
            None => panic!("resync {resynced}, small message {got} after 5 s"),
        }
    }
    let after = mesh1.peer_stats(NodeId(2)).expect("peer");
    assert_eq!(after.dropped - before.dropped, 1, "only the oversized one");
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// Channel member changes travel on a lane that is never dropped. With a peer queue of one
/// envelope kept full by a flood of pushes to an offline user, each followed by a member
/// change of the channel, a join on node 1 still reaches node 2's member cache: bob's next channel message (fanned out by node 2) reaches
/// the new member carol. Through the queue the change could be dropped, which resynced every
/// user on node 2 (dave, in no channel, included) and until then left node 2's list stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reaches_a_peer_whose_queue_is_full() {
    use meshchat_idgen::UserId;
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = cluster_with(2, |cfg| cfg.cluster.peer_queue = 1).await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.to_string()).collect();
    let homes = [
        addrs[0].clone(),
        addrs[0].clone(),
        addrs[1].clone(),
        addrs[1].clone(),
    ];
    let mut users = common::one_user_homed_at_each(&addrs[0], &c.options(), &homes)
        .await
        .into_iter();
    let (alice, mut alice_ev, _) = users.next().expect("alice on node 1");
    let (carol, mut carol_ev, _) = users.next().expect("carol on node 1");
    let (bob, _bob_ev, _) = users.next().expect("bob on node 2");
    // Online on node 2, in no channel: only a resync of everyone reaches him.
    let (dave, mut dave_ev, _) = users.next().expect("dave on node 2");

    let ch = alice.channel_create("lane").await.expect("create");
    let chat = ChatId::Channel(ChannelId(ch.channel_id));
    bob.channel_join("lane").await.expect("join");
    // Node 2 fans bob's message out, caching the member list [alice, bob].
    let p = bob.send(chat, "before carol", None).await.expect("send");
    assert_eq!(next_message(&mut alice_ev).await.message_id, p.message_id);

    // Keep node 1's queue to node 2 full while carol joins.
    let mesh1 = c.mesh(NodeId(1)).clone();
    let ring = mesh1.ring();
    let ghost = (1u64 << 60..)
        .map(UserId)
        .find(|u| ring.owner(*u) == Some(NodeId(2)))
        .expect("a user id homed on node 2");
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let (mesh1, flooding) = (mesh1.clone(), flooding.clone());
        let push = meshchat_messaging::node::encode_push(push::Event::Message(pb::Message {
            message_id: 1,
            body: "flood".into(),
            ..Default::default()
        }));
        std::thread::spawn(move || {
            let channel = ChannelId(ch.channel_id);
            while flooding.load(Ordering::Relaxed) {
                // A push fills the queue; a member change right behind it meets it full.
                Router::deliver(&*mesh1, &[ghost], &push, None);
                Router::channel_changed(&*mesh1, channel);
            }
        })
    };
    // The queue overflows before the join and still after it: the join's change met a
    // full queue.
    let dropped = || mesh1.peer_stats(NodeId(2)).expect("peer").dropped;
    let overflowing = |since: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while dropped() <= since {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flood never overflowed the peer queue"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    overflowing(0).await;
    carol.channel_join("lane").await.expect("join");
    overflowing(dropped()).await;
    flooding.store(false, Ordering::Relaxed);
    flood.join().expect("flood thread");

    // Node 2 learns of carol: a message bob sends reaches her (its change may still be on
    // the way when bob first sends: send again until one arrives, within 10 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut sent = BTreeSet::new();
    'arrived: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 2 never learnt carol joined"
        );
        let p = bob
            .send(chat, format!("after carol {}", sent.len()), None)
            .await
            .expect("send");
        sent.insert(p.message_id);
        while let Some(ev) = carol_ev.next_within(Duration::from_millis(500)).await {
            if let Event::Message(m) = ev
                && sent.contains(&m.message_id)
            {
                break 'arrived;
            }
        }
    }
    // No resync of everyone on node 2 (a dropped change's cost through the queue): dave,
    // in no channel and sent nothing, was never resynced. His request's reply comes after
    // any push queued for him before it.
    dave.channel_list().await.expect("dave's round trip");
    while let Some(ev) = dave_ev.next_within(Duration::from_millis(1)).await {
        assert!(
            !matches!(ev, Event::Resync),
            "dave was resynced: a channel change was dropped"
        );
    }
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// A UDP relay in front of a node's mesh port that can black-hole everything: a network path
/// that dies without a word. Its target is set once the node's address is known.
struct Relay {
    addr: std::net::SocketAddr,
    target: Arc<parking_lot::Mutex<Option<std::net::SocketAddr>>>,
    blackhole: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = front.local_addr().expect("addr");
        let target: Arc<parking_lot::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let blackhole: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (t, b) = (target.clone(), blackhole.clone());
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client = None;
            loop {
                let dark = || b.load(std::sync::atomic::Ordering::SeqCst);
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let to = *t.lock();
                        if let (false, Some(to)) = (dark(), to) {
                            let _ = back.send_to(&up[..n], to).await;
                        }
                    }
                    Ok((n, _)) = back.recv_from(&mut down) => {
                        if let (false, Some(to)) = (dark(), client) {
                            let _ = front.send_to(&down[..n], to).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            target,
            blackhole,
            task,
        }
    }

    fn set_dark(&self, dark: bool) {
        self.blackhole
            .store(dark, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two nodes; node 1 reaches node 2's mesh port (it dials: the lower id dials) through a
/// relay the test can darken.
async fn two_nodes_through_a_relay() -> (Relay, Cluster) {
    let relay = Relay::start().await;
    let (relay_addr, target) = (relay.addr, relay.target.clone());
    let c = cluster_with(2, move |cfg| {
        if cfg.node_id == 1 {
            let m = &mut cfg.cluster.members[1];
            *target.lock() = Some(m.mesh_addr);
            m.mesh_addr = relay_addr;
        }
    })
    .await;
    (relay, c)
}

/// A push whose batch was written into a mesh link that then dies (the path goes dark: the
/// write completes into QUIC's buffer, nothing arrives, the link idles out) is not lost
/// invisibly: the next link carries a `Resync` for its recipient, who fills the gap while
/// online. Node 1 reaches node 2's mesh port through a relay that the test darkens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_written_into_a_link_that_dies_is_resynced_to_the_online_recipient() {
    let (relay, c) = two_nodes_through_a_relay().await;
    let ((alice, _ae, _), (bob, mut bob_events, _), chat) = c.pair().await;
    alice.send(chat, "before", None).await.expect("send");
    assert_eq!(text(&next_message(&mut bob_events).await), "before");

    // The path goes dark; the push is written into the link all the same.
    let mesh1 = c.mesh(NodeId(1)).clone();
    let sent =
        |m: &meshchat_backplane::mesh::Mesh| m.peer_stats(NodeId(2)).expect("peer").envelopes_sent;
    let before = sent(&mesh1);
    relay.set_dark(true);
    let lost = alice
        .send(chat, "into a dying link", None)
        .await
        .expect("acked: it is durable")
        .message_id;
    common::wait_for("the push is written", Duration::from_secs(10), || {
        sent(&mesh1) > before
    })
    .await;
    // The link idles out; the path comes back and node 1 dials again.
    common::wait_for("the link dies", Duration::from_secs(30), || {
        !mesh1.peer_up(NodeId(2))
    })
    .await;
    relay.set_dark(false);
    common::wait_for("a new link", Duration::from_secs(30), || {
        mesh1.peer_up(NodeId(2))
    })
    .await;

    // Bob stayed online on node 2 the whole time: he is told to fill his gap, and does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut resynced = false;
    loop {
        match tokio::time::timeout_at(deadline, bob_events.next()).await {
            Ok(Some(Event::Message(m))) if m.message_id == lost => break,
            Ok(Some(Event::Resync)) => {
                resynced = true;
                bob.fill_gaps().await.expect("fill");
            }
            Ok(Some(Event::Disconnected { code, reason })) => assert!(
                bob.conn().is_ok_and(|c| c.is_open()),
                "bob was disconnected ({code}: {reason}): the test needs him online"
            ),
            Ok(Some(_)) => {}
            _ => panic!("the push written into the dead link never reached bob"),
        }
    }
    assert!(resynced, "it came through a resync");
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// Pushes a node queued for a peer while their link was down reach the peer's users when
/// the link comes back. The node that accepts the link writes its backlog right behind its
/// hello reply, so the dialer reads both at once; it used to drop everything its hello reader
/// had taken past the reply, that first batch with it, invisibly (no resync: the batch was
/// written into a link that stayed up). Found by the load test's partition fault. Node 1
/// dials node 2 (the lower id dials) through a relay that the test darkens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_queued_while_the_link_was_down_arrives_when_it_is_back() {
    let (relay, c) = two_nodes_through_a_relay().await;
    // Alice is homed on node 1 (the dialer), Bob on node 2 (the acceptor).
    let ((alice, mut alice_events, _), (bob, _be, _), chat) = c.pair().await;
    bob.send(chat, "before", None).await.expect("send");
    assert_eq!(text(&next_message(&mut alice_events).await), "before");

    // The path goes dark and the link idles out on node 2's side too.
    let mesh2 = c.mesh(NodeId(2)).clone();
    relay.set_dark(true);
    common::wait_for(
        "the link is down on node 2",
        Duration::from_secs(30),
        || !mesh2.peer_up(NodeId(1)),
    )
    .await;
    // Sends while there is no link: their pushes wait in node 2's queue for node 1.
    let mut waiting = std::collections::BTreeSet::new();
    for i in 0..5 {
        let id = bob
            .send(chat, format!("queued {i}"), None)
            .await
            .expect("acked: it is durable")
            .message_id;
        waiting.insert(id);
    }
    relay.set_dark(false);

    // Alice stayed online on node 1: the backlog reaches her as pushes (a resync and a
    // gap fill would do too: what must not happen is nothing at all).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !waiting.is_empty() {
        match tokio::time::timeout_at(deadline, alice_events.next()).await {
            Ok(Some(Event::Message(m))) => {
                waiting.remove(&m.message_id);
            }
            Ok(Some(Event::Resync)) => {
                alice.fill_gaps().await.expect("fill");
            }
            Ok(Some(Event::Disconnected { code, reason })) => assert!(
                alice.conn().is_ok_and(|c| c.is_open()),
                "alice was disconnected ({code}: {reason}): the test needs her online"
            ),
            Ok(Some(_)) => {}
            _ => panic!(
                "{} pushes queued while the link was down never reached alice",
                waiting.len()
            ),
        }
    }
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// A connection the client replaces itself (the registration's first connection, redirected
/// to the user's home; the one before each reconnect) ends without a `Disconnected` event:
/// an application that reconnects on every `Disconnected`, as the CLI's `listen` once did,
/// would otherwise loop (issue 17's listener defect, fixed in the client library). The
/// client's own close is still reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_client_replaces_end_without_a_disconnected_event() {
    let c = cluster(2).await;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.to_string()).collect();
    // Registered through node 1, homed at node 2: one redirect.
    let (bob, mut events, _) = common::one_user_homed_at_each(&addrs[0], &c.options(), &addrs[1..])
        .await
        .pop()
        .expect("a user homed at node 2");
    bob.reconnect().await.expect("reconnect");
    bob.reconnect().await.expect("reconnect again");
    assert_eq!(bob.server(), addrs[1]);
    // A closed connection's reader reports within 2 s of its close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(e) = events
        .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        assert!(
            !matches!(e, Event::Disconnected { .. }),
            "a replaced connection was reported: {e:?}"
        );
    }
    bob.close();
    let reason = common::next_matching(&mut events, |e| match e {
        Event::Disconnected { reason, .. } => Some(reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, "closed by this client");
}
