//! The embedded store's statements. Each function runs on a connection handed to it: writes
//! inside the writer's batch transaction (possibly run twice: see `writer::run_batch`), reads
//! on a read connection.
//! Statements are cached per connection (`prepare_cached`).

use std::collections::BTreeMap;

use bytes::Bytes;
use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::StorageError;
use crate::model::{
    AppendOutcome, Channel, ChatSummary, Direction, Marks, NewMessage, PageQuery, Reaction,
    ReceiptKind, StoredMessage, UNREAD_CAP, User, UserCredentials, check_emoji, check_name,
};

fn db(e: rusqlite::Error) -> StorageError {
    StorageError::backend(e)
}

/// Ids are u64 on the wire and i64 in SQLite; Snowflakes never set the sign bit, and other
/// values round-trip by bit pattern.
fn i(v: u64) -> i64 {
    v as i64
}

fn u(v: i64) -> u64 {
    v as u64
}

fn chat_key(chat: ChatId) -> String {
    chat.to_string()
}

fn parse_chat(s: &str) -> Result<ChatId, StorageError> {
    s.parse().map_err(StorageError::backend)
}

/// Appends a message: one row and two index entries written (the message row and its unique
/// index on (client_msg_id, sender, chat), the idempotency key). A 1:1 append also reads the
/// chat's newest two rows; only a 1:1 chat's first message writes both members' chat-list
/// rows. A channel append writes nothing else.
pub(super) fn append(c: &Connection, m: &NewMessage) -> Result<AppendOutcome, StorageError> {
    let key = chat_key(m.chat);
    if let Some(reply_to) = m.reply_to {
        // A retry is recognised before its reply target is checked.
        if let Some(first) = first_of(c, &key, m)? {
            return Ok(AppendOutcome {
                id: first,
                duplicate: true,
            });
        }
        if !message_exists(c, &key, reply_to)? {
            return Err(StorageError::UnknownMessage {
                chat: m.chat,
                id: reply_to,
            });
        }
    }
    // The idempotency key is (sender, chat, client_msg_id): a client id reused in another
    // chat is another message. The conflict target names that index only: any other
    // conflict (a reused message id) is an error, not a duplicate.
    let inserted = c
        .prepare_cached(
            "INSERT INTO messages (chat, id, sender, client_msg_id, body, reply_to)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (client_msg_id, sender, chat) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![
            key,
            i(m.id.0),
            i(m.sender.0),
            m.client_msg_id,
            &m.body[..],
            m.reply_to.map(|r| i(r.0)),
        ])
        .map_err(db)?;
    if inserted == 0 {
        let first = first_of(c, &key, m)?.ok_or_else(|| {
            db(rusqlite::Error::QueryReturnedNoRows) // the conflict named a row that exists
        })?;
        return Ok(AppendOutcome {
            id: first,
            duplicate: true,
        });
    }
    // The chat's newest message is the last of its rows in `messages` (readers take max(id)),
    // so a message to a chat that exists changes nothing else. Only a 1:1 chat's first message
    // writes more: both members' chat-list rows. Whether the chat has another message is
    // asked of its newest two rows (the page the insert wrote, as a rule). Messages are never
    // deleted, so a chat that had a message still has one.
    let ChatId::Direct { low, high } = m.chat else {
        return Ok(AppendOutcome {
            id: m.id,
            duplicate: false,
        });
    };
    let rows: i64 = c
        .prepare_cached(
            "SELECT count(*) FROM (SELECT 1 FROM messages WHERE chat = ?1 ORDER BY id DESC LIMIT 2)",
        )
        .map_err(db)?
        .query_row(params![key], |r| r.get(0))
        .map_err(db)?;
    if rows > 1 {
        return Ok(AppendOutcome {
            id: m.id,
            duplicate: false,
        });
    }
    let mut add = c
        .prepare_cached("INSERT OR IGNORE INTO user_chats (user_id, chat) VALUES (?1, ?2)")
        .map_err(db)?;
    add.execute(params![i(low.0), key]).map_err(db)?;
    add.execute(params![i(high.0), key]).map_err(db)?;
    Ok(AppendOutcome {
        id: m.id,
        duplicate: false,
    })
}

/// The message already stored under `m`'s idempotency key, if any.
fn first_of(c: &Connection, key: &str, m: &NewMessage) -> Result<Option<MessageId>, StorageError> {
    c.prepare_cached(
        "SELECT id FROM messages WHERE chat = ?1 AND sender = ?2 AND client_msg_id = ?3",
    )
    .map_err(db)?
    .query_row(params![key, i(m.sender.0), m.client_msg_id], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .map_err(db)
    .map(|v| v.map(|id| MessageId(u(id))))
}

fn message_exists(c: &Connection, key: &str, id: MessageId) -> Result<bool, StorageError> {
    c.prepare_cached("SELECT 1 FROM messages WHERE chat = ?1 AND id = ?2")
        .map_err(db)?
        .query_row(params![key, i(id.0)], |_| Ok(()))
        .optional()
        .map_err(db)
        .map(|o| o.is_some())
}

fn message_row(chat: ChatId, r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: MessageId(u(r.get(0)?)),
        chat,
        sender: UserId(u(r.get(1)?)),
        client_msg_id: r.get(2)?,
        body: Bytes::from(r.get::<_, Vec<u8>>(3)?),
        reply_to: r.get::<_, Option<i64>>(4)?.map(|v| MessageId(u(v))),
        reactions: Vec::new(),
    })
}

/// Loads the reactions of `msgs` (all of one chat) in one range query.
fn attach_reactions(
    c: &Connection,
    key: &str,
    msgs: &mut [StoredMessage],
) -> Result<(), StorageError> {
    let (Some(lo), Some(hi)) = (
        msgs.iter().map(|m| m.id).min(),
        msgs.iter().map(|m| m.id).max(),
    ) else {
        return Ok(());
    };
    let mut by_msg: BTreeMap<u64, Vec<Reaction>> = BTreeMap::new();
    let mut stmt = c
        .prepare_cached(
            "SELECT message_id, user_id, emoji FROM reactions
             WHERE chat = ?1 AND message_id BETWEEN ?2 AND ?3 ORDER BY message_id, user_id",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![key, i(lo.0), i(hi.0)], |r| {
            Ok((
                u(r.get(0)?),
                Reaction {
                    user: UserId(u(r.get(1)?)),
                    emoji: r.get(2)?,
                },
            ))
        })
        .map_err(db)?;
    for row in rows {
        let (id, reaction) = row.map_err(db)?;
        by_msg.entry(id).or_default().push(reaction);
    }
    for m in msgs {
        if let Some(r) = by_msg.remove(&m.id.0) {
            m.reactions = r;
        }
    }
    Ok(())
}

pub(super) fn message(
    c: &Connection,
    chat: ChatId,
    id: MessageId,
) -> Result<Option<StoredMessage>, StorageError> {
    let key = chat_key(chat);
    let found = c
        .prepare_cached(
            "SELECT id, sender, client_msg_id, body, reply_to FROM messages
             WHERE chat = ?1 AND id = ?2",
        )
        .map_err(db)?
        .query_row(params![key, i(id.0)], |r| message_row(chat, r))
        .optional()
        .map_err(db)?;
    match found {
        Some(m) => {
            let mut one = [m];
            attach_reactions(c, &key, &mut one)?;
            let [m] = one;
            Ok(Some(m))
        }
        None => Ok(None),
    }
}

pub(super) fn page(
    c: &Connection,
    chat: ChatId,
    q: PageQuery,
) -> Result<Vec<StoredMessage>, StorageError> {
    let key = chat_key(chat);
    let (sql, bound) = match q.direction {
        Direction::Backward => (
            "SELECT id, sender, client_msg_id, body, reply_to FROM messages
             WHERE chat = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
            q.cursor.map(|m| i(m.0)).unwrap_or(i64::MAX),
        ),
        Direction::Forward => (
            "SELECT id, sender, client_msg_id, body, reply_to FROM messages
             WHERE chat = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3",
            q.cursor.map(|m| i(m.0)).unwrap_or(i64::MIN),
        ),
    };
    let mut stmt = c.prepare_cached(sql).map_err(db)?;
    let mut msgs = stmt
        .query_map(params![key, bound, q.limit], |r| message_row(chat, r))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    attach_reactions(c, &key, &mut msgs)?;
    Ok(msgs)
}

pub(super) fn react(
    c: &Connection,
    chat: ChatId,
    id: MessageId,
    user: UserId,
    emoji: &str,
) -> Result<(), StorageError> {
    check_emoji(emoji)?;
    let key = chat_key(chat);
    if !message_exists(c, &key, id)? {
        return Err(StorageError::UnknownMessage { chat, id });
    }
    c.prepare_cached(
        "INSERT INTO reactions (chat, message_id, user_id, emoji) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (chat, message_id, user_id) DO UPDATE SET emoji = excluded.emoji",
    )
    .map_err(db)?
    .execute(params![key, i(id.0), i(user.0), emoji])
    .map_err(db)?;
    Ok(())
}

pub(super) fn unreact(
    c: &Connection,
    chat: ChatId,
    id: MessageId,
    user: UserId,
) -> Result<bool, StorageError> {
    let key = chat_key(chat);
    if !message_exists(c, &key, id)? {
        return Err(StorageError::UnknownMessage { chat, id });
    }
    let n = c
        .prepare_cached(
            "DELETE FROM reactions WHERE chat = ?1 AND message_id = ?2 AND user_id = ?3",
        )
        .map_err(db)?
        .execute(params![key, i(id.0), i(user.0)])
        .map_err(db)?;
    Ok(n > 0)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

pub(super) fn create_user(
    c: &Connection,
    id: UserId,
    name: &str,
    hash: &str,
) -> Result<User, StorageError> {
    check_name(name)?;
    match c
        .prepare_cached("INSERT INTO users (id, name, password_hash) VALUES (?1, ?2, ?3)")
        .map_err(db)?
        .execute(params![i(id.0), name, hash])
    {
        Ok(_) => Ok(User {
            id,
            name: name.to_owned(),
        }),
        Err(e) if is_unique_violation(&e) => Err(StorageError::UserExists(name.to_owned())),
        Err(e) => Err(db(e)),
    }
}

pub(super) fn user_by_name(
    c: &Connection,
    name: &str,
) -> Result<Option<UserCredentials>, StorageError> {
    c.prepare_cached("SELECT id, name, password_hash FROM users WHERE name = ?1")
        .map_err(db)?
        .query_row(params![name], |r| {
            Ok(UserCredentials {
                user: User {
                    id: UserId(u(r.get(0)?)),
                    name: r.get(1)?,
                },
                password_hash: r.get(2)?,
            })
        })
        .optional()
        .map_err(db)
}

pub(super) fn set_password_hash(
    c: &Connection,
    user: UserId,
    old_hash: &str,
    new_hash: &str,
) -> Result<bool, StorageError> {
    let n = c
        .prepare_cached("UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2")
        .map_err(db)?
        .execute(params![i(user.0), old_hash, new_hash])
        .map_err(db)?;
    if n == 0 && user_by_id(c, user)?.is_none() {
        return Err(StorageError::UnknownUser(user));
    }
    Ok(n > 0)
}

pub(super) fn signed_out_before(c: &Connection, user: UserId) -> Result<u64, StorageError> {
    c.prepare_cached("SELECT signed_out_before FROM users WHERE id = ?1")
        .map_err(db)?
        .query_row(params![i(user.0)], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db)
        .map(|v| v.map_or(0, u))
}

pub(super) fn sign_out_before(c: &Connection, user: UserId, at: u64) -> Result<(), StorageError> {
    let n = c
        .prepare_cached(
            "UPDATE users SET signed_out_before = max(signed_out_before, ?2) WHERE id = ?1",
        )
        .map_err(db)?
        .execute(params![i(user.0), i(at)])
        .map_err(db)?;
    if n == 0 {
        return Err(StorageError::UnknownUser(user));
    }
    Ok(())
}

pub(super) fn user_by_id(c: &Connection, id: UserId) -> Result<Option<User>, StorageError> {
    c.prepare_cached("SELECT name FROM users WHERE id = ?1")
        .map_err(db)?
        .query_row(params![i(id.0)], |r| {
            Ok(User {
                id,
                name: r.get(0)?,
            })
        })
        .optional()
        .map_err(db)
}

pub(super) fn is_member(c: &Connection, user: UserId, chat: ChatId) -> Result<bool, StorageError> {
    match chat {
        ChatId::Direct { .. } => {
            let Some(peer) = chat.peer_of(user) else {
                return Ok(false);
            };
            Ok(user_by_id(c, peer)?.is_some())
        }
        ChatId::Channel(ch) => c
            .prepare_cached("SELECT 1 FROM channel_members WHERE channel_id = ?1 AND user_id = ?2")
            .map_err(db)?
            .query_row(params![i(ch.0), i(user.0)], |_| Ok(()))
            .optional()
            .map_err(db)
            .map(|o| o.is_some()),
    }
}

fn marks_of(c: &Connection, user: UserId, key: &str) -> Result<Option<Marks>, StorageError> {
    c.prepare_cached("SELECT delivered, seen FROM user_chats WHERE user_id = ?1 AND chat = ?2")
        .map_err(db)?
        .query_row(params![i(user.0), key], |r| {
            Ok(Marks {
                delivered: MessageId(u(r.get(0)?)),
                seen: MessageId(u(r.get(1)?)),
            })
        })
        .optional()
        .map_err(db)
}

pub(super) fn mark(
    c: &Connection,
    user: UserId,
    chat: ChatId,
    kind: ReceiptKind,
    upto: MessageId,
) -> Result<Marks, StorageError> {
    if !is_member(c, user, chat)? {
        return Err(StorageError::NotMember { user, chat });
    }
    let key = chat_key(chat);
    if !message_exists(c, &key, upto)? {
        return Err(StorageError::UnknownMessage { chat, id: upto });
    }
    // A 1:1 chat row may not exist yet for a member who never wrote in it.
    c.prepare_cached("INSERT OR IGNORE INTO user_chats (user_id, chat) VALUES (?1, ?2)")
        .map_err(db)?
        .execute(params![i(user.0), key])
        .map_err(db)?;
    let sql = match kind {
        ReceiptKind::Delivered => {
            "UPDATE user_chats SET delivered = max(delivered, ?3) WHERE user_id = ?1 AND chat = ?2"
        }
        ReceiptKind::Seen => {
            "UPDATE user_chats SET seen = max(seen, ?3), delivered = max(delivered, ?3)
             WHERE user_id = ?1 AND chat = ?2"
        }
    };
    c.prepare_cached(sql)
        .map_err(db)?
        .execute(params![i(user.0), key, i(upto.0)])
        .map_err(db)?;
    Ok(marks_of(c, user, &key)?.unwrap_or_default())
}

pub(super) fn chat_list(
    c: &Connection,
    user: UserId,
    limit: u32,
) -> Result<Vec<ChatSummary>, StorageError> {
    let rows: Vec<(String, Marks, Option<i64>)> = c
        .prepare_cached(
            "SELECT uc.chat, uc.delivered, uc.seen,
                    (SELECT max(m.id) FROM messages m WHERE m.chat = uc.chat) AS newest
             FROM user_chats uc
             WHERE uc.user_id = ?1
             ORDER BY coalesce(newest, 0) DESC, uc.chat
             LIMIT ?2",
        )
        .map_err(db)?
        .query_map(params![i(user.0), limit], |r| {
            Ok((
                r.get(0)?,
                Marks {
                    delivered: MessageId(u(r.get(1)?)),
                    seen: MessageId(u(r.get(2)?)),
                },
                r.get(3)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut out = Vec::with_capacity(rows.len());
    for (key, mine, last) in rows {
        let chat = parse_chat(&key)?;
        let newest = match last {
            Some(id) => message(c, chat, MessageId(u(id)))?,
            None => None,
        };
        let unread: u32 = c
            .prepare_cached(
                "SELECT count(*) FROM (SELECT 1 FROM messages
                  WHERE chat = ?1 AND id > ?2 AND sender != ?3 LIMIT ?4)",
            )
            .map_err(db)?
            .query_row(params![key, i(mine.seen.0), i(user.0), UNREAD_CAP], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let (title, peer) = match chat {
            ChatId::Direct { .. } => {
                let peer_id = chat.peer_of(user).unwrap_or(user);
                let name = user_by_id(c, peer_id)?.map(|u| u.name).unwrap_or_default();
                (name, Some(marks_of(c, peer_id, &key)?.unwrap_or_default()))
            }
            ChatId::Channel(ch) => (channel(c, ch)?.map(|ch| ch.name).unwrap_or_default(), None),
        };
        out.push(ChatSummary {
            chat,
            title,
            newest,
            unread,
            mine,
            peer,
        });
    }
    Ok(out)
}

fn channel_row(r: &Row<'_>) -> rusqlite::Result<Channel> {
    Ok(Channel {
        id: ChannelId(u(r.get(0)?)),
        name: r.get(1)?,
        owner: UserId(u(r.get(2)?)),
        member_count: r.get(3)?,
        private: r.get::<_, i64>(4)? != 0,
    })
}

const CHANNEL_COLUMNS: &str = "c.id, c.name, c.owner,
    (SELECT count(*) FROM channel_members m WHERE m.channel_id = c.id), c.private";

pub(super) fn create_channel(
    c: &Connection,
    id: ChannelId,
    name: &str,
    owner: UserId,
    private: bool,
) -> Result<Channel, StorageError> {
    check_name(name)?;
    if user_by_id(c, owner)?.is_none() {
        return Err(StorageError::UnknownUser(owner));
    }
    match c
        .prepare_cached("INSERT INTO channels (id, name, owner, private) VALUES (?1, ?2, ?3, ?4)")
        .map_err(db)?
        .execute(params![i(id.0), name, i(owner.0), i64::from(private)])
    {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            return Err(StorageError::ChannelExists(name.to_owned()));
        }
        Err(e) => return Err(db(e)),
    }
    join_channel(c, id, owner)?;
    Ok(Channel {
        id,
        name: name.to_owned(),
        owner,
        member_count: 1,
        private,
    })
}

pub(super) fn is_channel_admin(
    c: &Connection,
    id: ChannelId,
    user: UserId,
) -> Result<bool, StorageError> {
    let Some(ch) = channel(c, id)? else {
        return Err(StorageError::UnknownChannel(id));
    };
    if ch.owner == user {
        return Ok(true);
    }
    c.prepare_cached("SELECT 1 FROM channel_admins WHERE channel_id = ?1 AND user_id = ?2")
        .map_err(db)?
        .query_row(params![i(id.0), i(user.0)], |_| Ok(()))
        .optional()
        .map_err(db)
        .map(|o| o.is_some())
}

pub(super) fn set_channel_admin(
    c: &Connection,
    id: ChannelId,
    user: UserId,
    admin: bool,
) -> Result<bool, StorageError> {
    if !channel_exists(c, id)? {
        return Err(StorageError::UnknownChannel(id));
    }
    let member = c
        .prepare_cached("SELECT 1 FROM channel_members WHERE channel_id = ?1 AND user_id = ?2")
        .map_err(db)?
        .query_row(params![i(id.0), i(user.0)], |_| Ok(()))
        .optional()
        .map_err(db)?
        .is_some();
    if !member {
        return Ok(false);
    }
    let sql = if admin {
        "INSERT OR IGNORE INTO channel_admins (channel_id, user_id) VALUES (?1, ?2)"
    } else {
        "DELETE FROM channel_admins WHERE channel_id = ?1 AND user_id = ?2"
    };
    c.prepare_cached(sql)
        .map_err(db)?
        .execute(params![i(id.0), i(user.0)])
        .map_err(db)?;
    Ok(true)
}

pub(super) fn channel(c: &Connection, id: ChannelId) -> Result<Option<Channel>, StorageError> {
    c.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS} FROM channels c WHERE c.id = ?1"
    ))
    .map_err(db)?
    .query_row(params![i(id.0)], channel_row)
    .optional()
    .map_err(db)
}

pub(super) fn channel_by_name(c: &Connection, name: &str) -> Result<Option<Channel>, StorageError> {
    c.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS} FROM channels c WHERE c.name = ?1"
    ))
    .map_err(db)?
    .query_row(params![name], channel_row)
    .optional()
    .map_err(db)
}

fn channel_exists(c: &Connection, id: ChannelId) -> Result<bool, StorageError> {
    c.prepare_cached("SELECT 1 FROM channels WHERE id = ?1")
        .map_err(db)?
        .query_row(params![i(id.0)], |_| Ok(()))
        .optional()
        .map_err(db)
        .map(|o| o.is_some())
}

pub(super) fn join_channel(
    c: &Connection,
    id: ChannelId,
    user: UserId,
) -> Result<bool, StorageError> {
    if !channel_exists(c, id)? {
        return Err(StorageError::UnknownChannel(id));
    }
    if user_by_id(c, user)?.is_none() {
        return Err(StorageError::UnknownUser(user));
    }
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO channel_members (channel_id, user_id) VALUES (?1, ?2)",
        )
        .map_err(db)?
        .execute(params![i(id.0), i(user.0)])
        .map_err(db)?;
    if n > 0 {
        // A new member has no role.
        c.prepare_cached("DELETE FROM channel_admins WHERE channel_id = ?1 AND user_id = ?2")
            .map_err(db)?
            .execute(params![i(id.0), i(user.0)])
            .map_err(db)?;
    }
    // A new member starts with everything before joining marked seen: no "999+ unread" and
    // no gap fill of the whole backlog.
    c.prepare_cached(
        "INSERT OR IGNORE INTO user_chats (user_id, chat, delivered, seen)
         SELECT ?1, ?2, coalesce(max(id), 0), coalesce(max(id), 0)
         FROM messages WHERE chat = ?2",
    )
    .map_err(db)?
    .execute(params![i(user.0), chat_key(ChatId::Channel(id))])
    .map_err(db)?;
    Ok(n > 0)
}

pub(super) fn leave_channel(
    c: &Connection,
    id: ChannelId,
    user: UserId,
) -> Result<bool, StorageError> {
    if !channel_exists(c, id)? {
        return Err(StorageError::UnknownChannel(id));
    }
    let n = c
        .prepare_cached("DELETE FROM channel_members WHERE channel_id = ?1 AND user_id = ?2")
        .map_err(db)?
        .execute(params![i(id.0), i(user.0)])
        .map_err(db)?;
    c.prepare_cached("DELETE FROM user_chats WHERE user_id = ?1 AND chat = ?2")
        .map_err(db)?
        .execute(params![i(user.0), chat_key(ChatId::Channel(id))])
        .map_err(db)?;
    // A role ends with the membership: rejoining makes a plain member.
    c.prepare_cached("DELETE FROM channel_admins WHERE channel_id = ?1 AND user_id = ?2")
        .map_err(db)?
        .execute(params![i(id.0), i(user.0)])
        .map_err(db)?;
    Ok(n > 0)
}

pub(super) fn channel_members(c: &Connection, id: ChannelId) -> Result<Vec<UserId>, StorageError> {
    channel_members_page(c, id, UserId(0), u32::MAX)
}

pub(super) fn channel_members_page(
    c: &Connection,
    id: ChannelId,
    after: UserId,
    limit: u32,
) -> Result<Vec<UserId>, StorageError> {
    if !channel_exists(c, id)? {
        return Err(StorageError::UnknownChannel(id));
    }
    c.prepare_cached(
        "SELECT user_id FROM channel_members WHERE channel_id = ?1 AND user_id > ?2
         ORDER BY user_id LIMIT ?3",
    )
    .map_err(db)?
    .query_map(params![i(id.0), i(after.0), i64::from(limit)], |r| {
        Ok(UserId(u(r.get(0)?)))
    })
    .map_err(db)?
    .collect::<Result<_, _>>()
    .map_err(db)
}

pub(super) fn channels_of(c: &Connection, user: UserId) -> Result<Vec<Channel>, StorageError> {
    c.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS} FROM channel_members um JOIN channels c ON c.id = um.channel_id
         WHERE um.user_id = ?1 ORDER BY c.name"
    ))
    .map_err(db)?
    .query_map(params![i(user.0)], channel_row)
    .map_err(db)?
    .collect::<Result<_, _>>()
    .map_err(db)
}

pub(super) fn direct_peers(c: &Connection, user: UserId) -> Result<Vec<UserId>, StorageError> {
    // 1:1 chat keys start with "d:" (`ChatId`'s text form); the range keeps channels out.
    let keys: Vec<String> = c
        .prepare_cached(
            "SELECT chat FROM user_chats WHERE user_id = ?1 AND chat >= 'd:' AND chat < 'd;'",
        )
        .map_err(db)?
        .query_map(params![i(user.0)], |r| r.get(0))
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let chats = keys
        .iter()
        .map(|k| parse_chat(k))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::model::peers_of(user, &chats))
}

pub(super) fn channels_of_page(
    c: &Connection,
    user: UserId,
    after: ChannelId,
    limit: u32,
) -> Result<Vec<Channel>, StorageError> {
    c.prepare_cached(&format!(
        "SELECT {CHANNEL_COLUMNS} FROM channel_members um JOIN channels c ON c.id = um.channel_id
         WHERE um.user_id = ?1 AND um.channel_id > ?2 ORDER BY um.channel_id LIMIT ?3"
    ))
    .map_err(db)?
    .query_map(
        params![i(user.0), i(after.0), i64::from(limit)],
        channel_row,
    )
    .map_err(db)?
    .collect::<Result<_, _>>()
    .map_err(db)
}
