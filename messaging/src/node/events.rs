//! Reactions and typing: what a member does to a chat beyond sending (receipts, which move
//! a read mark, are with the messages).

use super::*;

impl Node {
    /// `React`: a reaction to a message, stored and pushed to the chat.
    pub(super) async fn react(
        &self,
        me: &Identity,
        conn: ConnId,
        r: pb::React,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let chat = chat_from(r.chat.as_ref())?;
        let id = message_id(r.message_id, "message_id")?;
        if r.emoji.is_empty() || r.emoji.len() > 64 {
            return Err(RequestError::InvalidArgument(
                "emoji must be 1 to 64 bytes".into(),
            ));
        }
        self.rate_then_authorise(me, Rate::Event, Some(chat))
            .await?;
        self.storage.react(chat, id, me.user, &r.emoji).await?;
        self.push_reaction(me, conn, chat, id, r.emoji).await?;
        Ok(R::Done(pb::Done {}))
    }

    /// `Unreact`: a reaction taken back (pushed only when there was one).
    pub(super) async fn unreact(
        &self,
        me: &Identity,
        conn: ConnId,
        r: pb::Unreact,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let chat = chat_from(r.chat.as_ref())?;
        let id = message_id(r.message_id, "message_id")?;
        self.rate_then_authorise(me, Rate::Event, Some(chat))
            .await?;
        if self.storage.unreact(chat, id, me.user).await? {
            self.push_reaction(me, conn, chat, id, String::new())
                .await?;
        }
        Ok(R::Done(pb::Done {}))
    }

    /// `Typing`: pushed to the chat's members, never stored.
    pub(super) async fn typing(
        &self,
        me: &Identity,
        t: pb::Typing,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let chat = chat_from(t.chat.as_ref())?;
        self.rate_then_authorise(me, Rate::Typing, Some(chat))
            .await?;
        self.push_typing(me, chat, t.typing).await?;
        Ok(R::Done(pb::Done {}))
    }

    async fn push_reaction(
        &self,
        me: &Identity,
        conn: ConnId,
        chat: ChatId,
        id: MessageId,
        emoji: String,
    ) -> Result<(), RequestError> {
        let push = encode_push(push::Event::Reaction(pb::ReactionEvent {
            chat: Some(chat_to(chat)),
            message_id: id.0,
            user_id: me.user.0,
            emoji,
        }));
        let audience = self.audience(chat).await?;
        self.router.deliver(&audience, &push, Some(conn));
        Ok(())
    }

    /// Pushes my typing start or stop to the chat's other members, if the gate lets it.
    async fn push_typing(
        &self,
        me: &Identity,
        chat: ChatId,
        typing: bool,
    ) -> Result<(), RequestError> {
        let audience = self.audience(chat).await?;
        // Counted first: a chat too large for indicators is refused without a copy of it.
        let count = audience.len() - usize::from(audience.contains(&me.user));
        self.typing.admit_then(me.user, chat, typing, count, || {
            let push = encode_push(push::Event::Typing(pb::TypingEvent {
                chat: Some(chat_to(chat)),
                user_id: me.user.0,
                typing,
                expires_in_ms: if typing {
                    crate::typing::TTL.as_millis() as u32
                } else {
                    0
                },
            }));
            let others: Vec<UserId> = audience.iter().copied().filter(|u| *u != me.user).collect();
            self.router.deliver(&others, &push, None);
        })?;
        Ok(())
    }
}
