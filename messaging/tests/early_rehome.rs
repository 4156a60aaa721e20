//! Re-homing ahead of the liveness timeout (`ConnectOptions::suspect_after`), with real node
//! processes and a real `redis-server`: a client whose node goes silent tries its predicted
//! new home at once, without closing its connection. That node authenticates it only once
//! its ring has dropped the silent node: a SIGKILLed node's client is serving elsewhere long
//! before its liveness timeout could have fired, and a stopped-then-resumed (slow, alive)
//! node keeps its client, on the same connection and session. Waits are for conditions.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::kill::{three_nodes, users_on_two_homes};
use common::{free_port, next_message, text, wait_for};
use meshchat_idgen::ChatId;

/// Keep-alives often, silence noticed after 1 s, and a liveness timeout (and QUIC idle
/// timeout) far beyond the test's deadlines: only the early path can move a client in time.
fn early_only(opts: &mut meshchat_client::ConnectOptions) {
    opts.keep_alive = Duration::from_millis(300);
    opts.suspect_after = Duration::from_secs(1);
    opts.liveness_timeout = Duration::from_secs(120);
    opts.idle_timeout = Duration::from_secs(240);
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_client_rehomes_before_its_liveness_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let redis_port = free_port();
    let _redis = common::redis_server(redis_port);
    let (nodes, addrs, mut opts) = three_nodes(dir.path(), redis_port, "", "3s").await;
    early_only(&mut opts);
    let mut users = users_on_two_homes(&addrs[0], &opts, 2).await;
    let victim_addr = users[0].0.server();
    let victim_node = &nodes[addrs
        .iter()
        .position(|a| *a == victim_addr)
        .expect("a node")];
    let other = (1..users.len())
        .find(|&i| users[i].0.server() != victim_addr)
        .expect("a user elsewhere");
    let client = users[0].0.clone();
    let (old, sessions) = (client.conn().expect("connected"), client.authentications());
    let _supervisor = client.supervise();

    signal(victim_node.0.id(), "-KILL");
    let killed = tokio::time::Instant::now();
    // The liveness timeout is 120 s: within 30 s only the early re-home can have moved it.
    // Moved means a new session on a new, open connection at another node.
    wait_for("re-homed early", Duration::from_secs(30), || {
        client.authentications() > sessions
            && client.server() != victim_addr
            && client
                .conn()
                .is_ok_and(|c| c.is_open() && !Arc::ptr_eq(&c, &old))
    })
    .await;
    assert!(
        !old.is_open(),
        "the silent connection was closed once moved"
    );
    assert!(killed.elapsed() < Duration::from_secs(30));
    // Serving there: a message from a user on a live node arrives.
    let chat = ChatId::direct(users[other].2.user, users[0].2.user);
    users[other]
        .0
        .send(chat, "after the early re-home", None)
        .await
        .expect("send");
    assert_eq!(
        text(&next_message(&mut users[0].1).await),
        "after the early re-home"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_keeps_its_client_through_an_early_rehome_attempt() {
    let dir = tempfile::tempdir().expect("dir");
    let redis_port = free_port();
    let _redis = common::redis_server(redis_port);
    // A TTL longer than the stop: the stalled node stays on every ring, so no node may take
    // its users.
    let (nodes, addrs, mut opts) = three_nodes(dir.path(), redis_port, "", "8s").await;
    early_only(&mut opts);
    let mut users = users_on_two_homes(&addrs[0], &opts, 2).await;
    let home = users[0].0.server();
    let home_node = &nodes[addrs.iter().position(|a| *a == home).expect("a node")];
    let other = (1..users.len())
        .find(|&i| users[i].0.server() != home)
        .expect("a user elsewhere");
    let client: Arc<meshchat_client::Client> = users[0].0.clone();
    let conn = client.conn().expect("connected");
    let sessions = client.authentications();
    let _supervisor = client.supervise();

    // Stopped: silent. The client tries another node, which redirects it back (the stopped
    // node is still on its ring), and asks again there until the node speaks.
    let attempts = client.early_rehome_attempts();
    signal(home_node.0.id(), "-STOP");
    let resumed = scopeguard(home_node.0.id());
    wait_for("an early re-home attempt", Duration::from_secs(20), || {
        client.early_rehome_attempts() > attempts
    })
    .await;
    assert!(
        conn.is_silent(),
        "the attempt started on a silent connection"
    );
    signal(home_node.0.id(), "-CONT");
    drop(resumed);
    // Heard again: the attempt is called off (within a tick of the liveness check, well
    // inside the 8 s an attempt redirected back to a silent node would otherwise go on
    // for), and the client stays where it was.
    wait_for("the node heard again", Duration::from_secs(6), || {
        !conn.is_silent()
    })
    .await;
    assert_eq!(client.server(), home);
    assert!(conn.is_open());
    assert!(
        Arc::ptr_eq(&conn, &client.conn().expect("connected")),
        "the same connection"
    );
    assert_eq!(client.authentications(), sessions, "no new session");
    let chat = ChatId::direct(users[other].2.user, users[0].2.user);
    users[other]
        .0
        .send(chat, "still home", None)
        .await
        .expect("send");
    assert_eq!(text(&next_message(&mut users[0].1).await), "still home");
}

/// Resumes a stopped process if the test fails while it is stopped (a stopped child is not
/// killed by SIGKILL until it runs again on some systems; and it would hold its ports).
fn scopeguard(pid: u32) -> impl Drop {
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-CONT", &self.0.to_string()])
                .status();
        }
    }
    Resume(pid)
}
