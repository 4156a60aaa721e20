//! Replacing a node: node N's machine dies (SIGKILL) and a new process with the same node id
//! starts on another address (new client and mesh ports: the new machine), with Redis
//! membership and one store. The replacement waits out the dead process's worker-id lease,
//! takes it over, and is published with its new addresses: every node's ring has it again,
//! the users homed on N end up connected to the new address by themselves (their clients
//! fail over, then follow the redirect), it issues ids under the same worker id, above the
//! dead process's, and messages flow both ways. (That the lease's high-water mark, not just
//! the clock, keeps them above is `fencing.rs`'s test.) Real processes,
//! a real `redis-server`; which node is replaced depends on where the first user landed, not
//! on where ids fall on the ring.

mod common;

use std::time::Duration;

use common::kill::{homed_at, spawn_node_ttl, three_nodes, users_on_two_homes};
use meshchat_client::Event;
use meshchat_idgen::{ChatId, Snowflake};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_replaced_on_a_new_address_takes_over_its_id_its_users_and_its_ids() {
    let dir = tempfile::tempdir().expect("dir");
    let redis_port = common::free_port();
    let _redis = common::redis_server(redis_port);
    let (mut nodes, addrs, opts) = three_nodes(dir.path(), redis_port, "", "3s").await;
    let mut users = users_on_two_homes(&addrs[0], &opts, 6).await;
    let old_addr = users[0].0.server();
    let index = addrs.iter().position(|a| *a == old_addr).expect("a node");
    let id = index as u32 + 1;
    let moved = homed_at(&users, &old_addr);
    let other = (0..users.len())
        .find(|i| !moved.contains(i))
        .expect("a user homed elsewhere");
    let supervisors: Vec<_> = moved.iter().map(|&v| users[v].0.supervise()).collect();

    // An id the old process issued (a send is stamped by the sender's home).
    let (mover, stayer) = (moved[0], other);
    let chat = ChatId::direct(users[mover].2.user, users[stayer].2.user);
    let before = users[mover]
        .0
        .send(chat, "before", None)
        .await
        .expect("send before")
        .message_id;
    assert_eq!(Snowflake(before).worker(), id as u16);

    // The machine dies; the replacement starts at once, on new ports.
    // Not reaped first: the replacement may start while the kernel still tears the old
    // process down, holding its lock on the worker id (on this one store); it waits for it.
    nodes[index].0.kill().expect("SIGKILL");
    let (_replacement, new_addr) = spawn_node_ttl(dir.path(), id, redis_port, "", "3s");

    // Every user of node N ends up on the new address, by itself.
    for &v in &moved {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while users[v].0.server() != new_addr || !users[v].0.conn().is_ok_and(|c| c.is_open()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "user {} is at {} (want {new_addr})",
                users[v].2.user,
                users[v].0.server()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every node publishes the new address for node N (what clients are redirected to).
    let info = users[stayer].0.cluster().await.expect("cluster");
    let member = info
        .members
        .iter()
        .find(|m| m.node_id == id)
        .unwrap_or_else(|| panic!("node {id} not a member: {info:?}"));
    assert_eq!(member.address, new_addr, "{info:?}");

    // Ids from the same worker id stay above the dead process's; messages flow both ways.
    let after = users[mover]
        .0
        .send(chat, "after", None)
        .await
        .expect("send after")
        .message_id;
    assert_eq!(Snowflake(after).worker(), id as u16);
    assert!(after > before, "{after} <= {before}");
    let back = users[stayer]
        .0
        .send(chat, "back", None)
        .await
        .expect("send back")
        .message_id;
    for (who, want) in [(stayer, after), (mover, back)] {
        let events = &mut users[who].1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Event::Message(m))) if m.message_id == want => break,
                Ok(Some(_)) => {}
                other => panic!("message {want} not pushed to user {who}: {other:?}"),
            }
        }
    }
    for s in supervisors {
        s.abort();
    }
}
