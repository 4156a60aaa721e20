//! Typing indicators over real QUIC across a 3-node static cluster (one user homed on each
//! node, whichever way ids land): pushed to the chat's other members on every node and never
//! to the typist, refreshes coalesced, stops pushed, expiry by the pushed lifetime, and every
//! refusal with its code. "Nothing else arrived" is checked by a message sent afterwards
//! arriving next, never by waiting.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{User, cluster};
use common::{code_of, next_matching};
use meshchat_client::{Event, Events, TypingTracker};
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_proto::client::{self as pb, ErrorCode};

/// The next typing push or message, whichever comes first (other events skipped).
async fn next_typing_or_message(events: &mut Events) -> Result<pb::TypingEvent, pb::Message> {
    next_matching(events, |e| match e {
        Event::Typing(t) => Some(Ok(t)),
        Event::Message(m) => Some(Err(m)),
        _ => None,
    })
    .await
}

async fn typing(events: &mut Events) -> pb::TypingEvent {
    match next_typing_or_message(events).await {
        Ok(t) => t,
        Err(m) => panic!("a message ({}) came before the typing push", m.message_id),
    }
}

async fn message(events: &mut Events) -> pb::Message {
    match next_typing_or_message(events).await {
        Ok(t) => panic!("an unexpected typing push: {t:?}"),
        Err(m) => m,
    }
}

async fn three_users() -> (common::cluster::Cluster, Vec<User>) {
    let cl = cluster(3).await;
    let addrs: Vec<String> = cl.nodes.iter().map(|n| n.addr.to_string()).collect();
    let users = common::one_user_homed_at_each(&addrs[0], &cl.options(), &addrs).await;
    (cl, users)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_on_every_node_and_expires_by_itself() {
    let (_cl, mut users) = three_users().await;
    let (a, b, c) = (users[0].2.user, users[1].2.user, users[2].2.user);

    // 1:1 across nodes 1 and 2: a start, a refresh sent at once (coalesced), a stop.
    let direct = ChatId::direct(a, b);
    users[0].0.typing(direct, true).await.expect("start");
    users[0].0.typing(direct, true).await.expect("refresh");
    let start = typing(&mut users[1].1).await;
    let got_at = Instant::now();
    assert_eq!(start.user_id, a.0);
    assert!(start.typing);
    assert_eq!(start.expires_in_ms, 6_000);
    assert_eq!(start.chat, Some(meshchat_proto::ids::chat_to_wire(direct)));
    // The indicator runs out by itself at the pushed lifetime, with no stop.
    let mut tracker = TypingTracker::new();
    let shown = tracker.observe(&start, got_at).expect("shown");
    assert!(shown.typing);
    assert_eq!(
        tracker.typing_in(direct, got_at + Duration::from_millis(5_999)),
        vec![a]
    );
    assert!(
        tracker
            .typing_in(direct, got_at + Duration::from_secs(6))
            .is_empty()
    );
    users[0].0.typing(direct, false).await.expect("stop");
    let stop = typing(&mut users[1].1).await;
    assert!(
        !stop.typing,
        "the refresh was not pushed: the stop comes next"
    );
    assert_eq!(stop.expires_in_ms, 0);
    // Nothing else for b: the message sent next is b's next event.
    users[0]
        .0
        .send(direct, "sent after typing", None)
        .await
        .expect("send");
    assert_eq!(
        common::text(&message(&mut users[1].1).await),
        "sent after typing"
    );

    // A channel with a member on each node: the typist's start reaches both others.
    let ch = users[0].0.channel_create("typists").await.expect("create");
    users[1].0.channel_join("typists").await.expect("join");
    users[2].0.channel_join("typists").await.expect("join");
    let chan = ChatId::Channel(ChannelId(ch.channel_id));
    users[2]
        .0
        .typing(chan, true)
        .await
        .expect("start in channel");
    for u in [0, 1] {
        let t = typing(&mut users[u].1).await;
        assert_eq!((t.user_id, t.typing), (c.0, true), "user {u}");
    }
    users[2]
        .0
        .send(chan, "sent by the typist", None)
        .await
        .expect("send");
    for u in [0, 1] {
        assert_eq!(
            common::text(&message(&mut users[u].1).await),
            "sent by the typist"
        );
    }
    // The typist's own start did not come back to it: the next message is the next event.
    users[0].0.send(chan, "last", None).await.expect("send");
    assert_eq!(common::text(&message(&mut users[2].1).await), "last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_refused_with_a_reason_where_it_may_not_go() {
    let (_cl, users) = three_users().await;
    let (a, b) = (users[0].2.user, users[1].2.user);
    let client = &users[0].0;
    // Not a member: a channel a is not in, a 1:1 of two others.
    let ch = users[1].0.channel_create("closed").await.expect("create");
    let chan = ChatId::Channel(ChannelId(ch.channel_id));
    assert_eq!(
        code_of(client.typing(chan, true).await),
        ErrorCode::Forbidden
    );
    let others = ChatId::direct(b, users[2].2.user);
    assert_eq!(
        code_of(client.typing(others, true).await),
        ErrorCode::Forbidden
    );
    // Unknown ids.
    assert_eq!(
        code_of(client.typing(ChatId::Channel(ChannelId(42)), true).await),
        ErrorCode::UnknownChannel
    );
    assert_eq!(
        code_of(
            client
                .typing(ChatId::direct(a, UserId(u64::MAX >> 1)), true)
                .await
        ),
        ErrorCode::UnknownUser
    );
    // No chat at all.
    let r = client
        .request(pb::client_frame::Body::Typing(pb::Typing {
            chat: None,
            typing: true,
        }))
        .await;
    assert_eq!(code_of(r), ErrorCode::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_toggling_fast_is_rate_limited_and_others_are_not() {
    let (_cl, users) = three_users().await;
    let direct = ChatId::direct(users[0].2.user, users[1].2.user);
    // 5 a second, burst 10: toggling as fast as replies come is refused within a bounded
    // number of tries (how many depends on how long each took).
    let mut limited = None;
    for i in 0..40 {
        if let Err(e) = users[0].0.typing(direct, i % 2 == 0).await {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("refused within 40 toggles");
    assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
    assert!(e.to_string().contains("retry in"), "{e}");
    // Another user is not affected.
    users[1]
        .0
        .typing(direct, true)
        .await
        .expect("the other user types");
}
