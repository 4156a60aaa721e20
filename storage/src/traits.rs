//! The storage traits every backend implements. The node only sees these.
//!
//! Contract (checked for every backend by [`crate::contract`]):
//! - a write returns only after it is durable at the backend's durability setting;
//! - `append` is idempotent on `(sender, chat, client_msg_id)`;
//! - history pages are ordered by message id and exclusive of their cursor;
//! - receipt marks only move forwards; `seen` implies `delivered`.

use async_trait::async_trait;
use meshchat_idgen::{ChannelId, ChatId, MessageId, UserId};

use crate::error::StorageError;
use crate::model::{
    AppendOutcome, Channel, ChatSummary, Marks, NewMessage, PageQuery, ReceiptKind, StoredMessage,
    User, UserCredentials,
};

/// Messages and reactions, per chat, paged by id.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores a message, or finds the first one with the same `(sender, chat, client_msg_id)`.
    /// Fails with `UnknownMessage` if `reply_to` is not a message of the same chat.
    /// For a 1:1 chat it also puts the chat on both users' chat lists.
    async fn append(&self, msg: NewMessage) -> Result<AppendOutcome, StorageError>;

    /// One message with its reactions.
    async fn message(
        &self,
        chat: ChatId,
        id: MessageId,
    ) -> Result<Option<StoredMessage>, StorageError>;

    /// A page of history (see [`PageQuery`]).
    async fn page(
        &self,
        chat: ChatId,
        query: PageQuery,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// Sets `user`'s reaction on a message (replacing an earlier one).
    async fn react(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
        emoji: &str,
    ) -> Result<(), StorageError>;

    /// Removes `user`'s reaction; `false` if there was none.
    async fn unreact(
        &self,
        chat: ChatId,
        id: MessageId,
        user: UserId,
    ) -> Result<bool, StorageError>;
}

/// Users, chat lists with receipt marks, channels and members.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Registers a user. `UserExists` if the name is taken.
    async fn create_user(
        &self,
        id: UserId,
        name: &str,
        password_hash: &str,
    ) -> Result<User, StorageError>;

    /// Replaces the password hash of `user`, whose name is `name`, if it is still `old_hash`
    /// (compare-and-set: of two concurrent changes from one old password, one wins). `false`
    /// if it was not; `UnknownUser` if there is no such user.
    async fn set_password_hash(
        &self,
        user: UserId,
        name: &str,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StorageError>;

    /// The time (Unix milliseconds) before which `user`'s logins are signed out: tokens of a
    /// login made earlier are refused. 0 when they never signed out everywhere.
    async fn signed_out_before(&self, user: UserId) -> Result<u64, StorageError>;

    /// Signs out every login of `user` made before `at` (Unix milliseconds). Never moves
    /// back.
    async fn sign_out_before(&self, user: UserId, at: u64) -> Result<(), StorageError>;

    /// Looks a user up by name, with the password hash.
    async fn user_by_name(&self, name: &str) -> Result<Option<UserCredentials>, StorageError>;

    /// Looks a user up by id.
    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StorageError>;

    /// Whether `user` may read and write `chat`: a participant of a 1:1 chat whose peer
    /// exists, or a member of a channel.
    async fn is_member(&self, user: UserId, chat: ChatId) -> Result<bool, StorageError>;

    /// Moves `user`'s mark in `chat` forwards to `upto` (never backwards) and returns the
    /// marks now stored. Seen also moves delivered. `NotMember` if the user is not in the
    /// chat; `UnknownMessage` if `upto` is not a message of the chat.
    async fn mark(
        &self,
        user: UserId,
        chat: ChatId,
        kind: ReceiptKind,
        upto: MessageId,
    ) -> Result<Marks, StorageError>;

    /// The user's chats, most recently active first, at most `limit`.
    async fn chat_list(&self, user: UserId, limit: u32) -> Result<Vec<ChatSummary>, StorageError>;

    /// Creates a public channel with `owner` as its first member. `ChannelExists` if the
    /// name is taken.
    async fn create_channel(
        &self,
        id: ChannelId,
        name: &str,
        owner: UserId,
    ) -> Result<Channel, StorageError> {
        self.create_channel_with(id, name, owner, false).await
    }

    /// Creates a channel, public or `private` (invite-only), with `owner` as its first
    /// member. `ChannelExists` if the name is taken. A private channel is never visible as
    /// public, not even for a moment or after a failed creation.
    async fn create_channel_with(
        &self,
        id: ChannelId,
        name: &str,
        owner: UserId,
        private: bool,
    ) -> Result<Channel, StorageError>;

    /// Whether `user` is an admin of channel `id`: its owner, or a member made admin.
    /// `UnknownChannel` if none.
    async fn is_channel_admin(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError>;

    /// Makes member `user` an admin of channel `id`, or a plain member again. Returns
    /// `false` (and changes nothing) if `user` is not a member. Leaving a channel drops the
    /// role. `UnknownChannel` if none.
    async fn set_channel_admin(
        &self,
        id: ChannelId,
        user: UserId,
        admin: bool,
    ) -> Result<bool, StorageError>;

    /// A channel by id.
    async fn channel(&self, id: ChannelId) -> Result<Option<Channel>, StorageError>;

    /// A channel by name.
    async fn channel_by_name(&self, name: &str) -> Result<Option<Channel>, StorageError>;

    /// Adds `user` to a channel; `false` if already a member. `UnknownChannel` if none.
    async fn join_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError>;

    /// Removes `user` from a channel; `false` if not a member. `UnknownChannel` if none.
    async fn leave_channel(&self, id: ChannelId, user: UserId) -> Result<bool, StorageError>;

    /// Every member of a channel, by user id.
    async fn channel_members(&self, id: ChannelId) -> Result<Vec<UserId>, StorageError>;

    /// The channels `user` is a member of.
    async fn channels_of(&self, user: UserId) -> Result<Vec<Channel>, StorageError>;

    /// One page of a channel's members: user ids above `after` (`UserId(0)`: from the
    /// start), ascending, at most `limit`. `UnknownChannel` if none.
    async fn channel_members_page(
        &self,
        id: ChannelId,
        after: UserId,
        limit: u32,
    ) -> Result<Vec<UserId>, StorageError>;

    /// One page of the channels `user` is a member of: channel ids above `after`
    /// (`ChannelId(0)`: from the start), ascending, at most `limit`.
    async fn channels_of_page(
        &self,
        user: UserId,
        after: ChannelId,
        limit: u32,
    ) -> Result<Vec<Channel>, StorageError>;

    /// The users `user` shares a 1:1 chat with (a chat with at least one message), ascending
    /// by id, `user` itself never among them (notes to self are not a contact).
    async fn direct_peers(&self, user: UserId) -> Result<Vec<UserId>, StorageError>;
}

/// A whole backend: history and state. Blanket-implemented.
pub trait Storage: HistoryStore + StateStore {}

impl<T: HistoryStore + StateStore> Storage for T {}
