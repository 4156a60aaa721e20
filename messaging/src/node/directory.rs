//! The directory: users by id or name, where a user's home is, the cluster, and the
//! presence of a user's contacts.

use super::*;

impl Node {
    /// `ResolveUser`: a user by id or by name.
    pub(super) async fn resolve_user(
        &self,
        r: pb::ResolveUser,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let user = if r.user_id != 0 {
            self.storage
                .user_by_id(UserId(r.user_id))
                .await?
                .ok_or_else(|| RequestError::UnknownUser(r.user_id.to_string()))?
        } else {
            self.storage
                .user_by_name(&r.user_name)
                .await?
                .ok_or_else(|| RequestError::UnknownUser(r.user_name.clone()))?
                .user
        };
        Ok(R::User(pb::UserInfo {
            user_id: user.id.0,
            user_name: user.name,
        }))
    }

    /// `WhereIs`: the node a user's connections belong on.
    pub(super) async fn where_is(
        &self,
        w: pb::WhereIs,
    ) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let creds = self
            .storage
            .user_by_name(&w.user_name)
            .await?
            .ok_or_else(|| RequestError::UnknownUser(w.user_name.clone()))?;
        let (node_id, address, ring_epoch) = match self.router.home(creds.user.id) {
            Home::Local => (
                self.config.node_id,
                self.config.advertised(),
                self.router.epoch(),
            ),
            Home::Remote { node, addr, epoch } => (node.0, addr, epoch),
        };
        Ok(R::UserHome(pb::UserHome {
            user_id: creds.user.id.0,
            user_name: creds.user.name,
            node_id,
            address,
            ring_epoch,
        }))
    }

    /// `Cluster`: the ring's members and epoch.
    pub(super) async fn cluster(&self) -> Result<server_frame::Body, RequestError> {
        use server_frame::Body as R;
        let mut members: Vec<pb::ClusterMember> = self
            .router
            .members()
            .into_iter()
            .map(|m| pb::ClusterMember {
                node_id: m.node.0,
                address: m.addr,
                weight: m.weight,
                state: m.state.into(),
            })
            .collect();
        if members.is_empty() {
            members.push(pb::ClusterMember {
                node_id: self.config.node_id,
                address: self.config.advertised(),
                weight: 1,
                state: "self".into(),
            });
        }
        Ok(R::Cluster(pb::ClusterInfo {
            ring_epoch: self.router.epoch(),
            node_id: self.config.node_id,
            members,
        }))
    }

    /// The presence of my contacts (the users I share a 1:1 chat with), ascending by id: the
    /// first [`crate::presence::MAX_QUERY`], cut to fit one frame.
    pub(super) async fn presence_of_contacts(
        &self,
        me: &Identity,
    ) -> Result<pb::PresenceList, RequestError> {
        let contacts = self.storage.direct_peers(me.user).await?;
        let book = self.registry.presence();
        let rows = contacts
            .into_iter()
            .take(crate::presence::MAX_QUERY)
            .map(|u| presence_to(u, book.state(u)))
            .collect();
        let (users, _) = fit_page(
            rows,
            crate::presence::MAX_QUERY as u32,
            self.reply_budget(),
            |p| p.user_id,
        );
        Ok(pb::PresenceList { users })
    }
}
