//! A lone endpoint loop runs on a thread of its own (`mc-loop-0`), serves clients there, and
//! the thread ends when the node shuts down. A file of its own: the test counts the threads
//! of its process, so no other test's node may run beside it.

mod common;

use std::time::Duration;

use common::TestNode;
use meshchat_idgen::ChatId;
use meshchat_proto::client as pb;

/// Names of this process's threads that are endpoint loops.
fn loop_threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("mc-loop-"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_loop_runs_on_a_thread_of_its_own_until_shutdown() {
    assert!(loop_threads().is_empty(), "{:?}", loop_threads());
    let mut node = TestNode::start_with(|c| {
        // The loop whatever the suite's pass (`TEST_CLIENT_ENDPOINT`).
        c.transport.endpoint = meshchat_messaging::config::EndpointKind::Loop;
        c.transport.lean_tls = true;
        c.transport.loops = 1;
    })
    .await;
    common::wait_for("the loop's thread", Duration::from_secs(10), || {
        loop_threads() == ["mc-loop-0"]
    })
    .await;

    // Served there: a message and its push (the task a send spawns runs on that thread
    // too), and a read answered from the store.
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, mut be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    alice
        .send(chat, "on the loop's thread", None)
        .await
        .expect("send");
    assert_eq!(
        common::text(&common::next_message(&mut be).await),
        "on the loop's thread"
    );
    let page = alice
        .history(chat, 0, pb::Direction::Backward, 10)
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(loop_threads(), ["mc-loop-0"]);

    // Shutdown returns once the loop's thread has ended.
    tokio::time::timeout(Duration::from_secs(30), node.stop())
        .await
        .expect("the node stops");
    assert!(loop_threads().is_empty(), "{:?}", loop_threads());
}
