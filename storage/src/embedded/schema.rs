//! The embedded store's schema and connection settings. Versioned with `PRAGMA user_version`.
//!
//! Keys mirror the Cassandra schema (`storage/cql/`, a later issue) so both backends answer the
//! same queries the same way: history keyed by `(chat, id)`, chat lists by `(user, chat)`,
//! members by `(channel, user)` with an index for `(user, channel)`.

use rusqlite::{Connection, OptionalExtension};

use crate::error::StorageError;

/// Schema version written to `PRAGMA user_version`.
/// 2: the idempotency key includes the chat.
/// 3: private channels, channel admins, and sign-outs (`users.signed_out_before`).
/// 4: idempotency is a unique index of `messages` (no `idempotency` table), and `chats` keeps
///    no newest-message id (readers take the chat's max(id) from `messages`): an append writes
///    one row and its index entries, nothing else.
/// 5: no `chats` table: a chat's first message is told by `messages` itself (the chat's newest
///    two rows), so an append no longer looks a chat up in a table of its own, and a chat's
///    first message writes one row fewer.
/// 6: the idempotency index leads with the client message id, `(client_msg_id, sender, chat)`:
///    the client library's ids begin with the time, so the index grows at its end (a few
///    pages shared by every chat) instead of one page in each chat's part of it.
pub(super) const SCHEMA_VERSION: i64 = 6;

/// Versions 1 to 3 kept idempotency keys in their own table, written beside every message
/// (version 1 keyed it without the chat). Each row named a message stored in the same
/// transaction, so `messages` holds every key: the table goes, and [`SCHEMA`] builds the
/// unique index from the messages themselves.
const MIGRATE_IDEMPOTENCY: &str = "DROP TABLE IF EXISTS idempotency;";

/// Versions 1 to 4 kept the set of chats with a message in `chats` (1 to 3 also each chat's
/// newest message id, updated by every append). The chat's rows in `messages` answer both.
const MIGRATE_CHATS: &str = "DROP TABLE IF EXISTS chats;";

/// Versions 4 and 5 kept the idempotency index in chat order; [`SCHEMA`] builds it again in
/// the order of version 6 (same columns, same uniqueness, so the messages cannot clash). A
/// build of version 5 still running meanwhile keeps working: its conflict target names the
/// same columns, and SQLite matches them in any order.
const MIGRATE_CLIENT_ID_ORDER: &str = "DROP INDEX IF EXISTS messages_by_client_id;";

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

-- Idempotency: (client message id, sender, chat) -> the first message stored for it. An
-- append inserts with ON CONFLICT on this index, so a retry costs one lookup and no write.
-- The client id leads: ids that begin with the time (the client library's) make every
-- append's entry land at the index's end, on a page the last appends wrote too.
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_client_id
    ON messages (client_msg_id, sender, chat);

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

/// Sets the writer's connection up (WAL, settings) and creates or upgrades the schema.
///
/// `synchronous=NORMAL`: commits do not fsync; the store's syncer thread fsyncs the WAL before
/// a write is answered when durability is Full (see `writer`).
pub(super) fn prepare(conn: &Connection) -> Result<(), StorageError> {
    // journal_mode=WAL is persistent in the file; setting it again is a no-op.
    // A 64 MiB page cache (allocated as used) keeps the hot index pages: with SQLite's default
    // 2 MiB, pages evicted while their newest version sat in the WAL were read back through
    // pread (28% of the writer under load) and the node's per-second p99 had 100 ms outliers.
    // It costs a walk of the cache's hash table at every commit (pcache1Truncate, ~6% of the
    // writer). Clean pages of the database file are read through mmap. Checkpoints run on the
    // store's checkpointer thread, not inside commits; the automatic checkpoint stays, at
    // 65,536 pages, only as a safety net should it fall behind, and a WAL that grew past
    // 64 MiB is cut back when it restarts. See docs/PERFORMANCE.md (embedded store).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -65536;
         PRAGMA mmap_size = 268435456;
         PRAGMA wal_autocheckpoint = 65536;",
    )
    .map_err(StorageError::backend)?;
    // The syncer fsyncs the `-wal` file: the store must really be in WAL mode (a file system
    // without shared memory for the WAL index would leave it in another journal mode).
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(StorageError::backend)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::backend(std::io::Error::other(format!(
            "the store could not switch to WAL mode (journal_mode is {mode})"
        ))));
    }
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
        if found > SCHEMA_VERSION {
            // A newer build upgraded the file since the check above: leave it as it is.
            return Ok(Some(found));
        }
        if (1..4).contains(&found) {
            // The unique index below is built from the messages; no version of meshchat stores
            // two messages under one key, but say which chat if a file does.
            let clash: Option<String> = conn
                .query_row(
                    "SELECT chat FROM messages GROUP BY chat, sender, client_msg_id
                     HAVING count(*) > 1 LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(chat) = clash {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "cannot upgrade: chat {chat} holds two messages with one (sender, client id)"
                )));
            }
            conn.execute_batch(MIGRATE_IDEMPOTENCY)?;
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
            conn.execute_batch(MIGRATE_CHATS)?;
        }
        // By shape, not by version: only an index in chat order is rebuilt, so a file already
        // in client-id order (a version-6 one) never is.
        let leading: Option<String> = conn
            .query_row(
                "SELECT name FROM pragma_index_info('messages_by_client_id') WHERE seqno = 0",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if leading.as_deref() == Some("chat") {
            conn.execute_batch(MIGRATE_CLIENT_ID_ORDER)?;
        }
        conn.execute_batch(&format!("{SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};"))?;
        conn.execute_batch("COMMIT")?;
        Ok(None)
    })();
    match upgrade {
        Ok(None) => Ok(()),
        Ok(Some(found)) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(StorageError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            })
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(StorageError::backend(e))
        }
    }
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
