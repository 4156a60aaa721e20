//! Messages: `Send` (stored, then pushed to the chat's audience), `Receipt`, `History` and
//! `ChatList`.

use super::*;

impl Node {
    pub(super) async fn send(
        &self,
        me: &Identity,
        conn: ConnId,
        s: pb::SendMessage,
    ) -> Result<pb::Processed, RequestError> {
        let limits = self.limits();
        if s.client_msg_id.is_empty() || s.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(RequestError::InvalidArgument(
                "client_msg_id must be 1 to 64 bytes".into(),
            ));
        }
        if s.body.is_empty() {
            return Err(RequestError::InvalidArgument(
                "message body is empty".into(),
            ));
        }
        if s.body.len() > limits.max_body_bytes as usize {
            return Err(RequestError::MessageTooLarge {
                len: s.body.len(),
                max: limits.max_body_bytes,
            });
        }
        let chat = chat_from(s.chat.as_ref())?;
        // The rate first: the membership check reads storage, and a flood of sends to chats
        // the user is not in must cost no more than sends to their own.
        self.rate_then_authorise(me, Rate::Send, Some(chat)).await?;
        // Who gets it, resolved before the write: once the message is durable, nothing may
        // fail between the ack and the push (a retry would be a duplicate and push nothing).
        let audience = self.audience(chat).await?;
        let id = MessageId(self.next_id()?);
        let reply_to = (s.reply_to != 0).then_some(MessageId(s.reply_to));
        let msg = NewMessage {
            id,
            chat,
            sender: me.user,
            client_msg_id: s.client_msg_id.clone(),
            body: s.body,
            reply_to,
        };
        // The append and the push run in their own task: the request future is dropped when
        // its connection closes, and a push lost between the commit and the deliver would be
        // invisible to every recipient. The task finishes both whatever happens to the
        // request; the request only waits for it.
        let storage = self.storage.clone();
        let router = self.router.clone();
        let (user, name) = (me.user, me.name.clone());
        let client_msg_id = s.client_msg_id.clone();
        let metrics = self.metrics.clone();
        let committed = tokio::spawn(async move {
            let body = msg.body.clone();
            // Durable before acked: the append returns after the group commit.
            let started = std::time::Instant::now();
            let out = storage.append(msg).await;
            // Failed appends too: a store that fails slowly shows here.
            metrics.append(started.elapsed());
            let out = out?;
            let stored = if !out.duplicate {
                metrics.message_sent();
                Some(meshchat_storage::StoredMessage {
                    id,
                    chat,
                    sender: user,
                    client_msg_id,
                    body,
                    reply_to,
                    reactions: Vec::new(),
                })
            } else {
                // A retry of a message already stored. The first attempt's push may never
                // have gone out (its node died between the commit and the push). Push the
                // stored message again; clients drop ids they already have, so a second copy
                // costs bandwidth, never a duplicate (found by the load test).
                storage
                    .message(chat, out.id)
                    .await?
                    .filter(|m| m.sender == user)
            };
            if let Some(mut stored) = stored {
                // The push announces the message; its reactions (any number by now) are a
                // history request away, and would not always fit a frame.
                stored.reactions.clear();
                let push = encode_push(push::Event::Message(convert::message_to(&stored, &name)));
                let d = router.deliver(&audience, &push, Some(conn));
                debug!(
                    message = stored.id.0,
                    queued = d.queued,
                    cut_off = d.cut_off,
                    "delivered"
                );
            }
            Ok::<_, RequestError>(out)
        });
        let out = committed
            .await
            .map_err(|e| RequestError::Internal(format!("send task: {e}")))??;
        Ok(pb::Processed {
            client_msg_id: s.client_msg_id,
            message_id: out.id.0,
            duplicate: out.duplicate,
            chat: Some(chat_to(chat)),
        })
    }

    pub(super) async fn receipt(
        &self,
        me: &Identity,
        conn: ConnId,
        r: pb::MarkReceipt,
    ) -> Result<(), RequestError> {
        let chat = chat_from(r.chat.as_ref())?;
        let id = message_id(r.message_id, "message_id")?;
        let kind = convert::receipt_from(r.kind)?;
        self.rate_then_authorise(me, Rate::Event, Some(chat))
            .await?;
        let before = self.storage.mark(me.user, chat, kind, id).await?;
        let push = encode_push(push::Event::Receipt(pb::ReceiptEvent {
            chat: Some(chat_to(chat)),
            user_id: me.user.0,
            message_id: match kind {
                ReceiptKind::Delivered => before.delivered.0,
                ReceiptKind::Seen => before.seen.0,
            },
            kind: convert::receipt_to(kind) as i32,
        }));
        // My other devices, and the other side of a 1:1 chat. In a channel, the author of the
        // marked message learns of it (not all members: that would be a push per member).
        let mut to = vec![me.user];
        match chat {
            ChatId::Direct { .. } => {
                // Notes to self: the peer is me, already listed (one event per connection).
                if let Some(peer) = chat.peer_of(me.user)
                    && peer != me.user
                {
                    to.push(peer);
                }
            }
            ChatId::Channel(_) => {
                // Only while the author is still a member: who read a channel is for its
                // members (an ex-member of a private channel learns nothing of it).
                if let Some(m) = self.storage.message(chat, id).await?
                    && m.sender != me.user
                    && self.storage.is_member(m.sender, chat).await?
                {
                    to.push(m.sender);
                }
            }
        }
        self.router.deliver(&to, &push, Some(conn));
        Ok(())
    }

    pub(super) async fn history(
        &self,
        me: &Identity,
        q: pb::HistoryQuery,
    ) -> Result<pb::HistoryPage, RequestError> {
        let chat = chat_from(q.chat.as_ref())?;
        self.require_member(me.user, chat).await?;
        let l = self.limits();
        let limit = match q.limit {
            0 => l.default_page_size,
            n => n.min(l.max_page_size),
        };
        let direction = match pb::Direction::try_from(q.direction) {
            Ok(pb::Direction::Forward) => Direction::Forward,
            Ok(pb::Direction::Backward) => Direction::Backward,
            Err(_) => {
                return Err(RequestError::InvalidArgument(
                    "direction must be BACKWARD or FORWARD".into(),
                ));
            }
        };
        let page = self
            .storage
            .page(
                chat,
                PageQuery {
                    cursor: (q.cursor != 0).then_some(MessageId(q.cursor)),
                    direction,
                    limit,
                },
            )
            .await?;
        // The reply must fit one frame: stop early (with a cursor) when the page's bytes
        // would pass the budget.
        let budget = self.reply_budget();
        let mut used = 0usize;
        let mut truncated = false;
        let mut messages = Vec::with_capacity(page.len());
        for m in &page {
            // Reactions aggregated, and a lone message shrunk to fit: a page holds at least
            // one message and a cursor past it, whatever its reactions.
            let mut wire = convert::history_message_to(m, &self.name_of(m.sender).await?, me.user);
            convert::shrink_history_message(&mut wire, budget, me.user);
            let len = wire.encoded_len() + 8;
            if used + len > budget && !messages.is_empty() {
                truncated = true;
                break;
            }
            used += len;
            messages.push(wire);
        }
        let next_cursor = if truncated || page.len() as u32 == limit {
            messages.last().map(|m| m.message_id).unwrap_or(0)
        } else {
            0
        };
        Ok(pb::HistoryPage {
            chat: Some(chat_to(chat)),
            messages,
            next_cursor,
        })
    }

    pub(super) async fn chat_list(&self, me: &Identity) -> Result<pb::ChatList, RequestError> {
        let rows = self
            .storage
            .chat_list(me.user, self.limits().max_chat_list)
            .await?;
        let budget = self.reply_budget();
        let mut used = 0usize;
        let mut chats = Vec::with_capacity(rows.len());
        for r in &rows {
            let name = match &r.newest {
                Some(m) => self.name_of(m.sender).await?,
                None => Arc::from(""),
            };
            let mut row = convert::summary_to(r, &name);
            if let Some(newest) = row.newest.as_mut() {
                // A preview, not the message: the chat list must fit one frame whatever
                // others sent. The full message is one history request away.
                if newest.body.len() > CHAT_LIST_PREVIEW_BYTES {
                    newest
                        .body
                        .truncate(convert::preview_len(&newest.body, CHAT_LIST_PREVIEW_BYTES));
                }
                newest.reactions.clear();
            }
            used += row.encoded_len() + 8;
            if used > budget {
                break;
            }
            chats.push(row);
        }
        Ok(pb::ChatList { chats })
    }

    /// Everyone who receives events of `chat`.
    pub(super) async fn audience(&self, chat: ChatId) -> Result<Arc<Vec<UserId>>, RequestError> {
        match chat {
            ChatId::Direct { low, high } if low == high => Ok(Arc::new(vec![low])),
            ChatId::Direct { low, high } => Ok(Arc::new(vec![low, high])),
            ChatId::Channel(c) => self.members_of(c).await,
        }
    }
}
