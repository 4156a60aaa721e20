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

/// A client that keeps sending requests and never reads the replies: the node stops reading
/// its frames once its replies wait for it, and closes it with SLOW_READER `write_timeout`
/// after they stopped moving, instead of buffering replies without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed_as_a_slow_reader() {
    use meshchat_proto::client::{self as pb, client_frame};
    let node = TestNode::start_with(|c| c.limits.write_timeout = Duration::from_millis(500)).await;
    // A 4 KiB stream window: the node can put little on the wire before the client's reads
    // (none) would have to make room.
    let mut opts = node.options();
    opts.stream_receive_window = 4 * 1024;
    let (addr, name) = meshchat_client::conn::resolve(&node.addr()).expect("address");
    let endpoint =
        meshchat_client::conn::client_endpoint(&opts, "127.0.0.1:0".parse().expect("bind"))
            .expect("endpoint");
    let conn = endpoint
        .connect(addr, &name)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    // Pings until the node stops taking them (its reading paused, the stream window full) or
    // the connection closes: bounded at 200,000 frames (~2 MB).
    let writer = tokio::spawn(async move {
        let mut batch = bytes::BytesMut::new();
        for id in 1..=200_000u64 {
            let frame = pb::ClientFrame {
                request_id: id,
                body: Some(client_frame::Body::Ping(pb::Ping { nonce: id })),
            };
            meshchat_proto::codec::encode_into(&frame, 1 << 16, &mut batch).expect("encode");
            if batch.len() >= 8 * 1024 {
                if send.write_all(&batch).await.is_err() {
                    return id;
                }
                batch.clear();
            }
        }
        200_000
    });
    let code = match tokio::time::timeout(Duration::from_secs(15), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(a)) => a.error_code.into_inner(),
        Ok(other) => panic!("closed without an application code: {other}"),
        Err(_) => panic!("not closed within 15 s"),
    };
    assert_eq!(code, ErrorCode::SlowReader as u64);
    let sent = writer.await.expect("writer");
    assert!(
        sent < 200_000,
        "the node stopped taking frames before the bound"
    );
}
