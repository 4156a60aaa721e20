//! Presence over real QUIC across a 3-node static cluster (one user homed on each node,
//! whichever way ids land): a user's state goes to the users they share a 1:1 chat with and
//! to no one else, is the union of their devices, keeps last seen, honours hiding, and costs
//! the mesh a fixed number of envelopes per change whatever the number of contacts. "Nothing
//! else arrived" is checked by a message sent afterwards arriving next, never by waiting.

mod common;

use std::time::Duration;

use common::cluster::{User, cluster};
use common::next_matching_within;
use meshchat_client::{Client, Event, Events};
use meshchat_idgen::{ChatId, MessageId, NodeId, UserId};
use meshchat_proto::client as pb;
use meshchat_storage::NewMessage;

/// The next presence push or message, whichever comes first (other events skipped).
async fn next_presence_or_message(events: &mut Events) -> Result<pb::PresenceState, pb::Message> {
    // An offline comes a grace after the last device left.
    let within = meshchat_messaging::presence::GRACE + Duration::from_secs(10);
    next_matching_within(events, within, |e| match e {
        Event::Presence(mut p) if p.users.len() == 1 => p.users.pop().map(Ok),
        Event::Presence(p) => panic!("one change per push: {p:?}"),
        Event::Message(m) => Some(Err(m)),
        _ => None,
    })
    .await
}

async fn presence(events: &mut Events) -> pb::PresenceState {
    match next_presence_or_message(events).await {
        Ok(p) => p,
        Err(m) => panic!("a message ({}) came before the presence push", m.message_id),
    }
}

async fn message(events: &mut Events) -> pb::Message {
    match next_presence_or_message(events).await {
        Ok(p) => panic!("an unexpected presence push: {p:?}"),
        Err(m) => m,
    }
}

/// A second device of `user` (homed at `home`), authenticated.
async fn device(cl: &common::cluster::Cluster, home: &str, user: &User, hide: bool) -> Client {
    let mut opts = cl.options();
    opts.hide_presence = hide;
    let (c, _events) = Client::connect(home, opts).await.expect("connect");
    c.authenticate(&user.2.token).await.expect("authenticate");
    c
}

/// Polls `who`'s view of `of` until it is `online` (the presence lane is asynchronous).
async fn until_seen(who: &Client, of: UserId, online: bool) -> pb::PresenceState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = who.presence().await.expect("presence");
        if let Some(p) = list.iter().find(|p| p.user_id == of.0)
            && p.online == online
        {
            return *p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{of} never seen online={online}: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_contacts_across_nodes_as_the_union_of_devices_with_last_seen() {
    let cl = cluster(3).await;
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    let mut users = common::one_user_homed_at_each(&addrs[0], &cl.options(), &addrs).await;
    let (a, b) = (users[0].2.user, users[1].2.user);

    // Everyone's online is published first (after that, a new chat pushes nothing).
    common::wait_for(
        "the users online everywhere",
        Duration::from_secs(10),
        || {
            cl.nodes.iter().all(|n| {
                users
                    .iter()
                    .all(|u| n.node.registry().presence().state(u.2.user).online)
            })
        },
    )
    .await;
    // ... and pushed (to nobody yet): the ticks that flipped them are over once every node
    // has completed two more.
    let ticks: Vec<u64> = cl.nodes.iter().map(|n| n.node.presence_ticks()).collect();
    common::wait_for("two more presence ticks", Duration::from_secs(10), || {
        cl.nodes
            .iter()
            .zip(&ticks)
            .all(|(n, t)| n.node.presence_ticks() >= t + 2)
    })
    .await;
    // No 1:1 chat yet: nobody is a contact.
    assert_eq!(users[1].0.presence().await.expect("presence"), vec![]);
    // a (node 1) and b (node 2) get a 1:1 chat; a and c (node 3) share only a channel.
    let ab = ChatId::direct(a, b);
    users[0].0.send(ab, "hello b", None).await.expect("send");
    message(&mut users[1].1).await;
    let room = users[0].0.channel_create("room").await.expect("create");
    users[2].0.channel_join("room").await.expect("join");
    let room = ChatId::Channel(meshchat_idgen::ChannelId(room.channel_id));

    // b sees a online (a's node told b's node through the mesh), and only a; a sees b; c,
    // a channel member only, has no contacts.
    let seen = until_seen(&users[1].0, a, true).await;
    assert_eq!(seen.last_seen_unix_ms, 0, "no last seen while online");
    assert_eq!(users[1].0.presence().await.expect("presence").len(), 1);
    until_seen(&users[0].0, b, true).await;
    assert_eq!(users[2].0.presence().await.expect("presence"), vec![]);

    // A second device of a: a stays online when the first one goes. b learns nothing: the
    // message the second device sends is b's next event.
    let second = device(&cl, &addrs[0], &users[0], false).await;
    users[0].0.close();
    let n1 = cl.nodes[0].node.clone();
    common::wait_for(
        "a's first device counted gone",
        Duration::from_secs(10),
        || n1.registry().connections_of(a) == 1,
    )
    .await;
    // The tracker counts the second device: no offline can ever come due for a (the grace
    // starts only at zero devices), so nothing is pushed; the message shows b got nothing.
    assert_eq!(n1.registry().visible_connections(a), 1);
    second.send(ab, "still here", None).await.expect("send");
    assert_eq!(common::text(&message(&mut users[1].1).await), "still here");
    assert!(users[1].0.presence().await.expect("presence")[0].online);

    // The last device goes: offline after the grace, pushed to b with last seen.
    let before_close = meshchat_messaging::auth::now_ms();
    second.close();
    let p = presence(&mut users[1].1).await;
    assert_eq!((p.user_id, p.online), (a.0, false));
    assert!(
        p.last_seen_unix_ms >= before_close
            && p.last_seen_unix_ms <= meshchat_messaging::auth::now_ms(),
        "last seen {} is when the last device left (after {before_close})",
        p.last_seen_unix_ms
    );
    assert_eq!(
        p.changed_unix_ms, p.last_seen_unix_ms,
        "offline since last seen"
    );
    let listed = until_seen(&users[1].0, a, false).await;
    assert_eq!(listed.last_seen_unix_ms, p.last_seen_unix_ms);
    let went = p.changed_unix_ms;

    // a comes back: online, pushed, a newer state than the offline.
    let back = device(&cl, &addrs[0], &users[0], false).await;
    let p = presence(&mut users[1].1).await;
    assert_eq!((p.user_id, p.online), (a.0, true));
    assert!(p.changed_unix_ms > went, "{} > {went}", p.changed_unix_ms);

    // Hiding: the device that hides makes a offline (after the grace); a hidden device does
    // not make a online, so when the visible one closes a goes offline again; showing it
    // again makes a online.
    back.set_presence_hidden(true).await.expect("hide");
    let p = presence(&mut users[1].1).await;
    assert_eq!((p.user_id, p.online), (a.0, false));
    let hidden = device(&cl, &addrs[0], &users[0], true).await;
    back.set_presence_hidden(false).await.expect("show");
    let p = presence(&mut users[1].1).await;
    assert_eq!((p.user_id, p.online), (a.0, true));
    back.close();
    let p = presence(&mut users[1].1).await;
    assert_eq!(
        (p.user_id, p.online),
        (a.0, false),
        "the hidden device left does not show a online"
    );
    hidden.set_presence_hidden(false).await.expect("show");
    let p = presence(&mut users[1].1).await;
    assert_eq!((p.user_id, p.online), (a.0, true));

    // c, a channel member and no contact, got none of it: the channel message is its next
    // message or presence event.
    hidden.send(room, "to the room", None).await.expect("send");
    assert_eq!(common::text(&message(&mut users[2].1).await), "to the room");
}

/// Mesh envelopes written by `node` to its peers so far, and the frames that carried them.
fn sent_by(cl: &common::cluster::Cluster, node: NodeId) -> (u64, u64) {
    let mesh = cl.mesh(node);
    mesh.peer_ids()
        .into_iter()
        .filter_map(|p| mesh.peer_stats(p))
        .fold((0, 0), |(e, f), s| {
            (e + s.envelopes_sent, f + s.frames_sent)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_a_user_with_1k_contacts_costs_two_envelopes_per_peer() {
    const CONTACTS: u64 = 1_000;
    let cl = cluster(3).await;
    let (x, _x_events) = Client::connect(&cl.nodes[0].addr.to_string(), cl.options())
        .await
        .expect("connect");
    let session = x.register("x", "password-123").await.expect("register");
    let me = session.user;
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    let home = cl.home_of(&x);
    let store = cl.nodes[0].node.storage().clone();
    // 1,000 contacts, each with a message to x: users and messages written to the store
    // directly (registering them would hash 1,000 passwords).
    let ids = meshchat_idgen::Generator::new(1_000).expect("generator");
    let mut contacts = Vec::new();
    for i in 0..CONTACTS {
        let u = UserId(ids.next_id().expect("id").0);
        store
            .create_user(u, &format!("contact{i}"), "not-a-hash")
            .await
            .expect("user");
        contacts.push(u);
    }
    let appends = contacts.iter().map(|&u| {
        let store = store.clone();
        let id = MessageId(ids.next_id().expect("id").0);
        async move {
            store
                .append(NewMessage {
                    id,
                    chat: ChatId::direct(u, me),
                    sender: u,
                    client_msg_id: format!("c{}", u.0),
                    body: bytes::Bytes::from_static(b"hi"),
                    reply_to: None,
                })
                .await
                .expect("append")
        }
    });
    futures::future::join_all(appends).await;
    assert_eq!(
        store.direct_peers(me).await.expect("peers").len() as u64,
        CONTACTS
    );
    // Where the contacts are homed: the Deliver envelopes go to the other nodes with any.
    let ring = cl.mesh(home).ring();
    let remote_nodes: std::collections::BTreeSet<NodeId> = contacts
        .iter()
        .filter_map(|u| ring.owner(*u))
        .filter(|n| *n != home)
        .collect();
    assert_eq!(remote_nodes.len(), 2, "1,000 contacts on all 3 nodes");

    // Every node sees x online: the mesh is quiet from now on but for x's changes.
    let books = |online: bool| {
        cl.nodes
            .iter()
            .all(|n| n.node.registry().presence().state(me).online == online)
    };
    common::wait_for("x online everywhere", Duration::from_secs(10), || {
        books(true)
    })
    .await;
    let home_node = cl.nodes[home.0 as usize - 1].node.clone();

    // The baseline, in the same cluster: x's message to a channel of the same 1,000 users
    // (one Deliver per node that homes members).
    let ch = meshchat_idgen::ChannelId(ids.next_id().expect("id").0);
    store
        .create_channel(ch, "all-contacts", me)
        .await
        .expect("channel");
    for u in &contacts {
        store.join_channel(ch, *u).await.expect("join");
    }
    let before = sent_by(&cl, home);
    x.send(ChatId::Channel(ch), "to all", None)
        .await
        .expect("send");
    common::wait_for("the channel message sent", Duration::from_secs(10), || {
        sent_by(&cl, home).0 >= before.0 + 2
    })
    .await;
    let channel = delta(before, sent_by(&cl, home));
    assert_eq!(
        channel.0, 2,
        "a channel message: one Deliver per other node"
    );

    // x goes, then comes back: one change each. Per peer: one presence update (the cluster
    // view) and one Deliver (the push to the contacts homed there, ~333 recipients),
    // whatever the number of contacts.
    let mut costs = Vec::new();
    for online in [false, true] {
        let pushes = home_node.presence_pushes();
        let before = sent_by(&cl, home);
        let back = if online {
            let (c, e) = Client::connect(&addrs[home.0 as usize - 1], cl.options())
                .await
                .expect("connect");
            c.authenticate(&session.token).await.expect("authenticate");
            Some((c, e))
        } else {
            x.close();
            None
        };
        common::wait_for(
            "the change seen everywhere and pushed",
            meshchat_messaging::presence::GRACE + Duration::from_secs(10),
            || {
                books(online)
                    && home_node.presence_pushes() == pushes + 1
                    && sent_by(&cl, home).0 >= before.0 + 4
            },
        )
        .await;
        let cost = delta(before, sent_by(&cl, home));
        assert_eq!(cost.0, 4, "envelopes for one change (online: {online})");
        assert!(cost.1 <= 4, "frames: {}", cost.1);
        costs.push(cost);
        drop(back);
    }
    tracing::info!(
        contacts = CONTACTS,
        ?channel,
        offline = ?costs[0],
        online = ?costs[1],
        "mesh (envelopes, frames) written by the user's home"
    );
}

fn delta(before: (u64, u64), after: (u64, u64)) -> (u64, u64) {
    (after.0 - before.0, after.1 - before.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_node_that_leaves_are_pushed_offline_by_their_new_home() {
    let dir = tempfile::tempdir().expect("dir");
    let port = common::free_port();
    let _redis = common::redis_server(port);
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(common::start_node(|| common::redis_config(dir.path(), id, port)).await);
    }
    common::converge(&[&nodes[0], &nodes[1], &nodes[2]], &[1, 2, 3]).await;
    let opts = meshchat_client::ConnectOptions::new(
        meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("dev CA"),
    );
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    // x homed on node 3 (the one that leaves), b on node 1.
    let mut users =
        common::users_homed_at_each("p", &addrs[0], &opts, &[addrs[2].clone(), addrs[0].clone()])
            .await;
    let (x, b) = (users[0].2.user, users[1].2.user);
    users[0]
        .0
        .send(ChatId::direct(x, b), "hi", None)
        .await
        .expect("send");
    message(&mut users[1].1).await;
    common::wait_for("x online everywhere", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.node.registry().presence().state(x).online)
    })
    .await;

    // Node 3 stops: x's connection ends with it, and node 3 leaves the member set. Node 3 is
    // x's home until then, and may or may not publish x's offline as it goes: either way x's
    // new home pushes it.
    let node3 = nodes.pop().expect("node 3");
    node3.shutdown().await;
    // The new home may push x's state as it first sees it (still online) before the offline:
    // a later push supersedes an earlier one; the last one must say offline.
    let p = loop {
        let p = presence(&mut users[1].1).await;
        assert_eq!(p.user_id, x.0);
        if !p.online {
            break p;
        }
    };
    assert!(p.last_seen_unix_ms > 0);
    let p = until_seen(&users[1].0, x, false).await;
    assert!(p.last_seen_unix_ms > 0);
}
