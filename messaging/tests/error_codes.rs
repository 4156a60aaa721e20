//! Every protocol error code, provoked for real against a running node, in one table.
//!
//! [`cases`] has one row per way a code reaches a client: the code, how it arrives (an `Error`
//! reply, an `Error` with request id 0, a QUIC close code, or an `Error` and then a close) and
//! what provokes it. [`NOT_PRODUCIBLE`] lists the codes no test can make a node send, each
//! with the reason. `the_table_covers_every_error_code` checks that the two together are
//! exactly the `ErrorCode` enum, so a new code fails this test until it has a row.
//!
//! Each row also checks the "connection" column of docs/PROTOCOL.md's error-code table: after
//! an `Error` the same connection is sent a `Ping`: a `Pong` means the connection stayed open;
//! else the close code is read from the client's `Disconnected` event. Every wait is for an
//! event or a reply, with a deadline.
//!
//! Rows marked `Shared` run one after another on one node with a few fixtures (two users, a
//! message, a channel), each on a connection of its own. Rows marked `Own` need a node
//! configured for them (a low rate, a short auth timeout, a small outbound queue) or break it
//! (fenced, stopped), and start one.

mod common;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{TestNode, code_of, next_matching};
use futures::FutureExt;
use futures::future::BoxFuture;
use meshchat_client::{Client, ClientError, Event, Events, Session};
use meshchat_idgen::{ChannelId, ChatId};
use meshchat_messaging::auth::Auth;
use meshchat_proto::client::{self as pb, ErrorCode, client_frame, server_frame};
use meshchat_proto::codec::encode_into;
use meshchat_proto::ids::chat_to_wire;

/// How a code reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// An `Error` with the request's id; the connection stays open.
    Reply,
    /// An `Error` with request id 0 (it answers no request); the connection stays open.
    Unsolicited,
    /// An `Error` with the request's id, then the connection is closed with the same code.
    ReplyThenClose,
    /// An `Error` with request id 0, then the connection is closed with the same code.
    UnsolicitedThenClose,
    /// The QUIC close code only, no `Error` frame.
    Close,
}

/// What a trigger saw: the `Error` frame's code, and the close code if the node closed the
/// connection afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Reply(i32),
    Unsolicited(i32),
    ReplyThenClose(i32, u64),
    UnsolicitedThenClose(i32, u64),
    Close(u64),
}

/// Where a trigger runs.
enum Run {
    /// On the shared node, with its fixtures.
    Shared(fn(Arc<World>) -> BoxFuture<'static, Got>),
    /// On a node it starts itself.
    Own(fn() -> BoxFuture<'static, Got>),
}

struct Case {
    code: ErrorCode,
    answer: Answer,
    /// What provokes it, for people.
    trigger: &'static str,
    run: Run,
}

impl Case {
    fn expected(&self) -> Got {
        let c = self.code as i32;
        match self.answer {
            Answer::Reply => Got::Reply(c),
            Answer::Unsolicited => Got::Unsolicited(c),
            Answer::ReplyThenClose => Got::ReplyThenClose(c, c as u64),
            Answer::UnsolicitedThenClose => Got::UnsolicitedThenClose(c, c as u64),
            Answer::Close => Got::Close(c as u64),
        }
    }
}

/// Every way a code reaches a client, and what provokes it. A code may have several rows (an
/// `Error` and a close code, or two causes).
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Answer::*;
    use ErrorCode as E;
    use Run::{Own, Shared};
    fn case(code: ErrorCode, answer: Answer, run: Run, trigger: &'static str) -> Case {
        Case { code, answer, trigger, run }
    }
    vec![
        case(E::Unspecified, Close, Shared(|w| normal_close(w).boxed()),
            "Hello, then the client finishes its stream: the node answers, then closes (\"bye\")"),
        case(E::MalformedFrame, Unsolicited, Shared(|w| malformed_frame(w).boxed()),
            "a frame whose body is not a ClientFrame"),
        case(E::FrameTooLarge, UnsolicitedThenClose, Shared(|w| frame_too_large(w).boxed()),
            "a length prefix of max_frame_bytes + 1"),
        case(E::UnknownRequest, Reply, Shared(|w| unknown_request(w).boxed()),
            "a frame with a request id and only a field number ClientFrame does not have"),
        case(E::UnknownRequest, Unsolicited, Shared(|w| empty_frame(w).boxed()),
            "an empty frame (length 0: request id 0, no body)"),
        case(E::Unauthenticated, Reply, Shared(|w| unauthenticated(w).boxed()),
            "ChatListQuery before authenticating"),
        case(E::Unauthenticated, Reply, Shared(|w| push_ack_unauthenticated(w).boxed()),
            "PushAck before authenticating"),
        case(E::TokenExpired, Reply, Shared(|w| token_expired(w).boxed()),
            "Authenticate with a token of the node's secret issued an hour ago, 60 s TTL"),
        case(E::TokenInvalid, Reply, Shared(|w| token_invalid(w).boxed()),
            "Authenticate with \"not.a.jwt\""),
        case(E::Forbidden, Reply, Shared(|w| forbidden(w).boxed()),
            "SendMessage to a channel that exists and I am not a member of"),
        case(E::UnknownUser, Reply, Shared(|w| unknown_user(w).boxed()),
            "ResolveUser of a name nobody has"),
        case(E::UnknownChannel, Reply, Shared(|w| unknown_channel(w).boxed()),
            "ChannelJoin by a name no channel has"),
        case(E::UnknownMessage, Reply, Shared(|w| unknown_message(w).boxed()),
            "React to message id 777 of a 1:1 chat that has no such message"),
        case(E::MessageTooLarge, Reply, Shared(|w| message_too_large(w).boxed()),
            "SendMessage with a body of max_body_bytes + 1"),
        case(E::RateLimited, Reply, Own(|| send_rate_limited().boxed()),
            "sends past a send quota of 1/s with a burst of 1"),
        case(E::RateLimited, Reply, Own(|| password_rate_limited().boxed()),
            "a Login past a password-attempt quota of 1 a minute per source"),
        case(E::SlowReader, Close, Own(|| slow_reader().boxed()),
            "a device that stops reading while 60 pushes of 2 KiB come (outbound_queue 4)"),
        case(E::UserExists, Reply, Shared(|w| user_exists(w).boxed()),
            "Register with a taken name"),
        case(E::BadCredentials, Reply, Shared(|w| bad_credentials(w).boxed()),
            "Login with a wrong password"),
        case(E::BadCredentials, ReplyThenClose, Shared(|w| too_many_auth_failures(w).boxed()),
            "the max_auth_failures-th failed Login on one connection"),
        case(E::InvalidArgument, Reply, Shared(|w| invalid_argument(w).boxed()),
            "Register on a connection that is already authenticated"),
        case(E::VersionMismatch, Reply, Shared(|w| version_mismatch(w).boxed()),
            "Hello with protocol_version 99"),
        case(E::ChannelExists, Reply, Shared(|w| channel_exists(w).boxed()),
            "ChannelCreate with a taken name"),
        // The close code of a fenced node ("node fenced") needs Redis: tests/fencing.rs.
        case(E::Unavailable, Reply, Own(|| fenced().boxed()),
            "Register on a fenced node (its lease gate closed)"),
        case(E::Unavailable, Close, Own(|| shutting_down().boxed()),
            "the node shuts down under an authenticated connection"),
        case(E::AuthTimeout, UnsolicitedThenClose, Own(|| auth_timeout().boxed()),
            "no authentication within auth_timeout (1 s) after Hello"),
        case(E::AuthTimeout, Close, Own(|| no_stream_in_time().boxed()),
            "no stream opened within auth_timeout (1 s)"),
    ]
}

/// Codes no test here can make a node send, and why.
const NOT_PRODUCIBLE: &[(ErrorCode, &str)] = &[
    (
        ErrorCode::TooEarly,
        "only in 0-RTT early data, which needs a ticket from an earlier connection and a \
         handshake held open while the node reads: zero_rtt.rs makes it (a relay holds the \
         node's answers) in \
         a_request_a_replay_could_harm_is_refused_in_early_data_and_served_after_the_handshake, \
         and checks the connection stays open",
    ),
    (
        ErrorCode::Internal,
        "sent for a storage backend failure, or in place of a reply too large for a frame \
         (session::put, unit-tested); error messages clip the input they quote to 64 \
         characters, so no request makes a healthy node send it (see \
         a_huge_name_is_refused_with_its_own_code_before_authentication_too)",
    ),
    (
        ErrorCode::Overloaded,
        "every path waits out a bounded queue on the wall clock: a password attempt waits 5 s \
     (auth::HASH_QUEUE_WAIT, not configurable) for its source's turn or a hashing slot, and \
     hashes take milliseconds; a write waits 2 s on the embedded store's queue of 16,384 (not \
     configurable from NodeConfig); the id generator refuses only when the clock goes \
     backwards. Provoking any of them means racing real work against a timeout.",
    ),
];

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn the_table_covers_every_error_code() {
    let every: BTreeSet<i32> = (0..=64)
        .filter(|&i| ErrorCode::try_from(i).is_ok())
        .collect();
    let table: BTreeSet<i32> = cases().iter().map(|c| c.code as i32).collect();
    let left_out: BTreeSet<i32> = NOT_PRODUCIBLE.iter().map(|(c, _)| *c as i32).collect();
    assert!(
        table.is_disjoint(&left_out),
        "a code is both in the table and left out: {:?}",
        names(table.intersection(&left_out))
    );
    let covered: BTreeSet<i32> = table.union(&left_out).copied().collect();
    assert_eq!(
        names(covered.iter()),
        names(every.iter()),
        "every ErrorCode needs a row in cases() or a reason in NOT_PRODUCIBLE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_on_a_shared_node() {
    let world = Arc::new(World::new().await);
    let mut failures = Vec::new();
    for case in cases() {
        let Run::Shared(run) = case.run else { continue };
        let got = tokio::spawn(run(world.clone()));
        check(&case, got, &mut failures).await;
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_on_their_own_nodes() {
    let mut failures = Vec::new();
    for case in cases() {
        let Run::Own(run) = case.run else { continue };
        let got = tokio::spawn(run());
        check(&case, got, &mut failures).await;
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Waits for one case's trigger and records a mismatch (or a panic) in `failures`.
async fn check(case: &Case, got: tokio::task::JoinHandle<Got>, failures: &mut Vec<String>) {
    let want = case.expected();
    let row = format!("{:?} ({:?}) [{}]", case.code, case.answer, case.trigger);
    match tokio::time::timeout(Duration::from_secs(60), got).await {
        Ok(Ok(got)) if got == want => {}
        Ok(Ok(got)) => failures.push(format!("{row}: want {want:?}, got {got:?}")),
        Ok(Err(e)) => failures.push(format!("{row}: the trigger failed: {e}")),
        Err(_) => failures.push(format!("{row}: no outcome within 60 s")),
    }
}

fn names<'a>(codes: impl Iterator<Item = &'a i32>) -> Vec<String> {
    codes
        .map(|&i| match ErrorCode::try_from(i) {
            Ok(c) => format!("{i} {}", c.as_str_name()),
            Err(_) => format!("{i} ?"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The shared node and what the triggers observe

/// A node with two users, a message between them and a channel only bob is in.
struct World {
    node: TestNode,
    alice: Session,
    bob: Session,
    /// alice's message in her 1:1 chat with bob.
    message: u64,
    /// bob's channel.
    channel: pb::ChannelInfo,
}

impl World {
    async fn new() -> Self {
        let node = TestNode::start().await;
        let (a, _ae, alice) = node.user("alice").await;
        let (b, _be, bob) = node.user("bob").await;
        let chat = ChatId::direct(alice.user, bob.user);
        let message = a.send(chat, "hello", None).await.expect("send").message_id;
        let channel = b.channel_create("bobs-room").await.expect("create");
        Self {
            node,
            alice,
            bob,
            message,
            channel,
        }
    }

    fn chat(&self) -> ChatId {
        ChatId::direct(self.alice.user, self.bob.user)
    }

    /// A new connection authenticated as alice.
    async fn alice(&self) -> (Client, Events) {
        self.node.device(&self.alice).await
    }
}

/// What follows an `Error` with code `code`: a `Ping` answered on the same connection (it
/// stayed open), or the connection's close code.
async fn after_error(c: &Client, ev: &mut Events, reply: bool, code: i32) -> Got {
    // Raced with the close: a request sent after the node closed its side may wait out the
    // client's whole request timeout instead of failing.
    let first = tokio::select! {
        r = c.request(ping()) => Ok(r),
        k = disconnect_code(ev) => Err(k),
    };
    let close = match first {
        Ok(Ok(server_frame::Body::Pong(p))) if p.nonce == NONCE => None,
        Ok(Ok(other)) => panic!("a Ping got {other:?}"),
        Ok(Err(_)) => Some(disconnect_code(ev).await),
        Err(k) => Some(k),
    };
    match (reply, close) {
        (true, None) => Got::Reply(code),
        (false, None) => Got::Unsolicited(code),
        (true, Some(k)) => Got::ReplyThenClose(code, k),
        (false, Some(k)) => Got::UnsolicitedThenClose(code, k),
    }
}

/// A request the node refused: its code, and whether the connection stayed open.
async fn refused<T: Debug>(c: &Client, ev: &mut Events, r: Result<T, ClientError>) -> Got {
    let code = code_of(r);
    after_error(c, ev, true, code as i32).await
}

/// An `Error` with request id 0, and whether the connection stayed open.
async fn unsolicited(c: &Client, ev: &mut Events) -> Got {
    let code = next_matching(ev, |e| match e {
        Event::NodeError { code, .. } => Some(code),
        _ => None,
    })
    .await;
    after_error(c, ev, false, code).await
}

/// The close of a connection the client does nothing on, and any `Error` before it.
async fn closed(ev: &mut Events) -> Got {
    let mut error = None;
    let close = next_matching(ev, |e| match e {
        Event::NodeError { code, .. } => {
            error.get_or_insert(code);
            None
        }
        Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await;
    match error {
        Some(code) => Got::UnsolicitedThenClose(code, close),
        None => Got::Close(close),
    }
}

async fn disconnect_code(ev: &mut Events) -> u64 {
    next_matching(ev, |e| match e {
        Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await
}

const NONCE: u64 = 0x5eed;

fn ping() -> client_frame::Body {
    client_frame::Body::Ping(pb::Ping { nonce: NONCE })
}

/// One frame: the length prefix, then `body`.
fn frame(body: &[u8]) -> BytesMut {
    let mut raw = BytesMut::new();
    raw.put_u32(body.len() as u32);
    raw.extend_from_slice(body);
    raw
}

/// A QUIC connection to `node` without the client library (which always opens its stream and
/// says hello). The endpoint must outlive the connection.
async fn raw_connection(node: &TestNode) -> (quinn::Endpoint, quinn::Connection) {
    let (addr, name) = meshchat_client::conn::resolve(&node.addr()).expect("address");
    let bind = "127.0.0.1:0".parse().expect("bind address");
    let endpoint = meshchat_client::conn::client_endpoint(&node.options(), bind).expect("endpoint");
    let conn = endpoint
        .connect(addr, &name)
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}

/// The application close code `conn` is closed with, within 10 s.
async fn raw_close_code(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(a)) => a.error_code.into_inner(),
        Ok(other) => panic!("closed without an application code: {other}"),
        Err(_) => panic!("not closed within 10 s"),
    }
}

// ---------------------------------------------------------------------------------------
// Triggers on the shared node

async fn normal_close(w: Arc<World>) -> Got {
    let (_endpoint, conn) = raw_connection(&w.node).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut hello = BytesMut::new();
    encode_into(
        &pb::ClientFrame {
            request_id: 1,
            body: Some(client_frame::Body::Hello(pb::Hello {
                protocol_version: meshchat_proto::PROTOCOL_VERSION,
                client_name: "error_codes".into(),
                hide_presence: false,
            })),
        },
        1 << 16,
        &mut hello,
    )
    .expect("encode");
    send.write_all(&hello).await.expect("write");
    send.finish().expect("finish");
    // The node answers the hello, then finishes its side when it sees ours end.
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
        .await
        .expect("the node finishes its stream within 5 s")
        .expect("read");
    assert!(answer.len() > 4, "the hello was answered before the close");
    Got::Close(raw_close_code(&conn).await)
}

async fn malformed_frame(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let raw = frame(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02, 0x03]);
    c.conn().expect("conn").send_raw(&raw).await.expect("write");
    unsolicited(&c, &mut ev).await
}

async fn frame_too_large(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let mut raw = BytesMut::new();
    raw.put_u32(w.node.config.limits.max_frame_bytes + 1);
    c.conn().expect("conn").send_raw(&raw).await.expect("write");
    unsolicited(&c, &mut ev).await
}

async fn unknown_request(w: Arc<World>) -> Got {
    const ID: u64 = 1_000_000;
    let (c, mut ev) = w.node.client().await;
    // A request id, then field 99 (a varint), which ClientFrame does not have.
    let mut body = BytesMut::new();
    prost::encoding::uint64::encode(1, &ID, &mut body);
    prost::encoding::uint64::encode(99, &1u64, &mut body);
    let conn = c.conn().expect("conn");
    let reply = conn.expect_reply(ID);
    conn.send_raw(&frame(&body)).await.expect("write");
    let reply = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("a reply within 5 s")
        .expect("reply");
    match reply.body {
        Some(server_frame::Body::Error(e)) => after_error(&c, &mut ev, true, e.code).await,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn empty_frame(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    c.conn()
        .expect("conn")
        .send_raw(&frame(&[]))
        .await
        .expect("write");
    unsolicited(&c, &mut ev).await
}

async fn unauthenticated(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c.chat_list().await;
    refused(&c, &mut ev, r).await
}

async fn push_ack_unauthenticated(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c
        .request(client_frame::Body::PushAck(pb::PushAck { seq: 1 }))
        .await;
    refused(&c, &mut ev, r).await
}

async fn token_expired(w: Arc<World>) -> Got {
    let secret = Auth::load_or_create_secret(&w.node.dir.path().join("token.key")).expect("secret");
    let auth = Auth::new(&secret, Duration::from_secs(60), 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let (expired, _) = auth
        .mint_at(w.alice.user, &w.alice.name, now - 3_600)
        .expect("mint");
    let (c, mut ev) = w.node.client().await;
    let r = c.authenticate(&expired).await;
    refused(&c, &mut ev, r).await
}

async fn token_invalid(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c.authenticate("not.a.jwt").await;
    refused(&c, &mut ev, r).await
}

async fn forbidden(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c
        .request(client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "forbidden-1".into(),
            chat: Some(chat_to_wire(ChatId::Channel(ChannelId(
                w.channel.channel_id,
            )))),
            body: "let me in".into(),
            reply_to: 0,
        }))
        .await;
    refused(&c, &mut ev, r).await
}

async fn unknown_user(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c.resolve_user("ghost").await;
    refused(&c, &mut ev, r).await
}

async fn unknown_channel(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c.channel_join("no-such-room").await;
    refused(&c, &mut ev, r).await
}

async fn unknown_message(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    assert_ne!(w.message, 777, "777 must not be a message of the chat");
    let r = c.react(w.chat(), 777, "👍").await;
    refused(&c, &mut ev, r).await
}

async fn message_too_large(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c
        .request(client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "too-large-1".into(),
            chat: Some(chat_to_wire(w.chat())),
            body: vec![b'x'; w.node.config.limits.max_body_bytes as usize + 1].into(),
            reply_to: 0,
        }))
        .await;
    refused(&c, &mut ev, r).await
}

async fn user_exists(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c.register(&w.alice.name, "password-123").await;
    refused(&c, &mut ev, r).await
}

async fn bad_credentials(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c.login(&w.alice.name, "wrong-password").await;
    refused(&c, &mut ev, r).await
}

async fn too_many_auth_failures(w: Arc<World>) -> Got {
    let allowed = w.node.config.auth.max_auth_failures.max(1);
    let (c, mut ev) = w.node.client().await;
    for n in 1..allowed {
        assert_eq!(
            code_of(c.login(&w.alice.name, "wrong-password").await),
            ErrorCode::BadCredentials,
            "failed login {n} of {allowed}"
        );
    }
    let r = c.login(&w.alice.name, "wrong-password").await;
    refused(&c, &mut ev, r).await
}

async fn invalid_argument(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c
        .request(client_frame::Body::Register(pb::Register {
            user_name: "alice-again".into(),
            password: "password-123".into(),
        }))
        .await;
    refused(&c, &mut ev, r).await
}

async fn version_mismatch(w: Arc<World>) -> Got {
    let (c, mut ev) = w.node.client().await;
    let r = c
        .request(client_frame::Body::Hello(pb::Hello {
            protocol_version: 99,
            client_name: "from the future".into(),
            hide_presence: false,
        }))
        .await;
    refused(&c, &mut ev, r).await
}

async fn channel_exists(w: Arc<World>) -> Got {
    let (c, mut ev) = w.alice().await;
    let r = c.channel_create(&w.channel.name).await;
    refused(&c, &mut ev, r).await
}

// ---------------------------------------------------------------------------------------
// Triggers on nodes of their own

async fn send_rate_limited() -> Got {
    let node = TestNode::start_with(|c| {
        c.limits.send_rate_per_sec = 1;
        c.limits.send_burst = 1;
    })
    .await;
    let (a, mut ae, alice) = node.user("alice").await;
    let (_b, _be, bob) = node.user("bob").await;
    let chat = ChatId::direct(alice.user, bob.user);
    // Straight requests: the library's send would wait and retry on RATE_LIMITED. One send a
    // second is allowed, so the second of these is refused unless each takes a second.
    for n in 0..20 {
        let r = a
            .request(client_frame::Body::Send(pb::SendMessage {
                client_msg_id: format!("burst-{n}"),
                chat: Some(chat_to_wire(chat)),
                body: "burst".into(),
                reply_to: 0,
            }))
            .await;
        if r.is_err() {
            return refused(&a, &mut ae, r).await;
        }
    }
    panic!("20 sends at a quota of 1/s were all accepted");
}

async fn password_rate_limited() -> Got {
    let node = TestNode::start_with(|c| {
        c.auth.attempts_per_source_per_min = 1;
        c.auth.attempts_per_source_burst = 1;
    })
    .await;
    // The registration is this source's one attempt of the minute.
    let (_a, _ae, alice) = node.user("alice").await;
    let (c, mut ev) = node.client().await;
    let r = c.login(&alice.name, "password-123").await;
    refused(&c, &mut ev, r).await
}

async fn slow_reader() -> Got {
    let node = TestNode::start_with(|c| c.limits.outbound_queue = 4).await;
    let (alice, _ae, a) = node.user("alice").await;
    let (_bob, _be, b) = node.user("bob").await;
    // bob's second device reads nothing: a one-event buffer and a 4 KiB stream window, so the
    // node's writes to it block almost at once and its queue of 4 fills (as in
    // tests/slow_reader.rs).
    let mut opts = node.options();
    opts.event_buffer = 1;
    opts.stream_receive_window = 4 * 1024;
    let (slow, mut slow_ev) = node.client_with(opts).await;
    slow.authenticate(&b.token).await.expect("authenticate");
    let chat = ChatId::direct(a.user, b.user);
    for _ in 0..60 {
        alice
            .send(chat, vec![b'z'; 2048], None)
            .await
            .expect("the sender is never slowed down");
    }
    closed(&mut slow_ev).await
}

async fn fenced() -> Got {
    let node = TestNode::start().await;
    // The gate the Redis membership driver closes when the node's lease runs out
    // (tests/fencing.rs does that with a real Redis); closed here directly.
    let running = node.running.as_ref().expect("running");
    running.node.lease_gate().set_valid_until(0);
    let (c, mut ev) = node.client().await;
    let r = c.register("fenced-out", "password-123").await;
    refused(&c, &mut ev, r).await
}

async fn shutting_down() -> Got {
    let mut node = TestNode::start().await;
    let (_c, mut ev, _s) = node.user("alice").await;
    node.stop().await;
    closed(&mut ev).await
}

async fn auth_timeout() -> Got {
    let node = TestNode::start_with(|c| c.limits.auth_timeout = Duration::from_secs(1)).await;
    let (_c, mut ev) = node.client().await;
    closed(&mut ev).await
}

async fn no_stream_in_time() -> Got {
    let node = TestNode::start_with(|c| c.limits.auth_timeout = Duration::from_secs(1)).await;
    let (_endpoint, conn) = raw_connection(&node).await;
    Got::Close(raw_close_code(&conn).await)
}

/// Every request gets an answer with its own code: a name of 20,000 control bytes (quoted
/// with `{:?}`, six bytes each, it once made an error over a frame, which went unanswered
/// before authentication and came back `INTERNAL` after) is refused `INVALID_ARGUMENT`, its
/// quote clipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_name_is_refused_with_its_own_code_before_authentication_too() {
    let node = TestNode::start().await;
    let mut opts = node.options();
    opts.request_timeout = Duration::from_secs(5);
    let (c, _ev) = node.client_with(opts).await;
    // INVALID_ARGUMENT quotes the name with `{:?}`: six bytes per byte here.
    let r = c.register(&"\u{1}".repeat(20_000), "password-123").await;
    assert_eq!(common::code_of(r), ErrorCode::InvalidArgument);
    // After authentication too, and for a channel name.
    let (u, _ue, _us) = node.user("huge-name-asker").await;
    let r = u.channel_join(&"\u{1}".repeat(20_000)).await;
    assert_eq!(common::code_of(r), ErrorCode::UnknownChannel);
}
