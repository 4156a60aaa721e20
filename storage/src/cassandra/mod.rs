//! The Cassandra/ScyllaDB backend (feature `cassandra`): [`CassandraStore`] implements
//! [`HistoryStore`] and [`StateStore`] over the `scylla` driver.
//!
//! - [`config`]: [`CassandraConfig`] and its validation.
//! - [`schema`]: the CQL schema (`storage/cql/`) and the versioned, idempotent migrator.
//! - `statements`: every statement, prepared once per store.
//! - `rows`: CQL <-> model mapping, history buckets, LWT results.
//! - [`error`]: [`CassandraError`], reaching callers as [`StorageError::Backend`].
//!
//! Concurrency rules (see docs/STORAGE.md): no value is read-modified-written. Unread
//! counts and newest messages are computed from history; receipt marks are clustering rows
//! whose maximum is the mark; names and idempotency keys are claimed with Paxos
//! (`IF NOT EXISTS`). Every write waits for the configured consistency before it returns.

pub mod config;
pub mod error;
mod rows;
pub mod schema;
mod statements;

use std::cmp::Reverse;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::statement::Statement;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::MaybeUnset;

pub use config::CassandraConfig;
/// The driver's consistency levels, re-exported so config code needs no direct `scylla` dependency.
pub mod consistency {
    pub use scylla::statement::{Consistency, SerialConsistency};
}
pub use error::{CassandraError, ConfigError};
pub use rows::bucket_of;
pub use schema::{
    SCHEMA_VERSION, ServerFlavour, detect_server, migrate, schema_statements, schema_statements_for,
};

use error::drv;
use rows::{LwtOutcome, MessageRow, chat_key, i, lwt_outcome, mark_kind, parse_chat, u};
use statements::{Prepared, Texts};

use crate::error::StorageError;
use crate::model::{
    AppendOutcome, Channel, ChatSummary, Direction, Marks, NewMessage, PageQuery, ReceiptKind,
    StoredMessage, UNREAD_CAP, User, UserCredentials, check_emoji, check_name,
};
use crate::traits::{HistoryStore, StateStore};

/// How many chats of one chat list are looked at concurrently.
const CHAT_LIST_FANOUT: usize = 16;

/// Rows of `chat_buckets` read per request while walking a chat's buckets.
const BUCKETS_PER_READ: i32 = 8;

/// Rows per request while counting unread messages (the count stops at [`UNREAD_CAP`],
/// or earlier at the seen mark).
const UNREAD_ROWS_PER_READ: i32 = 1_000;

/// Attempts of a lightweight transaction that timed out (contention on one partition, or
/// a lost reply). Every LWT here is safe to repeat: a repeat that finds the row it wrote
/// itself recognises it (same id) and carries on.
const LWT_ATTEMPTS: usize = 4;

/// Whether a failed request is a timeout (server- or client-side) that a repeat may cure.
fn is_timeout(e: &StorageError) -> bool {
    let StorageError::Backend(inner) = e else {
        return false;
    };
    let Some(CassandraError::Execution(e)) = inner.downcast_ref::<CassandraError>() else {
        return false;
    };
    match e {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
            db,
            DbError::WriteTimeout { .. }
                | DbError::ReadTimeout { .. }
                | DbError::Unavailable { .. }
        ),
        _ => false,
    }
}

/// The write timestamp (microseconds) of a message's `chat_latest` cell: its Snowflake time,
/// so the newest id wins however concurrent appends are ordered.
fn latest_timestamp(id: MessageId) -> i64 {
    i64::try_from(id.snowflake().unix_ms().saturating_mul(1_000)).unwrap_or(i64::MAX)
}

/// Opens a driver session for `cfg`: token-aware load balancing preferring `local_dc`,
/// the configured consistency, serial consistency and timeout on every request, and the
/// driver's default retry policy (which retries timed-out writes only when a statement is
/// marked idempotent).
pub async fn connect_session(cfg: &CassandraConfig) -> Result<Session, StorageError> {
    cfg.validate()?;
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cfg.local_dc {
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(cfg.consistency)
        .serial_consistency(Some(cfg.serial_consistency))
        .request_timeout(Some(cfg.request_timeout))
        .load_balancing_policy(policy.build())
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .build();
    SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .map_err(drv)
}

/// A [`Storage`](crate::Storage) backend on Cassandra or ScyllaDB.
pub struct CassandraStore {
    session: Arc<Session>,
    st: Prepared,
    width_ms: u64,
    idempotency_ttl: i32,
}

impl std::fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraStore")
            .field("width_ms", &self.width_ms)
            .finish_non_exhaustive()
    }
}

impl CassandraStore {
    /// Connects and prepares every statement. The keyspace must be migrated ([`migrate`]);
    /// a keyspace from a newer build is refused ([`StorageError::SchemaTooNew`]), as is a
    /// config whose bucket width differs from the keyspace's.
    pub async fn connect(cfg: &CassandraConfig) -> Result<Self, StorageError> {
        let session = connect_session(cfg).await?;
        Self::with_session(Arc::new(session), cfg).await
    }

    /// Like [`CassandraStore::connect`] on an open session (shared with other users).
    pub async fn with_session(
        session: Arc<Session>,
        cfg: &CassandraConfig,
    ) -> Result<Self, StorageError> {
        cfg.validate()?;
        match schema::stored_version(&session, cfg).await? {
            None => return Err(CassandraError::NotMigrated(cfg.keyspace.clone()).into()),
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StorageError::SchemaTooNew {
                    found: i64::from(found),
                    supported: i64::from(SCHEMA_VERSION),
                });
            }
            Some(found) if found < SCHEMA_VERSION => {
                return Err(CassandraError::Outdated {
                    keyspace: cfg.keyspace.clone(),
                    found,
                    needed: SCHEMA_VERSION,
                }
                .into());
            }
            Some(_) => {}
        }
        let mut q = Statement::new(format!(
            "SELECT value FROM {}.settings WHERE name = ?",
            cfg.keyspace
        ));
        q.set_is_idempotent(true);
        let stored = session
            .query_unpaged(q, (schema::BUCKET_WIDTH_SETTING,))
            .await
            .map_err(drv)?
            .into_rows_result()
            .map_err(drv)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(drv)?
            .and_then(|(v,)| v)
            .ok_or_else(|| CassandraError::NotMigrated(cfg.keyspace.clone()))?;
        if u(stored) != cfg.bucket_width_ms {
            return Err(CassandraError::BucketWidthMismatch {
                stored: u(stored),
                configured: cfg.bucket_width_ms,
            }
            .into());
        }
        schema::check_replication(&session, cfg).await?;
        schema::warn_unless_commitlog_is_synced(&session, cfg).await;
        let st = Prepared::prepare(&session, &Texts::new(&cfg.keyspace)).await?;
        Ok(Self {
            session,
            st,
            width_ms: cfg.bucket_width_ms,
            idempotency_ttl: cfg.idempotency_ttl_secs(),
        })
    }

    /// The driver session (for health checks and metrics).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    fn bucket(&self, id: MessageId) -> i32 {
        bucket_of(id, self.width_ms)
    }

    async fn exec(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<scylla::response::query_result::QueryResult, StorageError> {
        self.session.execute_unpaged(st, values).await.map_err(drv)
    }

    /// Runs a lightweight transaction, repeating it on a timeout (see [`LWT_ATTEMPTS`]): the
    /// callers treat "not applied, but the existing row is ours" as success.
    async fn lwt(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow + Clone,
    ) -> Result<LwtOutcome, StorageError> {
        let mut attempt = 1;
        loop {
            match self.exec(st, values.clone()).await.and_then(lwt_outcome) {
                Err(e) if attempt < LWT_ATTEMPTS && is_timeout(&e) => {
                    tracing::debug!(error = %e, attempt, "lightweight transaction timed out; repeating it");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// All rows of a (paged) query, decoded as `R`.
    async fn all<R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>, StorageError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(drv)?
            .rows_stream::<R>()
            .map_err(drv)?
            .map_err(drv)
            .try_collect()
            .await
    }

    /// The first row of an unpaged query, decoded as `R`.
    async fn first<R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Option<R>, StorageError>
    where
        R: for<'f> scylla::deserialize::row::DeserializeRow<'f, 'f>,
    {
        self.exec(st, values)
            .await?
            .into_rows_result()
            .map_err(drv)?
            .maybe_first_row::<R>()
            .map_err(drv)
    }

    async fn message_exists(&self, chat: ChatId, id: MessageId) -> Result<bool, StorageError> {
        Ok(self.message(chat, id).await?.is_some())
    }

    /// Writes a message and everything that makes it visible: its row, then its bucket in
    /// the chat's bucket index, the chat's newest id and (1:1) the chat on both users' lists.
    /// All blind, idempotent upserts, so a retry (or a later duplicate) may write them again.
    async fn write_message(&self, m: &NewMessage) -> Result<(), StorageError> {
        let key = chat_key(m.chat);
        let reply_to = match m.reply_to {
            Some(r) => MaybeUnset::Set(i(r.0)),
            None => MaybeUnset::Unset,
        };
        self.exec(
            &self.st.insert_message,
            (
                &key,
                self.bucket(m.id),
                i(m.id.0),
                i(m.sender.0),
                &m.client_msg_id,
                &m.body[..],
                reply_to,
            ),
        )
        .await?;
        self.write_companions(m.chat, m.id).await
    }

    /// The rows that make a stored message findable: its bucket, the chat's newest id, and
    /// (1:1) both users' chat lists. Written after the message row, so nothing points at a
    /// message that is not there.
    async fn write_companions(&self, chat: ChatId, id: MessageId) -> Result<(), StorageError> {
        let key = chat_key(chat);
        futures::try_join!(
            self.exec(&self.st.insert_bucket, (&key, self.bucket(id))),
            self.exec(&self.st.set_latest, (latest_timestamp(id), i(id.0), &key)),
            self.list_direct_chat(chat),
        )?;
        Ok(())
    }

    /// Puts a 1:1 chat on both participants' chat lists (key-only rows: marks untouched).
    async fn list_direct_chat(&self, chat: ChatId) -> Result<(), StorageError> {
        if let ChatId::Direct { low, high } = chat {
            let key = chat_key(chat);
            futures::try_join!(
                self.exec(&self.st.add_user_chat, (i(low.0), &key)),
                self.exec(&self.st.add_user_chat, (i(high.0), &key)),
            )?;
        }
        Ok(())
    }

    /// Reads one page of one bucket.
    async fn bucket_page(
        &self,
        chat: ChatId,
        bucket: i32,
        direction: Direction,
        bound: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let st = match direction {
            Direction::Backward => &self.st.page_backward,
            Direction::Forward => &self.st.page_forward,
        };
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows: Vec<MessageRow> = self.all(st, (chat_key(chat), bucket, bound, limit)).await?;
        Ok(rows.into_iter().map(|r| r.into_message(chat)).collect())
    }

    /// Up to [`BUCKETS_PER_READ`] of the chat's non-empty buckets from `start` (inclusive)
    /// in `direction`. Exact: every append records its bucket, so empty buckets are never
    /// probed and the walk ends where the chat starts or ends.
    async fn buckets(
        &self,
        chat: ChatId,
        start: i32,
        direction: Direction,
    ) -> Result<Vec<i32>, StorageError> {
        let st = match direction {
            Direction::Backward => &self.st.buckets_down,
            Direction::Forward => &self.st.buckets_up,
        };
        let rows = self
            .exec(st, (chat_key(chat), start, BUCKETS_PER_READ))
            .await?
            .into_rows_result()
            .map_err(drv)?;
        rows.rows::<(i32,)>()
            .map_err(drv)?
            .map(|r| r.map(|(b,)| b).map_err(drv))
            .collect()
    }

    /// The next bucket to read after `last` in `direction`, `None` past the end.
    fn next_start(last: i32, direction: Direction) -> Option<i32> {
        match direction {
            Direction::Backward => last.checked_sub(1),
            Direction::Forward => last.checked_add(1),
        }
    }

    /// The newest message id of a chat (one single-row read).
    async fn latest_id(&self, chat: ChatId) -> Result<Option<MessageId>, StorageError> {
        Ok(self
            .first::<(Option<i64>,)>(&self.st.latest, (chat_key(chat),))
            .await?
            .and_then(|(v,)| v)
            .map(|v| MessageId(u(v))))
    }

    /// Messages from others after `seen`, up to [`UNREAD_CAP`]: walks the buckets from the
    /// newest down to the seen mark's bucket, [`UNREAD_ROWS_PER_READ`] rows per request, and
    /// stops at the cap.
    async fn unread(
        &self,
        user: UserId,
        chat: ChatId,
        seen: MessageId,
    ) -> Result<u32, StorageError> {
        let key = chat_key(chat);
        let floor = self.bucket(seen);
        let me = i(user.0);
        let mut count = 0u32;
        let mut start = Some(i32::MAX);
        while let Some(from) = start {
            let buckets = self.buckets(chat, from, Direction::Backward).await?;
            start = match buckets.last() {
                Some(last) if buckets.len() == BUCKETS_PER_READ as usize => {
                    Self::next_start(*last, Direction::Backward)
                }
                _ => None,
            };
            for bucket in buckets {
                if bucket < floor {
                    return Ok(count);
                }
                // Newest first, UNREAD_ROWS_PER_READ rows per request, below the last row read.
                let mut below = i64::MAX;
                loop {
                    let rows = self
                        .exec(
                            &self.st.senders_after,
                            (&key, bucket, i(seen.0), below, UNREAD_ROWS_PER_READ),
                        )
                        .await?
                        .into_rows_result()
                        .map_err(drv)?;
                    let mut read = 0;
                    for row in rows.rows::<(i64, i64)>().map_err(drv)? {
                        let (id, sender) = row.map_err(drv)?;
                        read += 1;
                        below = id;
                        if sender != me {
                            count += 1;
                            if count >= UNREAD_CAP {
                                return Ok(UNREAD_CAP);
                            }
                        }
                    }
                    if read < UNREAD_ROWS_PER_READ {
                        break;
                    }
                }
            }
        }
        Ok(count)
    }

    async fn read_marks(&self, user: UserId, chat: ChatId) -> Result<Marks, StorageError> {
        let key = chat_key(chat);
        let (d, s) = futures::try_join!(
            self.first::<(i64,)>(
                &self.st.read_mark,
                (i(user.0), &key, mark_kind(ReceiptKind::Delivered))
            ),
            self.first::<(i64,)>(
                &self.st.read_mark,
                (i(user.0), &key, mark_kind(ReceiptKind::Seen))
            ),
        )?;
        Ok(Marks {
            delivered: MessageId(d.map_or(0, |(v,)| u(v))),
            seen: MessageId(s.map_or(0, |(v,)| u(v))),
        })
    }

    /// Inserts mark rows (delivered first, so a reader never sees seen above delivered).
    async fn put_marks(
        &self,
        user: UserId,
        key: &str,
        kinds: &[ReceiptKind],
        upto: MessageId,
    ) -> Result<(), StorageError> {
        for kind in kinds {
            self.exec(
                &self.st.insert_mark,
                (i(user.0), key, mark_kind(*kind), i(upto.0)),
            )
            .await?;
        }
        Ok(())
    }

    async fn channel_exists(&self, id: ChannelId) -> Result<bool, StorageError> {
        Ok(self
            .first::<(Option<String>, Option<i64>)>(&self.st.channel_by_id, (i(id.0),))
            .await?
            .is_some())
    }

    async fn summary(
        &self,
        user: UserId,
        chat: ChatId,
        latest: Option<MessageId>,
    ) -> Result<ChatSummary, StorageError> {
        let newest = match latest {
            Some(id) => self.message(chat, id).await?,
            None => None,
        };
        let mine = self.read_marks(user, chat).await?;
        let unread = self.unread(user, chat, mine.seen).await?;
        let (title, peer) = match chat {
            ChatId::Direct { .. } => {
                let peer_id = chat.peer_of(user).unwrap_or(user);
                let (name, marks) =
                    futures::try_join!(self.user_by_id(peer_id), self.read_marks(peer_id, chat))?;
                (name.map(|u| u.name).unwrap_or_default(), Some(marks))
            }
            // The name only: a title needs no member count.
            ChatId::Channel(ch) => (
                self.first::<(Option<String>, Option<i64>)>(&self.st.channel_by_id, (i(ch.0),))
                    .await?
                    .and_then(|(name, _)| name)
                    .unwrap_or_default(),
                None,
            ),
        };
        Ok(ChatSummary {
            chat,
            title,
            newest,
            unread,
            mine,
            peer,
        })
    }

    /// The channel rows of `ids` (channel-id rows of a query), in the same order; ids whose
    /// channel row is gone are skipped.
    async fn channel_rows(&self, ids: Vec<(i64,)>) -> Result<Vec<Channel>, StorageError> {
        Ok(futures::stream::iter(ids)
            .map(|(id,)| self.channel_row(ChannelId(u(id))))
            .buffered(CHAT_LIST_FANOUT)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    async fn channel_row(&self, id: ChannelId) -> Result<Option<Channel>, StorageError> {
        let Some((name, owner)) = self
            .first::<(Option<String>, Option<i64>)>(&self.st.channel_by_id, (i(id.0),))
            .await?
        else {
            return Ok(None);
        };
        let (count, private) = futures::try_join!(
            self.first::<(i64,)>(&self.st.member_count, (i(id.0),)),
            self.first::<(i64,)>(&self.st.is_private, (i(id.0),)),
        )?;
        Ok(Some(Channel {
            id,
            name: name.unwrap_or_default(),
            owner: UserId(owner.map_or(0, u)),
            member_count: u32::try_from(count.map_or(0, |(n,)| n)).unwrap_or(u32::MAX),
            private: private.is_some(),
        }))
    }
}

#[async_trait]
impl HistoryStore for CassandraStore {
    async fn append(&self, msg: NewMessage) -> Result<AppendOutcome, StorageError> {
        if let Some(reply_to) = msg.reply_to
            && !self.message_exists(msg.chat, reply_to).await?
        {
            return Err(StorageError::UnknownMessage {
                chat: msg.chat,
                id: reply_to,
            });
        }
        // Claim the idempotency key first (Paxos): exactly one append per key wins. The key
        // is (sender, chat, client_msg_id), so the first message is always in this chat.
        let key = chat_key(msg.chat);
        let claim = self
            .lwt(
                &self.st.claim_idempotency,
                (
                    i(msg.sender.0),
                    &key,
                    &msg.client_msg_id,
                    i(msg.id.0),
                    self.idempotency_ttl,
                ),
            )
            .await?;
        let first_id = match claim.existing_bigint("message_id") {
            Some(first) if !claim.applied && u(first) != msg.id.0 => MessageId(u(first)),
            // Applied, or the claim is ours from an earlier attempt of this very append.
            _ => {
                self.write_message(&msg).await?;
                return Ok(AppendOutcome {
                    id: msg.id,
                    duplicate: false,
                });
            }
        };
        // A retry. The first attempt may have died between its claim and its writes: finish
        // them with this retry's content (same key = same message) under the first id.
        if self.message_exists(msg.chat, first_id).await? {
            // Re-record the companions (idempotent) in case those writes failed.
            self.write_companions(msg.chat, first_id).await?;
        } else {
            self.write_message(&NewMessage {
                id: first_id,
                ..msg
            })
            .await?;
        }
        Ok(AppendOutcome {
            id: first_id,
            duplicate: true,
        })
    }

    async fn message(
        &self,
        chat: ChatId,
        id: MessageId,
    ) -> Result<Option<StoredMessage>, StorageError> {
        Ok(self
            .first::<MessageRow>(
                &self.st.message_by_id,
                (chat_key(chat), self.bucket(id), i(id.0)),
            )
            .await?
            .map(|r| r.into_message(chat)))
    }

    async fn page(
        &self,
        chat: ChatId,
        query: PageQuery,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let limit = query.limit as usize;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (start, bound) = match (query.direction, query.cursor) {
            (_, Some(c)) => (self.bucket(c), i(c.0)),
            (Direction::Backward, None) => (i32::MAX, i64::MAX),
            (Direction::Forward, None) => (i32::MIN, i64::MIN),
        };
        let mut out = Vec::new();
        let mut next = Some(start);
        while let Some(from) = next {
            let buckets = self.buckets(chat, from, query.direction).await?;
            next = match buckets.last() {
                Some(last) if buckets.len() == BUCKETS_PER_READ as usize => {
                    Self::next_start(*last, query.direction)
                }
                _ => None,
            };
            for bucket in buckets {
                let page = self
                    .bucket_page(chat, bucket, query.direction, bound, limit - out.len())
                    .await?;
                out.extend(page);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    async fn react(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
        emoji: &str,
    ) -> Result<(), StorageError> {
        check_emoji(emoji)?;
        // Messages are never deleted, so checking first cannot race with a removal; the
        // map entry is its own cell, so concurrent reactions of other users are kept.
        if !self.message_exists(chat, id).await? {
            return Err(StorageError::UnknownMessage { chat, id });
        }
        self.exec(
            &self.st.set_reaction,
            (i(user.0), emoji, chat_key(chat), self.bucket(id), i(id.0)),
        )
        .await?;
        Ok(())
    }

    async fn unreact(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
    ) -> Result<bool, StorageError> {
        let Some(m) = self.message(chat, id).await? else {
            return Err(StorageError::UnknownMessage { chat, id });
        };
        let had = m.reactions.iter().any(|r| r.user == user);
        if had {
            self.exec(
                &self.st.delete_reaction,
                (i(user.0), chat_key(chat), self.bucket(id), i(id.0)),
            )
            .await?;
        }
        Ok(had)
    }
}

#[async_trait]
impl StateStore for CassandraStore {
    async fn create_user(
        &self,
        id: UserId,
        name: &str,
        password_hash: &str,
    ) -> Result<User, StorageError> {
        check_name(name)?;
        // The id row first, then the name claim: a claimed name always leads to a user row
        // (a failure after the claim would otherwise leave a user who can log in but whom
        // nobody can message). A lost claim removes the id row again; should that fail, the
        // row is unreachable (ids are only found through names and chats).
        self.exec(&self.st.insert_user, (i(id.0), name)).await?;
        let claim = self
            .lwt(&self.st.claim_user_name, (name, i(id.0), password_hash))
            .await?;
        if !claim.applied && claim.existing_bigint("id") != Some(i(id.0)) {
            self.exec(&self.st.delete_user, (i(id.0),)).await?;
            return Err(StorageError::UserExists(name.to_owned()));
        }
        Ok(User {
            id,
            name: name.to_owned(),
        })
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<UserCredentials>, StorageError> {
        Ok(self
            .first::<(Option<i64>, String, Option<String>)>(&self.st.user_by_name, (name,))
            .await?
            .map(|(id, name, hash)| UserCredentials {
                user: User {
                    id: UserId(id.map_or(0, u)),
                    name,
                },
                password_hash: hash.unwrap_or_default(),
            }))
    }

    async fn set_password_hash(
        &self,
        user: UserId,
        name: &str,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StorageError> {
        // The name row is where logins read the hash; it must be this user's.
        match self.user_by_name(name).await? {
            Some(c) if c.user.id == user => {}
            _ => return Err(StorageError::UnknownUser(user)),
        }
        // A Paxos compare-and-set: of two changes from one old password, one wins.
        Ok(self
            .lwt(
                &self.st.set_password_hash,
                (new_hash, name, i(user.0), old_hash),
            )
            .await?
            .applied)
    }

    async fn signed_out_before(&self, user: UserId) -> Result<u64, StorageError> {
        Ok(self
            .first::<(Option<i64>,)>(&self.st.signed_out_before, (i(user.0),))
            .await?
            .and_then(|(v,)| v)
            .map_or(0, u))
    }

    async fn sign_out_before(&self, user: UserId, at: u64) -> Result<(), StorageError> {
        if self.user_by_id(user).await?.is_none() {
            return Err(StorageError::UnknownUser(user));
        }
        // Insert-only, read newest first: never back, in any order.
        self.exec(&self.st.sign_out_before, (i(user.0), i(at)))
            .await?;
        Ok(())
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StorageError> {
        Ok(self
            .first::<(Option<String>,)>(&self.st.user_by_id, (i(id.0),))
            .await?
            .map(|(name,)| User {
                id,
                name: name.unwrap_or_default(),
            }))
    }

    async fn is_member(&self, user: UserId, chat: ChatId) -> Result<bool, StorageError> {
        match chat {
            ChatId::Direct { .. } => match chat.peer_of(user) {
                Some(peer) => Ok(self.user_by_id(peer).await?.is_some()),
                None => Ok(false),
            },
            ChatId::Channel(ch) => Ok(self
                .first::<(i64,)>(&self.st.member, (i(ch.0), i(user.0)))
                .await?
                .is_some()),
        }
    }

    async fn mark(
        &self,
        user: UserId,
        chat: ChatId,
        kind: ReceiptKind,
        upto: MessageId,
    ) -> Result<Marks, StorageError> {
        if !self.is_member(user, chat).await? {
            return Err(StorageError::NotMember { user, chat });
        }
        if !self.message_exists(chat, upto).await? {
            return Err(StorageError::UnknownMessage { chat, id: upto });
        }
        let key = chat_key(chat);
        if let ChatId::Direct { .. } = chat {
            // A member who never wrote in the chat may not have it listed yet.
            self.exec(&self.st.add_user_chat, (i(user.0), &key)).await?;
        }
        let kinds: &[ReceiptKind] = match kind {
            ReceiptKind::Delivered => &[ReceiptKind::Delivered],
            ReceiptKind::Seen => &[ReceiptKind::Delivered, ReceiptKind::Seen],
        };
        self.put_marks(user, &key, kinds, upto).await?;
        let marks = self.read_marks(user, chat).await?;
        // Drop rows below the current maxima (never the maxima themselves, so a concurrent
        // mark cannot be lost).
        for (k, top) in [
            (ReceiptKind::Delivered, marks.delivered),
            (ReceiptKind::Seen, marks.seen),
        ] {
            if top.0 > 0 {
                self.exec(
                    &self.st.prune_marks,
                    (i(user.0), &key, mark_kind(k), i(top.0)),
                )
                .await?;
            }
        }
        Ok(marks)
    }

    async fn chat_list(&self, user: UserId, limit: u32) -> Result<Vec<ChatSummary>, StorageError> {
        let keys: Vec<(String,)> = self.all(&self.st.user_chats, (i(user.0),)).await?;
        let chats = keys
            .iter()
            .map(|(k,)| parse_chat(k))
            .collect::<Result<Vec<_>, _>>()?;
        // The newest id of every chat (one single-row read each), then the full newest
        // message, unread count, marks and title only for the chats kept.
        let mut with_latest: Vec<(ChatId, Option<MessageId>)> = futures::stream::iter(chats)
            .map(|chat| async move { Ok::<_, StorageError>((chat, self.latest_id(chat).await?)) })
            .buffered(CHAT_LIST_FANOUT)
            .try_collect()
            .await?;
        with_latest
            .sort_by_key(|(chat, latest)| (Reverse(latest.map_or(0, |m| m.0)), chat_key(*chat)));
        with_latest.truncate(limit as usize);
        futures::stream::iter(with_latest)
            .map(|(chat, latest)| self.summary(user, chat, latest))
            .buffered(CHAT_LIST_FANOUT)
            .try_collect()
            .await
    }

    async fn create_channel_with(
        &self,
        id: ChannelId,
        name: &str,
        owner: UserId,
        private: bool,
    ) -> Result<Channel, StorageError> {
        check_name(name)?;
        if self.user_by_id(owner).await?.is_none() {
            return Err(StorageError::UnknownUser(owner));
        }
        // Private first: the channel is never readable as public.
        if private {
            self.exec(&self.st.mark_private, (i(id.0),)).await?;
        }
        // The id row first, then the name claim (see create_user): a claimed name always
        // leads to a channel.
        self.exec(&self.st.insert_channel, (i(id.0), name, i(owner.0)))
            .await?;
        let claim = self
            .lwt(&self.st.claim_channel_name, (name, i(id.0)))
            .await?;
        if !claim.applied && claim.existing_bigint("id") != Some(i(id.0)) {
            self.exec(&self.st.delete_channel, (i(id.0),)).await?;
            if private {
                self.exec(&self.st.unmark_private, (i(id.0),)).await?;
            }
            return Err(StorageError::ChannelExists(name.to_owned()));
        }
        self.join_channel(id, owner).await?;
        Ok(Channel {
            id,
            name: name.to_owned(),
            owner,
            member_count: 1,
            private,
        })
    }

    async fn is_channel_admin(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        let Some(ch) = self.channel_row(id).await? else {
            return Err(StorageError::UnknownChannel(id));
        };
        if ch.owner == user {
            return Ok(true);
        }
        Ok(self
            .first::<(i64,)>(&self.st.is_admin, (i(id.0), i(user.0)))
            .await?
            .is_some())
    }

    async fn set_channel_admin(
        &self,
        id: ChannelId,
        user: UserId,
        admin: bool,
    ) -> Result<bool, StorageError> {
        if !self.channel_exists(id).await? {
            return Err(StorageError::UnknownChannel(id));
        }
        if !self.is_member(user, ChatId::Channel(id)).await? {
            return Ok(false);
        }
        let st = if admin {
            &self.st.add_admin
        } else {
            &self.st.remove_admin
        };
        self.exec(st, (i(id.0), i(user.0))).await?;
        Ok(true)
    }

    async fn channel(&self, id: ChannelId) -> Result<Option<Channel>, StorageError> {
        self.channel_row(id).await
    }

    async fn channel_by_name(&self, name: &str) -> Result<Option<Channel>, StorageError> {
        match self
            .first::<(Option<i64>,)>(&self.st.channel_id_by_name, (name,))
            .await?
        {
            Some((Some(id),)) => self.channel_row(ChannelId(u(id))).await,
            _ => Ok(None),
        }
    }

    async fn join_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        if !self.channel_exists(id).await? {
            return Err(StorageError::UnknownChannel(id));
        }
        if self.user_by_id(user).await?.is_none() {
            return Err(StorageError::UnknownUser(user));
        }
        let chat = ChatId::Channel(id);
        let key = chat_key(chat);
        let applied = self
            .lwt(&self.st.add_member, (i(id.0), i(user.0)))
            .await?
            .applied;
        // Already a member: a repeated join, or the retry of a join that failed after its
        // membership row (an LWT timeout whose write went through, or a failure of the writes
        // below). The companions are written last, so a missing companion means unfinished:
        // finish it and report the join as ours.
        let added = applied
            || self
                .first::<(i64,)>(&self.st.channel_of_user, (i(user.0), i(id.0)))
                .await?
                .is_none();
        if added {
            // A new member has no role, whatever an interrupted leave left behind.
            self.exec(&self.st.remove_admin, (i(id.0), i(user.0)))
                .await?;
            // A new member starts with the backlog marked seen (as in the embedded store).
            // Rows at 0 when the channel is empty record "joined, nothing to skip", so a
            // later repeated join never marks the messages sent in between as seen.
            let has_marks = self
                .first::<(i64,)>(
                    &self.st.read_mark,
                    (i(user.0), &key, mark_kind(ReceiptKind::Seen)),
                )
                .await?
                .is_some();
            if !has_marks {
                let newest = self.latest_id(chat).await?.unwrap_or(MessageId(0));
                self.put_marks(
                    user,
                    &key,
                    &[ReceiptKind::Delivered, ReceiptKind::Seen],
                    newest,
                )
                .await?;
            }
        }
        // Idempotent companions, written again on a repeated join in case they were lost;
        // channels_by_user last (it marks the join finished).
        self.exec(&self.st.add_user_chat, (i(user.0), &key)).await?;
        self.exec(&self.st.add_channel_of_user, (i(user.0), i(id.0)))
            .await?;
        Ok(added)
    }

    async fn leave_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError> {
        if !self.channel_exists(id).await? {
            return Err(StorageError::UnknownChannel(id));
        }
        let key = chat_key(ChatId::Channel(id));
        // What the membership grants goes first (the chat-list row, marks, an admin role),
        // the membership itself after: a leave that fails halfway leaves a member without a
        // chat-list row (a retry or a rejoin repairs it), never a non-member who still sees
        // the channel in their chat list.
        futures::try_join!(
            self.exec(&self.st.remove_user_chat, (i(user.0), &key)),
            self.exec(&self.st.clear_marks, (i(user.0), &key)),
            self.exec(&self.st.remove_admin, (i(id.0), i(user.0))),
        )?;
        let applied = self
            .lwt(&self.st.remove_member, (i(id.0), i(user.0)))
            .await?
            .applied;
        // Not a member: never was, or the retry of a leave that failed after its membership
        // delete (its channels_by_user row is still there: finish it and report the leave as
        // ours).
        let removed = applied
            || self
                .first::<(i64,)>(&self.st.channel_of_user, (i(user.0), i(id.0)))
                .await?
                .is_some();
        // channels_by_user last: while it is there, a retry knows the leave is unfinished.
        self.exec(&self.st.remove_channel_of_user, (i(user.0), i(id.0)))
            .await?;
        Ok(removed)
    }

    async fn channel_members(&self, id: ChannelId) -> Result<Vec<UserId>, StorageError> {
        if !self.channel_exists(id).await? {
            return Err(StorageError::UnknownChannel(id));
        }
        let rows: Vec<(i64,)> = self.all(&self.st.members, (i(id.0),)).await?;
        Ok(rows.into_iter().map(|(v,)| UserId(u(v))).collect())
    }

    async fn channels_of(&self, user: UserId) -> Result<Vec<Channel>, StorageError> {
        let ids: Vec<(i64,)> = self.all(&self.st.channels_of_user, (i(user.0),)).await?;
        let mut out = self.channel_rows(ids).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn channel_members_page(
        &self,
        id: ChannelId,
        after: UserId,
        limit: u32,
    ) -> Result<Vec<UserId>, StorageError> {
        if !self.channel_exists(id).await? {
            return Err(StorageError::UnknownChannel(id));
        }
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows: Vec<(i64,)> = self
            .all(&self.st.members_after, (i(id.0), i(after.0), limit))
            .await?;
        Ok(rows.into_iter().map(|(v,)| UserId(u(v))).collect())
    }

    async fn direct_peers(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
        let keys: Vec<(String,)> = self.all(&self.st.user_chats, (i(user.0),)).await?;
        let chats = keys
            .iter()
            .map(|(k,)| parse_chat(k))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::model::peers_of(user, &chats))
    }

    async fn channels_of_page(
        &self,
        user: UserId,
        after: ChannelId,
        limit: u32,
    ) -> Result<Vec<Channel>, StorageError> {
        let want = limit as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let mut after = after;
        let mut out = Vec::new();
        // A membership whose channel row is missing (a create that failed half way) is
        // skipped; read on past it so that a short page still means "no more" to the
        // caller's paging.
        loop {
            let asked = want - out.len();
            let ids: Vec<(i64,)> = self
                .all(
                    &self.st.channels_of_user_after,
                    (
                        i(user.0),
                        i(after.0),
                        i32::try_from(asked).unwrap_or(i32::MAX),
                    ),
                )
                .await?;
            let (read, last) = (ids.len(), ids.last().map(|(id,)| ChannelId(u(*id))));
            // `buffered` keeps the ascending id order of the rows.
            out.extend(self.channel_rows(ids).await?);
            match last {
                Some(last) if read == asked && out.len() < want => after = last,
                _ => return Ok(out),
            }
        }
    }
}
