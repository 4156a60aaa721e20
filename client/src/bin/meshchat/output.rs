//! Printing: human lines, or one JSON object per line (`--json`) with stable field names.
//!
//! JSON objects carry `"type"` and, by type:
//! - `message`: `message_id`, `from`, `from_id`, `chat`, `text`, `reply_to`, `sent_unix_ms`,
//!   `reactions` (`[{user_id, emoji}]`)
//! - `processed`: `message_id`, `client_msg_id`, `duplicate`, `chat`
//! - `receipt`: `chat`, `user`, `user_id`, `message_id`, `kind` (`delivered`|`seen`)
//! - `reaction`: `chat`, `user`, `user_id`, `message_id`, `emoji` (empty = removed)
//! - `chat`: `chat`, `unread`, `newest` (a message object or null), `my_delivered`, `my_seen`,
//!   `peer_delivered`, `peer_seen`, `presence` (1:1 chats: `{online, last_seen_unix_ms}`; null
//!   for channels, notes to self, and contacts past the first 1,000)
//! - `presence`: `user`, `user_id`, `online`, `last_seen_unix_ms` (0: unknown or online)
//! - `channel`: `channel_id`, `name`, `owner_id`, `member_count`; `member`: `channel`,
//!   `user`, `user_id`; `channel_event`: `channel_id`, `user_id`, `joined`
//! - `whereis` (no `type`, as specified): `user`, `node`, `addr`, `epoch`; `cluster`: `epoch`,
//!   `node`, `members` (`[{node, addr, weight, state}]`)
//! - `auth`: `user`, `user_id`, `expires_unix_ms`; `done`: `action`, `chat`, `message_id`;
//!   `page_end`: `next_cursor`; `error` (on stderr): `code`, `code_num`, `message`
//!
//! A chat is named from my side: the other user's name for 1:1 chats, `#name` for channels.

use std::collections::HashMap;

use meshchat_client::Session as AuthSession;
use meshchat_idgen::{ChatId, UserId};
use meshchat_proto::client::{self as pb, ErrorCode, ReceiptKind};
use serde_json::{Value, json};

/// "unknown", or how long ago `unix_ms` was ("just now", "5 min ago", "3 h ago", "2 d ago").
fn last_seen(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "unknown".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(unix_ms) / 1000;
    match secs {
        0..60 => "just now".into(),
        60..3_600 => format!("{} min ago", secs / 60),
        3_600..86_400 => format!("{} h ago", secs / 3_600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

pub(crate) struct Out {
    json: bool,
    users: HashMap<u64, String>,
    channels: HashMap<u64, String>,
}

fn kind_name(k: i32) -> &'static str {
    match ReceiptKind::try_from(k) {
        Ok(ReceiptKind::Delivered) => "delivered",
        Ok(ReceiptKind::Seen) => "seen",
        _ => "unknown",
    }
}

#[allow(clippy::needless_pass_by_value)] // `emit` consumes what each printer builds for it
impl Out {
    pub(crate) fn new(json: bool) -> Self {
        Self {
            json,
            users: HashMap::new(),
            channels: HashMap::new(),
        }
    }

    pub(crate) fn remember_user(&mut self, id: u64, name: &str) {
        self.users.insert(id, name.to_owned());
    }
    pub(crate) fn remember_channel(&mut self, id: u64, name: &str) {
        self.channels.insert(id, name.to_owned());
    }
    pub(crate) fn knows_user(&self, id: u64) -> bool {
        self.users.contains_key(&id)
    }
    pub(crate) fn knows_channel(&self, id: u64) -> bool {
        self.channels.contains_key(&id)
    }

    fn user(&self, id: u64) -> String {
        self.users
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    fn chat_name(&self, chat: ChatId, me: UserId) -> String {
        match chat {
            ChatId::Direct { .. } => self.user(chat.peer_of(me).unwrap_or(me).0),
            ChatId::Channel(c) => format!(
                "#{}",
                self.channels
                    .get(&c.0)
                    .cloned()
                    .unwrap_or_else(|| c.0.to_string())
            ),
        }
    }

    fn wire_chat_name(&self, chat: Option<&pb::ChatId>, me: UserId) -> String {
        meshchat_proto::ids::chat_from_wire(chat)
            .map(|c| self.chat_name(c, me))
            .unwrap_or_default()
    }

    fn emit(&self, v: Value, human: String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{human}");
        }
    }

    fn message_json(&self, m: &pb::Message, me: UserId) -> Value {
        json!({
            "type": "message",
            "message_id": m.message_id,
            "from": if m.sender_name.is_empty() { self.user(m.sender_id) } else { m.sender_name.clone() },
            "from_id": m.sender_id,
            "chat": self.wire_chat_name(m.chat.as_ref(), me),
            "text": String::from_utf8_lossy(&m.body),
            "reply_to": (m.reply_to != 0).then_some(m.reply_to),
            "sent_unix_ms": m.sent_unix_ms,
            "reactions": m.reactions.iter().map(|r| json!({"user_id": r.user_id, "emoji": r.emoji})).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn message(&self, m: &pb::Message, me: UserId, _seq: Option<u64>) {
        let v = self.message_json(m, me);
        let reply = if m.reply_to != 0 {
            format!(" (reply to {})", m.reply_to)
        } else {
            String::new()
        };
        let reactions = if m.reactions.is_empty() {
            String::new()
        } else {
            format!(
                " [{}]",
                m.reactions
                    .iter()
                    .map(|r| r.emoji.clone())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        let human = format!(
            "[{}] {}: {}{reply}{reactions}  (id {})",
            v["chat"].as_str().unwrap_or_default(),
            v["from"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&m.body),
            m.message_id
        );
        self.emit(v, human);
    }

    pub(crate) fn processed(&self, p: &pb::Processed, chat: ChatId, me: UserId) {
        let name = self.chat_name(chat, me);
        self.emit(
            json!({"type": "processed", "message_id": p.message_id, "client_msg_id": p.client_msg_id,
                   "duplicate": p.duplicate, "chat": name}),
            format!(
                "sent to {name} (id {}){}",
                p.message_id,
                if p.duplicate { " (already sent before)" } else { "" }
            ),
        );
    }

    pub(crate) fn receipt(&self, r: &pb::ReceiptEvent, me: UserId) {
        let chat = self.wire_chat_name(r.chat.as_ref(), me);
        let who = self.user(r.user_id);
        let kind = kind_name(r.kind);
        self.emit(
            json!({"type": "receipt", "chat": chat, "user": who, "user_id": r.user_id,
                   "message_id": r.message_id, "kind": kind}),
            format!("[{chat}] {who} {kind} up to {}", r.message_id),
        );
    }

    pub(crate) fn reaction(&self, r: &pb::ReactionEvent, me: UserId) {
        let chat = self.wire_chat_name(r.chat.as_ref(), me);
        let who = self.user(r.user_id);
        let human = if r.emoji.is_empty() {
            format!("[{chat}] {who} removed their reaction on {}", r.message_id)
        } else {
            format!("[{chat}] {who} reacted {} on {}", r.emoji, r.message_id)
        };
        self.emit(
            json!({"type": "reaction", "chat": chat, "user": who, "user_id": r.user_id,
                   "message_id": r.message_id, "emoji": r.emoji}),
            human,
        );
    }

    pub(crate) fn chat_row(
        &self,
        row: &pb::ChatSummary,
        me: UserId,
        presence: Option<&pb::PresenceState>,
    ) {
        let chat = meshchat_proto::ids::chat_from_wire(row.chat.as_ref()).ok();
        let name = match chat {
            Some(ChatId::Channel(_)) => format!("#{}", row.title),
            _ => row.title.clone(),
        };
        let newest = row.newest.as_ref().map(|m| {
            let mut v = self.message_json(m, me);
            v["chat"] = json!(name);
            v
        });
        let status = if chat.is_some_and(|c| matches!(c, ChatId::Direct { .. }))
            && row.newest.as_ref().is_some_and(|m| m.sender_id == me.0)
        {
            let id = row.newest.as_ref().map(|m| m.message_id).unwrap_or(0);
            if row.peer_seen >= id {
                " ✓✓ seen"
            } else if row.peer_delivered >= id {
                " ✓✓ delivered"
            } else {
                " ✓ sent"
            }
        } else {
            ""
        };
        let preview = row
            .newest
            .as_ref()
            .map(|m| {
                format!(
                    "{}: {}",
                    m.sender_name,
                    String::from_utf8_lossy(&m.body)
                        .chars()
                        .take(60)
                        .collect::<String>()
                )
            })
            .unwrap_or_default();
        let here = presence.map(|p| {
            if p.online {
                "  (online)".to_owned()
            } else {
                format!("  (last seen {})", last_seen(p.last_seen_unix_ms))
            }
        });
        self.emit(
            json!({"type": "chat", "chat": name, "unread": row.unread, "newest": newest,
                   "my_delivered": row.my_delivered, "my_seen": row.my_seen,
                   "peer_delivered": row.peer_delivered, "peer_seen": row.peer_seen,
                   "presence": presence.map(|p| json!({"online": p.online,
                       "last_seen_unix_ms": p.last_seen_unix_ms}))}),
            format!(
                "{name:<20} {:>4} unread  {preview}{status}{}",
                row.unread,
                here.unwrap_or_default()
            ),
        );
    }

    pub(crate) fn presence(&self, p: &pb::PresenceState) {
        let who = self.user(p.user_id);
        self.emit(
            json!({"type": "presence", "user": who, "user_id": p.user_id, "online": p.online,
                   "last_seen_unix_ms": p.last_seen_unix_ms}),
            if p.online {
                format!("{who} is online")
            } else {
                format!(
                    "{who} went offline (last seen {})",
                    last_seen(p.last_seen_unix_ms)
                )
            },
        );
    }

    pub(crate) fn channel(&self, c: &pb::ChannelInfo) {
        self.emit(
            json!({"type": "channel", "channel_id": c.channel_id, "name": c.name,
                   "owner_id": c.owner_id, "member_count": c.member_count}),
            format!(
                "#{} ({} members, id {})",
                c.name, c.member_count, c.channel_id
            ),
        );
    }

    pub(crate) fn left(&self, c: &pb::ChannelInfo) {
        self.emit(
            json!({"type": "done", "action": "leave", "chat": format!("#{}", c.name), "message_id": null}),
            format!("left #{}", c.name),
        );
    }

    pub(crate) fn member(&self, c: &pb::ChannelInfo, u: &pb::UserInfo) {
        self.emit(
            json!({"type": "member", "channel": format!("#{}", c.name), "user": u.user_name, "user_id": u.user_id}),
            u.user_name.clone(),
        );
    }

    pub(crate) fn typing(&self, c: &meshchat_client::typing::TypingChange, me: UserId) {
        let chat = self.chat_name(c.chat, me);
        let who = self.user(c.user.0);
        self.emit(
            json!({"type": "typing", "chat": chat, "user": who, "user_id": c.user.0,
                   "typing": c.typing}),
            if c.typing {
                format!("[{chat}] {who} is typing")
            } else {
                format!("[{chat}] {who} stopped typing")
            },
        );
    }

    pub(crate) fn channel_event(&self, c: &pb::ChannelEvent) {
        self.emit(
            json!({"type": "channel_event", "channel_id": c.channel_id, "user_id": c.user_id, "joined": c.joined}),
            format!(
                "user {} {} channel {}",
                self.user(c.user_id),
                if c.joined { "joined" } else { "left" },
                c.channel_id
            ),
        );
    }

    pub(crate) fn done(&self, action: &str, chat: ChatId, me: UserId, id: Option<u64>) {
        let name = self.chat_name(chat, me);
        self.emit(
            json!({"type": "done", "action": action, "chat": name, "message_id": id}),
            format!("{action}: ok"),
        );
    }

    pub(crate) fn user_home(&self, h: &pb::UserHome) {
        self.emit(
            json!({"user": h.user_name, "node": h.node_id, "addr": h.address, "epoch": h.ring_epoch}),
            format!(
                "{} is homed on node {} ({}), ring epoch {}",
                h.user_name, h.node_id, h.address, h.ring_epoch
            ),
        );
    }

    pub(crate) fn cluster(&self, c: &pb::ClusterInfo) {
        let members: Vec<Value> = c
            .members
            .iter()
            .map(|m| json!({"node": m.node_id, "addr": m.address, "weight": m.weight, "state": m.state}))
            .collect();
        let mut human = format!(
            "ring epoch {} (answered by node {})",
            c.ring_epoch, c.node_id
        );
        for m in &c.members {
            human.push_str(&format!(
                "\n  node {:<4} {:<22} weight {}  {}",
                m.node_id, m.address, m.weight, m.state
            ));
        }
        self.emit(
            json!({"type": "cluster", "epoch": c.ring_epoch, "node": c.node_id, "members": members}),
            human,
        );
    }

    pub(crate) fn page_end(&self, next_cursor: u64) {
        if self.json {
            println!(
                "{}",
                json!({"type": "page_end", "next_cursor": next_cursor})
            );
        } else if next_cursor != 0 {
            println!("(more: --before/--after {next_cursor})");
        }
    }

    pub(crate) fn auth(&self, s: &AuthSession, home: &std::path::Path) {
        self.emit(
            json!({"type": "auth", "user": s.name, "user_id": s.user.0, "expires_unix_ms": s.expires_unix_ms}),
            format!("logged in as {} (id {}); token saved in {}", s.name, s.user.0, home.display()),
        );
    }

    /// Printed once the connection is authenticated and pushes will arrive (on stderr, so
    /// scripts can wait for it without parsing stdout).
    pub(crate) fn listening(&self, server: &str) {
        eprintln!("listening on {server} (Ctrl-C to stop)");
    }

    pub(crate) fn note(&self, text: &str) {
        eprintln!("{text}");
    }
}

/// Prints an error to stderr (JSON with `--json`).
pub(crate) fn error(json: bool, e: &anyhow::Error, code: Option<ErrorCode>) {
    let message = match e.downcast_ref::<meshchat_client::ClientError>() {
        Some(meshchat_client::ClientError::Server { message, .. }) => message.clone(),
        _ => format!("{e:#}"),
    };
    if json {
        eprintln!(
            "{}",
            json!({"type": "error", "code": code.map(|c| c.as_str_name()), "code_num": code.map(|c| c as i32), "message": message})
        );
    } else {
        match code {
            Some(c) => eprintln!("error: {message} [{}]", c.as_str_name()),
            None => eprintln!("error: {message}"),
        }
    }
}
