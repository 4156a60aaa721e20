//! Every kind of bad input gets its error code, and the node keeps serving everyone else.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{TestNode, code_of, next_matching, next_message, text};
use meshchat_client::{ClientError, Event};
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_messaging::auth::Auth;
use meshchat_proto::client::{self as pb, ErrorCode, client_frame, server_frame};

/// The node still carries a conversation between two fresh users.
async fn node_still_serves(node: &TestNode) {
    let (a, _ae, sa) = node.user(&format!("ok-a-{}", rand_suffix())).await;
    let (_b, mut be, sb) = node.user(&format!("ok-b-{}", rand_suffix())).await;
    a.send(ChatId::direct(sa.user, sb.user), "still here", None)
        .await
        .expect("send");
    assert_eq!(text(&next_message(&mut be).await), "still here");
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn node_error(events: &mut meshchat_client::Events) -> (i32, String) {
    next_matching(events, |e| match e {
        Event::NodeError { code, message } => Some((code, message)),
        _ => None,
    })
    .await
}

async fn disconnect_code(events: &mut meshchat_client::Events) -> u64 {
    next_matching(events, |e| match e {
        Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_are_malformed_and_the_connection_survives() {
    let node = TestNode::start().await;
    let (c, mut ev) = node.client().await;
    let mut raw = BytesMut::new();
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02, 0x03];
    raw.put_u32(garbage.len() as u32);
    raw.extend_from_slice(&garbage);
    c.conn().expect("conn").send_raw(&raw).await.expect("write");
    let (code, message) = node_error(&mut ev).await;
    assert_eq!(code, ErrorCode::MalformedFrame as i32);
    assert!(message.contains("not a valid ClientFrame"), "{message}");
    // The stream is still in sync: the same connection registers fine.
    c.register("garbage-survivor", "password-123")
        .await
        .expect("register after garbage");
    node_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_before_its_body_and_the_connection_closed() {
    let node = TestNode::start().await;
    let (c, mut ev) = node.client().await;
    let mut raw = BytesMut::new();
    raw.put_u32(node.config.limits.max_frame_bytes + 1);
    c.conn().expect("conn").send_raw(&raw).await.expect("write");
    let (code, _) = node_error(&mut ev).await;
    assert_eq!(code, ErrorCode::FrameTooLarge as i32);
    assert_eq!(
        disconnect_code(&mut ev).await,
        ErrorCode::FrameTooLarge as u64
    );
    node_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_request_type_gets_unknown_request() {
    let node = TestNode::start().await;
    let (c, _ev) = node.client().await;
    // request_id = 5 and a field number this protocol does not have (99, varint 1).
    let mut body = BytesMut::new();
    prost::encoding::uint64::encode(1, &5u64, &mut body);
    prost::encoding::uint64::encode(99, &1u64, &mut body);
    let mut raw = BytesMut::new();
    raw.put_u32(body.len() as u32);
    raw.extend_from_slice(&body);
    let conn = c.conn().expect("conn");
    let reply = conn.expect_reply(5);
    conn.send_raw(&raw).await.expect("write");
    let frame = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("reply in time")
        .expect("reply");
    match frame.body {
        Some(server_frame::Body::Error(e)) => assert_eq!(e.code, ErrorCode::UnknownRequest as i32),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_authentication_are_refused() {
    let node = TestNode::start().await;
    let (c, _ev) = node.client().await;
    assert_eq!(code_of(c.chat_list().await), ErrorCode::Unauthenticated);
    assert_eq!(
        code_of(c.channel_create("sneaky").await),
        ErrorCode::Unauthenticated
    );
    let r = c
        .request(client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "x".into(),
            chat: None,
            body: "hi".into(),
            reply_to: 0,
        }))
        .await;
    assert_eq!(code_of(r), ErrorCode::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_tampered_tokens_are_refused() {
    let node = TestNode::start().await;
    let (_a, _ae, s) = node.user("tok").await;
    let secret = Auth::load_or_create_secret(&node.dir.path().join("token.key")).expect("secret");
    let auth = Auth::new(&secret, Duration::from_secs(60), 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let (expired, _) = auth.mint_at(s.user, "tok", now - 3_600).expect("mint");
    let (c, _ev) = node.client().await;
    assert_eq!(
        code_of(c.authenticate(&expired).await),
        ErrorCode::TokenExpired
    );
    let mut tampered = s.token.clone();
    let last = tampered.pop().expect("non-empty");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        code_of(c.authenticate(&tampered).await),
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        code_of(c.authenticate("not.a.jwt").await),
        ErrorCode::TokenInvalid
    );
    // A token signed by another cluster's secret.
    let foreign = Auth::new(&[3u8; 32], Duration::from_secs(60), 1);
    let (forged, _) = foreign.mint(s.user, "tok").expect("mint");
    assert_eq!(
        code_of(c.authenticate(&forged).await),
        ErrorCode::TokenInvalid
    );
    // The real token still works on the same connection.
    c.authenticate(&s.token).await.expect("good token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_names_are_checked() {
    let node = TestNode::start().await;
    let (_a, _ae, _s) = node.user("carla").await;
    let (c, _ev) = node.client().await;
    assert_eq!(
        code_of(c.login("carla", "wrong-password").await),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        code_of(c.login("nobody", "password-123").await),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        code_of(c.register("carla", "password-123").await),
        ErrorCode::UserExists
    );
    assert_eq!(
        code_of(c.register("Bad Name!", "password-123").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(c.register("shortpw", "123").await),
        ErrorCode::InvalidArgument
    );
    let r = c
        .request(client_frame::Body::Hello(pb::Hello {
            protocol_version: 99,
            client_name: "future".into(),
            hide_presence: false,
        }))
        .await;
    assert_eq!(code_of(r), ErrorCode::VersionMismatch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_channels_and_messages() {
    let node = TestNode::start().await;
    let (a, _ae, s) = node.user("uma").await;
    assert_eq!(
        code_of(a.resolve_user("ghost").await),
        ErrorCode::UnknownUser
    );
    assert_eq!(
        code_of(a.user_by_id(UserId(42)).await),
        ErrorCode::UnknownUser
    );
    assert_eq!(
        code_of(a.channel_join("ghosts").await),
        ErrorCode::UnknownChannel
    );
    assert_eq!(
        code_of(a.channel_members(ChannelId(12_345)).await),
        ErrorCode::UnknownChannel
    );
    assert_eq!(
        code_of(
            a.send(ChatId::Channel(ChannelId(12_345)), "hello?", None)
                .await
        ),
        ErrorCode::UnknownChannel
    );
    let (_b, _be, sb) = node.user("vic").await;
    let chat = ChatId::direct(s.user, sb.user);
    assert_eq!(
        code_of(a.react(chat, 777, "👍").await),
        ErrorCode::UnknownMessage
    );
    // A malformed chat id: users out of order.
    let r = a
        .request(client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "m1".into(),
            chat: Some(pb::ChatId {
                kind: Some(pb::chat_id::Kind::Direct(pb::DirectChat {
                    low_user: 9,
                    high_user: 1,
                })),
            }),
            body: "x".into(),
            reply_to: 0,
        }))
        .await;
    assert_eq!(code_of(r), ErrorCode::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_and_the_rate_limit() {
    let node = TestNode::start_with(|c| {
        c.limits.send_rate_per_sec = 1;
        c.limits.send_burst = 3;
    })
    .await;
    let (a, _ae, s) = node.user("rita").await;
    let (_b, _be, sb) = node.user("sam").await;
    let chat = ChatId::direct(s.user, sb.user);
    let big = vec![b'x'; node.config.limits.max_body_bytes as usize + 1];
    assert_eq!(
        code_of(a.send(chat, big, None).await),
        ErrorCode::MessageTooLarge
    );
    // Straight requests (the high-level send would wait and retry on RATE_LIMITED).
    let send = |n: u32| {
        client_frame::Body::Send(pb::SendMessage {
            client_msg_id: format!("burst-{n}"),
            chat: Some(meshchat_proto::ids::chat_to_wire(chat)),
            body: "burst".into(),
            reply_to: 0,
        })
    };
    let mut codes = Vec::new();
    for n in 0..5 {
        codes.push(match a.request(send(n)).await {
            Ok(_) => None,
            Err(e) => e.code(),
        });
    }
    assert_eq!(&codes[..3], &[None, None, None], "the burst is allowed");
    assert_eq!(codes[3], Some(ErrorCode::RateLimited));
    // Reactions, receipts and joins have their own quota (twice the send quota) and are
    // refused with RATE_LIMITED past it, so nobody can flood others' push queues with them.
    let target = a
        .history(chat, 0, meshchat_proto::client::Direction::Backward, 1)
        .await
        .expect("history")
        .messages[0]
        .message_id;
    let mut react_codes = Vec::new();
    for n in 0..8 {
        react_codes.push(
            a.react(chat, target, if n % 2 == 0 { "👍" } else { "👎" })
                .await
                .err()
                .and_then(|e| e.code()),
        );
    }
    assert!(
        react_codes[..6].iter().all(Option::is_none),
        "{react_codes:?}"
    );
    assert_eq!(react_codes[7], Some(ErrorCode::RateLimited));
    // The retrying send gets through once the bucket refills.
    a.send(chat, "patient", None)
        .await
        .expect("send after waiting");
    match a.request(send(99)).await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(message.contains("retry in"), "{message}");
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_authenticates_is_closed() {
    let node = TestNode::start_with(|c| c.limits.auth_timeout = Duration::from_millis(300)).await;
    let (_c, mut ev) = node.client().await;
    let (code, _) = node_error(&mut ev).await;
    assert_eq!(code, ErrorCode::AuthTimeout as i32);
    assert_eq!(
        disconnect_code(&mut ev).await,
        ErrorCode::AuthTimeout as u64
    );
    node_still_serves(&node).await;
}

/// Request id 0 is the pushes': a request sent with it is not handled, and is answered
/// `INVALID_ARGUMENT` with id 0 (an unsolicited error); the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_id_0_is_refused_not_handled() {
    let node = TestNode::start().await;
    let (c, mut ev) = node.client().await;
    let mut raw = BytesMut::new();
    meshchat_proto::codec::encode_into(
        &pb::ClientFrame {
            request_id: 0,
            body: Some(client_frame::Body::Register(pb::Register {
                user_name: "id-zero".into(),
                password: "password-123".into(),
            })),
        },
        1 << 16,
        &mut raw,
    )
    .expect("encode");
    c.conn().expect("conn").send_raw(&raw).await.expect("write");
    let (code, message) = node_error(&mut ev).await;
    assert_eq!(code, ErrorCode::InvalidArgument as i32);
    assert!(message.contains("request_id 0"), "{message}");
    // Not handled: the name is still free, on the same connection.
    c.register("id-zero", "password-123")
        .await
        .expect("the name was not taken");
}
