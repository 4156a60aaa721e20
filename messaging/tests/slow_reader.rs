//! A reader too slow for its outbound queue is cut off with SLOW_READER; the sender and the
//! user's other devices are unaffected, and the slow device fills the gap from history when it
//! reconnects.

mod common;

use std::time::Duration;

use common::{TestNode, next_matching, next_message};
use meshchat_client::{Client, Event, Events};
use meshchat_idgen::ChatId;
use meshchat_proto::client::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_off_and_others_are_unaffected() {
    let node = TestNode::start_with(|c| c.limits.outbound_queue = 4).await;
    // Bob's second device reads nothing, so its queue of 4 fills.
    let mut s = Slow::start(&node).await;
    let registry = node.running.as_ref().expect("running").node.clone();
    let live_before = registry_live(&registry);
    let ids = s.send(60, 2048).await;
    let (bob_slow, mut slow_ev) = (s.bob_slow, s.slow_ev);
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

/// The queue is bounded in bytes too: a reader that falls behind by a few large pushes is cut
/// off long before its count (the default 256) is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_large_pushes_is_cut_off_by_bytes() {
    let node = TestNode::start_with(|c| c.limits.outbound_queue_bytes = 64 * 1024).await;
    assert_eq!(node.config.limits.outbound_queue, 256);
    let mut s = Slow::start(&node).await;
    // 40 pushes of ~16 KiB: 640 KiB, ten times the byte bound, a sixth of the count bound.
    s.send(40, 16 * 1024 - 64).await;
    let (code, reason) = next_matching(&mut s.slow_ev, |e| match e {
        Event::Disconnected { code, reason } => Some((code, reason)),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::SlowReader as u64);
    assert!(
        reason.contains("outbound queue full"),
        "cut off for its queue, not for a blocked write: {reason}"
    );
}

/// Alice, Bob's device that reads, and Bob's second device that reads nothing: a one-event
/// buffer and a 4 KiB stream window, so the node's writes to it block almost at once.
struct Slow {
    alice: Client,
    chat: ChatId,
    fast_ev: Events,
    _bob_fast: Client,
    bob_slow: Client,
    slow_ev: Events,
}

impl Slow {
    async fn start(node: &TestNode) -> Self {
        let (alice, _ae, a) = node.user("alice").await;
        let (bob_fast, fast_ev, b) = node.user("bob").await;
        let mut opts = node.options();
        opts.event_buffer = 1;
        opts.stream_receive_window = 4 * 1024;
        let (bob_slow, slow_ev) = node.client_with(opts).await;
        bob_slow.authenticate(&b.token).await.expect("auth");
        Self {
            alice,
            chat: ChatId::direct(a.user, b.user),
            fast_ev,
            _bob_fast: bob_fast,
            bob_slow,
            slow_ev,
        }
    }

    /// Alice sends `n` messages of `len` bytes; Bob's reading device gets every one, in
    /// order. Their ids.
    async fn send(&mut self, n: usize, len: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(
                self.alice
                    .send(self.chat, vec![b'z'; len], None)
                    .await
                    .expect("the sender is never slowed down")
                    .message_id,
            );
        }
        for id in &ids {
            assert_eq!(next_message(&mut self.fast_ev).await.message_id, *id);
        }
        ids
    }
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

/// An application that asks for a gap fill from its event loop while its event buffer is
/// full (pushes waiting, the connection's reader stopped behind them) is not held up: the
/// fill reads the chat list in its background task, which proceeds as the events are
/// taken. (The chat list was read in the caller: its reply waited behind the stopped reader,
/// and the caller behind the reply, until every retry had timed out; found as a rare
/// `fill: Timeout` in `mesh.rs::dropped_mesh_envelopes_are_resynced_...`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_fill_asked_for_with_a_full_event_buffer_returns_and_completes() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    // Bob's other device: two events of buffer, and a request timeout long enough that
    // waiting it out could not pass for returning at once.
    let mut opts = node.options();
    opts.event_buffer = 2;
    opts.request_timeout = Duration::from_secs(30);
    let (slow, mut slow_ev) = node.client_with(opts).await;
    slow.authenticate(&b.token).await.expect("auth");
    let chat = ChatId::direct(a.user, b.user);
    let mut ids = std::collections::BTreeSet::new();
    for n in 0..10 {
        ids.insert(
            alice
                .send(chat, format!("m{n}"), None)
                .await
                .expect("send")
                .message_id,
        );
    }
    // Nothing read yet: the buffer holds two pushes and the reader waits with a third.
    let fill = tokio::time::timeout(Duration::from_secs(5), slow.fill_gaps())
        .await
        .expect("the fill returns without waiting for a reply")
        .expect("a fill on an open connection");
    // Reading the events lets the pushes and the fill through: every message arrives.
    let mut got = std::collections::BTreeSet::new();
    while !ids.is_subset(&got) {
        match slow_ev.next_within(Duration::from_secs(10)).await {
            Some(Event::Message(m)) => {
                got.insert(m.message_id);
            }
            Some(_) => {}
            None => panic!("{} of {} messages arrived", got.len(), ids.len()),
        }
    }
    // And the fill itself ran to its end (its messages, duplicates of the pushes, read too).
    let mut fill = fill;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                ended = &mut fill => break ended,
                _ = slow_ev.next_within(Duration::from_secs(10)) => {}
            }
        }
    })
    .await
    .expect("the fill ended within 10 s")
    .expect("the fill's task");
    assert_eq!(slow.gap_fills(), 1, "the fill read every chat to its head");
}
