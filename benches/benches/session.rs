//! The client session's state machine without I/O (`meshchat_messaging::session::machine`):
//! requests per second through it (frames decoded, dispatched, replies encoded), and pushes
//! per second written with their sequence numbers. No socket, task or node: what the session
//! itself costs per request, apart from the transport and the work a request asks for.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshchat_idgen::UserId;
use meshchat_messaging::auth::Identity;
use meshchat_messaging::node::encode_push;
use meshchat_messaging::session::machine::{Authenticated, Bounds, Host, Next, Session};
use meshchat_proto::client::{
    self as pb, ChatId, ClientFrame, ServerFrame, chat_id, client_frame, push, server_frame,
};
use meshchat_proto::{DEFAULT_MAX_FRAME, FrameCodec};
use tokio_util::codec::{Decoder, Encoder};

/// Frames per batch, as a busy connection's read might hold.
const BATCH: usize = 64;

struct Node;

impl Host for Node {
    fn hello_ok(&self) -> pb::HelloOk {
        pb::HelloOk {
            protocol_version: meshchat_proto::PROTOCOL_VERSION,
            node_id: 1,
            ..Default::default()
        }
    }
}

fn chat() -> ChatId {
    ChatId {
        kind: Some(chat_id::Kind::ChannelId(1_234_567_890_123)),
    }
}

/// `BATCH` frames of `body` as the client writes them.
fn wire(body: impl Fn(u64) -> client_frame::Body) -> BytesMut {
    let mut enc: FrameCodec<ClientFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut out = BytesMut::new();
    for rid in 1..=BATCH as u64 {
        let f = ClientFrame {
            request_id: rid,
            body: Some(body(rid)),
        };
        enc.encode(&f, &mut out).expect("encode");
    }
    out
}

fn session() -> Session {
    Session::new(
        Bounds {
            max_frame: DEFAULT_MAX_FRAME,
            max_inflight: BATCH,
            max_auth_failures: 5,
        },
        Instant::now(),
        Duration::from_secs(10),
    )
}

fn authenticated() -> Session {
    let mut s = session();
    let token = ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Authenticate(pb::Authenticate {
            token: "t".into(),
        })),
    };
    assert!(matches!(s.frame(&Node, Ok(token), false), Next::Call(_)));
    let ok = pb::AuthOk {
        user_id: 7,
        user_name: "ann".into(),
        token: "t".into(),
        expires_unix_ms: u64::MAX,
    };
    let registered = Authenticated::Registered {
        identity: Identity {
            user: UserId(7),
            name: "ann".into(),
            auth_time_ms: 0,
        },
        ok,
        expires: Instant::now() + Duration::from_secs(3600),
    };
    assert!(matches!(
        s.authenticated(1, registered),
        Next::Answered("ok")
    ));
    s.out().clear();
    s
}

fn session_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(BATCH as u64));

    // A send of 100 bytes: decoded, dispatched (Start), its Processed reply encoded.
    let sends = wire(|rid| {
        client_frame::Body::Send(pb::SendMessage {
            client_msg_id: format!("0192f1c2-7a3b-7c2e-9f00-{rid:012}"),
            chat: Some(chat()),
            body: vec![b'x'; 100].into(),
            reply_to: 0,
        })
    });
    // Baseline: the same frames decoded, nothing else (the floor any session pays).
    g.bench_function("send_decode_only", |b| {
        let mut dec: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
        b.iter(|| {
            let mut buf = sends.clone();
            let mut n = 0;
            while let Some(f) = dec.decode(&mut buf).transpose() {
                n += usize::from(f.is_ok());
            }
            n
        })
    });
    g.bench_function("send_request", |b| {
        let mut s = authenticated();
        let mut dec: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
        b.iter(|| {
            let mut buf = sends.clone();
            while let Some(f) = dec.decode(&mut buf).transpose() {
                let Next::Start { rid, .. } = s.frame(&Node, f, false) else {
                    panic!("not started");
                };
                s.finished(&ServerFrame {
                    request_id: rid,
                    body: Some(server_frame::Body::Processed(pb::Processed {
                        client_msg_id: String::new(),
                        message_id: 1 << 40 | rid,
                        duplicate: false,
                        chat: Some(chat()),
                    })),
                });
            }
            s.out().clear();
        })
    });

    // A ping before authentication: answered by the machine itself.
    let pings = wire(|rid| client_frame::Body::Ping(pb::Ping { nonce: rid }));
    g.bench_function("ping_answered_inline", |b| {
        let mut s = session();
        let mut dec: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
        b.iter(|| {
            let mut buf = pings.clone();
            while let Some(f) = dec.decode(&mut buf).transpose() {
                assert!(matches!(s.frame(&Node, f, false), Next::Answered("ok")));
            }
            s.out().clear();
        })
    });

    // Pushes of a 100-byte message event, numbered and framed.
    let event = encode_push(push::Event::Message(pb::Message {
        message_id: 1 << 40,
        chat: Some(chat()),
        sender_id: 9,
        body: vec![b'x'; 100].into(),
        ..Default::default()
    }));
    g.bench_function("push", |b| {
        let mut s = authenticated();
        let mut batch: Vec<Bytes> = Vec::with_capacity(BATCH);
        b.iter(|| {
            batch.extend(std::iter::repeat_n(event.clone(), BATCH));
            s.pushes(&mut batch);
            s.out().clear();
        })
    });
    g.finish();
}

criterion_group!(benches, session_bench);
criterion_main!(benches);
