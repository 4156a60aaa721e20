//! # meshchat-idgen
//!
//! Owns identity in meshchat:
//!
//! - [`snowflake`]: the lock-free Snowflake generator ([`Generator`]), the id layout
//!   ([`Snowflake`]), and the injected clock ([`Clock`], [`SystemClock`], [`ManualClock`]).
//! - [`ids`]: the newtypes every other crate uses at its edges ([`UserId`], [`ChannelId`],
//!   [`MessageId`], [`ChatId`], [`NodeId`], [`WorkerId`]) so that a user id can never be passed
//!   where a message id is expected.
//!
//! Ids are 64-bit: 1 unused sign bit, 41 bits of milliseconds since [`EPOCH_UNIX_MS`]
//! (2024-01-01T00:00:00Z, good until 2093), 10 bits of worker id, 12 bits of sequence.
//! Ids from one generator are strictly increasing; ids across workers sort by time.

pub mod ids;
pub mod snowflake;

pub use ids::{ChannelId, ChatId, ChatIdParseError, MessageId, NodeId, UserId, WorkerId};
pub use snowflake::{
    Clock, EPOCH_UNIX_MS, Generator, IdError, MAX_SEQUENCE, MAX_WORKER, ManualClock, Snowflake,
    SystemClock,
};
