//! Who may read and change what: private (invite-only) channels with owner and admin roles,
//! and the authorization matrix: every request that names a chat, asked by a member, an
//! ex-member, a non-member, a non-member of a private channel, and a user outside a 1:1 chat.

mod common;

use common::{TestNode, code_of, next_matching};
use meshchat_client::{Client, Event, Events};
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_proto::client::{self as pb, ErrorCode, client_frame, server_frame};

/// The next channel event within 5 s.
async fn channel_event(events: &mut Events) -> pb::ChannelEvent {
    next_matching(events, |e| match e {
        Event::Channel(c) => Some(c),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_channel_is_read_only_by_the_members_its_admins_add() {
    let node = TestNode::start().await;
    let (owner, _oe, _os) = node.user("pc-owner").await;
    let (outsider, mut xe, xs) = node.user("pc-outsider").await;
    let ch = owner
        .channel_create_private("secret-plans")
        .await
        .expect("create");
    assert_eq!(ch.visibility, pb::ChannelVisibility::Private as i32);
    let id = ChannelId(ch.channel_id);
    let chat = ChatId::Channel(id);
    owner.send(chat, "the plan", None).await.expect("send");

    // Neither by name nor by id; and nothing in it is readable or writable.
    assert_eq!(
        code_of(outsider.channel_join("secret-plans").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(
            outsider
                .request(client_frame::Body::ChannelJoin(pb::ChannelJoin {
                    channel_id: id.0,
                    name: String::new(),
                }))
                .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(outsider.history(chat, 0, pb::Direction::Backward, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(outsider.send(chat, "let me in", None).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(outsider.channel_members(id).await),
        ErrorCode::Forbidden
    );

    // Added by the owner: the outsider learns it, and reads the backlog.
    let info = owner.channel_add_member(id, xs.user).await.expect("add");
    assert_eq!(info.member_count, 2);
    let ev = channel_event(&mut xe).await;
    assert_eq!(
        (ev.user_id, ev.joined, ev.by_user_id),
        (xs.user.0, true, info.owner_id)
    );
    let page = outsider
        .history(chat, 0, pb::Direction::Backward, 10)
        .await
        .expect("history as a member");
    assert_eq!(page.messages.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_admins_manage_members_and_only_the_owner_manages_admins() {
    let node = TestNode::start().await;
    let (owner, _oe, os) = node.user("ro-owner").await;
    let (admin, _ae, asess) = node.user("ro-admin").await;
    let (member, _me, ms) = node.user("ro-member").await;
    let (late, mut le, ls) = node.user("ro-late").await;
    let id = ChannelId(
        owner
            .channel_create_private("roles")
            .await
            .expect("create")
            .channel_id,
    );
    owner
        .channel_add_member(id, asess.user)
        .await
        .expect("add admin");
    owner
        .channel_add_member(id, ms.user)
        .await
        .expect("add member");
    owner
        .channel_set_admin(id, asess.user, true)
        .await
        .expect("promote");

    // A plain member manages nothing.
    assert_eq!(
        code_of(member.channel_add_member(id, ls.user).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(member.channel_remove_member(id, asess.user).await),
        ErrorCode::Forbidden
    );
    // An admin adds and removes members, but not admins or the owner, and makes no admins.
    admin
        .channel_add_member(id, ls.user)
        .await
        .expect("admin adds");
    assert!(channel_event(&mut le).await.joined);
    assert_eq!(
        code_of(admin.channel_set_admin(id, ms.user, true).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(admin.channel_remove_member(id, os.user).await),
        ErrorCode::Forbidden
    );
    owner
        .channel_set_admin(id, ms.user, true)
        .await
        .expect("second admin");
    assert_eq!(
        code_of(admin.channel_remove_member(id, ms.user).await),
        ErrorCode::Forbidden
    );
    owner
        .channel_set_admin(id, ms.user, false)
        .await
        .expect("demote");
    admin
        .channel_remove_member(id, ls.user)
        .await
        .expect("admin removes a member");
    let ev = channel_event(&mut le).await;
    assert_eq!((ev.joined, ev.by_user_id), (false, asess.user.0));
    // Removed: locked out again, and cannot rejoin a private channel.
    assert_eq!(
        code_of(
            late.history(ChatId::Channel(id), 0, pb::Direction::Backward, 1)
                .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(late.channel_join("roles").await),
        ErrorCode::Forbidden
    );
    // Nobody removes the owner; the owner's role does not change; bad targets are named.
    assert_eq!(
        code_of(owner.channel_remove_member(id, os.user).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code_of(owner.channel_set_admin(id, os.user, false).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(owner.channel_set_admin(id, ls.user, true).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(owner.channel_remove_member(id, ls.user).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(owner.channel_add_member(id, UserId(1)).await),
        ErrorCode::UnknownUser
    );
    // The owner removes an admin.
    owner
        .channel_remove_member(id, asess.user)
        .await
        .expect("owner removes the admin");
    // A public channel says so, and must be asked for explicitly.
    let public = owner.channel_create("roles-public").await.expect("public");
    assert_eq!(public.visibility, pb::ChannelVisibility::Public as i32);
    assert_eq!(
        code_of(
            owner
                .request(client_frame::Body::ChannelCreate(pb::ChannelCreate {
                    name: "roles-unsaid".into(),
                    visibility: pb::ChannelVisibility::Unspecified as i32,
                }))
                .await
        ),
        ErrorCode::InvalidArgument
    );
}

/// Who asks, in the matrix below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// A member of the public channel (and one of the two users of the 1:1 chat).
    Member,
    /// Was a member of the public channel, left.
    ExMember,
    /// Never joined the public channel.
    NonMember,
    /// Not a member of the private channel.
    PrivateOutsider,
    /// Not one of the two users of a 1:1 chat.
    OtherDirect,
}

/// Every request that names a chat, asked about `chat` (message `msg` in it).
fn requests(chat: ChatId, msg: u64) -> Vec<(&'static str, client_frame::Body)> {
    let wire = meshchat_proto::ids::chat_to_wire(chat);
    let channel = match chat {
        ChatId::Channel(c) => c.0,
        ChatId::Direct { .. } => 0,
    };
    let mut v = vec![
        (
            "send",
            client_frame::Body::Send(pb::SendMessage {
                client_msg_id: format!("m-{}", rand::random::<u64>()),
                chat: Some(wire),
                body: b"hello".to_vec().into(),
                reply_to: 0,
            }),
        ),
        (
            "receipt",
            client_frame::Body::Receipt(pb::MarkReceipt {
                chat: Some(wire),
                message_id: msg,
                kind: pb::ReceiptKind::Seen as i32,
            }),
        ),
        (
            "react",
            client_frame::Body::React(pb::React {
                chat: Some(wire),
                message_id: msg,
                emoji: "+1".into(),
            }),
        ),
        (
            "unreact",
            client_frame::Body::Unreact(pb::Unreact {
                chat: Some(wire),
                message_id: msg,
            }),
        ),
        (
            "history",
            client_frame::Body::History(pb::HistoryQuery {
                chat: Some(wire),
                cursor: 0,
                direction: pb::Direction::Backward as i32,
                limit: 10,
            }),
        ),
    ];
    if channel != 0 {
        v.extend([
            (
                "members",
                client_frame::Body::ChannelMembers(pb::ChannelMembers {
                    channel_id: channel,
                    limit: 10,
                    after_user_id: 0,
                }),
            ),
            (
                "add",
                client_frame::Body::ChannelAdd(pb::ChannelAddMember {
                    channel_id: channel,
                    user_id: 1,
                }),
            ),
            (
                "remove",
                client_frame::Body::ChannelRemove(pb::ChannelRemoveMember {
                    channel_id: channel,
                    user_id: 1,
                }),
            ),
            (
                "set-admin",
                client_frame::Body::ChannelSetAdmin(pb::ChannelSetAdmin {
                    channel_id: channel,
                    user_id: 1,
                    admin: true,
                }),
            ),
            (
                "leave",
                client_frame::Body::ChannelLeave(pb::ChannelLeave {
                    channel_id: channel,
                }),
            ),
            // Last: it changes membership.
            (
                "join",
                client_frame::Body::ChannelJoin(pb::ChannelJoin {
                    channel_id: channel,
                    name: String::new(),
                }),
            ),
        ]);
    }
    v
}

/// What `who` gets for `request`: `None` for an answer that is not an error.
fn expected(who: Who, request: &str) -> Option<ErrorCode> {
    use Who::*;
    match (who, request) {
        // A member may do everything a member does; the management requests need a role
        // (`add`, `remove`, `set-admin` are refused for a plain member, and asked about user
        // 1, who does not exist, by no one who could), and a member joining again is a no-op.
        (Member, "add" | "remove" | "set-admin") => Some(ErrorCode::Forbidden),
        (Member, _) => None,
        // Anyone may join a public channel, and nothing else before joining.
        (ExMember | NonMember, "join") => None,
        (ExMember | NonMember, _) => Some(ErrorCode::Forbidden),
        // A private channel: nothing at all, joining included.
        (PrivateOutsider, _) => Some(ErrorCode::Forbidden),
        (OtherDirect, _) => Some(ErrorCode::Forbidden),
    }
}

async fn first_message(c: &Client, chat: ChatId) -> u64 {
    c.send(chat, "first", None).await.expect("send").message_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let node = TestNode::start().await;
    let (owner, _oe, os) = node.user("mx-owner").await;
    let (peer, _pe, ps) = node.user("mx-peer").await;
    let (third, _te, _ts) = node.user("mx-third").await;
    let public = ChannelId(
        owner
            .channel_create("mx-public")
            .await
            .expect("public")
            .channel_id,
    );
    let private = ChannelId(
        owner
            .channel_create_private("mx-private")
            .await
            .expect("private")
            .channel_id,
    );
    let direct = ChatId::direct(os.user, ps.user);
    let in_public = first_message(&owner, ChatId::Channel(public)).await;
    let in_private = first_message(&owner, ChatId::Channel(private)).await;
    let in_direct = first_message(&owner, direct).await;

    // Asker per role: a fresh user each, so one row's effects never reach another.
    let mut n = 0;
    let mut asker = |who: Who| {
        n += 1;
        let name = format!("mx-{who:?}-{n}").to_lowercase();
        let node = &node;
        async move {
            let (c, e, s) = node.user(&name).await;
            match who {
                Who::Member => {
                    c.channel_join("mx-public").await.expect("join");
                }
                Who::ExMember => {
                    c.channel_join("mx-public").await.expect("join");
                    c.channel_leave(public).await.expect("leave");
                }
                _ => {}
            }
            (c, e, s)
        }
    };

    let mut checked = 0;
    let cases: Vec<(Who, ChatId, u64)> = vec![
        (Who::Member, ChatId::Channel(public), in_public),
        (Who::ExMember, ChatId::Channel(public), in_public),
        (Who::NonMember, ChatId::Channel(public), in_public),
        (Who::PrivateOutsider, ChatId::Channel(private), in_private),
        (Who::OtherDirect, direct, in_direct),
    ];
    for (who, chat, msg) in cases {
        let (c, _e, _s) = asker(who).await;
        for (name, body) in requests(chat, msg) {
            let got = match c.request(body).await {
                Ok(server_frame::Body::Error(e)) => Some(e.code),
                Ok(_) => None,
                Err(e) => Some(e.code().unwrap_or_else(|| panic!("{who:?} {name}: {e}")) as i32),
            };
            let want = expected(who, name).map(|c| c as i32);
            assert_eq!(
                got.map(|c| ErrorCode::try_from(c).map_or(format!("{c}"), |e| format!("{e:?}"))),
                want.map(|c| ErrorCode::try_from(c).map_or(format!("{c}"), |e| format!("{e:?}"))),
                "{who:?} asking {name} about {chat:?}"
            );
            checked += 1;
        }
    }
    // 3 channel askers x 11 requests, 1 private x 11, 1 direct x 5.
    assert_eq!(checked, 4 * 11 + 5);
    drop((peer, third));
}
