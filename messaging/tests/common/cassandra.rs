//! A Cassandra keyspace of its own for each cluster test, on the server named by
//! `MESHCHAT_CQL_NODES` (comma-separated `host:port`, as for the storage contract suite;
//! `.ci/test.sh` boots one and sets it).

use std::time::{SystemTime, UNIX_EPOCH};

use meshchat_messaging::config::CassandraSettings;
use meshchat_storage::cassandra::CassandraStore;

/// Why the Cassandra cluster tests are ignored by default.
pub const WHY: &str = "needs a Cassandra server: set MESHCHAT_CQL_NODES (docs/STORAGE.md)";

/// Settings for a fresh, not yet created keyspace `mc_<tag>_<pid>_<nanos>` on the
/// `MESHCHAT_CQL_NODES` server. Panics without it: these tests run only when asked for and
/// must never pass without a server.
pub fn fresh_keyspace(tag: &str) -> CassandraSettings {
    let nodes: Vec<String> = std::env::var("MESHCHAT_CQL_NODES")
        .unwrap_or_else(|_| panic!("{WHY}"))
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    assert!(!nodes.is_empty(), "{WHY}");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    CassandraSettings {
        nodes,
        keyspace: format!("mc_{tag}_{}_{nanos}", std::process::id()),
        ..CassandraSettings::default()
    }
}

/// The `[storage]` section of a node config that uses `s`.
pub fn storage_toml(s: &CassandraSettings) -> String {
    format!(
        "[storage]\nbackend = \"cassandra\"\n[storage.cassandra]\nnodes = {:?}\nkeyspace = {:?}\n",
        s.nodes, s.keyspace
    )
}

/// `meshchat-node dev` flags for `s`.
pub fn dev_flags(s: &CassandraSettings) -> Vec<String> {
    vec![
        "--storage".into(),
        "cassandra".into(),
        "--cql".into(),
        s.nodes.join(","),
        "--keyspace".into(),
        s.keyspace.clone(),
    ]
}

/// The store on `s`'s keyspace (it must be migrated), to look at what the nodes wrote.
pub async fn open(s: &CassandraSettings) -> CassandraStore {
    let cfg = s.to_config().expect("valid settings");
    CassandraStore::connect(&cfg)
        .await
        .expect("open the Cassandra store")
}
