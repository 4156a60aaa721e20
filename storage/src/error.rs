//! The storage error type, shared by every backend. The node maps each variant to one
//! protocol error code.

use std::sync::Arc;

use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};

/// Why a storage call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// A user with that name exists.
    #[error("user name {0:?} is taken")]
    UserExists(String),
    /// A channel with that name exists.
    #[error("channel name {0:?} is taken")]
    ChannelExists(String),
    /// No such user.
    #[error("unknown user {0}")]
    UnknownUser(UserId),
    /// No such channel.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// No such message in that chat.
    #[error("unknown message {id} in chat {chat}")]
    UnknownMessage {
        /// Chat searched.
        chat: ChatId,
        /// Id asked for.
        id: MessageId,
    },
    /// The user is not a member of the chat.
    #[error("user {user} is not a member of chat {chat}")]
    NotMember {
        /// Who asked.
        user: UserId,
        /// Which chat.
        chat: ChatId,
    },
    /// A value is out of range for storage (an empty name, an over-long emoji...).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The write queue stayed full, or every reader stayed busy, for the wait limit: the store
    /// is overloaded.
    #[error("storage busy: no room for {waited_ms} ms")]
    Overloaded {
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// The store was written by a newer meshchat whose schema this build does not know.
    #[error("store schema version {found} is newer than this build's {supported}")]
    SchemaTooNew {
        /// Version in the store.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The store is shut down.
    #[error("storage is closed")]
    Closed,
    /// The engine failed (I/O, corruption, timeout). Retrying may help.
    #[error("storage backend error: {0}")]
    Backend(Arc<dyn std::error::Error + Send + Sync>),
}

impl StorageError {
    /// Wraps an engine error.
    pub fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Self::Backend(Arc::new(e))
    }
}
