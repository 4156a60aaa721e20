//! The backend contract suite against a real Cassandra or ScyllaDB cluster.
//!
//! Runs only when `MESHCHAT_CQL_NODES` is set (comma-separated `host:port`), in a fresh
//! keyspace per test process (`meshchat_contract_<pid>_<time>`), migrated once. Optional:
//! `MESHCHAT_CQL_DC` (local datacenter, default `datacenter1`) and `MESHCHAT_CQL_RF`
//! (replication factor, default 1). The tests are `#[ignore]`d, so a normal run reports them as
//! skipped, never as passed; `.ci/test.sh` runs them (`--run-ignored all`) when
//! `MESHCHAT_CQL_NODES` is set. Run without it, each test fails with a message saying so.
//!
//! ```text
//! docker run -d --name scylla -p 9042:9042 scylladb/scylla --smp 1
//! MESHCHAT_CQL_NODES=127.0.0.1:9042 cargo test -p meshchat-storage --features cassandra \
//!     --test cassandra_contract -- --include-ignored
//! ```
#![cfg(feature = "cassandra")]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use meshchat_storage::Storage;
use meshchat_storage::cassandra::{CassandraConfig, CassandraStore, connect_session, migrate};
use meshchat_storage::contract::Harness;
use tokio::sync::OnceCell;

const NODES_VAR: &str = "MESHCHAT_CQL_NODES";

const WHY: &str = "needs a Cassandra/ScyllaDB cluster: set MESHCHAT_CQL_NODES (docs/STORAGE.md)";

/// The config for this process's keyspace; panics when no cluster is configured (these tests
/// only run when asked for explicitly, and must never pass without a cluster).
fn cluster_config() -> CassandraConfig {
    match config() {
        Some(c) => c,
        None => panic!("{WHY}"),
    }
}

/// The config for this process's keyspace, or `None` (after a loud stderr line) when no
/// cluster is configured.
fn config() -> Option<CassandraConfig> {
    static CONFIG: OnceLock<Option<CassandraConfig>> = OnceLock::new();
    let cfg = CONFIG.get_or_init(|| {
        let nodes = std::env::var(NODES_VAR).ok()?;
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let dc = std::env::var("MESHCHAT_CQL_DC").unwrap_or_else(|_| "datacenter1".into());
        let rf = std::env::var("MESHCHAT_CQL_RF")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() % 1_000_000_000);
        Some(CassandraConfig {
            nodes,
            keyspace: format!("meshchat_contract_{}_{nanos}", std::process::id()),
            local_dc: Some(dc.clone()),
            replication: BTreeMap::from([(dc, rf)]),
            ..CassandraConfig::default()
        })
    });
    if cfg.is_none() {
        // Straight to the stderr handle, not eprintln!: the test harness captures the
        // macros' output of passing tests, and this line must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {NODES_VAR} is not set; the Cassandra contract suite did not run \
             (set {NODES_VAR}=host:port to run it, see docs/STORAGE.md)"
        );
    }
    cfg.clone()
}

/// Creates the keyspace once per process (tests share it; each uses fresh names).
async fn migrated(cfg: &CassandraConfig) {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async {
        let session = connect_session(cfg).await.expect("connect to the cluster");
        migrate(&session, cfg, false).await.expect("migrate");
        // A second run is a no-op (the migrator is idempotent).
        migrate(&session, cfg, false).await.expect("migrate again");
    })
    .await;
}

struct Cluster {
    cfg: CassandraConfig,
}

#[async_trait]
impl Harness for Cluster {
    async fn open(&self) -> Arc<dyn Storage> {
        migrated(&self.cfg).await;
        Arc::new(
            CassandraStore::connect(&self.cfg)
                .await
                .expect("open the Cassandra store"),
        )
    }

    async fn close(&self, store: Arc<dyn Storage>) {
        // Every acked write already reached its consistency level: nothing to flush.
        drop(store);
    }
}

meshchat_storage::contract_tests!(
    #[ignore = "needs a Cassandra/ScyllaDB cluster: set MESHCHAT_CQL_NODES (docs/STORAGE.md)"]
    Cluster {
        cfg: cluster_config()
    }
);

#[tokio::test]
#[ignore = "needs a Cassandra/ScyllaDB cluster: set MESHCHAT_CQL_NODES (docs/STORAGE.md)"]
async fn dry_run_lists_the_schema_without_running_it() {
    let cfg = cluster_config();
    let session = connect_session(&cfg).await.expect("connect");
    let other = CassandraConfig {
        keyspace: format!("{}_dry", cfg.keyspace),
        ..cfg.clone()
    };
    let planned = migrate(&session, &other, true).await.expect("dry run");
    assert_eq!(
        planned,
        meshchat_storage::cassandra::schema_statements(&other)
    );
    assert!(
        CassandraStore::connect(&other).await.is_err(),
        "a dry run creates nothing"
    );
}
