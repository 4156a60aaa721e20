//! Id newtypes used at every crate's edges. Distinct types make mix-ups compile errors.
//!
//! Users, channels and messages are Snowflake ids ([`crate::Snowflake`]). A [`ChatId`] names
//! either a 1:1 chat (the two users, lower id first, so both sides name it the same way) or a
//! channel. Its text form (`d:<low>:<high>` or `c:<channel>`) is the storage key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Snowflake;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }
    };
}

id_type!(
    /// A registered user (a Snowflake issued at registration).
    UserId(u64)
);
id_type!(
    /// A channel (group chat), a Snowflake issued at creation.
    ChannelId(u64)
);
id_type!(
    /// A stored message, a Snowflake issued by the sender's home node. Orders history.
    MessageId(u64)
);
id_type!(
    /// A messaging node in the cluster.
    NodeId(u32)
);
id_type!(
    /// A Snowflake worker id (0..=1023), leased to exactly one live node.
    WorkerId(u16)
);

impl MessageId {
    /// The Snowflake parts of this id.
    pub const fn snowflake(self) -> Snowflake {
        Snowflake(self.0)
    }
}

impl From<Snowflake> for MessageId {
    fn from(s: Snowflake) -> Self {
        Self(s.0)
    }
}

/// A conversation: a 1:1 chat between two users, or a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChatId {
    /// A 1:1 chat. Built with [`ChatId::direct`] so `low < high` always holds.
    Direct {
        /// The smaller user id.
        low: UserId,
        /// The larger user id.
        high: UserId,
    },
    /// A channel.
    Channel(ChannelId),
}

impl ChatId {
    /// The 1:1 chat between `a` and `b`, in either order. A user may chat with itself
    /// (notes to self): `low == high`.
    pub fn direct(a: UserId, b: UserId) -> Self {
        if a <= b {
            ChatId::Direct { low: a, high: b }
        } else {
            ChatId::Direct { low: b, high: a }
        }
    }

    /// For a 1:1 chat, the participant that is not `me`; `None` for channels or when `me`
    /// is not in the chat.
    pub fn peer_of(&self, me: UserId) -> Option<UserId> {
        match *self {
            ChatId::Direct { low, high } if low == me => Some(high),
            ChatId::Direct { low, high } if high == me => Some(low),
            _ => None,
        }
    }

    /// Whether `user` is one of the two users of a 1:1 chat (always false for channels,
    /// whose membership lives in storage).
    pub fn is_direct_member(&self, user: UserId) -> bool {
        matches!(*self, ChatId::Direct { low, high } if low == user || high == user)
    }
}

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChatId::Direct { low, high } => write!(f, "d:{low}:{high}"),
            ChatId::Channel(c) => write!(f, "c:{c}"),
        }
    }
}

/// The text is not a chat id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a chat id: {0:?} (expected d:<user>:<user> or c:<channel>)")]
pub struct ChatIdParseError(pub String);

impl FromStr for ChatId {
    type Err = ChatIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ChatIdParseError(s.chars().take(64).collect());
        let mut parts = s.split(':');
        let id = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("d"), Some(a), Some(b), None) => {
                let a = a.parse().map_err(|_| bad())?;
                let b = b.parse().map_err(|_| bad())?;
                if a > b {
                    return Err(bad());
                }
                ChatId::Direct {
                    low: UserId(a),
                    high: UserId(b),
                }
            }
            (Some("c"), Some(c), None, None) => {
                ChatId::Channel(ChannelId(c.parse().map_err(|_| bad())?))
            }
            _ => return Err(bad()),
        };
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_chat_is_the_same_from_both_sides() {
        let a = UserId(5);
        let b = UserId(3);
        assert_eq!(ChatId::direct(a, b), ChatId::direct(b, a));
        assert_eq!(ChatId::direct(a, b).peer_of(a), Some(b));
        assert_eq!(ChatId::direct(a, b).peer_of(b), Some(a));
        assert_eq!(ChatId::direct(a, b).peer_of(UserId(9)), None);
    }

    #[test]
    fn chat_id_text_round_trips() {
        for chat in [
            ChatId::direct(UserId(1), UserId(u64::MAX)),
            ChatId::Channel(ChannelId(77)),
            ChatId::direct(UserId(4), UserId(4)),
        ] {
            assert_eq!(chat.to_string().parse::<ChatId>(), Ok(chat));
        }
    }

    #[test]
    fn malformed_chat_ids_are_errors() {
        for s in [
            "", "d:1", "d:2:1", "x:1", "c:", "c:1:2", "d:a:b", "c:-1", "d:1:2:3",
        ] {
            assert!(s.parse::<ChatId>().is_err(), "{s} should not parse");
        }
    }
}
