//! Typing indicators on the client side: [`TypingTracker`] keeps who is typing where from the
//! node's typing pushes ([`crate::Event::Typing`]) and expires each indicator by itself
//! (`expires_in_ms` after it arrived), so a typist whose stop was lost, or whose client died,
//! does not show as typing for long. Sans-IO: the caller passes the time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshchat_idgen::{ChatId, UserId};
use meshchat_proto::client as pb;
use meshchat_proto::ids::chat_from_wire;

/// How often a client that is typing sends its start again (half the node's indicator
/// lifetime, so no recipient's indicator runs out while the user types).
pub const REFRESH: Duration = Duration::from_secs(3);

/// A change of who is typing, as a display would show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypingChange {
    /// Where.
    pub chat: ChatId,
    /// Who.
    pub user: UserId,
    /// Started (`true`) or stopped, or expired (`false`).
    pub typing: bool,
}

/// Who is typing in which chat, each until their indicator expires.
#[derive(Debug, Default)]
pub struct TypingTracker {
    until: HashMap<(ChatId, UserId), Instant>,
}

impl TypingTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a typing push received at `now`. Returns the change to show, if any (a refresh
    /// of a running indicator changes nothing; a malformed push is ignored).
    pub fn observe(&mut self, e: &pb::TypingEvent, now: Instant) -> Option<TypingChange> {
        let chat = chat_from_wire(e.chat.as_ref()).ok()?;
        let user = UserId(e.user_id);
        let key = (chat, user);
        let was = self.until.get(&key).is_some_and(|t| *t > now);
        let typing = e.typing && e.expires_in_ms > 0;
        if typing {
            self.until
                .insert(key, now + Duration::from_millis(e.expires_in_ms.into()));
        } else {
            self.until.remove(&key);
        }
        (was != typing).then_some(TypingChange { chat, user, typing })
    }

    /// Removes the indicators that expired by `now` and returns them as stops.
    pub fn expire(&mut self, now: Instant) -> Vec<TypingChange> {
        let mut gone = Vec::new();
        self.until.retain(|(chat, user), t| {
            let keep = *t > now;
            if !keep {
                gone.push(TypingChange {
                    chat: *chat,
                    user: *user,
                    typing: false,
                });
            }
            keep
        });
        gone
    }

    /// Who is typing in `chat` at `now`, in id order.
    pub fn typing_in(&self, chat: ChatId, now: Instant) -> Vec<UserId> {
        let mut who: Vec<UserId> = self
            .until
            .iter()
            .filter(|((c, _), t)| *c == chat && **t > now)
            .map(|((_, u), _)| *u)
            .collect();
        who.sort_unstable();
        who
    }

    /// When the next indicator expires (to wake a display up then).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.until.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use meshchat_idgen::ChannelId;
    use meshchat_proto::ids::chat_to_wire;

    use super::*;

    fn event(chat: ChatId, user: u64, typing: bool, ms: u32) -> pb::TypingEvent {
        pb::TypingEvent {
            chat: Some(chat_to_wire(chat)),
            user_id: user,
            typing,
            expires_in_ms: ms,
        }
    }

    #[test]
    fn an_indicator_expires_by_itself_unless_refreshed() {
        let chat = ChatId::Channel(ChannelId(5));
        let t0 = Instant::now();
        let mut t = TypingTracker::new();
        let start = t.observe(&event(chat, 7, true, 6000), t0);
        assert_eq!(
            start,
            Some(TypingChange {
                chat,
                user: UserId(7),
                typing: true
            })
        );
        assert_eq!(t.typing_in(chat, t0), vec![UserId(7)]);
        // A refresh at 3 s changes nothing on screen but moves the end to 9 s.
        assert_eq!(
            t.observe(&event(chat, 7, true, 6000), t0 + Duration::from_secs(3)),
            None
        );
        assert!(t.expire(t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(9)));
        let gone = t.expire(t0 + Duration::from_secs(9));
        assert_eq!(
            gone,
            vec![TypingChange {
                chat,
                user: UserId(7),
                typing: false
            }]
        );
        assert!(t.typing_in(chat, t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn a_stop_ends_it_at_once_and_only_once() {
        let chat = ChatId::direct(UserId(1), UserId(2));
        let t0 = Instant::now();
        let mut t = TypingTracker::new();
        t.observe(&event(chat, 2, true, 6000), t0);
        t.observe(&event(chat, 3, true, 6000), t0);
        let stop = t.observe(&event(chat, 2, false, 0), t0 + Duration::from_secs(1));
        assert_eq!(stop.map(|c| c.typing), Some(false));
        assert_eq!(
            t.observe(&event(chat, 2, false, 0), t0 + Duration::from_secs(1)),
            None,
            "a second stop shows nothing new"
        );
        assert_eq!(
            t.typing_in(chat, t0 + Duration::from_secs(1)),
            vec![UserId(3)]
        );
        // A start after a stop shows again.
        assert!(
            t.observe(&event(chat, 2, true, 6000), t0 + Duration::from_secs(2))
                .is_some()
        );
    }

    #[test]
    fn malformed_pushes_are_ignored() {
        let mut t = TypingTracker::new();
        let e = pb::TypingEvent {
            chat: None,
            user_id: 1,
            typing: true,
            expires_in_ms: 6000,
        };
        assert_eq!(t.observe(&e, Instant::now()), None);
        assert_eq!(t.next_expiry(), None);
    }
}
