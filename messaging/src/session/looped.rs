//! The client sessions on meshchat's endpoint loop (`transport.endpoint = "loop"`): the same
//! [`Session`] machine as the quinn driver, driven from `meshchat_edge`'s one task instead of
//! a task per connection.
//!
//! Per connection the loop keeps quinn-proto's connection and a [`LoopConn`]: the machine,
//! the bytes read and not yet decoded, the outbound queue once authenticated, the handshake
//! slot until the handshake ends. Requests and authentication calls run as futures polled by
//! the loop ([`NodeApp::poll_work`]); their results come back to their connection as events.
//! A push rings the connection's bell (its outbound queue is made with it), and the loop
//! drains the queue into the stream.
//!
//! Back-pressure, as the quinn driver has it: frames are read only while the machine wants
//! one and the connection's unsent bytes are under [`PENDING_SOFT`]; past it, reading and
//! the draining of pushes wait (so a client that does not read fills its outbound queue and
//! is cut off as a slow reader by the registry), and a connection whose bytes have not moved
//! for `write_timeout` is closed with `SLOW_READER`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use meshchat_edge::StreamId;
use meshchat_edge::{Admit, App, AppEvent, ConnKey, Cx};
use meshchat_proto::FrameCodec;
use meshchat_proto::client::{ClientFrame, ErrorCode, ServerFrame};
use tokio_util::codec::Decoder;
use tracing::{Instrument, debug};

use super::machine::{Authenticated, Bounds, Call, Close, Next, Session, error_frame};
use super::{CallResult, conn_span, record_step, run_call, run_request};
use crate::admission::{self, HandshakeGate, HandshakeSlot};
use crate::config::LimitsConfig;
use crate::error::close_code;
use crate::metrics::{EstablishedGuard, request_type};
use crate::node::Node;
use crate::registry::{ConnControl, ConnId, Outbox};

/// Unsent bytes past which a connection reads no frame and drains no push until they move.
pub(crate) const PENDING_SOFT: usize = 64 * 1024;
/// Pushes taken from a connection's queue at a time (the loop's hard bound on unsent bytes
/// leaves room for one step of frames of the largest size).
pub(crate) const PUSH_STEP: usize = 8;
/// How long a closing connection waits for the client to acknowledge its last bytes.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A request in progress, for its metrics: its type and when it was read.
type Req = Option<(&'static str, Instant)>;

/// What a connection's work returns to it.
pub(crate) enum Work {
    /// A request's reply.
    Reply(ServerFrame),
    /// An authentication-family call's result (of connection `id`).
    Call {
        id: ConnId,
        result: CallResult,
        request: Req,
    },
}

type WorkFuture = Pin<Box<dyn Future<Output = (ConnKey, Work)> + Send>>;

/// The node's sessions as the loop's application.
pub(crate) struct NodeApp {
    node: Arc<Node>,
    gate: Arc<HandshakeGate>,
    work: FuturesUnordered<WorkFuture>,
    /// Pushes taken from an outbound queue, reused.
    batch: Vec<Bytes>,
}

/// One connection's state beside quinn-proto's. Between events an idle connection holds no
/// read or write buffer: what it costs is this struct, the machine, its outbound queue and its
/// registry entry.
pub(crate) struct LoopConn {
    id: ConnId,
    session: Session,
    limits: Arc<LimitsConfig>,
    /// The protocol stream, once the client opened it.
    stream: Option<StreamId>,
    buf: BytesMut,
    codec: FrameCodec<ClientFrame, ServerFrame>,
    eof: bool,
    outbox: Option<Arc<Outbox>>,
    /// Until the handshake ends: its slot and when it started.
    handshake: Option<Box<(HandshakeSlot, Instant)>>,
    _established: Option<EstablishedGuard>,
    /// A close waiting for the requests in progress, until the instant.
    closing: Option<Box<(Close, Instant)>>,
    /// Since when the unsent bytes have been past [`PENDING_SOFT`].
    stalled: Option<Instant>,
    shutting_down: bool,
    /// Closed by the session: nothing more happens but the loop's linger and drain.
    done: bool,
}

impl NodeApp {
    pub(crate) fn new(node: Arc<Node>, gate: Arc<HandshakeGate>) -> Self {
        Self {
            node,
            gate,
            work: FuturesUnordered::new(),
            batch: Vec::new(),
        }
    }

    /// Frames as far as the machine takes them, then what is owed: writes, reading, deadline.
    fn pump(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn) {
        while !c.done
            && c.closing.is_none()
            && c.session.wants_frame()
            && cx.pending_bytes() < PENDING_SOFT
        {
            let frame = match c.codec.decode(&mut c.buf) {
                Ok(Some(f)) => Ok(f),
                Ok(None) if c.eof => {
                    self.close(cx, c, Close::CLEAN);
                    return;
                }
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let kind = frame
                .as_ref()
                .ok()
                .and_then(|f| f.body.as_ref())
                .map_or("unknown", request_type);
            // Early data until the handshake completed (`Connected`): a handshake that failed
            // or was cut short never makes a frame safe.
            let early = frame.is_ok() && c.handshake.is_some();
            if let (true, Ok(f)) = (early, &frame) {
                self.node
                    .early_request(f.body.as_ref().is_none_or(meshchat_proto::replay_safe));
            }
            let step = c.session.frame(&*self.node, frame, early);
            self.step(cx, c, step, Some((kind, Instant::now())));
        }
        // Nothing left to decode: an idle connection holds no read buffer.
        if c.buf.is_empty() && c.buf.capacity() > 0 {
            c.buf = BytesMut::new();
        }
        self.settle(cx, c);
    }

    /// Writes what the machine has, reads again or not, and sets the one deadline.
    fn settle(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn) {
        if c.done {
            return;
        }
        write_out(cx, c);
        let pending = cx.pending_bytes();
        // The write clock runs while bytes wait; `Flushed` (they moved) restarts it.
        if pending == 0 {
            c.stalled = None;
        } else {
            c.stalled.get_or_insert(cx.now());
        }
        if c.closing.is_none() && c.session.wants_frame() && pending < PENDING_SOFT {
            cx.resume_reading();
        } else {
            cx.pause_reading();
        }
        // A close waiting for requests has its one deadline (and `timer` serves only it).
        let at = match c.closing.as_deref() {
            Some((_, until)) => *until,
            None => {
                // While a call is out its result decides the deadline (a refresh near the
                // token's expiry is served, as the quinn driver, which awaits the call).
                let mut at = if c.session.calling() {
                    Instant::now() + Duration::from_secs(3600)
                } else {
                    c.session.deadline()
                };
                if let Some((_, started)) = c.handshake.as_deref() {
                    at = at.min(*started + c.limits.handshake_timeout);
                }
                if let Some(since) = c.stalled {
                    at = at.min(since + c.limits.write_timeout);
                }
                at
            }
        };
        cx.set_deadline(Some(at));
    }

    /// What a frame, a deadline or a call's result led to; a call's result leads on in turn
    /// when it comes back.
    fn step(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, step: Next, request: Req) {
        record_step(&self.node, c.id, &step, request);
        match step {
            Next::Answered(_) | Next::Skipped | Next::Visible { .. } => {}
            Next::Close(close) => self.close(cx, c, close),
            Next::Call(call) => self.call(cx, c, call, request),
            Next::Start {
                rid,
                identity,
                body,
            } => {
                let (kind, started) = request.unwrap_or(("unknown", Instant::now()));
                match self.node.admit_request(body.encoded_len()) {
                    Err(e) => {
                        self.node
                            .metrics
                            .request(kind, e.code().as_str_name(), started.elapsed());
                        c.session.finished(&error_frame(rid, &e));
                    }
                    Ok(permit) => {
                        let key = cx.key();
                        let _conn = conn_span(&self.node, c.id, cx.remote_address()).entered();
                        let reply = run_request(
                            &self.node,
                            identity,
                            c.id,
                            (rid, body),
                            (kind, started),
                            permit,
                        );
                        self.work
                            .push(Box::pin(async move { (key, Work::Reply(reply.await)) }));
                    }
                }
            }
        }
    }

    /// Runs an authentication-family call; the machine reads no frame until it returns.
    fn call(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, call: Call, request: Req) {
        let key = cx.key();
        let id = c.id;
        let span = conn_span(&self.node, id, cx.remote_address());
        let result = run_call(
            self.node.clone(),
            call,
            (id, cx.remote_address().ip()),
            c.limits.clone(),
            ConnControl::Loop(cx.bell()),
        )
        .instrument(span);
        self.work.push(Box::pin(async move {
            let result = result.await;
            (
                key,
                Work::Call {
                    id,
                    result,
                    request,
                },
            )
        }));
    }

    /// The session ends with `close`: after the requests in progress when it asks for that
    /// (bounded), else now.
    fn close(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, close: Close) {
        if c.done {
            return;
        }
        if c.closing.is_some() {
            // Already waiting to close (after a logout): a shutdown meanwhile only takes the
            // connection out of the registry now; the close it waits for stays.
            if c.shutting_down {
                self.unregister(c);
            }
            return;
        }
        self.abandon_handshake(c);
        if close.answer_inflight && c.session.inflight() > 0 {
            // When the node stops, the connection leaves the registry first (as the quinn
            // driver's order has it); after a logout, once its requests are answered.
            let wait = if c.shutting_down {
                self.unregister(c);
                self.node.config.shutdown_grace
            } else {
                c.limits.write_timeout
            };
            c.closing = Some(Box::new((close, cx.now() + wait)));
            self.settle(cx, c);
            return;
        }
        self.finish_close(cx, c, close);
    }

    /// Closes now: what the machine wrote goes out first (the reason, often), then the QUIC
    /// close once the client acknowledged it (bounded).
    fn finish_close(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, close: Close) {
        write_out(cx, c);
        self.unregister(c);
        c.done = true;
        c.closing = None;
        c.outbox = None;
        cx.pause_reading();
        cx.set_deadline(None);
        let (code, reason): (u32, &[u8]) = match close.code {
            Some((code, reason)) => (close_code(code).into_inner() as u32, reason),
            None => (0, b"bye"),
        };
        match c.stream {
            Some(stream) => cx.close_after_flush(stream, code, reason, CLOSE_LINGER),
            None => cx.close(code, reason),
        }
    }

    fn unregister(&self, c: &LoopConn) {
        if let Some(me) = c.session.identity() {
            self.node.registry.remove(me.user, c.id);
        }
    }

    /// The connection ends during its handshake: counted as failed, its slot given back.
    fn abandon_handshake(&self, c: &mut LoopConn) {
        if c.handshake.take().is_some() {
            debug!(conn = c.id.0, "connection ended during its handshake");
            self.node.metrics.handshake("failed", None);
        }
    }

    /// The connection's deadline passed: which one.
    fn timer(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn) {
        if c.done {
            return;
        }
        let now = cx.now();
        if let Some(&(close, until)) = c.closing.as_deref() {
            if until <= now {
                self.finish_close(cx, c, close);
            } else {
                self.settle(cx, c);
            }
            return;
        }
        if let Some((_, started)) = c.handshake.as_deref()
            && *started + c.limits.handshake_timeout <= now
        {
            c.handshake = None;
            debug!(conn = c.id.0, "handshake timed out");
            self.node.metrics.handshake("timeout", None);
            c.done = true;
            cx.close(0, b"handshake timed out");
            return;
        }
        if c.stalled
            .is_some_and(|since| since + c.limits.write_timeout <= now)
        {
            // The client stopped reading: nothing more can reach it.
            c.done = true;
            self.unregister(c);
            cx.close(
                close_code(ErrorCode::SlowReader).into_inner() as u32,
                b"client stopped reading",
            );
            return;
        }
        if c.session.deadline() <= now && !c.session.calling() {
            let close = c.session.expired();
            self.step(cx, c, Next::Close(close), None);
            return;
        }
        self.settle(cx, c);
    }

    /// A push was queued (the bell rang): write what the queue holds, unless the client is
    /// behind on reading (then the queue fills and the registry cuts it off).
    fn drain_outbox(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn) {
        if c.done || c.closing.is_some() {
            return;
        }
        let Some(o) = c.outbox.clone() else { return };
        // In steps, each written before the next, up to the soft mark: what is left waits in
        // the queue for `Flushed` (and a queue that fills cuts the reader off).
        while cx.pending_bytes() < PENDING_SOFT {
            o.drain_into(PUSH_STEP, &mut self.batch);
            if self.batch.is_empty() {
                break;
            }
            self.node.metrics.pushes(self.batch.len());
            c.session.pushes(&mut self.batch);
            write_out(cx, c);
        }
        if self.batch.capacity() > 256 {
            self.batch = Vec::new();
        }
        self.settle(cx, c);
    }

    /// A call or request came back.
    fn work(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, work: Work) {
        if c.done {
            self.orphaned(work);
            return;
        }
        match work {
            Work::Reply(reply) => {
                c.session.finished(&reply);
                if let Some(&(close, _)) = c.closing.as_deref()
                    && c.session.inflight() == 0
                {
                    self.finish_close(cx, c, close);
                    return;
                }
            }
            Work::Call {
                result, request, ..
            } => {
                if let Some(o) = result.registered() {
                    c.outbox = Some(o.clone());
                }
                let next = result.apply(&mut c.session);
                self.step(cx, c, next, request);
                // Authenticated in early data, and the handshake completed while the call
                // ran: shown online now (`Connected` found no user yet).
                if c.handshake.is_none()
                    && let Some(user) = c.session.handshake_complete()
                {
                    self.node.registry.set_visible(user, c.id, true);
                }
            }
        }
        // Frames may have waited for the machine, pushes for the client to catch up. Frames
        // first: pushes alone can keep the unsent bytes at the soft mark, and requests must
        // not starve behind them.
        self.pump(cx, c);
        self.drain_outbox(cx, c);
    }

    /// Work whose connection is gone: a registration it made is undone.
    fn orphaned(&self, work: Work) {
        if let Work::Call {
            id,
            result:
                CallResult::Authenticated {
                    result: Authenticated::Registered { identity, .. },
                    ..
                },
            ..
        } = work
        {
            self.node.registry.remove(identity.user, id);
        }
    }
}

/// Writes what the machine has to the protocol stream (dropped when there is none yet: a
/// close before the client opened it).
fn write_out(cx: &mut Cx<'_>, c: &mut LoopConn) {
    let out = c.session.out();
    if out.is_empty() {
        return;
    }
    if let Some(stream) = c.stream {
        cx.write(stream, out);
    }
    // Not kept: an idle connection holds no write buffer either.
    *out = BytesMut::new();
}

impl App for NodeApp {
    type Conn = LoopConn;
    type Admission = HandshakeSlot;
    type Work = Work;

    fn admit(&mut self, remote: SocketAddr, validated: bool, held: usize) -> Admit<HandshakeSlot> {
        let source = remote.ip();
        // Connections in any state (handshaking or live) count against the bound.
        if held >= self.node.limits().max_connections {
            self.node.metrics.handshake("refused", None);
            return Admit::Refuse;
        }
        match self.gate.admit(source, validated) {
            admission::Admit::Now(slot) => Admit::Accept(slot),
            // Costs the node no state; a spoofed source never answers.
            admission::Admit::Retry => Admit::Retry,
            // A validated client finding every slot taken waits for one, bounded.
            admission::Admit::Wait(share) => {
                let (node, gate) = (self.node.clone(), self.gate.clone());
                let wait = node.limits().handshake_queue_wait;
                Admit::Later(Box::pin(async move {
                    let slot = tokio::time::timeout(wait, gate.wait(share)).await.ok();
                    if slot.is_none() {
                        debug!(%source, "no handshake slot in time; refused");
                        node.metrics.handshake("refused", None);
                    }
                    slot
                }))
            }
            admission::Admit::Refuse => {
                debug!(%source, "too many handshakes from one source; refused");
                self.node.metrics.handshake("refused", None);
                Admit::Refuse
            }
        }
    }

    fn accept(&mut self, cx: &mut Cx<'_>, slot: HandshakeSlot) -> LoopConn {
        // This connection's bounds: the limits in force when it was made.
        let limits = self.node.limits_snapshot();
        let max_frame = limits.max_frame_bytes as usize;
        let session = Session::new(
            Bounds {
                max_frame,
                max_inflight: limits.max_inflight_per_conn,
                max_auth_failures: self.node.config.auth.max_auth_failures,
            },
            cx.now(),
            limits.auth_timeout,
        );
        let mut c = LoopConn {
            id: self.node.registry.next_conn_id(),
            session,
            limits,
            stream: None,
            buf: BytesMut::new(),
            codec: FrameCodec::new(max_frame),
            eof: false,
            outbox: None,
            handshake: Some(Box::new((slot, cx.now()))),
            _established: None,
            closing: None,
            stalled: None,
            shutting_down: false,
            done: false,
        };
        debug!(conn = c.id.0, peer = %cx.remote_address(), "connection accepted");
        self.settle(cx, &mut c);
        c
    }

    fn on_event(&mut self, cx: &mut Cx<'_>, c: &mut LoopConn, event: AppEvent<'_, Work>) {
        match event {
            AppEvent::Connected => {
                if let Some(h) = c.handshake.take() {
                    let (slot, started) = *h;
                    drop(slot);
                    self.node.metrics.handshake("ok", Some(started.elapsed()));
                    c._established = Some(self.node.metrics.established());
                    // Authenticated in early data: shown online only now (early data can be
                    // replayed, and a replay must not show anyone online).
                    if let Some(user) = c.session.handshake_complete() {
                        self.node.registry.set_visible(user, c.id, true);
                    }
                }
                self.settle(cx, c);
            }
            AppEvent::Data { stream, data, fin } => {
                // The client opens one bidirectional stream (the transport allows one).
                if *c.stream.get_or_insert(stream) != stream || c.done {
                    return;
                }
                c.buf.extend_from_slice(data);
                c.eof |= fin;
                self.pump(cx, c);
            }
            AppEvent::Timer => self.timer(cx, c),
            AppEvent::Wake => self.drain_outbox(cx, c),
            AppEvent::Work(work) => self.work(cx, c, work),
            AppEvent::Flushed => {
                // Bytes moved: the write clock starts again.
                c.stalled = None;
                self.pump(cx, c);
                self.drain_outbox(cx, c);
            }
            // The client will read no more: nothing it asks for can be answered.
            AppEvent::Stopped { stream } => {
                if c.stream == Some(stream) && !c.done {
                    c.stream = None;
                    self.finish_close(cx, c, Close::CLEAN);
                }
            }
            AppEvent::Shutdown => {
                c.shutting_down = true;
                let close = Close {
                    answer_inflight: true,
                    ..Close::with(ErrorCode::Unavailable, b"node shutting down")
                };
                self.close(cx, c, close);
            }
        }
    }

    fn on_closed(&mut self, mut c: LoopConn) {
        self.abandon_handshake(&mut c);
        self.unregister(&c);
    }

    fn orphaned(&mut self, work: Work) {
        NodeApp::orphaned(self, work);
    }

    fn accept_failed(&mut self, _slot: HandshakeSlot) {
        self.node.metrics.handshake("failed", None);
    }

    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<(ConnKey, Work)> {
        match self.work.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => Poll::Ready(done),
            // Empty: the loop polls again after it pushed more.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}
