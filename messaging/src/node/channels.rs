//! Channels: creation, membership (join, leave, add, remove, admins) and the lists of a
//! user's channels and of a channel's members, with the member cache kept in step.

use super::*;

impl Node {
    /// `ChannelCreate`: a public or private channel, its creator the owner.
    pub(super) async fn channel_create(
        &self,
        me: &Identity,
        c: pb::ChannelCreate,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        valid_name(&c.name)?;
        let private = match pb::ChannelVisibility::try_from(c.visibility) {
            Ok(pb::ChannelVisibility::Public) => false,
            Ok(pb::ChannelVisibility::Private) => true,
            _ => {
                return Err(RequestError::InvalidArgument(
                    "visibility must be PUBLIC or PRIVATE".into(),
                ));
            }
        };
        let id = ChannelId(self.next_id()?);
        let ch = self
            .storage
            .create_channel_with(id, &c.name, me.user, private)
            .await?;
        Ok(R::Channel(convert::channel_to(&ch)))
    }

    /// `ChannelJoin`: a public channel joined (a private one only by its admins' hand).
    pub(super) async fn channel_join(
        &self,
        me: &Identity,
        j: pb::ChannelJoin,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        let id = self.channel_ref(j.channel_id, &j.name).await?;
        let ch = self
            .storage
            .channel(id)
            .await?
            .ok_or(StorageError::UnknownChannel(id))?;
        if ch.private && !self.storage.is_member(me.user, ChatId::Channel(id)).await? {
            return Err(RequestError::Forbidden(format!(
                "channel {id} is invite-only: its owner or an admin adds members"
            )));
        }
        // Push only when something changed: a repeated join must not be a way to
        // flood the members' queues.
        if self.storage.join_channel(id, me.user).await? {
            self.members_changed(id);
            self.push_channel_event(id, me.user, true, None).await?;
        }
        let ch = self
            .storage
            .channel(id)
            .await?
            .ok_or(StorageError::UnknownChannel(id))?;
        Ok(R::Channel(convert::channel_to(&ch)))
    }

    /// `ChannelLeave`: the user leaves; the members and the user's other devices hear of it.
    pub(super) async fn channel_leave(
        &self,
        me: &Identity,
        conn: ConnId,
        l: pb::ChannelLeave,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        let id = self.channel_ref(l.channel_id, "").await?;
        // The leaver's other devices learn too (this connection has its reply).
        if !self.depart(id, me.user, None, Some(conn)).await? {
            return Err(RequestError::Forbidden(format!(
                "you are not a member of channel {id}"
            )));
        }
        Ok(R::Done(pb::Done {}))
    }

    /// `ChannelAdd`: an admin adds a member.
    pub(super) async fn channel_add(
        &self,
        me: &Identity,
        a: pb::ChannelAddMember,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        let id = self.channel_ref(a.channel_id, "").await?;
        self.require_channel_admin(id, me.user).await?;
        let user = UserId(a.user_id);
        if self.storage.user_by_id(user).await?.is_none() {
            return Err(RequestError::UnknownUser(user.to_string()));
        }
        if self.storage.join_channel(id, user).await? {
            self.members_changed(id);
            self.push_channel_event(id, user, true, Some(me.user))
                .await?;
        }
        let ch = self
            .storage
            .channel(id)
            .await?
            .ok_or(StorageError::UnknownChannel(id))?;
        Ok(R::Channel(convert::channel_to(&ch)))
    }

    /// `ChannelRemove`: an admin removes a member (the owner alone removes an admin).
    pub(super) async fn channel_remove(
        &self,
        me: &Identity,
        r: pb::ChannelRemoveMember,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        let id = self.channel_ref(r.channel_id, "").await?;
        let ch = self.require_channel_admin(id, me.user).await?;
        let user = UserId(r.user_id);
        if user == ch.owner {
            return Err(RequestError::Forbidden(
                "the owner cannot be removed (the owner may leave)".into(),
            ));
        }
        if me.user != ch.owner && self.storage.is_channel_admin(id, user).await? {
            return Err(RequestError::Forbidden(
                "only the owner removes an admin".into(),
            ));
        }
        if !self.depart(id, user, Some(me.user), None).await? {
            return Err(RequestError::InvalidArgument(format!(
                "user {user} is not a member of channel {id}"
            )));
        }
        Ok(R::Done(pb::Done {}))
    }

    /// `ChannelSetAdmin`: the owner makes or unmakes an admin.
    pub(super) async fn channel_set_admin(
        &self,
        me: &Identity,
        a: pb::ChannelSetAdmin,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        self.rate_then_authorise(me, Rate::Event, None).await?;
        let id = self.channel_ref(a.channel_id, "").await?;
        let ch = self.require_channel_admin(id, me.user).await?;
        if me.user != ch.owner {
            return Err(RequestError::Forbidden(
                "only the owner makes or unmakes admins".into(),
            ));
        }
        let user = UserId(a.user_id);
        if user == ch.owner {
            return Err(RequestError::InvalidArgument(
                "the owner's role does not change".into(),
            ));
        }
        if !self.storage.set_channel_admin(id, user, a.admin).await? {
            return Err(RequestError::InvalidArgument(format!(
                "user {user} is not a member of channel {id}"
            )));
        }
        Ok(R::Done(pb::Done {}))
    }

    /// `ChannelList`: a page of the user's channels.
    pub(super) async fn channel_list(
        &self,
        me: &Identity,
        q: pb::ChannelListMine,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let limit = list_limit(q.limit);
        // One more than the page holds: whether another page follows.
        let chans = self
            .storage
            .channels_of_page(me.user, ChannelId(q.after_channel_id), limit + 1)
            .await?;
        let rows = chans.iter().map(convert::channel_to).collect();
        let (channels, next_cursor) = fit_page(rows, limit, self.reply_budget(), |c| c.channel_id);
        Ok(R::Channels(pb::ChannelList {
            channels,
            next_cursor,
        }))
    }

    /// `ChannelMembers`: a page of a channel's members, for its members.
    pub(super) async fn channel_members(
        &self,
        me: &Identity,
        m: pb::ChannelMembers,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let id = self.channel_ref(m.channel_id, "").await?;
        // Authorised from storage, never from the fan-out cache: a lost
        // `ChannelChanged` must not let a user who left read the member list.
        self.require_member(me.user, ChatId::Channel(id)).await?;
        let limit = list_limit(m.limit);
        let members = self
            .storage
            .channel_members_page(id, UserId(m.after_user_id), limit + 1)
            .await?;
        let mut rows = Vec::with_capacity(members.len());
        for u in members.iter() {
            rows.push(pb::UserInfo {
                user_id: u.0,
                user_name: self.name_of(*u).await?.to_string(),
            });
        }
        let (members, next_cursor) = fit_page(rows, limit, self.reply_budget(), |u| u.user_id);
        Ok(R::Members(pb::MemberList {
            channel_id: id.0,
            members,
            next_cursor,
        }))
    }

    async fn channel_ref(&self, id: u64, name: &str) -> Result<ChannelId, RequestError> {
        if id != 0 {
            return Ok(ChannelId(id));
        }
        if name.is_empty() {
            return Err(RequestError::InvalidArgument(
                "channel_id or name is required".into(),
            ));
        }
        let name = name.trim_start_matches('#');
        match self.storage.channel_by_name(name).await? {
            Some(c) => Ok(c.id),
            None => Err(RequestError::UnknownChannelName(name.to_owned())),
        }
    }

    /// Channel members, from the per-node cache (invalidated on join/leave). Used for fan-out;
    /// authorisation asks storage ([`Self::require_member`]).
    pub(super) async fn members_of(&self, id: ChannelId) -> Result<Arc<Vec<UserId>>, RequestError> {
        if let Some(m) = self.members.get(id) {
            return Ok(m);
        }
        let version = self.members.version();
        let m = Arc::new(self.storage.channel_members(id).await?);
        self.members.insert_if_unchanged(id, m.clone(), version);
        Ok(m)
    }

    /// The channel, if `user` is its owner or one of its admins (from storage); `FORBIDDEN`
    /// otherwise, `UNKNOWN_CHANNEL` if there is none.
    async fn require_channel_admin(
        &self,
        id: ChannelId,
        user: UserId,
    ) -> Result<meshchat_storage::Channel, RequestError> {
        let ch = self
            .storage
            .channel(id)
            .await?
            .ok_or(StorageError::UnknownChannel(id))?;
        if ch.owner == user
            || (self.storage.is_member(user, ChatId::Channel(id)).await?
                && self.storage.is_channel_admin(id, user).await?)
        {
            Ok(ch)
        } else {
            Err(RequestError::Forbidden(format!(
                "only the owner or an admin of channel {id} may do this"
            )))
        }
    }

    /// Pushes a member change to the channel's members; `by` is who added or removed
    /// `user`, if not themselves.
    /// `user` leaves channel `id` (removed by `by`, or of their own accord): the member list
    /// is dropped from the caches, the members hear of it, and so does `user` (no longer among
    /// them; every connection but `except`). `false` when `user` was not a member.
    async fn depart(
        &self,
        id: ChannelId,
        user: UserId,
        by: Option<UserId>,
        except: Option<ConnId>,
    ) -> Result<bool, RequestError> {
        let left = self.storage.leave_channel(id, user).await;
        if left.is_err() {
            // It may have half happened: a stale member list must not outlive it.
            self.members_changed(id);
        }
        if !left? {
            return Ok(false);
        }
        self.members_changed(id);
        let push = channel_event(id, user, false, by);
        let members = self.members_of(id).await?;
        self.router.deliver(&members, &push, None);
        self.router.deliver(&[user], &push, except);
        Ok(true)
    }

    async fn push_channel_event(
        &self,
        id: ChannelId,
        user: UserId,
        joined: bool,
        by: Option<UserId>,
    ) -> Result<(), RequestError> {
        let push = channel_event(id, user, joined, by);
        let members = self.members_of(id).await?;
        self.router.deliver(&members, &push, None);
        Ok(())
    }
}

/// The push that tells of `user` joining or leaving channel `id` (`by` another user).
fn channel_event(id: ChannelId, user: UserId, joined: bool, by: Option<UserId>) -> Bytes {
    encode_push(push::Event::Channel(pb::ChannelEvent {
        channel_id: id.0,
        user_id: user.0,
        joined,
        by_user_id: by.map_or(0, |u| u.0),
    }))
}
