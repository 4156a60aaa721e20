//! One task per client connection: handshake, hello, authentication, then a loop that reads
//! requests, runs up to `max_inflight_per_conn` of them at once, writes their replies, and
//! writes pushes from the connection's bounded outbound queue with a per-connection sequence
//! number.
//!
//! Memory per idle connection is kept small on purpose: the read buffer starts at 256 bytes
//! (tokio's default is 8 KiB), the write buffer starts empty, the outbound queue is created
//! only after authentication, and nothing else is held per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use meshchat_proto::FrameCodec;
use meshchat_proto::client::{
    self as pb, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame,
};
use meshchat_proto::codec::{CodecError, encode_into};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::codec::Decoder;
use tracing::{Instrument, debug, info_span, warn};

use crate::admission::HandshakeSlot;
use crate::auth::Identity;
use crate::error::{RequestError, close_code};
use crate::metrics::{self, request_type};
use crate::node::{AuthOutcome, Node};
use crate::registry::{ConnHandle, ConnId, Outbox, Refused};

/// Initial capacity of a connection's read buffer; grows to the frame size when needed.
const READ_BUFFER: usize = 256;
/// A read buffer that grew past this is dropped once empty, so one large frame does not pin
/// memory for the connection's lifetime.
const READ_BUFFER_KEEP: usize = 16 * 1024;
/// How long a closing connection waits for the client to acknowledge the last frames (an
/// error explaining the close) before the QUIC close discards them.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Reads frames off the protocol stream. Unlike `FramedRead`, it keeps going after a
/// malformed frame (whose bytes were consumed whole, so the stream is still in sync).
/// `next` is cancel-safe: all state lives in the struct.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    codec: FrameCodec<ClientFrame, ServerFrame>,
    eof: bool,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(READ_BUFFER),
            codec: FrameCodec::new(max_frame),
            eof: false,
        }
    }

    /// The next frame, a decode error, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<Result<ClientFrame, CodecError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    if self.buf.is_empty() && self.buf.capacity() > READ_BUFFER_KEEP {
                        self.buf = BytesMut::with_capacity(READ_BUFFER);
                    }
                    return Some(Ok(f));
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.eof {
                return None;
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_BUFFER);
            }
            match self.recv.read_buf(&mut self.buf).await {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Some(Err(CodecError::Io(e))),
            }
        }
    }
}
/// Field number of `push` in `ServerFrame` (see client.proto).
const SERVER_FRAME_PUSH_FIELD: u32 = 14;
/// Field number of `seq` in `Push`.
const PUSH_SEQ_FIELD: u32 = 1;

/// Appends one `ServerFrame { push: Push { seq, <event> } }` frame, where `event` is a `Push`
/// body encoded once for all recipients with `seq = 0` (so it holds only the event field).
pub(crate) fn encode_push_frame(seq: u64, event: &Bytes, out: &mut BytesMut) {
    let seq_len = 1 + encoded_len_varint(seq);
    let push_len = seq_len + event.len();
    let frame_len = 1 + encoded_len_varint(push_len as u64) + push_len;
    out.reserve(4 + frame_len);
    out.extend_from_slice(&(frame_len as u32).to_be_bytes());
    encode_key(SERVER_FRAME_PUSH_FIELD, WireType::LengthDelimited, out);
    encode_varint(push_len as u64, out);
    encode_key(PUSH_SEQ_FIELD, WireType::Varint, out);
    encode_varint(seq, out);
    out.extend_from_slice(event);
}

/// The instant a token expiring at `unix_ms` (wall clock) runs out.
fn deadline_of(unix_ms: u64) -> tokio::time::Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    tokio::time::Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_ms))
}

/// Encodes `frame` into `out`. One that does not fit a frame (an error quoting too much, a
/// reply over the budget) is answered `INTERNAL` with the same request id instead: never
/// dropped, so a client never waits for an answer that will not come.
fn put(frame: &ServerFrame, max_frame: usize, out: &mut BytesMut) {
    if let Err(e) = encode_into(frame, max_frame, out) {
        warn!(error = %e, request_id = frame.request_id, "reply did not encode");
        let _ = encode_into(
            &code_frame(frame.request_id, ErrorCode::Internal, "reply too large"),
            max_frame,
            out,
        );
    }
}

fn error_frame(request_id: u64, e: &RequestError) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(server_frame::Body::Error(e.to_proto())),
    }
}

fn code_frame(request_id: u64, code: ErrorCode, message: &str) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(server_frame::Body::Error(pb::Error {
            code: code as i32,
            message: message.to_owned(),
        })),
    }
}

type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = ServerFrame> + Send>>;

/// Drives one connection from handshake to close.
pub(crate) async fn serve(
    node: Arc<Node>,
    incoming: quinn::Incoming,
    handshake_slot: HandshakeSlot,
    mut shutdown: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let started = std::time::Instant::now();
    let metrics = node.metrics.clone();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            metrics.handshake("failed", None);
            return;
        }
    };
    // Served from the start (0.5-RTT): a resuming client's 0-RTT requests are answered before
    // its handshake completes; `Handshake` finishes it. A server-side `into_0rtt` always
    // succeeds in quinn 0.11; were that to change, connections would fail here, counted.
    let Ok((conn, done)) = connecting.into_0rtt() else {
        debug!(%remote, "quinn refused to serve the connection before its handshake");
        metrics.handshake("failed", None);
        return;
    };
    let handshake = Handshake {
        // A handshake that does not finish in time gives its slot back and the connection is
        // closed: a client that sends an Initial and nothing more holds a slot for
        // `handshake_timeout`, not for the idle timeout.
        done: Box::pin(tokio::time::timeout(node.limits().handshake_timeout, done)),
        slot: handshake_slot,
        started,
        ended: None,
    };
    let id = node.registry.next_conn_id();
    // A root span: each connection is a trace of its own (with its requests under it), not
    // part of the node's, so traces end and are sampled per connection.
    let span =
        info_span!(parent: None, "conn", node = node.config.node_id, id = id.0, peer = %remote);
    run(node, conn, id, handshake, &mut shutdown)
        .instrument(span)
        .await;
}

/// The rest of a handshake while the connection is already served (0-RTT, 0.5-RTT).
struct Handshake {
    /// Resolves `Ok` once the handshake ended (complete or failed: see [`HandshakeEnd::of`]),
    /// `Err` at the handshake timeout.
    done: std::pin::Pin<Box<tokio::time::Timeout<quinn::ZeroRttAccepted>>>,
    /// The connection's handshake slot, given back when the handshake ends.
    slot: HandshakeSlot,
    started: std::time::Instant,
    /// How it ended, when [`Handshake::complete_now`] saw it end first.
    ended: Option<HandshakeEnd>,
}

/// How a handshake still in progress ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeEnd {
    Complete,
    Failed,
    TimedOut,
}

impl HandshakeEnd {
    /// The end `done` resolved to. On a server its `bool` says nothing (quinn); the connection
    /// has an error once the handshake failed (set before `done` resolves).
    fn of<T>(r: &Result<T, tokio::time::error::Elapsed>, conn: &quinn::Connection) -> Self {
        match r {
            Ok(_) if conn.close_reason().is_none() => Self::Complete,
            Ok(_) => Self::Failed,
            Err(_) => Self::TimedOut,
        }
    }
}

impl Handshake {
    /// Whether the handshake is complete at this instant. A frame is early data unless it is:
    /// the connection's driver may complete the handshake between the session's poll of
    /// [`handshake_end`] and its read of a frame that came after the client's Finished, so
    /// this looks again (and keeps what it saw for `handshake_end`). A failed or timed-out
    /// handshake never makes a frame safe.
    fn complete_now(&mut self, conn: &quinn::Connection) -> bool {
        if self.ended.is_none() {
            // Unconstrained: tokio's per-task budget must not make a completed handshake
            // look in progress (a safe answer, TOO_EARLY, but a needless one).
            self.ended = tokio::task::unconstrained(&mut self.done)
                .now_or_never()
                .map(|r| HandshakeEnd::of(&r, conn));
        }
        self.ended == Some(HandshakeEnd::Complete)
    }
}

/// Waits for the handshake in progress to end (never, when there is none).
async fn handshake_end(h: &mut Option<Handshake>, conn: &quinn::Connection) -> HandshakeEnd {
    match h {
        Some(h) => match h.ended {
            Some(end) => end,
            None => HandshakeEnd::of(&(&mut h.done).await, conn),
        },
        None => std::future::pending().await,
    }
}

/// Ends the handshake in progress (its slot given back, counted); `false` when the
/// connection is to be dropped (failed, or closed here at the timeout).
fn finish_handshake(
    h: &mut Option<Handshake>,
    end: HandshakeEnd,
    node: &Node,
    conn: &quinn::Connection,
) -> bool {
    let Some(hs) = h.take() else { return true };
    drop(hs.slot);
    match end {
        HandshakeEnd::Complete => {
            node.metrics.handshake("ok", Some(hs.started.elapsed()));
            true
        }
        HandshakeEnd::Failed => {
            debug!("handshake failed");
            node.metrics.handshake("failed", None);
            false
        }
        HandshakeEnd::TimedOut => {
            debug!("handshake timed out");
            node.metrics.handshake("timeout", None);
            conn.close(0u32.into(), b"handshake timed out");
            false
        }
    }
}

/// Ends the handshake record of a connection that ends: one already seen to end (by
/// [`Handshake::complete_now`], in the pass that ended the connection) is counted as it
/// ended; one still in progress (closed, shut down, timed out waiting for a stream) as
/// failed. Its slot goes with it.
fn abandon_handshake(h: &mut Option<Handshake>, node: &Node, conn: &quinn::Connection) {
    if let Some(end) = h.as_ref().and_then(|hs| hs.ended) {
        finish_handshake(h, end, node, conn);
    } else if h.take().is_some() {
        debug!("connection ended during its handshake");
        node.metrics.handshake("failed", None);
    }
}

async fn run(
    node: Arc<Node>,
    conn: quinn::Connection,
    id: ConnId,
    handshake: Handshake,
    shutdown: &mut watch::Receiver<bool>,
) {
    // Taken when the handshake ends; counted as established once it is complete.
    let mut handshake = Some(handshake);
    let mut _established = None;
    // This connection's bounds: the limits in force when it was made.
    let limits = node.limits_snapshot();
    let max_auth_failures = node.config.auth.max_auth_failures.max(1);
    // One timer for the connection's one deadline: authenticate by `auth_timeout`, then the
    // expiry of the token it last got (reset on authentication and on every refresh).
    let auth_deadline = tokio::time::sleep(limits.auth_timeout);
    tokio::pin!(auth_deadline);

    // The client opens one bidirectional stream (in 0-RTT data, when it resumes).
    let opened = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => break Some(s),
                Err(e) => { debug!(error = %e, "closed before opening a stream"); break None; }
            },
            end = handshake_end(&mut handshake, &conn) => {
                if !finish_handshake(&mut handshake, end, &node, &conn) {
                    return;
                }
                _established = Some(node.metrics.established());
            }
            _ = &mut auth_deadline => {
                conn.close(close_code(ErrorCode::AuthTimeout), b"no stream opened in time");
                break None;
            }
            _ = shutdown.changed() => {
                conn.close(close_code(ErrorCode::Unavailable), b"node shutting down");
                break None;
            }
        }
    };
    let Some((mut send, recv)) = opened else {
        abandon_handshake(&mut handshake, &node, &conn);
        return;
    };
    let mut reader = FrameReader::new(recv, limits.max_frame_bytes as usize);
    let mut out = BytesMut::new();
    let mut identity: Option<Arc<Identity>> = None;
    let mut outbox: Option<Arc<Outbox>> = None;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut seq: u64 = 0;
    let mut auth_failures: u32 = 0;
    // Hello's `hide_presence`, then `SetPresence`: this connection never shows its user online.
    let mut hide_presence = false;
    let mut inflight: FuturesUnordered<Reply> = FuturesUnordered::new();
    let max_frame = limits.max_frame_bytes as usize;
    // Why the loop ended: a code and reason to close with, or None for a clean client close.
    let close: Option<(ErrorCode, &'static [u8])> = loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                break Some((ErrorCode::Unavailable, b"node shutting down"));
            }
            end = handshake_end(&mut handshake, &conn), if handshake.is_some() => {
                if !finish_handshake(&mut handshake, end, &node, &conn) {
                    break None;
                }
                _established = Some(node.metrics.established());
                // Authenticated in early data: shown online only now (early data can be
                // replayed, and a replay must not show anyone online).
                if let Some(me) = &identity
                    && !hide_presence
                {
                    node.registry.set_visible(me.user, id, true);
                }
            }
            Some(reply) = inflight.next(), if !inflight.is_empty() => {
                put(&reply, max_frame, &mut out);
            }
            () = async { match outbox.as_ref() { Some(o) => o.wait().await, None => std::future::pending().await } }, if outbox.is_some() => {
                // Write whatever is queued in one go (one write, few packets).
                if let Some(o) = outbox.as_ref() {
                    o.drain_into(256, &mut batch);
                }
                node.metrics.pushes(batch.len());
                for push in batch.drain(..) {
                    seq += 1;
                    encode_push_frame(seq, &push, &mut out);
                }
                if batch.capacity() > 256 {
                    batch = Vec::new();
                }
            }
            _ = &mut auth_deadline => {
                // Authenticated: the token this connection last got has expired, and the
                // client did not refresh it (Authenticate again as the same user).
                if identity.is_some() {
                    put(&code_frame(0, ErrorCode::TokenExpired, "this connection's token expired: authenticate with a fresh token, or log in"), max_frame, &mut out);
                    flush_within(&mut send, &mut out, limits.write_timeout).await;
                    break Some((ErrorCode::TokenExpired, b"token expired"));
                }
                put(&code_frame(0, ErrorCode::AuthTimeout, "not authenticated in time"), max_frame, &mut out);
                flush_within(&mut send, &mut out, limits.write_timeout).await;
                break Some((ErrorCode::AuthTimeout, b"not authenticated in time"));
            }
            frame = reader.next(), if inflight.len() < limits.max_inflight_per_conn => {
                match frame {
                    None => break None,
                    Some(Err(CodecError::FrameTooLarge { len, max })) => {
                        let msg = format!("frame of {len} bytes is over the maximum of {max}");
                        put(&code_frame(0, ErrorCode::FrameTooLarge, &msg), max_frame, &mut out);
                        // The stream cannot be resynchronised after an unread body.
                        flush_within(&mut send, &mut out, limits.write_timeout).await;
                        break Some((ErrorCode::FrameTooLarge, b"frame too large"));
                    }
                    Some(Err(CodecError::Malformed(e))) => {
                        // The whole frame was consumed: the stream stays in sync.
                        let msg = format!("frame is not a valid ClientFrame: {e}");
                        put(&code_frame(0, ErrorCode::MalformedFrame, &msg), max_frame, &mut out);
                    }
                    Some(Err(CodecError::Io(e))) => {
                        debug!(error = %e, "read failed");
                        break None;
                    }
                    Some(Ok(frame)) => {
                        let rid = frame.request_id;
                        let kind = frame.body.as_ref().map_or("unknown", request_type);
                        let started = Instant::now();
                        let record = |outcome: &'static str| node.metrics.request(kind, outcome, started.elapsed());
                        let early = handshake.as_mut().is_some_and(|h| !h.complete_now(&conn));
                        let replayable = frame.body.as_ref().is_none_or(meshchat_proto::replay_safe);
                        if early {
                            node.early_request(replayable);
                        }
                        match (frame.body, identity.as_ref()) {
                            (None, _) => {
                                record(ErrorCode::UnknownRequest.as_str_name());
                                put(&error_frame(rid, &RequestError::UnknownRequest), max_frame, &mut out);
                            }
                            // Id 0 is the pushes': a reply carrying it could not be told from
                            // one. Refused, not handled (nothing happens), with id 0.
                            (Some(_), _) if rid == 0 => {
                                let e = RequestError::InvalidArgument("request_id 0 is reserved for pushes: use 1 or more".into());
                                record(e.code().as_str_name());
                                put(&error_frame(0, &e), max_frame, &mut out);
                            }
                            // 0-RTT data can be replayed: only replay-safe requests are
                            // served from it; the client sends the others again later.
                            (Some(_), _) if early && !replayable => {
                                record(ErrorCode::TooEarly.as_str_name());
                                put(&error_frame(rid, &RequestError::TooEarly), max_frame, &mut out);
                            }
                            (Some(client_frame::Body::Hello(h)), _) => {
                                if h.hide_presence && !hide_presence {
                                    hide_presence = true;
                                    // Already authenticated: hidden from now on.
                                    if let Some(me) = &identity {
                                        node.registry.set_visible(me.user, id, false);
                                    }
                                }
                                let reply = if h.protocol_version == meshchat_proto::PROTOCOL_VERSION {
                                    record("ok");
                                    ServerFrame { request_id: rid, body: Some(server_frame::Body::HelloOk(node.hello_ok())) }
                                } else {
                                    record(ErrorCode::VersionMismatch.as_str_name());
                                    error_frame(rid, &RequestError::VersionMismatch { got: h.protocol_version, want: meshchat_proto::PROTOCOL_VERSION })
                                };
                                put(&reply, max_frame, &mut out);
                            }
                            (Some(body @ (client_frame::Body::Register(_) | client_frame::Body::Login(_) | client_frame::Body::Authenticate(_))), None) => {
                                // Boxed: this rare, large future would otherwise be part of
                                // every idle connection's task.
                                match Box::pin(node.authenticate_request(body, conn.remote_address().ip())).await {
                                    Ok(AuthOutcome::Redirect(r)) => {
                                        record("ok");
                                        debug!(to = r.node_id, "redirecting to the user's home node");
                                        put(&ServerFrame { request_id: rid, body: Some(server_frame::Body::Redirect(r)) }, max_frame, &mut out);
                                    }
                                    Ok(AuthOutcome::Authenticated(who, ok)) => {
                                        let ob = Outbox::new(limits.outbound_queue);
                                        let handle = ConnHandle { id, outbox: ob.clone(), conn: conn.clone(), visible: !hide_presence && !early };
                                        if let Err(refused) = node.registry.insert_capped(who.user, handle, limits.max_connections_per_user, who.auth_time_ms) {
                                            let e = match refused {
                                                // One token must not take every slot of a node.
                                                Refused::Cap(has) => RequestError::Overloaded(format!("this user has {has} connections on this node, the most allowed; close one")),
                                                Refused::SignedOut => RequestError::TokenExpired,
                                            };
                                            record(e.code().as_str_name());
                                            put(&error_frame(rid, &e), max_frame, &mut out);
                                        } else {
                                            record("ok");
                                            auth_deadline.as_mut().reset(deadline_of(ok.expires_unix_ms));
                                            debug!(user = who.user.0, "authenticated");
                                            identity = Some(Arc::new(who));
                                            outbox = Some(ob);
                                            put(&ServerFrame { request_id: rid, body: Some(server_frame::Body::AuthOk(ok)) }, max_frame, &mut out);
                                        }
                                    }
                                    Err(e) => {
                                        record(e.code().as_str_name());
                                        put(&error_frame(rid, &e), max_frame, &mut out);
                                        if matches!(e, RequestError::BadCredentials | RequestError::TokenInvalid(_) | RequestError::TokenExpired) {
                                            auth_failures += 1;
                                            if auth_failures >= max_auth_failures {
                                                // A guesser opens a new connection (another
                                                // handshake) every few tries.
                                                debug!(failures = auth_failures, "too many failed authentications");
                                                flush_within(&mut send, &mut out, limits.write_timeout).await;
                                                break Some((ErrorCode::BadCredentials, b"too many failed authentications"));
                                            }
                                        }
                                    }
                                }
                            }
                            (Some(client_frame::Body::Authenticate(a)), Some(me)) => {
                                // A refresh: the same user's newer token extends this
                                // connection's life and gets a fresh token back.
                                let refreshed = Box::pin(node.refresh_request(me, &a.token)).await;
                                record(metrics::outcome(&refreshed, RequestError::code));
                                let reply = match refreshed {
                                    Ok((who, ok)) => {
                                        auth_deadline.as_mut().reset(deadline_of(ok.expires_unix_ms));
                                        identity = Some(Arc::new(who));
                                        ServerFrame { request_id: rid, body: Some(server_frame::Body::AuthOk(ok)) }
                                    }
                                    Err(e) => error_frame(rid, &e),
                                };
                                put(&reply, max_frame, &mut out);
                            }
                            (Some(client_frame::Body::ChangePassword(c)), Some(me)) => {
                                let changed = Box::pin(node.change_password(me, id, conn.remote_address().ip(), c)).await;
                                record(metrics::outcome(&changed, RequestError::code));
                                let reply = match changed {
                                    Ok((who, ok)) => {
                                        auth_deadline.as_mut().reset(deadline_of(ok.expires_unix_ms));
                                        identity = Some(Arc::new(who));
                                        ServerFrame { request_id: rid, body: Some(server_frame::Body::AuthOk(ok)) }
                                    }
                                    Err(e) => error_frame(rid, &e),
                                };
                                put(&reply, max_frame, &mut out);
                            }
                            (Some(client_frame::Body::Logout(l)), Some(me)) => {
                                let logged_out = Box::pin(node.logout(me, id, l.everywhere)).await;
                                record(metrics::outcome(&logged_out, RequestError::code));
                                match logged_out {
                                    Ok(()) => {
                                        put(&ServerFrame { request_id: rid, body: Some(server_frame::Body::Done(pb::Done {})) }, max_frame, &mut out);
                                        // Requests still in progress are answered, not dropped.
                                        let _ = tokio::time::timeout(limits.write_timeout, async {
                                            while let Some(reply) = inflight.next().await {
                                                put(&reply, max_frame, &mut out);
                                            }
                                        })
                                        .await;
                                        flush_within(&mut send, &mut out, limits.write_timeout).await;
                                        // A clean close (code 0) once the Done is delivered.
                                        break None;
                                    }
                                    Err(e) => put(&error_frame(rid, &e), max_frame, &mut out),
                                }
                            }
                            (Some(client_frame::Body::SetPresence(p)), Some(me)) => {
                                // Never early data here (not replay-safe): the handshake is
                                // complete.
                                hide_presence = p.hidden;
                                node.registry.set_visible(me.user, id, !p.hidden);
                                record("ok");
                                put(&ServerFrame { request_id: rid, body: Some(server_frame::Body::Done(pb::Done {})) }, max_frame, &mut out);
                            }
                            (Some(client_frame::Body::Ping(p)), None) => {
                                record("ok");
                                put(&ServerFrame { request_id: rid, body: Some(server_frame::Body::Pong(pb::Pong { nonce: p.nonce })) }, max_frame, &mut out);
                            }
                            (Some(_), None) => {
                                record(ErrorCode::Unauthenticated.as_str_name());
                                put(&error_frame(rid, &RequestError::Unauthenticated), max_frame, &mut out);
                            }
                            (Some(body), Some(me)) => {
                                // The node's budget of request bytes in progress: held until
                                // the reply is made.
                                match node.admit_request(body.encoded_len()) {
                                    Err(e) => {
                                        record(e.code().as_str_name());
                                        put(&error_frame(rid, &e), max_frame, &mut out);
                                    }
                                    Ok(permit) => {
                                        let m = node.metrics.clone();
                                        let fut = node.clone().handle(me.clone(), id, body).map(move |r| {
                                            let _permit = permit;
                                            m.request(kind, metrics::outcome(&r, RequestError::code), started.elapsed());
                                            match r {
                                                Ok(body) => ServerFrame { request_id: rid, body: Some(body) },
                                                Err(e) => {
                                                    if matches!(e.code(), ErrorCode::Internal) {
                                                        warn!(error = %e, "request failed");
                                                    }
                                                    error_frame(rid, &e)
                                                }
                                            }
                                        });
                                        // One span per request: its id on the wire (the
                                        // client's logs name it), its type and user.
                                        let span = info_span!("request", id = rid, r#type = kind, user = me.user.0);
                                        inflight.push(Box::pin(fut.instrument(span)));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            match flush_within(&mut send, &mut out, limits.write_timeout).await {
                Flushed::Ok => {}
                Flushed::Gone => break None,
                // The client stopped reading: a task blocked on one connection must not
                // outlive every deadline (auth, shutdown) by waiting here.
                Flushed::Blocked => break Some((ErrorCode::SlowReader, b"client stopped reading")),
            }
        }
    };

    abandon_handshake(&mut handshake, &node, &conn);
    if let Some(me) = &identity {
        node.registry.remove(me.user, id);
    }
    if let Some((code, reason)) = close {
        if code == ErrorCode::Unavailable {
            // Shutting down: finish what is in flight (their writes are durable either way).
            let grace = node.config.shutdown_grace;
            let _ = tokio::time::timeout(grace, async {
                while let Some(reply) = inflight.next().await {
                    put(&reply, max_frame, &mut out);
                }
                flush(&mut send, &mut out).await;
            })
            .await;
        }
        linger(&mut send).await;
        conn.close(close_code(code), reason);
    } else {
        linger(&mut send).await;
        conn.close(0u32.into(), b"bye");
    }
}

/// Finishes the stream and waits (bounded) for the client to acknowledge what was written:
/// a QUIC close discards unacknowledged stream data, and the last frame is often the error
/// that explains the close.
async fn linger(send: &mut quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(CLOSE_LINGER, send.stopped()).await;
    }
}

enum Flushed {
    Ok,
    Gone,
    Blocked,
}

/// [`flush`] bounded by `limit`.
async fn flush_within(
    send: &mut quinn::SendStream,
    out: &mut BytesMut,
    limit: Duration,
) -> Flushed {
    match tokio::time::timeout(limit, flush(send, out)).await {
        Ok(true) => Flushed::Ok,
        Ok(false) => Flushed::Gone,
        Err(_) => Flushed::Blocked,
    }
}

/// Writes `out` to the stream; false if the stream is gone.
async fn flush(send: &mut quinn::SendStream, out: &mut BytesMut) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = send.write_all(out).await.is_ok();
    out.clear();
    if out.capacity() > 64 * 1024 {
        // Do not keep a large buffer around after a burst.
        *out = BytesMut::new();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshchat_proto::client::push;
    use prost::Message;

    #[test]
    fn a_reply_too_large_for_a_frame_is_answered_internal_with_its_id() {
        let mut out = BytesMut::new();
        let big = code_frame(42, ErrorCode::UnknownChannel, &"x".repeat(10_000));
        put(&big, 1_024, &mut out);
        let f = ServerFrame::decode(&out[4..]).expect("decodes");
        assert_eq!(f.request_id, 42);
        match f.body {
            Some(server_frame::Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Internal as i32);
                assert_eq!(e.message, "reply too large");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn push_frames_decode_as_server_frames_with_their_seq() {
        let event = crate::node::encode_push(push::Event::Channel(pb::ChannelEvent {
            channel_id: 7,
            user_id: 9,
            joined: true,
            by_user_id: 3,
        }));
        for seq in [1u64, 127, 128, 300_000, u64::MAX >> 1] {
            let mut out = BytesMut::new();
            encode_push_frame(seq, &event, &mut out);
            let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
            assert_eq!(len, out.len() - 4);
            let f = ServerFrame::decode(&out[4..]).expect("decodes");
            assert_eq!(f.request_id, 0);
            match f.body {
                Some(server_frame::Body::Push(p)) => {
                    assert_eq!(p.seq, seq);
                    assert_eq!(
                        p.event,
                        Some(push::Event::Channel(pb::ChannelEvent {
                            channel_id: 7,
                            user_id: 9,
                            joined: true,
                            by_user_id: 3,
                        }))
                    );
                }
                other => panic!("not a push: {other:?}"),
            }
        }
    }
}
