//! The embedded store's schema and connection settings. Versioned with `PRAGMA user_version`.
//!
//! Keys mirror the Cassandra schema (`storage/cql/`, a later issue) so both backends answer the
//! same queries the same way: history keyed by `(chat, id)`, chat lists by `(user, chat)`,
//! members by `(channel, user)` with an index for `(user, channel)`.

use rusqlite::Connection;

use super::Durability;
use crate::error::StorageError;

/// Schema version written to `PRAGMA user_version`.
/// 2: the idempotency key includes the chat.
/// 3: private channels, channel admins, and sign-outs (`users.signed_out_before`).
pub(super) const SCHEMA_VERSION: i64 = 3;

/// Version 1 -> 2: the idempotency key was (sender, client_msg_id), so a client id reused
/// in another chat was acked as a duplicate and not stored. Rebuilds the table with the chat
/// in the key (existing rows keep their meaning: each names its chat).
const MIGRATE_V1: &str = r#"
CREATE TABLE idempotency_v2 (
    sender        INTEGER NOT NULL,
    chat          TEXT    NOT NULL,
    client_msg_id TEXT    NOT NULL,
    message_id    INTEGER NOT NULL,
    PRIMARY KEY (sender, chat, client_msg_id)
) WITHOUT ROWID;
INSERT INTO idempotency_v2 (sender, chat, client_msg_id, message_id)
    SELECT sender, chat, client_msg_id, message_id FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
"#;

/// Version 2 -> 3: a channel is public or private (existing ones stay public); the admins
/// table is created by [`SCHEMA`].
const MIGRATE_V2_CHANNELS: &str = r#"
ALTER TABLE channels ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
"#;

/// Version 2 -> 3: logins before this time (Unix milliseconds) are signed out (0: none).
const MIGRATE_V2_USERS: &str = r#"
ALTER TABLE users ADD COLUMN signed_out_before INTEGER NOT NULL DEFAULT 0;
"#;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    password_hash     TEXT NOT NULL,
    signed_out_before INTEGER NOT NULL DEFAULT 0
);

-- History: one row per message, clustered by chat then id (WITHOUT ROWID = the primary key
-- is the b-tree key, so a page is one range scan).
CREATE TABLE IF NOT EXISTS messages (
    chat          TEXT    NOT NULL,
    id            INTEGER NOT NULL,
    sender        INTEGER NOT NULL,
    client_msg_id TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    reply_to      INTEGER,
    PRIMARY KEY (chat, id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS reactions (
    chat       TEXT    NOT NULL,
    message_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    emoji      TEXT    NOT NULL,
    PRIMARY KEY (chat, message_id, user_id)
) WITHOUT ROWID;

-- Idempotency: (sender, chat, client message id) -> the first message stored for it.
-- (Version 1 keyed it by (sender, client message id) only: see MIGRATE_V1.)
CREATE TABLE IF NOT EXISTS idempotency (
    sender        INTEGER NOT NULL,
    chat          TEXT    NOT NULL,
    client_msg_id TEXT    NOT NULL,
    message_id    INTEGER NOT NULL,
    PRIMARY KEY (sender, chat, client_msg_id)
) WITHOUT ROWID;

-- Newest message per chat (for ordering chat lists).
CREATE TABLE IF NOT EXISTS chats (
    chat            TEXT    PRIMARY KEY,
    last_message_id INTEGER NOT NULL
) WITHOUT ROWID;

-- Each user's chats with their receipt marks.
CREATE TABLE IF NOT EXISTS user_chats (
    user_id   INTEGER NOT NULL,
    chat      TEXT    NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    seen      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, chat)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS channels (
    id      INTEGER PRIMARY KEY,
    name    TEXT    NOT NULL UNIQUE,
    owner   INTEGER NOT NULL,
    private INTEGER NOT NULL DEFAULT 0
);

-- Members made admins by the owner (the owner is an admin without a row).
CREATE TABLE IF NOT EXISTS channel_admins (
    channel_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    PRIMARY KEY (channel_id, user_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS channel_members (
    channel_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    PRIMARY KEY (channel_id, user_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS channel_members_by_user ON channel_members (user_id, channel_id);
"#;

/// Sets the connection up (WAL, durability, foreign settings) and creates the schema.
pub(super) fn prepare(conn: &Connection, durability: Durability) -> Result<(), StorageError> {
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    // journal_mode=WAL is persistent in the file; setting it again is a no-op.
    // Under load (the load test's direct scenario) the writer spent a third of its time
    // re-reading index pages through pread (SQLite's default page cache is 2 MiB) and a tenth
    // in automatic checkpoints inside its commits. A 64 MiB cache (allocated as used) and
    // reads through mmap cut the first; the store's checkpointer thread takes the second out
    // of the commit path. The automatic checkpoint stays, at 65,536 pages, only as a safety
    // net should the checkpointer fall behind. See docs/PERFORMANCE.md.
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = {sync};
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -65536;
         PRAGMA mmap_size = 268435456;
         PRAGMA wal_autocheckpoint = 65536;"
    ))
    .map_err(StorageError::backend)?;
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(StorageError::backend)?;
    if found > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    // Another process may migrate at the same time: the version is read again under the
    // write lock, and the whole upgrade is one transaction.
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(StorageError::backend)?;
    let upgrade = (|| {
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found == 1 {
            conn.execute_batch(MIGRATE_V1)?;
        }
        let has_column = |table: &str, column: &str| -> rusqlite::Result<bool> {
            conn.query_row(
                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )
        };
        // By column, not by version number: a file written by a build that had version 3
        // without sign-outs gains them too.
        if found >= 1 {
            if !has_column("channels", "private")? {
                conn.execute_batch(MIGRATE_V2_CHANNELS)?;
            }
            if !has_column("users", "signed_out_before")? {
                conn.execute_batch(MIGRATE_V2_USERS)?;
            }
        }
        conn.execute_batch(&format!("{SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};"))?;
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = upgrade {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(StorageError::backend(e));
    }
    Ok(())
}

/// Whether `e` is SQLite's "database is busy/locked" (worth retrying).
pub(super) fn is_busy(e: &StorageError) -> bool {
    let StorageError::Backend(inner) = e else {
        return false;
    };
    matches!(
        inner.downcast_ref::<rusqlite::Error>(),
        Some(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}
