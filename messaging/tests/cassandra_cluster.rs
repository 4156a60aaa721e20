//! The cluster on a real Cassandra: the same chat and SIGKILL checks as on the embedded store
//! (`dev_cluster.rs`, `node_kill.rs`; the checks themselves are in `common/`), each test in a
//! fresh keyspace of its own, and afterwards a look into the keyspace: what the nodes acked
//! is there, and no embedded store was written.
//!
//! Runs only when `MESHCHAT_CQL_NODES` is set (comma-separated `host:port`), like the storage
//! contract suite: the tests are `#[ignore]`d, so a plain `cargo test` reports them as
//! skipped, and `.ci/test.sh` (which boots a Cassandra and sets the variable) runs them with
//! `--run-ignored all`. Run by hand:
//!
//! ```text
//! deploy/cassandra-dev/cassandra.sh start /tmp/cass 9042
//! MESHCHAT_CQL_NODES=127.0.0.1:9042 cargo test -p meshchat-messaging \
//!     --test cassandra_cluster -- --include-ignored
//! ```

use meshchat_idgen::MessageId;
use meshchat_messaging::config::CassandraSettings;
use meshchat_storage::{HistoryStore, StateStore};

mod common;
use common::cassandra::{dev_flags, fresh_keyspace, open, storage_toml};
use common::dev::DevChat;

/// Both users and the message the receiver got are in the keyspace; the data dir holds no
/// embedded store.
async fn stored_in_cassandra(ks: &CassandraSettings, chat: &DevChat) {
    assert!(
        !chat.data.join(meshchat_storage::embedded::DB_FILE).exists(),
        "a node wrote an embedded store"
    );
    let store = open(ks).await;
    for s in &chat.users {
        let found = store
            .user_by_name(&s.name)
            .await
            .expect("user_by_name")
            .unwrap_or_else(|| panic!("user {} is not in Cassandra", s.name));
        assert_eq!(found.user.id, s.user);
    }
    let m = store
        .message(chat.chat, MessageId(chat.message_id))
        .await
        .expect("message")
        .expect("the delivered message is stored in Cassandra");
    assert_eq!(m.sender, chat.users[0].user);
    let list = store
        .chat_list(chat.users[1].user, 10)
        .await
        .expect("chat list");
    assert!(
        list.iter().any(|c| c.chat == chat.chat),
        "the chat is on the receiver's chat list: {list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Cassandra server: set MESHCHAT_CQL_NODES (docs/STORAGE.md)"]
async fn dev_on_cassandra_serves_two_users() {
    let ks = fresh_keyspace("dev1");
    let f = dev_flags(&ks);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let chat = common::dev::one_node_serves_two_users(&f).await;
    stored_in_cassandra(&ks, &chat).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Cassandra server: set MESHCHAT_CQL_NODES (docs/STORAGE.md)"]
async fn dev_with_three_nodes_on_cassandra_routes_between_them() {
    let ks = fresh_keyspace("dev3");
    let f = dev_flags(&ks);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let chat = common::dev::three_nodes_route_between_them(&f).await;
    stored_in_cassandra(&ks, &chat).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Cassandra server: set MESHCHAT_CQL_NODES (docs/STORAGE.md)"]
async fn sigkill_under_traffic_on_cassandra_loses_no_acked_message() {
    let ks = fresh_keyspace("kill");
    // `meshchat-node run` does not create the schema: migrate once, as an operator would.
    let ran = meshchat_messaging::dev::migrate_cassandra(&ks)
        .await
        .expect("migrate");
    assert!(!ran.is_empty(), "a fresh keyspace gets the whole schema");
    let dir = common::kill::sigkill_under_traffic_loses_no_acked_message(&storage_toml(&ks)).await;
    assert!(
        !dir.path()
            .join(meshchat_storage::embedded::DB_FILE)
            .exists(),
        "a node wrote an embedded store"
    );
}
