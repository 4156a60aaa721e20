//! One task per client connection: the handshake, then a loop that reads frames, runs what
//! they ask against the node (up to `max_inflight_per_conn` requests at once), writes their
//! replies, and writes pushes from the connection's bounded outbound queue. What a frame means
//! (authentication state, push sequence, the one deadline, errors) is [`machine`]'s, a sans-IO
//! state machine; this module is its driver over quinn's endpoint (`transport.endpoint =
//! "quinn"`), and [`looped`] its driver on meshchat's endpoint loop. What both drivers do the
//! same way lives here: running a request ([`run_request`]) or an authentication-family call
//! ([`run_call`]), and recording a step ([`record_step`]).
//!
//! Memory per idle connection is kept small on purpose: the read buffer starts at 256 bytes
//! (tokio's default is 8 KiB), the write buffer starts empty, the outbound queue is created
//! only after authentication, and nothing else is held per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use meshchat_proto::FrameCodec;
use meshchat_proto::client::{self as pb, ClientFrame, ErrorCode, ServerFrame};
use meshchat_proto::codec::CodecError;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::codec::Decoder;
use tracing::{Instrument, debug, info_span, warn};

pub(crate) mod looped;
pub mod machine;

use self::machine::{Authenticated, Bounds, Call, Close, Next, Session, error_frame};
use crate::admission::HandshakeSlot;
use crate::auth::Identity;
use crate::error::{RequestError, close_code};
use crate::metrics::{self, request_type};
use crate::node::{AuthOutcome, Node};
use crate::registry::{ConnControl, ConnHandle, ConnId, Outbox, Refused};

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
/// A renewed identity and token, with the instant the token runs out.
fn expiring((who, ok): (Identity, pb::AuthOk)) -> (Identity, pb::AuthOk, Instant) {
    let at = deadline_of(ok.expires_unix_ms);
    (who, ok, at)
}

/// The instant a token expiring at `unix_ms` (wall clock) runs out.
fn deadline_of(unix_ms: u64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_ms))
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
    let span = conn_span(&node, id, remote);
    run(node, conn, id, handshake, &mut shutdown)
        .instrument(span)
        .await;
}

/// A connection's span, `conn{node, id, peer}`: a root, so traces end and are sampled per
/// connection, not as part of the node's. The quinn driver holds one for the connection's
/// life (its requests under it, one trace); the loop makes one per request or call instead
/// (held per idle connection, a span would cost the registry's entry at 100k), so there each
/// request is a trace of its own with the same fields above it.
pub(crate) fn conn_span(node: &Node, id: ConnId, remote: SocketAddr) -> tracing::Span {
    info_span!(parent: None, "conn", node = node.config.node_id, id = id.0, peer = %remote)
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
    let max_frame = limits.max_frame_bytes as usize;
    let mut session = Session::new(
        Bounds {
            max_frame,
            max_inflight: limits.max_inflight_per_conn,
            max_auth_failures: node.config.auth.max_auth_failures,
        },
        std::time::Instant::now(),
        limits.auth_timeout,
    );
    // One timer for the connection's one deadline (the session's): authenticate by
    // `auth_timeout`, then the expiry of the token it last got.
    let auth_deadline = tokio::time::sleep_until(session.deadline().into());
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
    let mut reader = FrameReader::new(recv, max_frame);
    let mut outbox: Option<Arc<Outbox>> = None;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut inflight: FuturesUnordered<Reply> = FuturesUnordered::new();
    // Why the loop ended.
    let close: Close = loop {
        let mut next = None;
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                break Close { answer_inflight: true, ..Close::with(ErrorCode::Unavailable, b"node shutting down") };
            }
            end = handshake_end(&mut handshake, &conn), if handshake.is_some() => {
                if !finish_handshake(&mut handshake, end, &node, &conn) {
                    break Close::CLEAN;
                }
                _established = Some(node.metrics.established());
                // Authenticated in early data: shown online only now (early data can be
                // replayed, and a replay must not show anyone online).
                if let Some(user) = session.handshake_complete() {
                    node.registry.set_visible(user, id, true);
                }
            }
            Some(reply) = inflight.next(), if !inflight.is_empty() => {
                session.finished(&reply);
            }
            _ = &mut auth_deadline => {
                next = Some((Next::Close(session.expired()), None));
            }
            frame = reader.next(), if session.wants_frame() => {
                let Some(frame) = frame else { break Close::CLEAN };
                let kind = frame.as_ref().ok().and_then(|f| f.body.as_ref()).map_or("unknown", request_type);
                let started = Instant::now();
                let early = frame.is_ok() && handshake.as_mut().is_some_and(|h| !h.complete_now(&conn));
                if let (true, Ok(f)) = (early, &frame) {
                    node.early_request(f.body.as_ref().is_none_or(meshchat_proto::replay_safe));
                }
                let step = session.frame(&*node, frame, early);
                next = Some((step, Some((kind, started))));
            }
            // After frames: a burst of pushes must not keep a request (a gap fill, say) from
            // being read; the bound on requests in progress keeps frames from starving pushes.
            () = async { match outbox.as_ref() { Some(o) => o.wait().await, None => std::future::pending().await } }, if outbox.is_some() => {
                // Write whatever is queued in one go (one write, few packets).
                if let Some(o) = outbox.as_ref() {
                    o.drain_into(256, &mut batch);
                }
                node.metrics.pushes(batch.len());
                session.pushes(&mut batch);
                if batch.capacity() > 256 {
                    batch = Vec::new();
                }
            }
        }
        // What the frame (or the deadline) led to; a call's result leads on in turn.
        let mut ended = None;
        while let Some((step, request)) = next.take() {
            record_step(&node, id, &step, request);
            match step {
                Next::Answered(_) | Next::Skipped | Next::Visible { .. } => {}
                Next::Close(c) => {
                    ended = Some(c);
                }
                Next::Call(call) => {
                    // Boxed: these rare, large futures would otherwise be part of every
                    // idle connection's task.
                    let result = Box::pin(run_call(
                        node.clone(),
                        call,
                        (id, conn.remote_address().ip()),
                        limits.clone(),
                        ConnControl::Quinn(conn.clone()),
                    ))
                    .await;
                    if let Some(o) = result.registered() {
                        outbox = Some(o.clone());
                    }
                    let after = result.apply(&mut session);
                    auth_deadline.as_mut().reset(session.deadline().into());
                    next = Some((after, request));
                }
                Next::Start {
                    rid,
                    identity,
                    body,
                } => {
                    // The node's budget of request bytes in progress: held until the reply
                    // is made.
                    let kind = request.map_or("unknown", |(k, _)| k);
                    let started = request.map_or_else(Instant::now, |(_, s)| s);
                    match node.admit_request(body.encoded_len()) {
                        Err(e) => {
                            node.metrics
                                .request(kind, e.code().as_str_name(), started.elapsed());
                            session.finished(&error_frame(rid, &e));
                        }
                        Ok(permit) => {
                            inflight.push(Box::pin(run_request(
                                &node,
                                identity,
                                id,
                                (rid, body),
                                (kind, started),
                                permit,
                            )));
                        }
                    }
                }
            }
        }
        if let Some(c) = ended {
            if !c.answer_inflight {
                // The reason goes out before the close.
                flush_within(&mut send, session.out(), limits.write_timeout).await;
            }
            break c;
        }
        if !session.out().is_empty() {
            match flush_within(&mut send, session.out(), limits.write_timeout).await {
                Flushed::Ok => {}
                Flushed::Gone => break Close::CLEAN,
                // The client stopped reading: a task blocked on one connection must not
                // outlive every deadline (auth, shutdown) by waiting here.
                Flushed::Blocked => {
                    break Close::with(ErrorCode::SlowReader, b"client stopped reading");
                }
            }
        }
    };

    abandon_handshake(&mut handshake, &node, &conn);
    // Requests in progress are answered, not dropped (their writes are durable either way).
    // After a logout, before the connection leaves the registry (its user is online until
    // then, as the old order had it), within the write timeout; when the node stops, after,
    // within the shutdown grace.
    let shutting_down = close.code.is_some_and(|(c, _)| c == ErrorCode::Unavailable);
    if close.answer_inflight && !shutting_down {
        let _ = tokio::time::timeout(limits.write_timeout, async {
            while let Some(reply) = inflight.next().await {
                session.finished(&reply);
            }
        })
        .await;
        flush_within(&mut send, session.out(), limits.write_timeout).await;
    }
    if let Some(me) = session.identity() {
        node.registry.remove(me.user, id);
    }
    if close.answer_inflight && shutting_down {
        let _ = tokio::time::timeout(node.config.shutdown_grace, async {
            while let Some(reply) = inflight.next().await {
                session.finished(&reply);
            }
            flush(&mut send, session.out()).await;
        })
        .await;
    }
    linger(&mut send).await;
    match close.code {
        Some((code, reason)) => conn.close(close_code(code), reason),
        None => conn.close(0u32.into(), b"bye"),
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

/// What either driver does first with a step: the outcome of the request that led to it
/// recorded (`request`: its type and when it was read), a presence change applied.
pub(crate) fn record_step(
    node: &Node,
    id: ConnId,
    step: &Next,
    request: Option<(&'static str, Instant)>,
) {
    let outcome = match step {
        Next::Answered(outcome) => Some(*outcome),
        Next::Visible {
            outcome,
            user,
            visible,
        } => {
            node.registry.set_visible(*user, id, *visible);
            Some(*outcome)
        }
        Next::Close(c) => c.outcome,
        Next::Skipped | Next::Call(_) | Next::Start { .. } => None,
    };
    if let (Some(outcome), Some((kind, started))) = (outcome, request) {
        node.metrics.request(kind, outcome, started.elapsed());
    }
}

/// Request `rid` run against the node, its reply made, its outcome recorded as `kind` since
/// `started`; `permit` (its share of the node's request budget) is held until the reply is
/// made.
pub(crate) fn run_request(
    node: &Arc<Node>,
    identity: Arc<Identity>,
    id: ConnId,
    (rid, body): (u64, pb::client_frame::Body),
    (kind, started): (&'static str, Instant),
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ServerFrame> + Send + 'static {
    let m = node.metrics.clone();
    let user = identity.user.0;
    let fut = node.clone().handle(identity, id, body).map(move |r| {
        let _permit = permit;
        m.request(
            kind,
            metrics::outcome(&r, RequestError::code),
            started.elapsed(),
        );
        match r {
            Ok(body) => ServerFrame {
                request_id: rid,
                body: Some(body),
            },
            Err(e) => {
                if matches!(e.code(), ErrorCode::Internal) {
                    warn!(error = %e, "request failed");
                }
                error_frame(rid, &e)
            }
        }
    });
    // One span per request: its id on the wire (the client's logs name it), its type and user.
    let span = info_span!("request", id = rid, r#type = kind, user = user);
    fut.instrument(span)
}

/// The result of an authentication-family call, for the machine.
pub(crate) enum CallResult {
    /// [`Call::Authenticate`]'s; the outbound queue when the connection was registered.
    Authenticated {
        rid: u64,
        result: Authenticated,
        outbox: Option<Arc<Outbox>>,
    },
    /// [`Call::Refresh`]'s or [`Call::ChangePassword`]'s.
    Renewed {
        rid: u64,
        result: Result<(Identity, pb::AuthOk, Instant), RequestError>,
    },
    /// [`Call::Logout`]'s.
    LoggedOut {
        rid: u64,
        result: Result<(), RequestError>,
    },
}

impl CallResult {
    /// The outbound queue of a connection this call registered.
    pub(crate) fn registered(&self) -> Option<&Arc<Outbox>> {
        match self {
            CallResult::Authenticated { outbox, .. } => outbox.as_ref(),
            _ => None,
        }
    }

    /// Gives the result to the machine: what it leads to.
    pub(crate) fn apply(self, session: &mut Session) -> Next {
        match self {
            CallResult::Authenticated { rid, result, .. } => session.authenticated(rid, result),
            CallResult::Renewed { rid, result } => session.renewed(rid, result),
            CallResult::LoggedOut { rid, result } => session.logged_out(rid, result),
        }
    }
}

/// Runs an authentication-family call of connection `id` (from `source`, with the bounds
/// `limits`, closed through `conn`) against the node.
pub(crate) async fn run_call(
    node: Arc<Node>,
    call: Call,
    (id, source): (ConnId, std::net::IpAddr),
    limits: Arc<crate::config::LimitsConfig>,
    conn: ConnControl,
) -> CallResult {
    match call {
        Call::Authenticate { rid, body, visible } => {
            let outcome = node.authenticate_request(body, source).await;
            let (result, outbox) = register(&node, outcome, id, visible, &limits, conn);
            CallResult::Authenticated {
                rid,
                result,
                outbox,
            }
        }
        Call::Refresh {
            rid,
            identity,
            token,
        } => {
            let result = node.refresh_request(&identity, &token).await;
            CallResult::Renewed {
                rid,
                result: result.map(expiring),
            }
        }
        Call::ChangePassword {
            rid,
            identity,
            body,
        } => {
            let result = node.change_password(&identity, id, source, body).await;
            CallResult::Renewed {
                rid,
                result: result.map(expiring),
            }
        }
        Call::Logout {
            rid,
            identity,
            everywhere,
        } => {
            let result = node.logout(&identity, id, everywhere).await;
            CallResult::LoggedOut { rid, result }
        }
    }
}

/// What an authentication's outcome leads to: a redirect, a failure, or the connection
/// registered under its user (within the user's connection cap, and unless the user signed
/// out after this login) with a new outbound queue (returned too; a connection of the loop
/// gets one that rings its bell).
fn register(
    node: &Node,
    outcome: Result<AuthOutcome, RequestError>,
    id: ConnId,
    visible: bool,
    limits: &crate::config::LimitsConfig,
    conn: ConnControl,
) -> (Authenticated, Option<Arc<Outbox>>) {
    let (who, ok) = match outcome {
        Ok(AuthOutcome::Redirect(r)) => return (Authenticated::Redirect(r), None),
        Err(e) => return (Authenticated::Failed(e), None),
        Ok(AuthOutcome::Authenticated(who, ok)) => (who, ok),
    };
    let ob = match &conn {
        ConnControl::Quinn(_) => Outbox::new(limits.outbound_queue, limits.outbound_queue_bytes),
        ConnControl::Loop(bell) => Outbox::ringing(
            limits.outbound_queue,
            limits.outbound_queue_bytes,
            bell.clone(),
        ),
    };
    let handle = ConnHandle {
        id,
        outbox: ob.clone(),
        conn,
        visible,
    };
    match node.registry.insert_capped(
        who.user,
        handle,
        limits.max_connections_per_user,
        who.auth_time_ms,
    ) {
        // One token must not take every slot of a node.
        Err(Refused::Cap(has)) => (
            Authenticated::Refused(RequestError::Overloaded(format!(
                "this user has {has} connections on this node, the most allowed; close one"
            ))),
            None,
        ),
        Err(Refused::SignedOut) => (Authenticated::Refused(RequestError::TokenExpired), None),
        Ok(()) => (
            Authenticated::Registered {
                expires: deadline_of(ok.expires_unix_ms),
                identity: who,
                ok,
            },
            Some(ob),
        ),
    }
}

impl machine::Host for Node {
    fn hello_ok(&self) -> meshchat_proto::client::HelloOk {
        Node::hello_ok(self)
    }
}
