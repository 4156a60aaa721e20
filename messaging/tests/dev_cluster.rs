//! `meshchat-node dev` as a newcomer runs it: the real binary, a fresh data dir, the printed
//! instructions, two users chatting through it, and a clean stop on SIGTERM.

use std::process::Command;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_how_to_connect_and_serves_two_users() {
    let chat = common::dev::one_node_serves_two_users(&[]).await;
    assert!(
        chat.data.join(meshchat_storage::embedded::DB_FILE).exists(),
        "the embedded store is the default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_three_nodes_runs_three_processes_that_route_between_them() {
    let chat = common::dev::three_nodes_route_between_them(&[]).await;
    assert!(chat.data.join(meshchat_storage::embedded::DB_FILE).exists());
}

#[test]
fn migrate_dry_run_prints_the_cql_schema() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        "[storage]\nbackend = \"cassandra\"\n[storage.cassandra]\nkeyspace = \"chat_test\"\nreplication = { dc1 = 3 }\n",
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["migrate", "--dry-run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CREATE KEYSPACE IF NOT EXISTS chat_test"),
        "{text}"
    );
    assert!(text.contains("NetworkTopologyStrategy"), "{text}");
    assert!(
        text.contains("'dc1': 3") || text.contains("'dc1':3"),
        "{text}"
    );
    assert!(
        text.matches("CREATE TABLE IF NOT EXISTS").count() >= 8,
        "{text}"
    );
    // A bad consistency name is refused with the key named.
    std::fs::write(
        &cfg,
        "[storage]\nbackend = \"cassandra\"\n[storage.cassandra]\nconsistency = \"sometimes\"\n",
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["migrate", "--dry-run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run migrate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.cassandra.consistency"));
}
