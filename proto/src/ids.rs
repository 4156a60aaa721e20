//! Conversions between the wire's `ChatId` and [`meshchat_idgen::ChatId`], shared by the node
//! and the client so both sides agree on one mapping.

use meshchat_idgen::{ChannelId, ChatId, UserId};

use crate::client as pb;

/// A domain chat id on the wire.
pub fn chat_to_wire(c: ChatId) -> pb::ChatId {
    let kind = match c {
        ChatId::Direct { low, high } => pb::chat_id::Kind::Direct(pb::DirectChat {
            low_user: low.0,
            high_user: high.0,
        }),
        ChatId::Channel(ch) => pb::chat_id::Kind::ChannelId(ch.0),
    };
    pb::ChatId { kind: Some(kind) }
}

/// A wire chat id as a domain one. Refuses missing ids, zero ids, and 1:1 chats whose users
/// are out of order (`low_user > high_user`), with a readable reason.
pub fn chat_from_wire(p: Option<&pb::ChatId>) -> Result<ChatId, &'static str> {
    match p.and_then(|c| c.kind.as_ref()) {
        None => Err("chat is required"),
        Some(pb::chat_id::Kind::Direct(d)) => {
            if d.low_user == 0 || d.low_user > d.high_user {
                Err("direct chat needs 0 < low_user <= high_user")
            } else {
                Ok(ChatId::direct(UserId(d.low_user), UserId(d.high_user)))
            }
        }
        Some(pb::chat_id::Kind::ChannelId(0)) => Err("channel_id must be non-zero"),
        Some(pb::chat_id::Kind::ChannelId(c)) => Ok(ChatId::Channel(ChannelId(*c))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        for c in [
            ChatId::direct(UserId(9), UserId(2)),
            ChatId::Channel(ChannelId(5)),
        ] {
            assert_eq!(chat_from_wire(Some(&chat_to_wire(c))), Ok(c));
        }
        let reversed = pb::ChatId {
            kind: Some(pb::chat_id::Kind::Direct(pb::DirectChat {
                low_user: 9,
                high_user: 2,
            })),
        };
        assert!(chat_from_wire(Some(&reversed)).is_err());
        assert!(chat_from_wire(None).is_err());
        assert!(chat_from_wire(Some(&pb::ChatId { kind: None })).is_err());
    }
}
