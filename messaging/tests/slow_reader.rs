//! A reader too slow for its outbound queue is cut off with SLOW_READER; the sender and the
//! user's other devices are unaffected, and the slow device fills the gap from history when it
//! reconnects.

mod common;

use std::time::Duration;

use common::{TestNode, next_matching, next_message};
use meshchat_client::Event;
use meshchat_idgen::ChatId;
use meshchat_proto::client::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_off_and_others_are_unaffected() {
    let node = TestNode::start_with(|c| c.limits.outbound_queue = 4).await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob_fast, mut fast_ev, b) = node.user("bob").await;

    // Bob's second device reads nothing: a one-event buffer and a 4 KiB stream window, so the
    // node's writes to it block almost at once and its queue of 4 fills.
    let mut opts = node.options();
    opts.event_buffer = 1;
    opts.stream_receive_window = 4 * 1024;
    let (bob_slow, mut slow_ev) = node.client_with(opts).await;
    bob_slow.authenticate(&b.token).await.expect("auth");
    let registry = node.running.as_ref().expect("running").node.clone();
    let live_before = registry_live(&registry);

    let chat = ChatId::direct(a.user, b.user);
    let body = vec![b'z'; 2048];
    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(
            alice
                .send(chat, body.clone(), None)
                .await
                .expect("the sender is never slowed down")
                .message_id,
        );
    }
    // The fast device gets every message, in order.
    for id in &ids {
        assert_eq!(next_message(&mut fast_ev).await.message_id, *id);
    }
    // The slow device was cut off with SLOW_READER (after receiving a few messages).
    let mut got = std::collections::BTreeSet::new();
    let code = next_matching(&mut slow_ev, |e| match e {
        Event::Disconnected { code, .. } => Some(code),
        Event::Message(m) => {
            got.insert(m.message_id);
            None
        }
        _ => None,
    })
    .await;
    assert!(got.len() < ids.len(), "it really fell behind");
    assert_eq!(code, ErrorCode::SlowReader as u64);
    assert_eq!(
        registry_live(&registry),
        live_before - 1,
        "the slow connection left the registry"
    );

    // It comes back and fills the gap from history: every message arrives (deduplicated).
    bob_slow.reconnect().await.expect("reconnect");
    while got.len() < ids.len() {
        match slow_ev.next_within(Duration::from_secs(5)).await {
            Some(Event::Message(m)) => {
                got.insert(m.message_id);
            }
            Some(_) => {}
            None => panic!("gap fill stopped at {} of {}", got.len(), ids.len()),
        }
    }
    assert_eq!(got.into_iter().collect::<Vec<_>>(), ids);
}

fn registry_live(node: &std::sync::Arc<meshchat_messaging::node::Node>) -> u64 {
    node.registry().live_connections()
}
