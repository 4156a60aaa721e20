//! The backend contract suite against the embedded SQLite store in a temp dir.

use std::sync::Arc;

use async_trait::async_trait;
use meshchat_storage::contract::Harness;
use meshchat_storage::{EmbeddedStore, Storage};
use parking_lot::Mutex;

struct Embedded {
    dir: tempfile::TempDir,
    open: Mutex<Option<Arc<EmbeddedStore>>>,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            open: Mutex::new(None),
        }
    }
}

/// Runs `sql` on the store file in `dir` with a plain SQLite connection (to give it an older
/// shape); returns the file's path.
fn rewrite(dir: &std::path::Path, sql: &str) -> std::path::PathBuf {
    let path = dir.join(meshchat_storage::embedded::DB_FILE);
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    conn.execute_batch(sql).expect("rewrite the store file");
    path
}

/// A store opened in `dir` with users 1, 2 and 3 ("a", "b", "c").
async fn store_with_users(dir: &std::path::Path) -> (EmbeddedStore, [meshchat_idgen::UserId; 3]) {
    use meshchat_idgen::UserId;
    use meshchat_storage::StateStore;
    let store = EmbeddedStore::open_dir(dir).expect("open");
    let users = [UserId(1), UserId(2), UserId(3)];
    for (id, name) in users.into_iter().zip(["a", "b", "c"]) {
        store.create_user(id, name, "hash").await.expect("user");
    }
    (store, users)
}

/// A message "hi" with id `id` from `sender` in `chat` under client id `key`.
fn hello(
    id: u64,
    chat: meshchat_idgen::ChatId,
    sender: meshchat_idgen::UserId,
    key: &str,
) -> meshchat_storage::NewMessage {
    meshchat_storage::NewMessage {
        id: meshchat_idgen::MessageId(id),
        chat,
        sender,
        client_msg_id: key.into(),
        body: bytes::Bytes::from_static(b"hi"),
        reply_to: None,
    }
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn Storage> {
        let store = Arc::new(EmbeddedStore::open_dir(self.dir.path()).expect("open store"));
        *self.open.lock() = Some(store.clone());
        store
    }

    async fn close(&self, store: Arc<dyn Storage>) {
        drop(store);
        let typed = self.open.lock().take().expect("a store is open");
        match Arc::try_unwrap(typed) {
            Ok(store) => store.close().await,
            Err(_) => panic!("the contract leaked a store handle"),
        }
    }
}

meshchat_storage::contract_tests!(Embedded::new());

#[test]
fn a_store_from_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    rewrite(dir.path(), "PRAGMA user_version = 999");
    match EmbeddedStore::open_dir(dir.path()) {
        Err(meshchat_storage::StorageError::SchemaTooNew { found: 999, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

/// A write that waited longer than `max_queue_delay` for the writer is refused with
/// `Overloaded` and not applied (so an id is never committed long after it was issued).
#[tokio::test]
async fn a_write_that_waited_too_long_is_refused_not_applied() {
    use meshchat_idgen::UserId;
    use meshchat_storage::{EmbeddedConfig, StateStore, StorageError};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = EmbeddedConfig::in_dir(dir.path());
    cfg.max_queue_delay = std::time::Duration::ZERO;
    let store = EmbeddedStore::open(cfg).expect("open");
    let r = store.create_user(UserId(7), "late", "hash").await;
    assert!(matches!(r, Err(StorageError::Overloaded { .. })), "{r:?}");
    assert!(store.user_by_id(UserId(7)).await.expect("read").is_none());
    store.close().await;
    // With the default bound the same write lands.
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    store
        .create_user(UserId(7), "late", "hash")
        .await
        .expect("create");
    store.close().await;
}

/// A version-1 store (idempotency keyed without the chat) is upgraded in place: its keys
/// still find their messages, and a client id reused in another chat is a new message.
#[tokio::test]
async fn a_version_1_store_is_upgraded_to_per_chat_idempotency() {
    use bytes::Bytes;
    use meshchat_idgen::{ChatId, MessageId, UserId};
    use meshchat_storage::{HistoryStore, NewMessage};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_dir(dir.path()).expect("open");
    let (a, b, c) = (UserId(1), UserId(2), UserId(3));
    let ab = ChatId::direct(a, b);
    let msg = |id: u64, chat: ChatId| NewMessage {
        id: MessageId(id),
        chat,
        sender: a,
        client_msg_id: "k-1".into(),
        body: Bytes::from_static(b"hi"),
        reply_to: None,
    };
    store.append(msg(100, ab)).await.expect("append");
    store.close().await;
    // Turn the file back into version 1: the old table shape and version number.
    let path = rewrite(
        dir.path(),
        "CREATE TABLE old_idem (sender INTEGER NOT NULL, client_msg_id TEXT NOT NULL,
             chat TEXT NOT NULL, message_id INTEGER NOT NULL,
             PRIMARY KEY (sender, client_msg_id)) WITHOUT ROWID;
         INSERT INTO old_idem SELECT sender, client_msg_id, chat, id FROM messages;
         DROP INDEX messages_by_client_id;
         ALTER TABLE old_idem RENAME TO idempotency;
         ALTER TABLE channels DROP COLUMN private;
         DROP TABLE channel_admins;
         PRAGMA user_version = 1;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    let retry = store.append(msg(200, ab)).await.expect("retry");
    assert_eq!((retry.id, retry.duplicate), (MessageId(100), true));
    let other = store
        .append(msg(300, ChatId::direct(a, c)))
        .await
        .expect("other chat");
    assert_eq!((other.id, other.duplicate), (MessageId(300), false));
    store.close().await;
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, 6);
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'idempotency'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(
        tables, 0,
        "the idempotency table is gone; the index replaced it"
    );
}

/// A version-2 store (no private channels, no admins) opens as version 6: its channels stay
/// public, and private channels and admins work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_store_gains_private_channels_and_admins() {
    use meshchat_idgen::{ChannelId, UserId};
    use meshchat_storage::StateStore;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_dir(dir.path()).expect("open");
    let owner = store
        .create_user(UserId(1), "owner", "hash")
        .await
        .expect("user")
        .id;
    store
        .create_channel(ChannelId(10), "old", owner)
        .await
        .expect("channel");
    store.close().await;
    rewrite(
        dir.path(),
        "ALTER TABLE channels DROP COLUMN private;
         DROP TABLE channel_admins;
         PRAGMA user_version = 2;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    let old = store
        .channel(ChannelId(10))
        .await
        .expect("read")
        .expect("kept");
    assert!(!old.private);
    let new = store
        .create_channel_with(ChannelId(11), "new", owner, true)
        .await
        .expect("private channel");
    assert!(new.private);
    assert!(
        store
            .is_channel_admin(ChannelId(11), owner)
            .await
            .expect("admin")
    );
    store.close().await;
}

/// A version-3 file written before sign-outs existed (no `users.signed_out_before`) gains
/// the column on open: the migration goes by column, not by version number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_store_without_sign_outs_gains_them() {
    use meshchat_idgen::UserId;
    use meshchat_storage::StateStore;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_dir(dir.path()).expect("open");
    store
        .create_user(UserId(1), "early", "hash")
        .await
        .expect("user");
    store.close().await;
    rewrite(
        dir.path(),
        "ALTER TABLE users DROP COLUMN signed_out_before;
         PRAGMA user_version = 3;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    assert_eq!(store.signed_out_before(UserId(1)).await.expect("read"), 0);
    store.sign_out_before(UserId(1), 5).await.expect("sign out");
    assert_eq!(store.signed_out_before(UserId(1)).await.expect("read"), 5);
    store.close().await;
}

/// A version-3 file (idempotency table, newest id kept in `chats`) opens as version 6: the
/// chat list keeps its order (now from the messages themselves), retries still find their
/// first message, and new messages reorder the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_store_moves_to_the_append_only_layout() {
    use meshchat_idgen::{ChatId, MessageId};
    use meshchat_storage::{HistoryStore, StateStore};
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, [a, b, c]) = store_with_users(dir.path()).await;
    let (ab, ac) = (ChatId::direct(a, b), ChatId::direct(a, c));
    let msg = |id: u64, chat: ChatId, key: &str| hello(id, chat, a, key);
    store.append(msg(100, ab, "k1")).await.expect("append");
    store.append(msg(200, ac, "k2")).await.expect("append");
    store.close().await;
    // Back to the version-3 shape: an idempotency table and `chats.last_message_id`.
    let path = rewrite(
        dir.path(),
        "CREATE TABLE idempotency (sender INTEGER NOT NULL, chat TEXT NOT NULL,
             client_msg_id TEXT NOT NULL, message_id INTEGER NOT NULL,
             PRIMARY KEY (sender, chat, client_msg_id)) WITHOUT ROWID;
         INSERT INTO idempotency SELECT sender, chat, client_msg_id, id FROM messages;
         DROP INDEX messages_by_client_id;
         CREATE TABLE chats (chat TEXT PRIMARY KEY, last_message_id INTEGER NOT NULL)
             WITHOUT ROWID;
         INSERT INTO chats SELECT chat, max(id) FROM messages GROUP BY chat;
         PRAGMA user_version = 3;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    let order = |list: Vec<meshchat_storage::ChatSummary>| -> Vec<ChatId> {
        list.into_iter().map(|s| s.chat).collect()
    };
    assert_eq!(
        order(store.chat_list(a, 10).await.expect("list")),
        vec![ac, ab]
    );
    let retry = store.append(msg(300, ab, "k1")).await.expect("retry");
    assert_eq!((retry.id, retry.duplicate), (MessageId(100), true));
    store.append(msg(400, ab, "k3")).await.expect("append");
    let list = store.chat_list(a, 10).await.expect("list");
    assert_eq!(
        list.first().and_then(|s| s.newest.as_ref()).map(|m| m.id),
        Some(MessageId(400))
    );
    assert_eq!(order(list), vec![ab, ac]);
    store.close().await;
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let chats: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'chats'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(chats, 0, "the chats table is gone");
}

/// A version-4 file (a `chats` table beside `messages`) opens as version 6 without it: a
/// message to a chat that had messages is not taken for its first (not even one whose id is
/// below the others', from a node with a slow clock), and a new chat's first message puts it
/// in both members' lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_4_store_drops_the_chats_table_and_chat_lists_stay_whole() {
    use meshchat_idgen::{ChatId, UserId};
    use meshchat_storage::{HistoryStore, StateStore};
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, [a, b, c]) = store_with_users(dir.path()).await;
    let (ab, bc) = (ChatId::direct(a, b), ChatId::direct(b, c));
    let msg = hello;
    store.append(msg(100, ab, a, "k1")).await.expect("append");
    store.close().await;
    let path = rewrite(
        dir.path(),
        "CREATE TABLE chats (chat TEXT PRIMARY KEY) WITHOUT ROWID;
         INSERT INTO chats SELECT DISTINCT chat FROM messages;
         DELETE FROM user_chats WHERE user_id = 1;
         PRAGMA user_version = 4;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    let chats = |user: UserId| {
        let store = &store;
        async move {
            let list = store.chat_list(user, 10).await.expect("list");
            list.into_iter().map(|s| s.chat).collect::<Vec<_>>()
        }
    };
    // `a`'s chat-list row of ab was removed above: only a message taken for the chat's
    // first would write it again. Neither a later one nor one with an id below the first's
    // is.
    assert_eq!(chats(a).await, vec![]);
    store.append(msg(200, ab, b, "k2")).await.expect("append");
    store.append(msg(50, ab, b, "k3")).await.expect("append");
    assert_eq!(chats(a).await, vec![]);
    assert_eq!(chats(b).await, vec![ab]);
    // A new chat, its first message with an id below an old chat's: in both members' lists.
    store.append(msg(60, bc, c, "k4")).await.expect("append");
    assert_eq!(chats(b).await, vec![ab, bc]);
    assert_eq!(chats(c).await, vec![bc]);
    assert_eq!(chats(a).await, vec![]);
    store.close().await;
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let (version, tables): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT count(*) FROM sqlite_schema WHERE name = 'chats')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("schema");
    assert_eq!((version, tables), (6, 0));
}

/// A version-5 file (the idempotency index in chat order) opens as version 6 with the index
/// led by the client id: the same key, so a retry is still the first message and the same
/// client id in another chat is still another message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_5_store_orders_its_idempotency_index_by_client_id() {
    use meshchat_idgen::{ChatId, MessageId};
    use meshchat_storage::HistoryStore;
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, [a, b, c]) = store_with_users(dir.path()).await;
    let (ab, ac) = (ChatId::direct(a, b), ChatId::direct(a, c));
    let msg = |id: u64, chat: ChatId, key: &str| hello(id, chat, a, key);
    store.append(msg(100, ab, "k1")).await.expect("append");
    store.close().await;
    let path = rewrite(
        dir.path(),
        "DROP INDEX messages_by_client_id;
         CREATE UNIQUE INDEX messages_by_client_id ON messages (chat, sender, client_msg_id);
         PRAGMA user_version = 5;",
    );
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen upgrades");
    let retry = store.append(msg(200, ab, "k1")).await.expect("retry");
    assert_eq!((retry.id, retry.duplicate), (MessageId(100), true));
    let elsewhere = store.append(msg(300, ac, "k1")).await.expect("other chat");
    assert_eq!((elsewhere.id, elsewhere.duplicate), (MessageId(300), false));
    store.close().await;
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, 6);
    assert_eq!(
        client_id_index_columns(&path),
        ["client_msg_id", "sender", "chat"]
    );
}

/// The idempotency index's columns in the store file at `path`, in index order.
fn client_id_index_columns(path: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).expect("sqlite");
    conn.prepare("SELECT name FROM pragma_index_info('messages_by_client_id') ORDER BY seqno")
        .expect("index info")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("columns")
}

/// A new store is made at version 6 with the index led by the client id, and opening it again
/// keeps both (an index already in that order is never rebuilt).
#[tokio::test]
async fn a_new_store_has_its_idempotency_index_in_client_id_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(meshchat_storage::embedded::DB_FILE);
    for _ in 0..2 {
        EmbeddedStore::open_dir(dir.path())
            .expect("open")
            .close()
            .await;
        assert_eq!(
            client_id_index_columns(&path),
            ["client_msg_id", "sender", "chat"]
        );
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 6);
    }
}
