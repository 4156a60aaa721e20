//! Conversions between wire types (`meshchat_proto::client`) and domain types.

use meshchat_idgen::{ChatId, MessageId, Snowflake};
use meshchat_proto::client as pb;
use meshchat_storage::{Channel, ChatSummary, Reaction, ReceiptKind, StoredMessage};

use crate::error::RequestError;

/// A wire chat id to a domain one; checks the 1:1 ordering.
pub fn chat_from(p: Option<&pb::ChatId>) -> Result<ChatId, RequestError> {
    meshchat_proto::ids::chat_from_wire(p).map_err(|m| RequestError::InvalidArgument(m.into()))
}

/// A domain chat id on the wire.
pub fn chat_to(c: ChatId) -> pb::ChatId {
    meshchat_proto::ids::chat_to_wire(c)
}

/// A stored message on the wire.
pub fn message_to(m: &StoredMessage, sender_name: &str) -> pb::Message {
    pb::Message {
        message_id: m.id.0,
        chat: Some(chat_to(m.chat)),
        sender_id: m.sender.0,
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.clone(),
        reply_to: m.reply_to.map(|r| r.0).unwrap_or(0),
        reactions: m.reactions.iter().map(reaction_to).collect(),
        sent_unix_ms: Snowflake(m.id.0).unix_ms(),
        sender_name: sender_name.to_owned(),
    }
}

fn reaction_to(r: &Reaction) -> pb::Reaction {
    pb::Reaction {
        user_id: r.user.0,
        emoji: r.emoji.clone(),
    }
}

/// A receipt kind from the wire.
pub fn receipt_from(k: i32) -> Result<ReceiptKind, RequestError> {
    match pb::ReceiptKind::try_from(k) {
        Ok(pb::ReceiptKind::Delivered) => Ok(ReceiptKind::Delivered),
        Ok(pb::ReceiptKind::Seen) => Ok(ReceiptKind::Seen),
        _ => Err(RequestError::InvalidArgument(
            "receipt kind must be DELIVERED or SEEN".into(),
        )),
    }
}

/// A receipt kind on the wire.
pub fn receipt_to(k: ReceiptKind) -> pb::ReceiptKind {
    match k {
        ReceiptKind::Delivered => pb::ReceiptKind::Delivered,
        ReceiptKind::Seen => pb::ReceiptKind::Seen,
    }
}

/// A channel on the wire.
pub fn channel_to(c: &Channel) -> pb::ChannelInfo {
    pb::ChannelInfo {
        channel_id: c.id.0,
        name: c.name.clone(),
        owner_id: c.owner.0,
        member_count: c.member_count,
    }
}

/// A chat-list row on the wire.
pub fn summary_to(s: &ChatSummary, newest_sender_name: &str) -> pb::ChatSummary {
    let peer = s.peer.unwrap_or_default();
    pb::ChatSummary {
        chat: Some(chat_to(s.chat)),
        newest: s.newest.as_ref().map(|m| message_to(m, newest_sender_name)),
        unread: s.unread,
        my_delivered: s.mine.delivered.0,
        my_seen: s.mine.seen.0,
        peer_delivered: peer.delivered.0,
        peer_seen: peer.seen.0,
        title: s.title.clone(),
    }
}

/// A non-zero message id from the wire.
pub fn message_id(v: u64, field: &str) -> Result<MessageId, RequestError> {
    if v == 0 {
        return Err(RequestError::InvalidArgument(format!(
            "{field} is required"
        )));
    }
    Ok(MessageId(v))
}
