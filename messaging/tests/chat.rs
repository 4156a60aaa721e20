//! The chat feature set over real QUIC on loopback, with the real embedded store.

mod common;

use std::time::Duration;

use common::{TestNode, code_of, next_matching, next_message, no_message, text};
use meshchat_client::Event;
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_proto::client::{Direction, ErrorCode, ReceiptKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_both_ways() {
    let node = TestNode::start().await;
    let (alice, mut alice_ev, a) = node.user("alice").await;
    let (bob, mut bob_ev, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);

    let p = alice.send(chat, "hi bob", None).await.expect("send");
    assert!(!p.duplicate);
    let m = next_message(&mut bob_ev).await;
    assert_eq!(text(&m), "hi bob");
    assert_eq!(m.sender_id, a.user.0);
    assert_eq!(m.sender_name, "alice");
    assert_eq!(m.message_id, p.message_id);

    let p2 = bob.send(chat, "hi alice", None).await.expect("send");
    let m = next_message(&mut alice_ev).await;
    assert_eq!(text(&m), "hi alice");
    assert!(p2.message_id > p.message_id, "ids grow with time");
    // The sender's own connection does not get its own message pushed back.
    no_message(&mut bob_ev, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_of_one_user_stay_in_sync() {
    let node = TestNode::start().await;
    let (alice1, mut ev1, a) = node.user("alice").await;
    let (_alice2, mut ev2) = node.device(&a).await;
    let (_alice3, mut ev3) = node.device(&a).await;
    let (bob, mut bob_ev, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);

    // Sent from device 1: bob and devices 2 and 3 get it; device 1 does not.
    let p = alice1
        .send(chat, "from my phone", None)
        .await
        .expect("send");
    for ev in [&mut bob_ev, &mut ev2, &mut ev3] {
        assert_eq!(next_message(ev).await.message_id, p.message_id);
    }
    no_message(&mut ev1, Duration::from_millis(200)).await;

    // From bob: all three devices get it.
    let p = bob
        .send(chat, "to all your devices", None)
        .await
        .expect("send");
    for ev in [&mut ev1, &mut ev2, &mut ev3] {
        assert_eq!(next_message(ev).await.message_id, p.message_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_reactions_reach_the_right_devices() {
    let node = TestNode::start().await;
    let (alice, mut alice_ev, a) = node.user("alice").await;
    let (bob1, mut bob1_ev, b) = node.user("bob").await;
    let (_bob2, mut bob2_ev) = node.device(&b).await;
    let (_carol, mut carol_ev, _c) = node.user("carol").await;
    let chat = ChatId::direct(a.user, b.user);

    let p = alice
        .send(chat, "did you see this?", None)
        .await
        .expect("send");
    next_message(&mut bob1_ev).await;
    next_message(&mut bob2_ev).await;

    bob1.mark(chat, p.message_id, ReceiptKind::Delivered)
        .await
        .expect("delivered");
    bob1.mark(chat, p.message_id, ReceiptKind::Seen)
        .await
        .expect("seen");
    // The sender sees both receipts; bob's other device sees them too.
    for ev in [&mut alice_ev, &mut bob2_ev] {
        let r = next_matching(ev, |e| match e {
            Event::Receipt(r) if r.kind == ReceiptKind::Seen as i32 => Some(r),
            _ => None,
        })
        .await;
        assert_eq!(r.user_id, b.user.0);
        assert_eq!(r.message_id, p.message_id);
    }
    // And the chat list shows the peer's marks to the sender.
    let list = alice.chat_list().await.expect("chat list");
    assert_eq!(list[0].peer_seen, p.message_id);
    assert_eq!(list[0].peer_delivered, p.message_id);

    bob1.react(chat, p.message_id, "👍").await.expect("react");
    for ev in [&mut alice_ev, &mut bob2_ev] {
        let r = next_matching(ev, |e| match e {
            Event::Reaction(r) => Some(r),
            _ => None,
        })
        .await;
        assert_eq!((r.user_id, r.emoji.as_str()), (b.user.0, "👍"));
    }
    let page = alice
        .history(chat, 0, Direction::Backward, 10)
        .await
        .expect("history");
    assert_eq!(page.messages[0].reactions.len(), 1);
    bob1.unreact(chat, p.message_id).await.expect("unreact");
    let removed = next_matching(&mut alice_ev, |e| match e {
        Event::Reaction(r) => Some(r),
        _ => None,
    })
    .await;
    assert_eq!(removed.emoji, "", "an empty emoji means removed");
    // Carol is not in the chat and hears nothing of it.
    assert!(
        carol_ev
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_with_several_members() {
    let node = TestNode::start().await;
    let (alice, mut alice_ev, a) = node.user("alice").await;
    let (bob, mut bob_ev, _b) = node.user("bob").await;
    let (carol, mut carol_ev, _c) = node.user("carol").await;
    let (dave, mut dave_ev, _d) = node.user("dave").await;

    let ch = alice.channel_create("general").await.expect("create");
    assert_eq!(ch.owner_id, a.user.0);
    assert_eq!(
        code_of(bob.channel_create("general").await),
        ErrorCode::ChannelExists
    );
    bob.channel_join("general").await.expect("join");
    let joined = carol.channel_join("#general").await.expect("join");
    assert_eq!(joined.member_count, 3);
    let chat = ChatId::Channel(ChannelId(ch.channel_id));

    let p = bob.send(chat, "hello channel", None).await.expect("send");
    for ev in [&mut alice_ev, &mut carol_ev] {
        let m = next_message(ev).await;
        assert_eq!(
            (m.message_id, text(&m)),
            (p.message_id, "hello channel".into())
        );
    }
    no_message(&mut dave_ev, Duration::from_millis(200)).await;

    // Outsiders can neither write nor read.
    assert_eq!(
        code_of(dave.send(chat, "let me in", None).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(dave.history(chat, 0, Direction::Backward, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(dave.channel_members(ChannelId(ch.channel_id)).await),
        ErrorCode::Forbidden
    );
    let mut members: Vec<String> = alice
        .channel_members(ChannelId(ch.channel_id))
        .await
        .expect("members")
        .into_iter()
        .map(|u| u.user_name)
        .collect();
    members.sort();
    assert_eq!(members, vec!["alice", "bob", "carol"]);
    assert_eq!(
        bob.channel_list().await.expect("mine").len(),
        1,
        "bob's channels"
    );

    // After leaving, carol gets nothing more and cannot read.
    carol
        .channel_leave(ChannelId(ch.channel_id))
        .await
        .expect("leave");
    alice.send(chat, "carol left", None).await.expect("send");
    next_message(&mut bob_ev).await;
    no_message(&mut carol_ev, Duration::from_millis(200)).await;
    assert_eq!(
        code_of(carol.history(chat, 0, Direction::Backward, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(dave.channel_join("nope").await),
        ErrorCode::UnknownChannel
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_point_at_messages_of_the_chat() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (bob, mut bob_ev, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let root = alice.send(chat, "question?", None).await.expect("send");
    next_message(&mut bob_ev).await;
    let reply = alice
        .send(chat, "and a follow-up", Some(root.message_id))
        .await
        .expect("reply");
    let m = next_message(&mut bob_ev).await;
    assert_eq!(m.reply_to, root.message_id);
    assert_eq!(m.message_id, reply.message_id);
    assert_eq!(
        code_of(bob.send(chat, "re: nothing", Some(12345)).await),
        ErrorCode::UnknownMessage
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_forwards_and_back_with_a_capped_page_size() {
    let node = TestNode::start_with(|c| {
        c.limits.max_page_size = 10;
        c.limits.default_page_size = 5;
    })
    .await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let mut ids = Vec::new();
    for n in 0..25 {
        ids.push(
            alice
                .send(chat, format!("m{n}"), None)
                .await
                .expect("send")
                .message_id,
        );
    }
    // Backward, asking for more than the cap: pages of 10, 10, 5.
    let mut got = Vec::new();
    let mut cursor = 0;
    let mut pages = 0;
    loop {
        let page = alice
            .history(chat, cursor, Direction::Backward, 1_000)
            .await
            .expect("page");
        assert!(page.messages.len() <= 10, "capped at max_page_size");
        got.extend(page.messages.iter().map(|m| m.message_id));
        pages += 1;
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
    }
    let mut rev = ids.clone();
    rev.reverse();
    assert_eq!(got, rev);
    assert_eq!(pages, 3);
    // Forward from the 5th message.
    let page = alice
        .history(chat, ids[4], Direction::Forward, 3)
        .await
        .expect("page");
    let texts: Vec<String> = page.messages.iter().map(text).collect();
    assert_eq!(texts, vec!["m5", "m6", "m7"]);
    assert_eq!(page.next_cursor, ids[7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_list_counts_unread_until_seen() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (bob, _be, b) = node.user("bob").await;
    let (carol, _ce, c) = node.user("carol").await;
    let ab = ChatId::direct(a.user, b.user);
    let cb = ChatId::direct(c.user, b.user);
    let mut last = 0;
    for n in 0..3 {
        last = alice
            .send(ab, format!("a{n}"), None)
            .await
            .expect("send")
            .message_id;
    }
    carol.send(cb, "from carol", None).await.expect("send");
    let list = bob.chat_list().await.expect("list");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].title, "carol", "most recent first");
    assert_eq!(list[1].title, "alice");
    assert_eq!(list[1].unread, 3);
    assert_eq!(list[1].newest.as_ref().map(|m| m.message_id), Some(last));
    bob.mark(ab, last, ReceiptKind::Seen).await.expect("seen");
    let list = bob.chat_list().await.expect("list");
    let row = list.iter().find(|r| r.title == "alice").expect("alice row");
    assert_eq!(row.unread, 0);
    assert_eq!(row.my_seen, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_message_is_stored_and_delivered_once() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (bob, mut bob_ev, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let first = alice
        .send_with_id(chat, "only once", None, "client-msg-1")
        .await
        .expect("send");
    let again = alice
        .send_with_id(chat, "only once", None, "client-msg-1")
        .await
        .expect("resend");
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.message_id, again.message_id);
    next_message(&mut bob_ev).await;
    no_message(&mut bob_ev, Duration::from_millis(200)).await;
    let page = bob
        .history(chat, 0, Direction::Backward, 10)
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_stored_but_unpushed_message_is_pushed() {
    use meshchat_storage::HistoryStore;
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, mut bob_ev, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    // The first attempt committed, then its request died before the push (its connection
    // closed): the row is in the store and bob never heard of it.
    let store = meshchat_storage::EmbeddedStore::open_dir(node.dir.path()).expect("store");
    let first = meshchat_idgen::MessageId(1 << 40);
    store
        .append(meshchat_storage::NewMessage {
            id: first,
            chat,
            sender: a.user,
            client_msg_id: "lost-push".into(),
            body: "stored, never pushed".into(),
            reply_to: None,
        })
        .await
        .expect("append");
    // The client retries with the same id: the first id is acked, and bob gets it now.
    let again = alice
        .send_with_id(chat, "stored, never pushed", None, "lost-push")
        .await
        .expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.message_id, first.0);
    let m = next_message(&mut bob_ev).await;
    assert_eq!(m.message_id, first.0);
    assert_eq!(text(&m), "stored, never pushed");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_all_history() {
    let mut node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            alice
                .send(chat, format!("m{n}"), None)
                .await
                .expect("send")
                .message_id,
        );
    }
    let ch = alice.channel_create("keep").await.expect("channel");
    drop(alice);
    node.restart().await;

    // Same users, same tokens (the secret is in the data dir), same history.
    let (bob, _be) = node.client().await;
    bob.login("bob", "password-123")
        .await
        .expect("login after restart");
    let page = bob
        .history(chat, 0, Direction::Forward, 100)
        .await
        .expect("history");
    let got: Vec<u64> = page.messages.iter().map(|m| m.message_id).collect();
    assert_eq!(got, ids);
    let (alice, _ae) = node.device(&a).await;
    assert_eq!(
        alice.my_channel("keep").await.expect("channel").channel_id,
        ch.channel_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_read_a_chat_it_is_not_in() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    let (carol, _ce, _c) = node.user("carol").await;
    let chat = ChatId::direct(a.user, b.user);
    let p = alice.send(chat, "private", None).await.expect("send");
    assert_eq!(
        code_of(carol.history(chat, 0, Direction::Backward, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.mark(chat, p.message_id, ReceiptKind::Seen).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.react(chat, p.message_id, "👀").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(carol.send(chat, "butting in", None).await),
        ErrorCode::Forbidden
    );
    // A 1:1 chat with a user that does not exist.
    let ghost = ChatId::direct(a.user, UserId(a.user.0 + 999_999));
    assert_eq!(
        code_of(alice.send(ghost, "anyone?", None).await),
        ErrorCode::UnknownUser
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_clients_with_a_code() {
    let mut node = TestNode::start().await;
    let (alice, mut ev, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let acked = alice
        .send(chat, "before shutdown", None)
        .await
        .expect("send");
    node.stop().await;
    let (code, _reason) = next_matching(&mut ev, |e| match e {
        Event::Disconnected { code, reason } => Some((code, reason)),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::Unavailable as u64);
    // What was acked is there after a restart.
    node.restart().await;
    let (bob, _be) = node.device(&b).await;
    let page = bob
        .history(chat, 0, Direction::Backward, 10)
        .await
        .expect("history");
    assert_eq!(page.messages[0].message_id, acked.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_fit_one_frame_whatever_the_messages_weigh() {
    let node = TestNode::start_with(|c| {
        c.limits.max_frame_bytes = 8 * 1024;
        c.limits.max_body_bytes = 4 * 1024;
        c.transport.stream_receive_window = 64 * 1024;
    })
    .await;
    let (alice, _ae, a) = node.user("alice").await;
    let (bob, _be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    let big = vec![b'x'; 4_000];
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            alice
                .send(chat, big.clone(), None)
                .await
                .expect("send")
                .message_id,
        );
    }
    // Ten 4 KB messages do not fit an 8 KiB frame: pages come back short, with a cursor, and
    // paging still returns every message exactly once.
    let mut got = Vec::new();
    let mut cursor = 0;
    loop {
        let page = bob
            .history(chat, cursor, Direction::Forward, 10)
            .await
            .expect("page");
        assert!(page.messages.len() < 10, "truncated to the frame budget");
        got.extend(page.messages.iter().map(|m| m.message_id));
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(got, ids);
    // The chat list shows a bounded preview of the newest message.
    let list = bob.chat_list().await.expect("chat list");
    let newest = list[0].newest.as_ref().expect("newest");
    assert_eq!(newest.message_id, *ids.last().expect("ids"));
    assert_eq!(newest.body.len(), 512);
}
