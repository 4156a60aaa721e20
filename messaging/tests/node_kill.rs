//! A node process killed with SIGKILL under traffic, on the embedded store: no acked
//! message is lost (the check itself is in `common/kill.rs`, shared with the Cassandra
//! cluster tests).

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_traffic_loses_no_acked_message() {
    let dir = common::kill::sigkill_under_traffic_loses_no_acked_message("").await;
    assert!(
        dir.path()
            .join(meshchat_storage::embedded::DB_FILE)
            .exists()
    );
}
