//! The backend contract: one suite of behaviour every [`Storage`] backend must show.
//!
//! A backend's test file implements [`Harness`] (how to open and close a store over the same
//! data) and invokes [`contract_tests!`](crate::contract_tests), which makes one `#[tokio::test]`
//! per contract below. The Cassandra backend runs the very same functions.
//!
//! Each contract uses fresh, randomly named users and channels, so several contracts may share
//! one keyspace or file.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use meshchat_idgen::{
    ChannelId, ChatId, Clock, Generator, ManualClock, MessageId, SystemClock, UserId,
};

use crate::error::StorageError;
use crate::model::{Direction, NewMessage, PageQuery, Reaction, ReceiptKind, StoredMessage};
use crate::traits::Storage;

/// How a contract opens and closes the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the store. Opening again after [`Harness::close`] reaches the same data.
    async fn open(&self) -> Arc<dyn Storage>;
    /// Closes a store, waiting for its queued writes to become durable.
    async fn close(&self, store: Arc<dyn Storage>);
}

/// Makes one `#[tokio::test]` per contract. `$harness` is an expression of a type that
/// implements [`Harness`], evaluated once per test; it may `return` early to skip.
///
/// `contract_tests!(#[ignore = "why"] harness)` marks every test ignored: the test runner
/// reports them as skipped (never as passed) unless ignored tests are asked for.
#[macro_export]
macro_rules! contract_tests {
    // Internal arms first: an `@...` input must never reach the `$harness:expr` matcher.
    (@each $attrs:tt $harness:expr; $($name:ident),* $(,)?) => {
        $( $crate::contract_tests!(@one $attrs $harness; $name); )*
    };
    (@one [$($attr:tt)*] $harness:expr; $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $name() {
            let harness = $harness;
            $crate::contract::$name(&harness).await;
        }
    };
    (@all $attrs:tt $harness:expr) => {
        $crate::contract_tests!(@each $attrs $harness;
            users_register_and_lookup,
            append_and_page_both_directions,
            append_is_idempotent_per_sender,
            replies_must_point_into_the_chat,
            reactions_set_replace_and_remove,
            chat_list_unread_and_marks,
            channels_membership,
            marks_need_membership,
            concurrent_writers_all_land,
            reopen_after_close_keeps_everything,
            paging_across_day_buckets,
            unread_across_day_buckets,
            idempotency_key_includes_the_chat,
            concurrent_claims_of_one_name,
            concurrent_appends_of_one_client_msg_id,
            repeated_join_keeps_marks_and_rejoin_skips_backlog,
            member_counts_follow_joins_and_leaves,
            member_and_channel_pages_walk_by_cursor,
            private_channels_and_admins,
            sign_outs_and_password_changes,
            direct_peers_are_the_other_users_of_my_direct_chats,
        );
    };
    (#[ignore = $why:literal] $harness:expr) => {
        $crate::contract_tests!(@all [#[ignore = $why]] $harness);
    };
    ($harness:expr) => {
        $crate::contract_tests!(@all [] $harness);
    };
}

static NEXT_WORKER: AtomicU64 = AtomicU64::new(0);

/// One day of Snowflake milliseconds: the default history bucket width of the Cassandra
/// backend, so messages a day apart land in different partitions.
pub const DAY_MS: u64 = 86_400_000;

/// Fresh ids and names for one contract run.
///
/// User, channel and client ids come from the real clock (unique across runs sharing a
/// store). Message ids come from an injected clock that starts 60 days in the past and only
/// moves when told to (plus one millisecond per id), so a contract decides which day bucket
/// each message lands in.
struct Ids {
    generator: Generator,
    clock: Arc<ManualClock>,
    messages: Generator<Arc<ManualClock>>,
    tag: String,
}

impl Ids {
    fn new() -> Self {
        let worker =
            (std::process::id() as u64 + NEXT_WORKER.fetch_add(1, Ordering::Relaxed)) % 1024;
        let generator = Generator::new(worker as u16).expect("worker id in range");
        let tag = format!("{:x}", generator.next_id().expect("id").0);
        let now = SystemClock.now_unix_ms();
        let clock = Arc::new(ManualClock::new(now - 60 * DAY_MS));
        let messages =
            Generator::with_clock(worker as u16, clock.clone()).expect("worker id in range");
        Self {
            generator,
            clock,
            messages,
            tag,
        }
    }
    fn id(&self) -> u64 {
        self.generator.next_id().expect("clock in range").0
    }
    fn message_id(&self) -> MessageId {
        self.clock.advance(1);
        MessageId(self.messages.next_id().expect("clock in range").0)
    }
    /// Moves the message clock forwards by `days` days.
    fn advance_days(&self, days: u64) {
        self.clock.advance(days * DAY_MS);
    }
    fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.tag)
    }
    async fn user(&self, s: &dyn Storage, base: &str) -> UserId {
        let id = UserId(self.id());
        s.create_user(id, &self.name(base), "$argon2id$test")
            .await
            .expect("create user");
        id
    }
    fn msg(&self, chat: ChatId, sender: UserId, text: &str) -> NewMessage {
        NewMessage {
            id: self.message_id(),
            chat,
            sender,
            client_msg_id: format!("c-{}", self.id()),
            body: Bytes::from(text.to_owned()),
            reply_to: None,
        }
    }
}

/// The day (bucket of the default width) of a message id.
fn day_of(id: MessageId) -> u64 {
    id.snowflake().ms_since_epoch() / DAY_MS
}

/// Every message of `chat`, paged in `direction` with pages of `limit`, checking each page's
/// order and size on the way.
async fn all_pages(
    s: &dyn Storage,
    chat: ChatId,
    direction: Direction,
    limit: u32,
) -> Vec<MessageId> {
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .page(
                chat,
                PageQuery {
                    cursor,
                    direction,
                    limit,
                },
            )
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= limit as usize, "page above its limit");
        match direction {
            Direction::Backward => assert!(page.windows(2).all(|w| w[0].id > w[1].id)),
            Direction::Forward => assert!(page.windows(2).all(|w| w[0].id < w[1].id)),
        }
        cursor = page.last().map(|m| m.id);
        seen.extend(page.iter().map(|m| m.id));
        assert!(seen.len() < 100_000, "paging does not end");
    }
    seen
}

fn texts(page: &[StoredMessage]) -> Vec<String> {
    page.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// Users: register, look up by name and id, duplicate names refused, bad names refused.
pub async fn users_register_and_lookup(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let alice = ids.user(&*s, "alice").await;
    let creds = s
        .user_by_name(&ids.name("alice"))
        .await
        .expect("lookup")
        .expect("alice exists");
    assert_eq!(creds.user.id, alice);
    assert_eq!(creds.password_hash, "$argon2id$test");
    assert_eq!(
        s.user_by_id(alice).await.expect("lookup").map(|u| u.name),
        Some(ids.name("alice"))
    );
    match s
        .create_user(UserId(ids.id()), &ids.name("alice"), "x")
        .await
    {
        Err(StorageError::UserExists(n)) => assert_eq!(n, ids.name("alice")),
        other => panic!("expected UserExists, got {other:?}"),
    }
    assert!(matches!(
        s.create_user(UserId(ids.id()), "", "x").await,
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(
        s.user_by_name(&ids.name("nobody"))
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        s.user_by_id(UserId(ids.id()))
            .await
            .expect("lookup")
            .is_none()
    );
    h.close(s).await;
}

/// History: pages in both directions, exclusive cursors, ordered by id, no gaps or repeats.
pub async fn append_and_page_both_directions(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let mut sent = Vec::new();
    for n in 0..30 {
        let m = ids.msg(chat, if n % 2 == 0 { a } else { b }, &format!("m{n}"));
        sent.push(m.id);
        let out = s.append(m).await.expect("append");
        assert!(!out.duplicate);
    }
    // Backward from the newest in pages of 7.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .page(
                chat,
                PageQuery {
                    cursor,
                    direction: Direction::Backward,
                    limit: 7,
                },
            )
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        assert!(page.windows(2).all(|w| w[0].id > w[1].id), "newest first");
        cursor = page.last().map(|m| m.id);
        seen.extend(page.iter().map(|m| m.id));
    }
    let mut expect = sent.clone();
    expect.reverse();
    assert_eq!(seen, expect, "backward paging returns every message once");
    // Forward from the oldest.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .page(
                chat,
                PageQuery {
                    cursor,
                    direction: Direction::Forward,
                    limit: 8,
                },
            )
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
        cursor = page.last().map(|m| m.id);
        seen.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(seen, sent, "forward paging returns every message once");
    // A cursor in the middle is exclusive.
    let mid = sent[10];
    let after = s
        .page(
            chat,
            PageQuery {
                cursor: Some(mid),
                direction: Direction::Forward,
                limit: 2,
            },
        )
        .await
        .expect("page");
    assert_eq!(texts(&after), vec!["m11", "m12"]);
    let before = s
        .page(
            chat,
            PageQuery {
                cursor: Some(mid),
                direction: Direction::Backward,
                limit: 2,
            },
        )
        .await
        .expect("page");
    assert_eq!(texts(&before), vec!["m9", "m8"]);
    // Fields survive the round trip.
    let one = s
        .message(chat, sent[3])
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(one.sender, b);
    assert_eq!(one.chat, chat);
    assert_eq!(&one.body[..], b"m3");
    // Another chat sees none of it.
    let other = ChatId::direct(a, UserId(ids.id()));
    assert!(
        s.page(
            other,
            PageQuery {
                cursor: None,
                direction: Direction::Backward,
                limit: 10
            }
        )
        .await
        .expect("page")
        .is_empty()
    );
    h.close(s).await;
}

/// A retried send (same sender and client message id) returns the first id, stores nothing.
pub async fn append_is_idempotent_per_sender(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let first = ids.msg(chat, a, "hello");
    let first_id = first.id;
    let mut retry = first.clone();
    retry.id = ids.message_id();
    assert_eq!(
        s.append(first).await.expect("append").id,
        first_id,
        "first append stores under its own id"
    );
    let again = s.append(retry).await.expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.id, first_id);
    // The same client id from another sender is a different message.
    let mut from_b = ids.msg(chat, b, "hi");
    from_b.client_msg_id = format!("c-{}", first_id.0);
    let mut twin = ids.msg(chat, a, "x");
    twin.client_msg_id = from_b.client_msg_id.clone();
    assert!(!s.append(from_b).await.expect("append").duplicate);
    assert!(!s.append(twin).await.expect("append").duplicate);
    let all = s
        .page(
            chat,
            PageQuery {
                cursor: None,
                direction: Direction::Forward,
                limit: 100,
            },
        )
        .await
        .expect("page");
    assert_eq!(texts(&all), vec!["hello", "hi", "x"]);
    h.close(s).await;
}

/// Replies point at a message of the same chat; anything else is `UnknownMessage`.
pub async fn replies_must_point_into_the_chat(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
    );
    let ab = ChatId::direct(a, b);
    let ac = ChatId::direct(a, c);
    let root = s.append(ids.msg(ab, a, "root")).await.expect("append").id;
    let mut reply = ids.msg(ab, b, "re: root");
    reply.reply_to = Some(root);
    let reply_id = s.append(reply).await.expect("reply").id;
    assert_eq!(
        s.message(ab, reply_id)
            .await
            .expect("get")
            .expect("exists")
            .reply_to,
        Some(root)
    );
    let mut stray = ids.msg(ac, c, "re: something elsewhere");
    stray.reply_to = Some(root);
    assert!(matches!(
        s.append(stray).await,
        Err(StorageError::UnknownMessage { .. })
    ));
    h.close(s).await;
}

/// Reactions: one per user per message, replaced by a new one, removable; unknown messages
/// are refused.
pub async fn reactions_set_replace_and_remove(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let m = s
        .append(ids.msg(chat, a, "react to me"))
        .await
        .expect("append")
        .id;
    s.react(chat, m, b, "👍").await.expect("react");
    s.react(chat, m, a, "🎉").await.expect("react");
    s.react(chat, m, b, "❤️").await.expect("replace");
    let mut got = s
        .message(chat, m)
        .await
        .expect("get")
        .expect("exists")
        .reactions;
    got.sort();
    let mut want = vec![
        Reaction {
            user: a,
            emoji: "🎉".into(),
        },
        Reaction {
            user: b,
            emoji: "❤️".into(),
        },
    ];
    want.sort();
    assert_eq!(got, want);
    assert!(s.unreact(chat, m, a).await.expect("unreact"));
    assert!(
        !s.unreact(chat, m, a)
            .await
            .expect("second unreact is a no-op")
    );
    let page = s
        .page(
            chat,
            PageQuery {
                cursor: None,
                direction: Direction::Backward,
                limit: 5,
            },
        )
        .await
        .expect("page");
    assert_eq!(page[0].reactions.len(), 1, "pages carry reactions too");
    assert!(matches!(
        s.react(chat, ids.message_id(), a, "👍").await,
        Err(StorageError::UnknownMessage { .. })
    ));
    assert!(matches!(
        s.react(chat, m, a, "").await,
        Err(StorageError::InvalidArgument(_))
    ));
    h.close(s).await;
}

/// Chat lists: newest first, unread counts from the seen mark, marks only move forwards, and
/// the sender sees the peer's marks.
pub async fn chat_list_unread_and_marks(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
    );
    let ab = ChatId::direct(a, b);
    let cb = ChatId::direct(c, b);
    let mut to_b = Vec::new();
    for n in 0..3 {
        to_b.push(
            s.append(ids.msg(ab, a, &format!("a{n}")))
                .await
                .expect("append")
                .id,
        );
    }
    s.append(ids.msg(cb, c, "from c")).await.expect("append");
    let list = s.chat_list(b, 50).await.expect("chat list");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].chat, cb, "most recently active first");
    assert_eq!(list[0].title, ids.name("c"));
    assert_eq!(list[1].chat, ab);
    assert_eq!(list[1].unread, 3);
    assert_eq!(list[1].newest.as_ref().map(|m| m.id), Some(to_b[2]));
    // b's own message is never unread for b.
    s.append(ids.msg(ab, b, "reply")).await.expect("append");
    let marks = s
        .mark(b, ab, ReceiptKind::Delivered, to_b[2])
        .await
        .expect("delivered");
    assert_eq!(marks.delivered, to_b[2]);
    assert_eq!(marks.seen, MessageId(0));
    let marks = s
        .mark(b, ab, ReceiptKind::Seen, to_b[1])
        .await
        .expect("seen");
    assert_eq!(marks.seen, to_b[1]);
    assert_eq!(
        marks.delivered, to_b[2],
        "seen never moves delivered backwards"
    );
    let back = s
        .mark(b, ab, ReceiptKind::Seen, to_b[0])
        .await
        .expect("seen");
    assert_eq!(back.seen, to_b[1], "marks never move backwards");
    let list = s.chat_list(b, 50).await.expect("chat list");
    let row = list.iter().find(|r| r.chat == ab).expect("ab listed");
    assert_eq!(row.unread, 1, "one message from a after the seen mark");
    // The sender sees the recipient's marks.
    let a_list = s.chat_list(a, 50).await.expect("chat list");
    let a_row = a_list
        .iter()
        .find(|r| r.chat == ab)
        .expect("ab listed for a");
    assert_eq!(
        a_row.peer.map(|p| (p.delivered, p.seen)),
        Some((to_b[2], to_b[1]))
    );
    assert_eq!(a_row.unread, 1, "b's reply is unread for a");
    assert_eq!(a_row.title, ids.name("b"));
    // Limit applies.
    assert_eq!(s.chat_list(b, 1).await.expect("chat list").len(), 1);
    assert!(matches!(
        s.mark(b, ab, ReceiptKind::Seen, ids.message_id()).await,
        Err(StorageError::UnknownMessage { .. })
    ));
    h.close(s).await;
}

/// Channels: create (unique names), join, leave, members, a user's channels, membership.
pub async fn channels_membership(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
    );
    let ch = ChannelId(ids.id());
    let created = s
        .create_channel(ch, &ids.name("general"), a)
        .await
        .expect("create");
    assert_eq!(created.member_count, 1);
    assert!(matches!(
        s.create_channel(ChannelId(ids.id()), &ids.name("general"), b)
            .await,
        Err(StorageError::ChannelExists(_))
    ));
    assert!(s.join_channel(ch, b).await.expect("join"));
    assert!(!s.join_channel(ch, b).await.expect("join twice is a no-op"));
    assert!(s.join_channel(ch, c).await.expect("join"));
    let mut members = s.channel_members(ch).await.expect("members");
    members.sort();
    let mut want = vec![a, b, c];
    want.sort();
    assert_eq!(members, want);
    assert_eq!(
        s.channel_by_name(&ids.name("general"))
            .await
            .expect("by name")
            .map(|c| (c.id, c.member_count)),
        Some((ch, 3))
    );
    assert!(s.leave_channel(ch, c).await.expect("leave"));
    assert!(
        !s.leave_channel(ch, c)
            .await
            .expect("leave twice is a no-op")
    );
    let chat = ChatId::Channel(ch);
    assert!(s.is_member(b, chat).await.expect("member"));
    assert!(!s.is_member(c, chat).await.expect("member"));
    assert_eq!(
        s.channels_of(b)
            .await
            .expect("mine")
            .iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![ch]
    );
    assert!(s.channels_of(c).await.expect("mine").is_empty());
    // Channel history and chat lists.
    let m = s
        .append(ids.msg(chat, a, "hello channel"))
        .await
        .expect("append")
        .id;
    let b_list = s.chat_list(b, 10).await.expect("list");
    let row = b_list
        .iter()
        .find(|r| r.chat == chat)
        .expect("channel listed");
    assert_eq!(row.unread, 1);
    assert_eq!(row.title, ids.name("general"));
    assert_eq!(row.newest.as_ref().map(|m| m.id), Some(m));
    assert!(row.peer.is_none());
    // A member who joins later starts with the backlog marked seen: no "999+ unread", and no
    // gap fill of the whole history.
    let d = ids.user(&*s, "d").await;
    s.join_channel(ch, d).await.expect("join");
    let d_rows = s.chat_list(d, 10).await.expect("list");
    assert_eq!(d_rows[0].unread, 0);
    assert_eq!(d_rows[0].mine.seen, m);
    assert_eq!(d_rows[0].mine.delivered, m);
    // Unknown channels are errors, not empty answers.
    let nope = ChannelId(ids.id());
    assert!(matches!(
        s.join_channel(nope, a).await,
        Err(StorageError::UnknownChannel(_))
    ));
    assert!(matches!(
        s.leave_channel(nope, a).await,
        Err(StorageError::UnknownChannel(_))
    ));
    assert!(matches!(
        s.channel_members(nope).await,
        Err(StorageError::UnknownChannel(_))
    ));
    assert!(s.channel(nope).await.expect("lookup").is_none());
    assert!(matches!(
        s.join_channel(ch, UserId(ids.id())).await,
        Err(StorageError::UnknownUser(_))
    ));
    h.close(s).await;
}

/// Receipts from a user outside the chat are refused.
pub async fn marks_need_membership(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
    );
    let ab = ChatId::direct(a, b);
    let m = s
        .append(ids.msg(ab, a, "private"))
        .await
        .expect("append")
        .id;
    assert!(matches!(
        s.mark(c, ab, ReceiptKind::Seen, m).await,
        Err(StorageError::NotMember { .. })
    ));
    assert!(!s.is_member(c, ab).await.expect("member"));
    assert!(s.is_member(b, ab).await.expect("member"));
    let ch = ChannelId(ids.id());
    s.create_channel(ch, &ids.name("club"), a)
        .await
        .expect("create");
    let cm = s
        .append(ids.msg(ChatId::Channel(ch), a, "members only"))
        .await
        .expect("append")
        .id;
    assert!(matches!(
        s.mark(b, ChatId::Channel(ch), ReceiptKind::Delivered, cm)
            .await,
        Err(StorageError::NotMember { .. })
    ));
    h.close(s).await;
}

/// Many concurrent writers: every append returns, every message is there, ids unique.
pub async fn concurrent_writers_all_land(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Arc::new(Ids::new());
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let mut tasks = Vec::new();
    for w in 0..64 {
        let s = s.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..8 {
                let m = ids.msg(chat, if w % 2 == 0 { a } else { b }, &format!("{w}/{n}"));
                mine.push(s.append(m).await.expect("append").id);
            }
            mine
        }));
    }
    let mut acked = HashSet::new();
    for t in tasks {
        for id in t.await.expect("task") {
            assert!(acked.insert(id));
        }
    }
    let stored: HashSet<MessageId> = s
        .page(
            chat,
            PageQuery {
                cursor: None,
                direction: Direction::Forward,
                limit: 10_000,
            },
        )
        .await
        .expect("page")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(stored, acked);
    h.close(s).await;
}

/// Close and reopen: everything written before the close is there.
pub async fn reopen_after_close_keeps_everything(h: &dyn Harness) {
    let ids = Ids::new();
    let s = h.open().await;
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let m = s
        .append(ids.msg(chat, a, "before close"))
        .await
        .expect("append")
        .id;
    s.react(chat, m, b, "👀").await.expect("react");
    s.mark(b, chat, ReceiptKind::Seen, m).await.expect("mark");
    let ch = ChannelId(ids.id());
    s.create_channel(ch, &ids.name("persist"), a)
        .await
        .expect("create");
    h.close(s).await;

    let s = h.open().await;
    let got = s.message(chat, m).await.expect("get").expect("still there");
    assert_eq!(&got.body[..], b"before close");
    assert_eq!(got.reactions.len(), 1);
    let list = s.chat_list(b, 10).await.expect("list");
    assert_eq!(list[0].mine.seen, m);
    assert_eq!(
        s.channel(ch).await.expect("channel").map(|c| c.owner),
        Some(a)
    );
    assert!(
        s.user_by_name(&ids.name("a"))
            .await
            .expect("user")
            .is_some()
    );
    h.close(s).await;
}

/// History spread over several day buckets, with empty days between them: paging both ways
/// with page sizes that end inside, at and across bucket boundaries returns every message once,
/// in order; cursors in empty days and exactly on a bucket's first or last message work.
pub async fn paging_across_day_buckets(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    // Messages per active day, and empty days after each: more active days than a backend
    // might read bucket lists at once (the Cassandra backend reads 8).
    let plan: [(usize, u64); 12] = [
        (3, 1),
        (1, 4),
        (5, 1),
        (2, 0),
        (4, 9),
        (1, 1),
        (1, 0),
        (2, 2),
        (1, 0),
        (3, 30),
        (1, 0),
        (2, 1),
    ];
    let mut sent = Vec::new();
    let mut firsts = Vec::new();
    let mut empty_day_ids = Vec::new();
    for (n, (count, gap)) in plan.iter().enumerate() {
        for k in 0..*count {
            let m = ids.msg(chat, if k % 2 == 0 { a } else { b }, &format!("d{n}/{k}"));
            if k == 0 {
                firsts.push(m.id);
            }
            sent.push(m.id);
            assert!(!s.append(m).await.expect("append").duplicate);
        }
        ids.advance_days(1);
        if *gap > 0 {
            // An id from an empty day (never stored): a cursor there must still work.
            empty_day_ids.push(ids.message_id());
            ids.advance_days(*gap);
        }
    }
    let days: HashSet<u64> = sent.iter().map(|m| day_of(*m)).collect();
    assert_eq!(days.len(), plan.len(), "one day bucket per group");
    let mut newest_first = sent.clone();
    newest_first.reverse();
    for limit in [1, 2, 3, 4, 5, 7, 16, 100] {
        assert_eq!(
            all_pages(&*s, chat, Direction::Backward, limit).await,
            newest_first,
            "backward, pages of {limit}"
        );
        assert_eq!(
            all_pages(&*s, chat, Direction::Forward, limit).await,
            sent,
            "forward, pages of {limit}"
        );
    }
    let page = |cursor: MessageId, direction: Direction, limit: u32| {
        let s = s.clone();
        async move {
            s.page(
                chat,
                PageQuery {
                    cursor: Some(cursor),
                    direction,
                    limit,
                },
            )
            .await
            .expect("page")
            .into_iter()
            .map(|m| m.id)
            .collect::<Vec<_>>()
        }
    };
    // Cursors on a bucket's first message cross into the previous bucket and stay exclusive.
    for first in &firsts {
        let at = sent.iter().position(|m| m == first).expect("sent");
        let want_back: Vec<MessageId> = sent[..at].iter().rev().take(3).copied().collect();
        assert_eq!(page(*first, Direction::Backward, 3).await, want_back);
        let want_fwd: Vec<MessageId> = sent[at + 1..].iter().take(3).copied().collect();
        assert_eq!(page(*first, Direction::Forward, 3).await, want_fwd);
    }
    // Cursors in empty days.
    for gap_id in &empty_day_ids {
        let below: Vec<MessageId> = sent
            .iter()
            .rev()
            .filter(|m| *m < gap_id)
            .take(4)
            .copied()
            .collect();
        let above: Vec<MessageId> = sent
            .iter()
            .filter(|m| *m > gap_id)
            .take(4)
            .copied()
            .collect();
        assert_eq!(page(*gap_id, Direction::Backward, 4).await, below);
        assert_eq!(page(*gap_id, Direction::Forward, 4).await, above);
    }
    // Past either end: nothing.
    assert!(page(sent[0], Direction::Backward, 5).await.is_empty());
    let last = *sent.last().expect("sent");
    assert!(page(last, Direction::Forward, 5).await.is_empty());
    // The newest message is listed even though older days hold more messages, and unread
    // counts cover every day.
    let list = s.chat_list(a, 10).await.expect("chat list");
    assert_eq!(list[0].newest.as_ref().map(|m| m.id), Some(last));
    let from_b = plan.iter().map(|(n, _)| n / 2).sum::<usize>() as u32;
    let from_a = sent.len() as u32 - from_b;
    assert_eq!(list[0].unread, from_b);
    let list = s.chat_list(b, 10).await.expect("chat list");
    assert_eq!(list[0].unread, from_a);
    h.close(s).await;
}

/// Unread counts when the seen mark is days behind the newest message: counted across
/// buckets, from both participants' side, never counting one's own messages.
pub async fn unread_across_day_buckets(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let send = |from: UserId, text: String| {
        let s = s.clone();
        let m = ids.msg(chat, from, &text);
        async move { s.append(m).await.expect("append").id }
    };
    let unread = |user: UserId| {
        let s = s.clone();
        async move {
            let list = s.chat_list(user, 10).await.expect("chat list");
            let row = list.iter().find(|r| r.chat == chat).expect("chat listed");
            (row.unread, row.mine)
        }
    };
    // Day 0: a sends 2, b sends 1.
    let a0 = send(a, "a0".into()).await;
    let _a1 = send(a, "a1".into()).await;
    let b0 = send(b, "b0".into()).await;
    ids.advance_days(3);
    // Day 3: a sends 3.
    let mut day3 = Vec::new();
    for n in 0..3 {
        day3.push(send(a, format!("a3/{n}")).await);
    }
    ids.advance_days(2);
    // Day 5: b sends 2, a sends 1.
    let b5 = send(b, "b5/0".into()).await;
    send(b, "b5/1".into()).await;
    let a5 = send(a, "a5".into()).await;
    assert_eq!(
        unread(b).await.0,
        6,
        "b: every message of a, over three days"
    );
    assert_eq!(unread(a).await.0, 3, "a: every message of b, over two days");
    // b has seen up to a0 (day 0): a1 and the 4 later ones of a are unread.
    s.mark(b, chat, ReceiptKind::Seen, a0).await.expect("mark");
    assert_eq!(unread(b).await, (5, marks(a0, a0)));
    // b has seen up to the middle of day 3.
    s.mark(b, chat, ReceiptKind::Seen, day3[1])
        .await
        .expect("mark");
    assert_eq!(unread(b).await.0, 2, "a3/2 and a5");
    // a has seen b0 (day 0): b's 2 messages of day 5 are unread, a's own are not.
    s.mark(a, chat, ReceiptKind::Seen, b0).await.expect("mark");
    assert_eq!(unread(a).await.0, 2);
    // A seen mark on a message of one's own counts from there.
    s.mark(a, chat, ReceiptKind::Seen, b5).await.expect("mark");
    assert_eq!(unread(a).await.0, 1);
    s.mark(b, chat, ReceiptKind::Seen, a5).await.expect("mark");
    assert_eq!(unread(b).await, (0, marks(a5, a5)));
    h.close(s).await;
}

fn marks(delivered: MessageId, seen: MessageId) -> crate::model::Marks {
    crate::model::Marks { delivered, seen }
}

/// The idempotency key is (sender, chat, client message id): the same client id in another
/// chat is another message, stored in that chat; a retry in either chat finds its own.
pub async fn idempotency_key_includes_the_chat(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
    );
    let ab = ChatId::direct(a, b);
    let ac = ChatId::direct(a, c);
    let ch = ChannelId(ids.id());
    s.create_channel(ch, &ids.name("idem"), a)
        .await
        .expect("create");
    let key = format!("c-{}", ids.id());
    let mut firsts = Vec::new();
    for (chat, text) in [(ab, "to b"), (ac, "to c"), (ChatId::Channel(ch), "to all")] {
        let mut m = ids.msg(chat, a, text);
        m.client_msg_id = key.clone();
        let id = m.id;
        let out = s.append(m).await.expect("append");
        assert_eq!(
            (out.id, out.duplicate),
            (id, false),
            "{text}: a new message"
        );
        firsts.push((chat, id, text));
    }
    for (chat, id, text) in &firsts {
        let got = s.message(*chat, *id).await.expect("get").expect("stored");
        assert_eq!(
            &got.body[..],
            text.as_bytes(),
            "each chat keeps its own body"
        );
        let mut retry = ids.msg(*chat, a, "retry");
        retry.client_msg_id = key.clone();
        let out = s.append(retry).await.expect("retry");
        assert_eq!(
            (out.id, out.duplicate),
            (*id, true),
            "{text}: retry finds its own"
        );
        let page = s
            .page(
                *chat,
                PageQuery {
                    cursor: None,
                    direction: Direction::Forward,
                    limit: 10,
                },
            )
            .await
            .expect("page");
        assert_eq!(
            texts(&page),
            vec![text.to_string()],
            "nothing else in {chat}"
        );
    }
    h.close(s).await;
}

/// Concurrent registrations of one user name (and creations of one channel name): exactly
/// one wins, the rest get `UserExists` / `ChannelExists`, and the name leads to the winner.
pub async fn concurrent_claims_of_one_name(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Arc::new(Ids::new());
    let name = ids.name("contested");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, id, name) = (s.clone(), UserId(ids.id()), name.clone());
        tasks.push(tokio::spawn(async move {
            (id, s.create_user(id, &name, "$argon2id$x").await)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (id, Ok(user)) => {
                assert_eq!((user.id, user.name.as_str()), (id, name.as_str()));
                winners.push(id);
            }
            (id, Err(StorageError::UserExists(n))) => {
                assert_eq!(n, name);
                losers.push(id);
            }
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one registration wins");
    let winner = winners[0];
    let creds = s
        .user_by_name(&name)
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!(creds.user.id, winner);
    assert!(s.user_by_id(winner).await.expect("lookup").is_some());
    for id in losers {
        assert!(
            s.user_by_id(id).await.expect("lookup").is_none(),
            "a loser left a user"
        );
    }
    // Channels.
    let cname = ids.name("contested-channel");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, id, cname) = (s.clone(), ChannelId(ids.id()), cname.clone());
        tasks.push(tokio::spawn(async move {
            (id, s.create_channel(id, &cname, winner).await)
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (id, Ok(ch)) => {
                assert_eq!(ch.id, id);
                won.push(id);
            }
            (_, Err(StorageError::ChannelExists(n))) => assert_eq!(n, cname),
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one channel creation wins");
    let ch = s
        .channel_by_name(&cname)
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!((ch.id, ch.owner, ch.member_count), (won[0], winner, 1));
    assert_eq!(
        s.channels_of(winner)
            .await
            .expect("mine")
            .iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![won[0]]
    );
    h.close(s).await;
}

/// Concurrent appends of one (sender, chat, client message id), each with its own message id
/// (retries racing through different nodes): all succeed, exactly one stores, all return its
/// id, and the chat holds one message.
pub async fn concurrent_appends_of_one_client_msg_id(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Arc::new(Ids::new());
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let chat = ChatId::direct(a, b);
    let template = ids.msg(chat, a, "once");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut m = template.clone();
        m.id = ids.message_id();
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { s.append(m).await.expect("append") },
        ));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    let fresh: Vec<_> = outcomes.iter().filter(|o| !o.duplicate).collect();
    assert_eq!(fresh.len(), 1, "exactly one append stores: {outcomes:?}");
    let id = fresh[0].id;
    assert!(
        outcomes.iter().all(|o| o.id == id),
        "all return one id: {outcomes:?}"
    );
    let page = s
        .page(
            chat,
            PageQuery {
                cursor: None,
                direction: Direction::Forward,
                limit: 100,
            },
        )
        .await
        .expect("page");
    assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(texts(&page), vec!["once"]);
    h.close(s).await;
}

/// A repeated join changes nothing (the member's marks stay where they are); leaving and
/// joining again starts the member with the backlog seen again.
pub async fn repeated_join_keeps_marks_and_rejoin_skips_backlog(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b) = (ids.user(&*s, "a").await, ids.user(&*s, "b").await);
    let ch = ChannelId(ids.id());
    let chat = ChatId::Channel(ch);
    s.create_channel(ch, &ids.name("rejoin"), a)
        .await
        .expect("create");
    // b joins an empty channel: nothing to mark, nothing unread.
    assert!(s.join_channel(ch, b).await.expect("join"));
    let row = |user: UserId| {
        let s = s.clone();
        async move {
            let list = s.chat_list(user, 10).await.expect("list");
            list.into_iter().find(|r| r.chat == chat)
        }
    };
    assert_eq!(row(b).await.expect("listed").unread, 0);
    let m1 = s.append(ids.msg(chat, a, "one")).await.expect("append").id;
    ids.advance_days(2);
    let m2 = s.append(ids.msg(chat, a, "two")).await.expect("append").id;
    assert_eq!(row(b).await.expect("listed").unread, 2);
    // A repeated join is a no-op: the two messages stay unread.
    assert!(!s.join_channel(ch, b).await.expect("join again"));
    let r = row(b).await.expect("listed");
    assert_eq!((r.unread, r.mine), (2, marks(MessageId(0), MessageId(0))));
    s.mark(b, chat, ReceiptKind::Seen, m1).await.expect("mark");
    assert!(!s.join_channel(ch, b).await.expect("join again"));
    let r = row(b).await.expect("listed");
    assert_eq!((r.unread, r.mine), (1, marks(m1, m1)));
    // Leave: gone from the list; rejoin: the backlog counts as seen.
    assert!(s.leave_channel(ch, b).await.expect("leave"));
    assert!(row(b).await.is_none());
    ids.advance_days(1);
    let m3 = s
        .append(ids.msg(chat, a, "three"))
        .await
        .expect("append")
        .id;
    assert!(s.join_channel(ch, b).await.expect("rejoin"));
    let r = row(b).await.expect("listed again");
    assert_eq!((r.unread, r.mine), (0, marks(m3, m3)));
    assert!(m2 < m3);
    h.close(s).await;
}

/// A private channel says so (a public one does not); the owner is an admin, a member is one
/// only once made so, a non-member cannot be made one, and leaving ends the role.
pub async fn private_channels_and_admins(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (owner, m, x) = (
        ids.user(&*s, "o").await,
        ids.user(&*s, "m").await,
        ids.user(&*s, "x").await,
    );
    let (private, public) = (ChannelId(ids.id()), ChannelId(ids.id()));
    let created = s
        .create_channel_with(private, &ids.name("secret"), owner, true)
        .await
        .expect("create private");
    assert!(created.private);
    let read = |id: ChannelId| {
        let s = s.clone();
        async move { s.channel(id).await.expect("read").expect("exists") }
    };
    assert!(read(private).await.private);
    let by_name = s
        .channel_by_name(&ids.name("secret"))
        .await
        .expect("by name")
        .expect("exists");
    assert!(by_name.private);
    s.create_channel(public, &ids.name("open"), owner)
        .await
        .expect("create public");
    assert!(!read(public).await.private);
    // Listed with their visibility.
    let mine = s.channels_of(owner).await.expect("mine");
    assert_eq!(
        mine.iter()
            .map(|c| (c.id, c.private))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([(private, true), (public, false)])
    );

    assert!(s.is_channel_admin(private, owner).await.expect("owner"));
    assert!(s.join_channel(private, m).await.expect("add m"));
    assert!(!s.is_channel_admin(private, m).await.expect("member"));
    assert!(
        s.set_channel_admin(private, m, true)
            .await
            .expect("promote")
    );
    assert!(s.is_channel_admin(private, m).await.expect("admin now"));
    // Not a member: nothing changes.
    assert!(
        !s.set_channel_admin(private, x, true)
            .await
            .expect("non-member")
    );
    assert!(!s.is_channel_admin(private, x).await.expect("still not"));
    // Demote, promote again, then leave: rejoining makes a plain member.
    assert!(
        s.set_channel_admin(private, m, false)
            .await
            .expect("demote")
    );
    assert!(!s.is_channel_admin(private, m).await.expect("demoted"));
    assert!(
        s.set_channel_admin(private, m, true)
            .await
            .expect("promote")
    );
    assert!(s.leave_channel(private, m).await.expect("leave"));
    assert!(s.join_channel(private, m).await.expect("rejoin"));
    assert!(!s.is_channel_admin(private, m).await.expect("role ended"));
    // Unknown channels.
    let nowhere = ChannelId(ids.id());
    assert!(matches!(
        s.is_channel_admin(nowhere, owner).await,
        Err(StorageError::UnknownChannel(_))
    ));
    assert!(matches!(
        s.set_channel_admin(nowhere, owner, true).await,
        Err(StorageError::UnknownChannel(_))
    ));
    h.close(s).await;
}

/// A password hash is replaced where logins read it; a sign-out time starts at 0, only moves
/// forward, and is per user; unknown users are named.
pub async fn sign_outs_and_password_changes(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let a = ids.user(&*s, "a").await;
    let b = ids.user(&*s, "b").await;
    let name = s.user_by_id(a).await.expect("read").expect("a").name;
    let old = s
        .user_by_name(&name)
        .await
        .expect("read")
        .expect("a")
        .password_hash;
    assert!(
        s.set_password_hash(a, &name, &old, "new-hash")
            .await
            .expect("set")
    );
    let creds = s.user_by_name(&name).await.expect("read").expect("a");
    assert_eq!(
        (creds.user.id, creds.password_hash.as_str()),
        (a, "new-hash")
    );
    // A second change from the same old hash loses: compare-and-set.
    assert!(
        !s.set_password_hash(a, &name, &old, "other")
            .await
            .expect("cas")
    );
    assert_eq!(
        s.user_by_name(&name)
            .await
            .expect("read")
            .expect("a")
            .password_hash,
        "new-hash"
    );
    assert_eq!(s.signed_out_before(a).await.expect("read"), 0);
    s.sign_out_before(a, 2_000_000_000).await.expect("sign out");
    assert_eq!(s.signed_out_before(a).await.expect("read"), 2_000_000_000);
    // Never back.
    s.sign_out_before(a, 1_000_000_000).await.expect("earlier");
    assert_eq!(s.signed_out_before(a).await.expect("read"), 2_000_000_000);
    assert_eq!(s.signed_out_before(b).await.expect("read"), 0);
    let nobody = UserId(ids.id());
    assert!(matches!(
        s.sign_out_before(nobody, 1).await,
        Err(StorageError::UnknownUser(_))
    ));
    assert!(matches!(
        s.set_password_hash(nobody, "nobody-here", "h", "h2").await,
        Err(StorageError::UnknownUser(_))
    ));
    h.close(s).await;
}

/// `member_count` follows joins and leaves.
pub async fn member_counts_follow_joins_and_leaves(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let owner = ids.user(&*s, "owner").await;
    let ch = ChannelId(ids.id());
    s.create_channel(ch, &ids.name("count"), owner)
        .await
        .expect("create");
    let mut users = Vec::new();
    for n in 0..12 {
        let u = ids.user(&*s, &format!("u{n}")).await;
        assert!(s.join_channel(ch, u).await.expect("join"));
        users.push(u);
    }
    let count = || {
        let s = s.clone();
        async move {
            s.channel(ch)
                .await
                .expect("channel")
                .expect("exists")
                .member_count
        }
    };
    assert_eq!(count().await, 13);
    for u in &users[..5] {
        assert!(s.leave_channel(ch, *u).await.expect("leave"));
    }
    assert_eq!(count().await, 8);
    assert_eq!(s.channel_members(ch).await.expect("members").len(), 8);
    let by_name = s
        .channel_by_name(&ids.name("count"))
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!(by_name.member_count, 8);
    let mine = s.channels_of(users[7]).await.expect("mine");
    assert_eq!(
        mine.iter()
            .map(|c| (c.id, c.member_count))
            .collect::<Vec<_>>(),
        vec![(ch, 8)]
    );
    h.close(s).await;
}

/// Member and channel lists page by id cursor: ascending, exclusive of the cursor, at most
/// `limit` each, and the walk sees every row once.
pub async fn member_and_channel_pages_walk_by_cursor(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let owner = ids.user(&*s, "pager").await;
    let mut channels = Vec::new();
    for n in 0..5 {
        let ch = ChannelId(ids.id());
        s.create_channel(ch, &ids.name(&format!("pg{n}")), owner)
            .await
            .expect("create");
        channels.push(ch);
    }
    let ch = channels[0];
    let mut want = vec![owner];
    for n in 0..7 {
        let u = ids.user(&*s, &format!("pm{n}")).await;
        assert!(s.join_channel(ch, u).await.expect("join"));
        want.push(u);
    }
    want.sort();

    let mut got = Vec::new();
    let mut after = UserId(0);
    loop {
        let page = s
            .channel_members_page(ch, after, 3)
            .await
            .expect("members page");
        assert!(page.len() <= 3);
        assert!(page.windows(2).all(|w| w[0] < w[1]), "ascending");
        assert!(page.iter().all(|u| *u > after), "exclusive of the cursor");
        got.extend_from_slice(&page);
        match page.last() {
            Some(last) if page.len() == 3 => after = *last,
            _ => break,
        }
    }
    assert_eq!(got, want);

    let mut got = Vec::new();
    let mut after = ChannelId(0);
    loop {
        let page = s
            .channels_of_page(owner, after, 2)
            .await
            .expect("channels page");
        assert!(page.len() <= 2);
        got.extend(page.iter().map(|c| c.id));
        match page.last() {
            Some(last) if page.len() == 2 => after = last.id,
            _ => break,
        }
    }
    channels.sort();
    assert_eq!(got, channels);
    let first = s
        .channels_of_page(owner, ChannelId(0), 1)
        .await
        .expect("first");
    assert_eq!(
        first
            .iter()
            .map(|c| (c.id, c.member_count))
            .collect::<Vec<_>>(),
        vec![(ch, 8)]
    );

    let nope = ChannelId(ids.id());
    assert!(matches!(
        s.channel_members_page(nope, UserId(0), 10).await,
        Err(StorageError::UnknownChannel(_))
    ));
    h.close(s).await;
}

/// A user's contacts (presence goes to them): the other user of every 1:1 chat with a
/// message, in either direction, ascending; never channels' members, never the user itself.
pub async fn direct_peers_are_the_other_users_of_my_direct_chats(h: &dyn Harness) {
    let s = h.open().await;
    let ids = Ids::new();
    let (a, b, c, d) = (
        ids.user(&*s, "a").await,
        ids.user(&*s, "b").await,
        ids.user(&*s, "c").await,
        ids.user(&*s, "d").await,
    );
    assert_eq!(
        s.direct_peers(a).await.expect("peers"),
        Vec::<UserId>::new()
    );
    // a wrote to c; b wrote to a (a never answered); notes to self; a channel with d.
    s.append(ids.msg(ChatId::direct(a, c), a, "hi c"))
        .await
        .expect("append");
    s.append(ids.msg(ChatId::direct(b, a), b, "hi a"))
        .await
        .expect("append");
    s.append(ids.msg(ChatId::direct(a, a), a, "note"))
        .await
        .expect("append");
    let ch = ChannelId(ids.id());
    s.create_channel(ch, &ids.name("peers"), a)
        .await
        .expect("create");
    s.join_channel(ch, d).await.expect("join");
    s.append(ids.msg(ChatId::Channel(ch), d, "hi all"))
        .await
        .expect("append");
    let mut want = vec![b, c];
    want.sort_unstable();
    assert_eq!(s.direct_peers(a).await.expect("peers"), want);
    assert_eq!(s.direct_peers(b).await.expect("peers"), vec![a]);
    assert_eq!(
        s.direct_peers(d).await.expect("peers"),
        Vec::<UserId>::new()
    );
    h.close(s).await;
}
