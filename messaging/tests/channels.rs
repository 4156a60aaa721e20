//! Channels that stay correct, over real QUIC on loopback with the real embedded store:
//! authorisation from storage (not the fan-out cache), member and channel lists paged by
//! cursor, history pages that always fit a frame.

mod common;

use common::{TestNode, code_of, next_message};
use meshchat_idgen::{ChannelId, ChatId};
use meshchat_proto::client::ErrorCode;
use meshchat_storage::StateStore;

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
    let store = meshchat_storage::EmbeddedStore::open_dir(node.dir.path()).expect("store");
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
