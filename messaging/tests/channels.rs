//! Channels that stay correct, over real QUIC on loopback with the real embedded store:
//! authorisation from storage (not the fan-out cache), member and channel lists paged by
//! cursor, history pages that always fit a frame.

mod common;

use std::sync::Arc;

use common::{TestNode, code_of, next_message};
use futures::StreamExt;
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_proto::client::ErrorCode;
use meshchat_storage::{EmbeddedStore, StateStore};

/// Writes `members` users into channel `ch` and `channels` more channels owned by `owner`,
/// straight into the node's store (registering thousands of users over the wire would
/// spend the test on password hashing). Names are `{tag}` plus a zero-padded number.
async fn populate(
    store: &Arc<EmbeddedStore>,
    ch: ChannelId,
    owner: UserId,
    members: u64,
    channels: u64,
    tag: &str,
) {
    let base = 1u64 << 40;
    futures::stream::iter(0..members)
        .map(|n| {
            let store = store.clone();
            let name = format!("{tag}{n:05}");
            async move {
                let u = UserId(base + n);
                store.create_user(u, &name, "x").await.expect("user");
                assert!(store.join_channel(ch, u).await.expect("join"));
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    futures::stream::iter(0..channels)
        .map(|n| {
            let store = store.clone();
            let name = format!("{tag}c{n:05}");
            async move {
                store
                    .create_channel(ChannelId(base + n), &name, owner)
                    .await
                    .expect("channel");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

async fn close(store: Arc<EmbeddedStore>) {
    Arc::try_unwrap(store)
        .unwrap_or_else(|_| panic!("the test holds the last handle"))
        .close()
        .await;
}

/// A leave that reached storage but not this node's member cache (a lost `ChannelChanged`)
/// must not let the leaver keep reading the member list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_is_authorised_from_storage_not_the_cache() {
    let node = TestNode::start().await;
    let (alice, _ae, _a) = node.user("alice").await;
    let (bob, mut bob_ev, b) = node.user("bob").await;
    let ch = alice.channel_create("general").await.expect("create");
    let id = ChannelId(ch.channel_id);
    bob.channel_join("general").await.expect("join");
    // A send fills the node's fan-out cache with [alice, bob].
    alice
        .send(ChatId::Channel(id), "hello", None)
        .await
        .expect("send");
    next_message(&mut bob_ev).await;
    assert_eq!(bob.channel_members(id).await.expect("members").len(), 2);

    // Bob leaves behind the node's back: storage changes, the cache does not.
    let store = EmbeddedStore::open_dir(node.dir.path()).expect("store");
    assert!(store.leave_channel(id, b.user).await.expect("leave"));
    assert_eq!(code_of(bob.channel_members(id).await), ErrorCode::Forbidden);
    assert_eq!(
        alice
            .channel_members(id)
            .await
            .expect("members")
            .into_iter()
            .map(|u| u.user_name)
            .collect::<Vec<_>>(),
        vec!["alice"]
    );
    store.close().await;
}

/// The sizes the issue saw fail with "reply too large" (over ~2k members, over ~1.3k
/// channels) now page: every page fits, the walk sees every row once, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_members_and_channels_are_paged() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let ch = alice.channel_create("big").await.expect("create");
    let id = ChannelId(ch.channel_id);
    let store = Arc::new(EmbeddedStore::open_dir(node.dir.path()).expect("store"));
    populate(&store, id, a.user, 2_500, 1_500, "m").await;

    let first = alice
        .channel_members_page(id, UserId(0), 0)
        .await
        .expect("first page");
    assert!(!first.members.is_empty() && first.members.len() <= 1_000);
    assert_eq!(
        first.next_cursor,
        first.members.last().expect("a member").user_id
    );
    let all = alice.channel_members(id).await.expect("all members");
    let ids: Vec<u64> = all.iter().map(|u| u.user_id).collect();
    assert_eq!(ids.len(), 2_501, "alice and 2,500 more");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
    assert!(
        all.iter().all(|u| !u.user_name.is_empty()),
        "names filled in"
    );

    // A small page is honoured, and its cursor continues where it stopped.
    let p = alice
        .channel_members_page(id, UserId(0), 7)
        .await
        .expect("page of 7");
    assert_eq!(p.members.len(), 7);
    let q = alice
        .channel_members_page(id, UserId(p.next_cursor), 7)
        .await
        .expect("next page");
    assert_eq!(
        q.members.iter().map(|u| u.user_id).collect::<Vec<_>>(),
        ids[7..14]
    );

    let chans = alice.channel_list().await.expect("all channels");
    assert_eq!(chans.len(), 1_501, "big and 1,500 more");
    assert!(chans.windows(2).all(|w| w[0].channel_id < w[1].channel_id));
    // The last page says it is the last.
    let last_after = chans[chans.len() - 2].channel_id;
    let last = alice
        .channel_list_page(ChannelId(last_after), 0)
        .await
        .expect("last page");
    assert_eq!(last.channels.len(), 1);
    assert_eq!(last.next_cursor, 0);
    close(store).await;
}

/// Pages are cut by bytes as well as by count: with 8 KiB frames a default page of 500
/// members or channels with 32-byte names cannot fit, and the node returns shorter pages
/// that still walk the whole list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_are_cut_to_fit_the_frame() {
    let node = TestNode::start_with(|c| {
        c.limits.max_frame_bytes = 8 * 1024;
        c.limits.max_body_bytes = 4 * 1024;
    })
    .await;
    let (alice, _ae, a) = node.user("alice").await;
    let ch = alice.channel_create("wide").await.expect("create");
    let id = ChannelId(ch.channel_id);
    let store = Arc::new(EmbeddedStore::open_dir(node.dir.path()).expect("store"));
    let tag = "a-long-name-of-twenty-six-";
    populate(&store, id, a.user, 600, 600, tag).await;

    let first = alice
        .channel_members_page(id, UserId(0), 0)
        .await
        .expect("first page");
    assert!(
        first.members.len() < 500 && first.next_cursor != 0,
        "{} members in an 8 KiB page",
        first.members.len()
    );
    assert_eq!(alice.channel_members(id).await.expect("all").len(), 601);
    let first = alice
        .channel_list_page(ChannelId(0), 0)
        .await
        .expect("first page");
    assert!(first.channels.len() < 500 && first.next_cursor != 0);
    assert_eq!(alice.channel_list().await.expect("all").len(), 601);
    close(store).await;
}

/// A message with 800 reactions used to make every history page holding it fail with
/// INTERNAL "reply too large", forever. Now history pages count reactions per emoji and a
/// page always holds at least one message and a cursor past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_800_reactions_still_pages() {
    use meshchat_proto::client::Direction;
    use meshchat_storage::HistoryStore;
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let ch = alice.channel_create("popular").await.expect("create");
    let chat = ChatId::Channel(ChannelId(ch.channel_id));
    let before = alice.send(chat, "before", None).await.expect("send");
    // A full-size body, so the reactions are what pushes the message past the frame.
    let body = "x".repeat(node.config.limits.max_body_bytes as usize);
    let hot = alice.send(chat, body, None).await.expect("send");
    let after = alice.send(chat, "after", None).await.expect("send");
    alice
        .react(chat, hot.message_id, "my-own-rare-one")
        .await
        .expect("react");
    let store = Arc::new(EmbeddedStore::open_dir(node.dir.path()).expect("store"));
    futures::stream::iter(0..800u64)
        .map(|n| {
            let store = store.clone();
            async move {
                // 400 kinds of 64-byte emoji, two reactions each.
                let emoji = format!("{:064}", n % 400);
                store
                    .react(
                        chat,
                        meshchat_idgen::MessageId(hot.message_id),
                        UserId((1 << 40) + n),
                        &emoji,
                    )
                    .await
                    .expect("react");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;

    let check = |m: &meshchat_proto::client::Message| {
        assert_eq!(m.message_id, hot.message_id);
        assert_eq!(m.reaction_total, 801);
        assert!(m.reaction_counts.len() <= 32);
        assert!(
            m.reaction_counts
                .iter()
                .any(|c| c.mine && c.emoji == "my-own-rare-one" && c.count == 1),
            "my reaction is counted and marked"
        );
        assert_eq!(
            m.reactions
                .iter()
                .map(|r| (r.user_id, r.emoji.as_str()))
                .collect::<Vec<_>>(),
            vec![(a.user.0, "my-own-rare-one")],
            "only my own reaction is listed"
        );
    };
    // Backward from the newest: the page may stop at the big message, with a cursor.
    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let page = alice
            .history(chat, cursor, Direction::Backward, 50)
            .await
            .expect("backward page");
        assert!(!page.messages.is_empty() || page.next_cursor == 0);
        for m in &page.messages {
            if m.message_id == hot.message_id {
                check(m);
            }
            seen.push(m.message_id);
        }
        if page.next_cursor == 0 {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(
        seen,
        vec![after.message_id, hot.message_id, before.message_id]
    );
    // A page that starts at the big message.
    let page = alice
        .history(chat, before.message_id, Direction::Forward, 50)
        .await
        .expect("forward page from the big message");
    check(&page.messages[0]);
    close(store).await;
}
