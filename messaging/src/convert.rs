//! Conversions between wire types (`meshchat_proto::client`) and domain types.

use std::collections::BTreeMap;

use meshchat_idgen::{ChatId, MessageId, Snowflake, UserId};
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

/// A stored message on the wire, with every reaction (pushes, single messages).
pub fn message_to(m: &StoredMessage, sender_name: &str) -> pb::Message {
    pb::Message {
        reactions: m.reactions.iter().map(reaction_to).collect(),
        ..message_without_reactions(m, sender_name)
    }
}

fn message_without_reactions(m: &StoredMessage, sender_name: &str) -> pb::Message {
    pb::Message {
        message_id: m.id.0,
        chat: Some(chat_to(m.chat)),
        sender_id: m.sender.0,
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.clone(),
        reply_to: m.reply_to.map(|r| r.0).unwrap_or(0),
        reactions: Vec::new(),
        sent_unix_ms: Snowflake(m.id.0).unix_ms(),
        sender_name: sender_name.to_owned(),
        reaction_counts: Vec::new(),
        reaction_total: 0,
    }
}

fn reaction_to(r: &Reaction) -> pb::Reaction {
    pb::Reaction {
        user_id: r.user.0,
        emoji: r.emoji.clone(),
    }
}

/// Individual reactions a history message lists; past this only the asker's own.
pub const LISTED_REACTIONS: usize = 32;
/// Emoji a history message counts; the rest show only in `reaction_total`.
pub const COUNTED_EMOJI: usize = 32;

/// A stored message as a history page carries it for `me`: reactions aggregated per emoji
/// (bounded whatever the number of reactions: a message with hundreds of reactions made every
/// page holding it too large for a frame), the individual list only when short.
pub fn history_message_to(m: &StoredMessage, sender_name: &str, me: UserId) -> pb::Message {
    let mut counts: BTreeMap<&str, (u32, bool)> = BTreeMap::new();
    for r in &m.reactions {
        let c = counts.entry(r.emoji.as_str()).or_default();
        c.0 += 1;
        c.1 |= r.user == me;
    }
    let mut counts: Vec<pb::ReactionCount> = counts
        .into_iter()
        .map(|(emoji, (count, mine))| pb::ReactionCount {
            emoji: emoji.to_owned(),
            count,
            mine,
        })
        .collect();
    // Most used first; the BTreeMap already ordered ties by emoji and the sort is stable.
    counts.sort_by_key(|c| std::cmp::Reverse(c.count));
    if counts.len() > COUNTED_EMOJI {
        // The asker's emoji stays, in the last place, if it was not among the most used.
        if let Some(i) = counts[COUNTED_EMOJI..].iter().position(|c| c.mine) {
            counts.swap(COUNTED_EMOJI - 1, COUNTED_EMOJI + i);
        }
        counts.truncate(COUNTED_EMOJI);
    }
    let reactions = if m.reactions.len() <= LISTED_REACTIONS {
        m.reactions.iter().map(reaction_to).collect()
    } else {
        m.reactions
            .iter()
            .filter(|r| r.user == me)
            .map(reaction_to)
            .collect()
    };
    pb::Message {
        reactions,
        reaction_counts: counts,
        reaction_total: u32::try_from(m.reactions.len()).unwrap_or(u32::MAX),
        ..message_without_reactions(m, sender_name)
    }
}

/// Shrinks a history message until its encoding fits `budget` bytes, if it can: first the
/// individual reactions go (but the asker's own), then the least used counted emoji (but the
/// asker's). A message whose body alone passes the budget is left as it is (the frame keeps
/// 1 KiB beyond the budget for exactly that).
pub fn shrink_history_message(wire: &mut pb::Message, budget: usize, me: UserId) {
    use prost::Message as _;
    if wire.encoded_len() <= budget {
        return;
    }
    wire.reactions.retain(|r| r.user_id == me.0);
    while wire.encoded_len() > budget {
        match wire.reaction_counts.iter().rposition(|c| !c.mine) {
            Some(i) => {
                wire.reaction_counts.remove(i);
            }
            None => break,
        }
    }
}

/// How many bytes of `body` a preview of at most `max` bytes keeps: `max`, or up to three
/// less so that no UTF-8 character is cut in two (a client decoding the cut would show a
/// replacement character, or refuse the text outright). For a UTF-8 body this is
/// `str::floor_char_boundary`. Bodies are bytes the node never checks as text: one that is not
/// UTF-8 keeps its bytes up to `max` as they are, except that a well-formed character across
/// the cut is still left out whole, so a cut never adds an invalid sequence of its own.
/// O(1): only the last three bytes before the cut are looked at.
pub fn preview_len(body: &[u8], max: usize) -> usize {
    if body.len() <= max {
        return body.len();
    }
    // A UTF-8 character is at most four bytes: the cut splits one only if its first byte is
    // among the three before the cut.
    for start in (max.saturating_sub(3)..max).rev() {
        let first = body[start];
        if first & 0xC0 == 0x80 {
            // A continuation byte: the character (if any) starts further back.
            continue;
        }
        let width = match first {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 1,
        };
        let well_formed = body
            .get(start..start + width)
            .is_some_and(|c| std::str::from_utf8(c).is_ok());
        return if start + width > max && well_formed {
            start
        } else {
            max
        };
    }
    max
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
        visibility: if c.private {
            pb::ChannelVisibility::Private
        } else {
            pb::ChannelVisibility::Public
        } as i32,
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

#[cfg(test)]
mod tests {
    use meshchat_idgen::ChannelId;
    use prost::Message as _;

    use super::*;

    /// A message with `n` reactions: user `k` reacts with emoji `k % kinds` (64 bytes each);
    /// user 1 (me) reacts with the rarest one.
    fn reacted(n: u64, kinds: u64) -> StoredMessage {
        let emoji = |k: u64| format!("{k:064}");
        StoredMessage {
            id: MessageId(1 << 30),
            chat: ChatId::Channel(ChannelId(9)),
            sender: UserId(2),
            client_msg_id: "c".into(),
            body: "body".into(),
            reply_to: None,
            reactions: (1..=n)
                .map(|u| Reaction {
                    user: UserId(u),
                    emoji: if u == 1 {
                        "rare".into()
                    } else {
                        emoji(u % kinds)
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn many_reactions_are_counted_with_mine_kept() {
        let m = reacted(800, 100);
        let w = history_message_to(&m, "s", UserId(1));
        assert_eq!(w.reaction_total, 800);
        assert_eq!(w.reaction_counts.len(), COUNTED_EMOJI);
        assert!(
            w.reaction_counts[..COUNTED_EMOJI - 1]
                .windows(2)
                .all(|p| p[0].count >= p[1].count)
        );
        let mine: Vec<_> = w.reaction_counts.iter().filter(|c| c.mine).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!((mine[0].emoji.as_str(), mine[0].count), ("rare", 1));
        assert_eq!(w.reactions.len(), 1, "only my own reaction is listed");
        assert_eq!(w.reactions[0].user_id, 1);
        assert!(w.encoded_len() < 8 * 1024, "{} bytes", w.encoded_len());
    }

    #[test]
    fn few_reactions_are_listed_and_counted() {
        let m = reacted(5, 2);
        let w = history_message_to(&m, "s", UserId(3));
        assert_eq!(w.reactions.len(), 5);
        assert_eq!(w.reaction_counts.iter().map(|c| c.count).sum::<u32>(), 5);
        assert_eq!(
            w.reaction_counts
                .iter()
                .filter(|c| c.mine)
                .map(|c| c.count)
                .collect::<Vec<_>>(),
            vec![2],
            "user 3 reacted with emoji 1, as did user 5"
        );
    }

    /// A body of `pad` ASCII bytes, then `c` repeated past `max`.
    fn text_across(pad: usize, c: char, max: usize) -> String {
        let mut s = "a".repeat(pad);
        while s.len() <= max + 8 {
            s.push(c);
        }
        s
    }

    #[test]
    fn a_preview_never_cuts_a_character() {
        const MAX: usize = 512;
        // 2-, 3- and 4-byte characters, at every alignment against the cut.
        for c in ['é', '中', '😀', '👩'] {
            for pad in MAX - 8..=MAX {
                let body = text_across(pad, c, MAX);
                let n = preview_len(body.as_bytes(), MAX);
                assert_eq!(n, body.floor_char_boundary(MAX), "{c:?} after {pad} bytes");
                assert!(n <= MAX && n + c.len_utf8() > MAX, "{c:?} after {pad}: {n}");
                let cut = std::str::from_utf8(&body.as_bytes()[..n]).expect("valid UTF-8");
                assert!(body.starts_with(cut));
            }
        }
        // What a plain byte cut did: an emoji cut in two.
        let body = text_across(MAX - 1, '😀', MAX);
        assert!(std::str::from_utf8(&body.as_bytes()[..MAX]).is_err());
        assert_eq!(preview_len(body.as_bytes(), MAX), MAX - 1);
    }

    #[test]
    fn a_short_or_ascii_body_is_cut_at_the_maximum() {
        assert_eq!(preview_len(b"hello", 512), 5);
        assert_eq!(preview_len("中文".as_bytes(), 6), 6, "fits exactly");
        assert_eq!(preview_len(&[b'x'; 600], 512), 512);
        assert_eq!(preview_len("😀".as_bytes(), 0), 0);
        assert_eq!(preview_len("😀".as_bytes(), 2), 0);
    }

    #[test]
    fn a_body_that_is_not_utf8_keeps_its_bytes_but_not_half_a_character() {
        // Binary: cut at the maximum, whatever the bytes.
        assert_eq!(preview_len(&[0xFF; 600], 512), 512);
        assert_eq!(
            preview_len(&[0x80; 600], 512),
            512,
            "only continuation bytes"
        );
        // A stray invalid byte earlier does not stop a whole emoji being kept out.
        let mut body = vec![0xFF];
        body.extend_from_slice(text_across(509, '😀', 512).as_bytes());
        assert_eq!(preview_len(&body, 512), 510);
        // A lead byte with no continuation is no character: nothing to keep whole.
        let mut body = vec![b'a'; 511];
        body.extend_from_slice(&[0xF0, b'b', b'c', b'd']);
        assert_eq!(preview_len(&body, 512), 512);
        // Nor is an overlong or surrogate encoding (well formed in shape only).
        let mut body = vec![b'a'; 511];
        body.extend_from_slice(&[0xED, 0xA0, 0x80, b'z']);
        assert_eq!(preview_len(&body, 512), 512);
        // A body ending in half a character.
        let mut body = vec![b'a'; 511];
        body.extend_from_slice(&"😀".as_bytes()[..2]);
        assert_eq!(preview_len(&body, 512), 512);
    }

    #[test]
    fn a_message_is_shrunk_to_its_budget_keeping_mine() {
        let m = reacted(30, 30);
        let mut w = history_message_to(&m, "s", UserId(1));
        let full = w.encoded_len();
        shrink_history_message(&mut w, full, UserId(1));
        assert_eq!(w.encoded_len(), full, "a message that fits is untouched");
        shrink_history_message(&mut w, 300, UserId(1));
        assert!(w.encoded_len() <= 300, "{} bytes", w.encoded_len());
        assert_eq!(w.reactions.len(), 1);
        assert!(w.reaction_counts.iter().any(|c| c.mine));
    }
}
