//! The CQL schema (`storage/cql/*.cql`, compiled in) and the migrator: splitting the files
//! into statements, filling the keyspace and replication placeholders, and applying them
//! once per schema version.

use scylla::client::session::Session;
use scylla::statement::Statement;

use super::config::CassandraConfig;
use super::error::{CassandraError, drv};
use crate::error::StorageError;

/// Newest schema version this build knows (the number of the last `storage/cql` file).
pub const SCHEMA_VERSION: i32 = 3;

/// `component` of this schema's rows in `schema_version`.
pub(crate) const COMPONENT: &str = "meshchat";

/// Key of the bucket width in the `settings` table.
pub(crate) const BUCKET_WIDTH_SETTING: &str = "bucket_width_ms";

/// The schema files, in order: (version, file name, text).
const FILES: &[(i32, &str, &str)] = &[
    (
        1,
        "001_schema.cql",
        include_str!("../../cql/001_schema.cql"),
    ),
    (
        2,
        "002_channel_access.cql",
        include_str!("../../cql/002_channel_access.cql"),
    ),
    (
        3,
        "003_sign_outs.cql",
        include_str!("../../cql/003_sign_outs.cql"),
    ),
];

/// Splits a schema file into statements: drops whole-line `--` comments and blank lines,
/// splits on `;` and trims. Every statement comes back without its `;`.
pub(crate) fn split_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        for (n, part) in trimmed.split(';').enumerate() {
            if n > 0 {
                let stmt = current.trim().to_owned();
                if !stmt.is_empty() {
                    out.push(stmt);
                }
                current.clear();
            }
            if !part.trim().is_empty() {
                if !current.is_empty() {
                    current.push(' ');
                }
                current.push_str(part.trim());
            }
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// Fills `${keyspace}` and `${replication}`.
fn fill(stmt: &str, cfg: &CassandraConfig) -> String {
    stmt.replace("${keyspace}", &cfg.keyspace)
        .replace("${replication}", &cfg.replication_cql())
}

/// Which server the migrator talks to: keyspace options differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFlavour {
    /// Apache Cassandra (refuses a `tablets` keyspace option).
    Cassandra,
    /// ScyllaDB. `tablets`: the server supports tablets (6.0+), where they are on by default
    /// for new keyspaces and lightweight transactions are refused in tablet keyspaces, so
    /// meshchat's keyspace is created with tablets off.
    Scylla {
        /// The server knows tablets (has `system.tablets`).
        tablets: bool,
    },
}

/// The clause a keyspace needs on this server, appended to `CREATE KEYSPACE`.
fn keyspace_clause(flavour: ServerFlavour) -> &'static str {
    match flavour {
        ServerFlavour::Scylla { tablets: true } => " AND tablets = {'enabled': false}",
        _ => "",
    }
}

/// Tells Cassandra from ScyllaDB by the system tables only ScyllaDB has
/// (`system.scylla_local`; `system.tablets` on versions with tablets).
pub async fn detect_server(session: &Session) -> Result<ServerFlavour, StorageError> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'system' \
             AND table_name IN ('scylla_local', 'tablets')",
            (),
        )
        .await
        .map_err(drv)?
        .into_rows_result()
        .map_err(drv)?;
    let mut names = Vec::new();
    for row in rows.rows::<(String,)>().map_err(drv)? {
        names.push(row.map_err(drv)?.0);
    }
    Ok(flavour_from_tables(&names))
}

fn flavour_from_tables(names: &[String]) -> ServerFlavour {
    if names.iter().any(|n| n == "scylla_local") {
        ServerFlavour::Scylla {
            tablets: names.iter().any(|n| n == "tablets"),
        }
    } else {
        ServerFlavour::Cassandra
    }
}

fn statements_of(cfg: &CassandraConfig, newer_than: i32, flavour: ServerFlavour) -> Vec<String> {
    FILES
        .iter()
        .filter(|(v, _, _)| *v > newer_than)
        .flat_map(|(_, _, text)| split_statements(text))
        .map(|s| {
            let mut stmt = fill(&s, cfg);
            if stmt.starts_with("CREATE KEYSPACE ") {
                stmt.push_str(keyspace_clause(flavour));
            }
            stmt
        })
        .collect()
}

/// Every schema statement for `cfg` on Apache Cassandra, placeholders filled, in the order
/// the migrator runs them (each without a trailing `;`).
pub fn schema_statements(cfg: &CassandraConfig) -> Vec<String> {
    statements_of(cfg, 0, ServerFlavour::Cassandra)
}

/// Like [`schema_statements`] for a given server (ScyllaDB with tablets gets
/// `AND tablets = {'enabled': false}` on its keyspace).
pub fn schema_statements_for(cfg: &CassandraConfig, flavour: ServerFlavour) -> Vec<String> {
    statements_of(cfg, 0, flavour)
}

/// Outside development (see [`CassandraConfig::is_dev`]), refuses a keyspace replicated
/// fewer than [`MIN_PRODUCTION_RF`](super::config::MIN_PRODUCTION_RF) times in a datacenter,
/// unless `allow_weak_durability` is set: the config's `replication` only applies when the
/// migrator creates the keyspace, so the keyspace itself is checked.
pub async fn check_replication(
    session: &Session,
    cfg: &CassandraConfig,
) -> Result<(), StorageError> {
    if cfg.is_dev() || cfg.allow_weak_durability {
        return Ok(());
    }
    let row = session
        .query_unpaged(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (cfg.keyspace.as_str(),),
        )
        .await
        .map_err(drv)?
        .into_rows_result()
        .map_err(drv)?
        .maybe_first_row::<(std::collections::HashMap<String, String>,)>()
        .map_err(drv)?;
    let Some((replication,)) = row else {
        return Err(CassandraError::NotMigrated(cfg.keyspace.clone()).into());
    };
    match weak_replica_count(&replication) {
        Some((dc, rf)) => Err(CassandraError::WeakReplication {
            keyspace: cfg.keyspace.clone(),
            datacenter: dc,
            replicas: rf,
        }
        .into()),
        None => Ok(()),
    }
}

/// The first datacenter (or `replication_factor` of SimpleStrategy) with fewer than
/// `MIN_PRODUCTION_RF` replicas.
fn weak_replica_count(
    replication: &std::collections::HashMap<String, String>,
) -> Option<(String, u32)> {
    let mut entries: Vec<_> = replication.iter().filter(|(k, _)| *k != "class").collect();
    entries.sort();
    entries.into_iter().find_map(|(dc, rf)| {
        // "3", or "3/1" (replicas/transient) on Cassandra 4+.
        let full = rf.split('/').next().unwrap_or(rf).trim();
        let n = full.parse::<u32>().unwrap_or(0);
        (n < super::config::MIN_PRODUCTION_RF).then(|| (dc.clone(), n))
    })
}

/// "Acked means durable" also needs the servers to fsync their commit log before they
/// acknowledge (`commitlog_sync: batch` or `group`); `periodic` (Cassandra's default)
/// acknowledges first and syncs every 10 s. Reads the contacted node's setting where the
/// server exposes it (Cassandra 4+: `system_views.settings`) and warns if it is periodic.
pub async fn warn_unless_commitlog_is_synced(session: &Session, cfg: &CassandraConfig) {
    let read = session
        .query_unpaged(
            "SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'",
            (),
        )
        .await
        .map_err(drv)
        .and_then(|r| r.into_rows_result().map_err(drv))
        .and_then(|r| r.maybe_first_row::<(Option<String>,)>().map_err(drv));
    match read {
        Ok(Some((Some(mode),))) if mode.eq_ignore_ascii_case("periodic") => {
            tracing::warn!(
                keyspace = %cfg.keyspace,
                "the server runs commitlog_sync: periodic: it acknowledges writes before they \
                 are on disk, so a power loss of a quorum can lose acked messages; use batch or group"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "commitlog_sync setting not readable"),
    }
}

/// The schema version recorded in the keyspace, `None` if the keyspace or the version table
/// does not exist yet.
pub async fn stored_version(
    session: &Session,
    cfg: &CassandraConfig,
) -> Result<Option<i32>, StorageError> {
    let ks = &cfg.keyspace;
    let exists = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = ?",
            (ks.as_str(), "schema_version"),
        )
        .await
        .map_err(drv)?
        .into_rows_result()
        .map_err(drv)?
        .rows_num()
        > 0;
    if !exists {
        return Ok(None);
    }
    let mut q = Statement::new(format!(
        "SELECT version FROM {ks}.schema_version WHERE component = ? LIMIT 1"
    ));
    q.set_is_idempotent(true);
    let row = session
        .query_unpaged(q, (COMPONENT,))
        .await
        .map_err(drv)?
        .into_rows_result()
        .map_err(drv)?
        .maybe_first_row::<(i32,)>()
        .map_err(drv)?;
    Ok(row.map(|(v,)| v))
}

/// Brings the keyspace to [`SCHEMA_VERSION`] and returns the statements run (with
/// `dry_run`, the statements that would run; nothing is executed).
///
/// Idempotent: every statement is `CREATE ... IF NOT EXISTS`, and a version already
/// recorded in `schema_version` is skipped. A keyspace from a newer build is refused with
/// [`StorageError::SchemaTooNew`]. The first run also records the history bucket width;
/// a later run with another width fails.
pub async fn migrate(
    session: &Session,
    cfg: &CassandraConfig,
    dry_run: bool,
) -> Result<Vec<String>, StorageError> {
    cfg.validate()?;
    let found = stored_version(session, cfg).await?.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew {
            found: i64::from(found),
            supported: i64::from(SCHEMA_VERSION),
        });
    }
    let todo = statements_of(cfg, found, detect_server(session).await?);
    if dry_run {
        return Ok(todo);
    }
    for stmt in &todo {
        // DDL: the driver waits for schema agreement after each one.
        session
            .query_unpaged(stmt.as_str(), ())
            .await
            .map_err(drv)?;
    }
    let ks = &cfg.keyspace;
    // Record the bucket width once; a different width later is an error (data would be
    // looked for in the wrong partitions).
    let claim = session
        .query_unpaged(
            format!("INSERT INTO {ks}.settings (name, value) VALUES (?, ?) IF NOT EXISTS"),
            (BUCKET_WIDTH_SETTING, width_i64(cfg.bucket_width_ms)),
        )
        .await
        .map_err(drv)?;
    let outcome = super::rows::lwt_outcome(claim)?;
    if let Some(stored) = outcome.existing_bigint("value")
        && stored as u64 != cfg.bucket_width_ms
    {
        return Err(CassandraError::BucketWidthMismatch {
            stored: stored as u64,
            configured: cfg.bucket_width_ms,
        }
        .into());
    }
    for (version, _, _) in FILES.iter().filter(|(v, _, _)| *v > found) {
        let mut q = Statement::new(format!(
            "INSERT INTO {ks}.schema_version (component, version, applied_at) \
             VALUES (?, ?, toTimestamp(now()))"
        ));
        q.set_is_idempotent(true);
        session
            .query_unpaged(q, (COMPONENT, *version))
            .await
            .map_err(drv)?;
    }
    Ok(todo)
}

fn width_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn splitting_drops_comments_and_blanks() {
        let text = "-- a comment\nCREATE TABLE a (\n  x int\n);\n\n-- another\nCREATE TABLE b (y int);\n  ;\n";
        assert_eq!(
            split_statements(text),
            vec!["CREATE TABLE a ( x int )", "CREATE TABLE b (y int)"]
        );
        assert_eq!(
            split_statements("SELECT 1; SELECT 2"),
            vec!["SELECT 1", "SELECT 2"]
        );
        assert!(split_statements("-- only a comment\n\n").is_empty());
    }

    #[test]
    fn schema_file_parses_into_filled_statements() {
        let cfg = CassandraConfig {
            keyspace: "chat_ks".into(),
            replication: BTreeMap::from([("eu".into(), 3)]),
            ..CassandraConfig::default()
        };
        let stmts = schema_statements(&cfg);
        assert!(stmts.len() >= 14, "got {} statements", stmts.len());
        for s in &stmts {
            assert!(!s.trim().is_empty(), "empty statement");
            assert!(!s.contains(';'), "a statement holds a ';': {s}");
            assert!(!s.contains("${"), "unfilled placeholder: {s}");
            assert!(!s.contains("--"), "comment left in: {s}");
            assert!(s.contains("IF NOT EXISTS"), "not idempotent: {s}");
            assert!(s.starts_with("CREATE "), "not DDL: {s}");
            assert_eq!(
                s.matches('(').count(),
                s.matches(')').count(),
                "unbalanced: {s}"
            );
        }
        assert_eq!(
            stmts[0],
            "CREATE KEYSPACE IF NOT EXISTS chat_ks WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'eu': 3} AND durable_writes = true"
        );
        for table in [
            "schema_version",
            "settings",
            "messages",
            "chat_buckets",
            "chat_latest",
            "idempotency",
            "user_chats",
            "receipt_marks",
            "users",
            "users_by_name",
            "channels",
            "channels_by_name",
            "channel_members",
            "channels_by_user",
            "private_channels",
            "channel_admins",
            "user_sign_outs",
        ] {
            let head = format!("CREATE TABLE IF NOT EXISTS chat_ks.{table} (");
            assert_eq!(
                stmts.iter().filter(|s| s.starts_with(&head)).count(),
                1,
                "table {table}"
            );
        }
        let messages = stmts
            .iter()
            .find(|s| s.contains("chat_ks.messages ("))
            .expect("messages table");
        assert!(messages.contains("PRIMARY KEY ((chat, bucket), id)"));
        assert!(messages.contains("CLUSTERING ORDER BY (id DESC)"));
    }

    #[test]
    fn the_last_file_is_the_schema_version() {
        assert_eq!(FILES.last().map(|f| f.0), Some(SCHEMA_VERSION));
        assert!(FILES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(
            statements_of(
                &CassandraConfig::default(),
                SCHEMA_VERSION,
                ServerFlavour::Cassandra
            )
            .is_empty()
        );
    }

    #[test]
    fn scylla_with_tablets_gets_tablets_off_and_cassandra_does_not() {
        let cfg = CassandraConfig::default();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(flavour_from_tables(&names(&[])), ServerFlavour::Cassandra);
        assert_eq!(
            flavour_from_tables(&names(&["scylla_local"])),
            ServerFlavour::Scylla { tablets: false }
        );
        assert_eq!(
            flavour_from_tables(&names(&["tablets", "scylla_local"])),
            ServerFlavour::Scylla { tablets: true }
        );
        let cassandra = schema_statements_for(&cfg, ServerFlavour::Cassandra);
        assert_eq!(cassandra, schema_statements(&cfg));
        assert!(cassandra.iter().all(|s| !s.contains("tablets")));
        let old_scylla = schema_statements_for(&cfg, ServerFlavour::Scylla { tablets: false });
        assert_eq!(old_scylla, cassandra);
        let scylla = schema_statements_for(&cfg, ServerFlavour::Scylla { tablets: true });
        assert!(scylla[0].starts_with("CREATE KEYSPACE IF NOT EXISTS meshchat"));
        assert!(scylla[0].ends_with("AND durable_writes = true AND tablets = {'enabled': false}"));
        assert_eq!(scylla.iter().filter(|s| s.contains("tablets")).count(), 1);
    }

    #[test]
    fn weak_replication_is_found() {
        let map = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let nts = "org.apache.cassandra.locator.NetworkTopologyStrategy";
        assert_eq!(
            weak_replica_count(&map(&[("class", nts), ("dc1", "3"), ("dc2", "1")])),
            Some(("dc2".into(), 1))
        );
        assert_eq!(
            weak_replica_count(&map(&[("class", nts), ("dc1", "3")])),
            None
        );
        assert_eq!(
            weak_replica_count(&map(&[("class", nts), ("dc1", "5/2")])),
            None
        );
        assert_eq!(
            weak_replica_count(&map(&[
                ("class", "org.apache.cassandra.locator.SimpleStrategy"),
                ("replication_factor", "2")
            ])),
            Some(("replication_factor".into(), 2))
        );
    }
}
