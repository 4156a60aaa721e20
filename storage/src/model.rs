//! Plain data that crosses the storage traits. Backend-neutral: no SQL or CQL types here.

use bytes::Bytes;
use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};

/// Unread counts are exact up to this many and reported as this number above it (a chat list
/// shows "999+"; counting further would make the chat list cost grow with the backlog).
pub const UNREAD_CAP: u32 = 999;

/// Longest emoji string stored (a reaction is a short symbol, not a message).
pub const MAX_EMOJI_BYTES: usize = 64;
/// Longest user or channel name stored.
pub const MAX_NAME_BYTES: usize = 64;

/// Checks a user or channel name against what every backend stores.
pub fn check_name(name: &str) -> Result<(), crate::StorageError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(crate::StorageError::InvalidArgument(
            "names must be 1 to 64 bytes",
        ));
    }
    Ok(())
}

/// Checks a reaction's emoji against what every backend stores.
pub fn check_emoji(emoji: &str) -> Result<(), crate::StorageError> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        return Err(crate::StorageError::InvalidArgument(
            "emoji must be 1 to 64 bytes",
        ));
    }
    Ok(())
}

/// A message to store. The id is assigned by the sender's home node before the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Snowflake id assigned by the node.
    pub id: MessageId,
    /// Where it was sent.
    pub chat: ChatId,
    /// Who sent it.
    pub sender: UserId,
    /// The sender's idempotency key: a second append with the same
    /// `(sender, chat, client_msg_id)` stores nothing and returns the first message's id.
    /// The same client id in another chat is another message.
    pub client_msg_id: String,
    /// Opaque body (UTF-8 text for the CLI, but storage does not care).
    pub body: Bytes,
    /// The message this one replies to, in the same chat.
    pub reply_to: Option<MessageId>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stored message's id: the new id, or the first message's id for a retry.
    pub id: MessageId,
    /// True when `(sender, chat, client_msg_id)` was seen before and nothing new was stored.
    pub duplicate: bool,
}

/// A reaction on a message: one per user per message (a new one replaces the old).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reaction {
    /// Who reacted.
    pub user: UserId,
    /// The emoji (any short string).
    pub emoji: String,
}

/// A message as stored, with its reactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Snowflake id; orders history.
    pub id: MessageId,
    /// Chat it belongs to.
    pub chat: ChatId,
    /// Sender.
    pub sender: UserId,
    /// Sender's idempotency key.
    pub client_msg_id: String,
    /// Body.
    pub body: Bytes,
    /// Replied-to message, if any.
    pub reply_to: Option<MessageId>,
    /// Reactions, ordered by user id.
    pub reactions: Vec<Reaction>,
}

/// Which way a history page goes from its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Newest first: ids strictly below the cursor (no cursor = from the newest).
    Backward,
    /// Oldest first: ids strictly above the cursor (no cursor = from the oldest).
    Forward,
}

/// A history page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    /// Exclusive bound; `None` starts at the end the direction starts from.
    pub cursor: Option<MessageId>,
    /// Which way to read.
    pub direction: Direction,
    /// At most this many messages (the caller caps it).
    pub limit: u32,
}

/// Delivered or seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptKind {
    /// The user's device received the messages.
    Delivered,
    /// The user read the messages (implies delivered).
    Seen,
}

/// One user's receipt marks in one chat: every message up to the mark (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks {
    /// Highest delivered message id (0 = none).
    pub delivered: MessageId,
    /// Highest seen message id (0 = none). Never above `delivered`.
    pub seen: MessageId,
}

/// A registered user as other users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Unique name.
    pub name: String,
}

/// A user with the credential needed to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCredentials {
    /// The user.
    pub user: User,
    /// A PHC-format password hash (argon2id); storage never sees a plain password.
    pub password_hash: String,
}

/// A channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Id.
    pub id: ChannelId,
    /// Unique name.
    pub name: String,
    /// Who created it.
    pub owner: UserId,
    /// How many members it has now.
    pub member_count: u32,
    /// Invite-only: members join only when the owner or an admin adds them. A public
    /// channel is open to anyone who names it.
    pub private: bool,
}

/// One row of a user's chat list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSummary {
    /// The chat.
    pub chat: ChatId,
    /// The peer's name (1:1) or the channel's name.
    pub title: String,
    /// Newest message, if the chat has any.
    pub newest: Option<StoredMessage>,
    /// Messages from others after my seen mark, capped at [`UNREAD_CAP`].
    pub unread: u32,
    /// My marks.
    pub mine: Marks,
    /// For 1:1 chats, the other user's marks (so a sender sees delivered/seen).
    pub peer: Option<Marks>,
}

/// The other users of the 1:1 chats among `chats`, ascending, without `user` itself (the
/// answer of [`crate::StateStore::direct_peers`] from a user's chat-list keys).
pub(crate) fn peers_of(user: UserId, chats: &[ChatId]) -> Vec<UserId> {
    let mut peers: Vec<UserId> = chats
        .iter()
        .filter_map(|chat| match chat {
            ChatId::Direct { .. } => chat.peer_of(user).filter(|p| *p != user),
            ChatId::Channel(_) => None,
        })
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers
}
