//! The client session as a sans-IO state machine: what one connection's protocol stream
//! means, without sockets, tasks or clocks of its own.
//!
//! It owns a connection's protocol state: the authenticated identity, the push sequence, the
//! count of failed authentications, the presence choice, the one deadline (authenticate by
//! `auth_timeout`, then the expiry of the token last given), the bound on requests in
//! progress, and the bytes waiting to be written. It decides, for every frame read, whether
//! it is answered at once (errors, `Hello`, `Ping`), needs an authentication-family call the
//! machine waits for (`Register`, `Login`, `Authenticate`, `ChangePassword`, `Logout`), or
//! is a request to run alongside others (`Start`). It encodes every reply and push into its
//! output buffer.
//!
//! A driver reads frames, runs the calls and requests against the
//! [`Node`](crate::node::Node), writes [`Session::out`] to the stream, and feeds time in as
//! deadlines. Two drive it: `session::run` over quinn's endpoint (a task per connection) and
//! `session::looped` on meshchat's endpoint loop (`transport.endpoint`); its unit tests drive
//! it with made-up instants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use meshchat_idgen::UserId;
use meshchat_proto::client::{
    self as pb, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame,
};
use meshchat_proto::codec::{CodecError, encode_into};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tracing::{debug, warn};

use crate::auth::Identity;
use crate::error::RequestError;

/// Field number of `push` in `ServerFrame` (see client.proto).
const SERVER_FRAME_PUSH_FIELD: u32 = 14;
/// Field number of `seq` in `Push`.
const PUSH_SEQ_FIELD: u32 = 1;

/// What the machine needs from the node to answer at once.
pub trait Host {
    /// The answer to a `Hello` of the right protocol version.
    fn hello_ok(&self) -> pb::HelloOk;
}

/// A connection's bounds, fixed when it is made (the limits in force then).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Largest frame written or read, in bytes.
    pub max_frame: usize,
    /// Requests in progress at once; no frame is read past it.
    pub max_inflight: usize,
    /// Failed authentications before the connection is closed (at least 1).
    pub max_auth_failures: u32,
}

/// How the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// The QUIC close code and reason; `None` is a clean close (code 0).
    pub code: Option<(ErrorCode, &'static [u8])>,
    /// Answer the requests still in progress before closing (bounded by the driver).
    pub answer_inflight: bool,
    /// The outcome of the request that led to the close, to record; `None` when no request
    /// did (a deadline, an unreadable stream).
    pub outcome: Option<&'static str>,
}

impl Close {
    /// A clean close (code 0), nothing more to answer.
    pub const CLEAN: Close = Close {
        code: None,
        answer_inflight: false,
        outcome: None,
    };

    /// A close with `code` and `reason`.
    pub fn with(code: ErrorCode, reason: &'static [u8]) -> Self {
        Close {
            code: Some((code, reason)),
            ..Self::CLEAN
        }
    }
}

/// An authentication-family call the driver runs for the machine. No frame is read until its
/// result comes back through the matching method.
#[derive(Debug)]
pub enum Call {
    /// `Register`, `Login` or `Authenticate` on a connection that is not authenticated; the
    /// result goes to [`Session::authenticated`]. `visible`: whether the connection shows
    /// its user online once registered (not in early data, not hidden).
    Authenticate {
        /// The request id the answer carries.
        rid: u64,
        /// The request.
        body: client_frame::Body,
        /// Whether the connection shows its user online.
        visible: bool,
    },
    /// `Authenticate` again as the same user (a token refresh); [`Session::renewed`].
    Refresh {
        /// The request id the answer carries.
        rid: u64,
        /// The user the connection is authenticated as.
        identity: Arc<Identity>,
        /// The newer token.
        token: String,
    },
    /// `ChangePassword`; [`Session::renewed`].
    ChangePassword {
        /// The request id the answer carries.
        rid: u64,
        /// The user the connection is authenticated as.
        identity: Arc<Identity>,
        /// The request.
        body: pb::ChangePassword,
    },
    /// `Logout`; [`Session::logged_out`].
    Logout {
        /// The request id the answer carries.
        rid: u64,
        /// The user the connection is authenticated as.
        identity: Arc<Identity>,
        /// Every connection of the user, or this one.
        everywhere: bool,
    },
}

/// What the driver does after a frame.
#[derive(Debug)]
pub enum Next {
    /// Answered (the reply is in [`Session::out`]); the request is recorded with this outcome
    /// (an error code's name, or "ok").
    Answered(&'static str),
    /// Not a request (a malformed frame, answered with request id 0): nothing to record.
    Skipped,
    /// Answered, and this connection's presence changes: show `user` online on it or not.
    Visible {
        /// The outcome to record.
        outcome: &'static str,
        /// The connection's user.
        user: UserId,
        /// Whether the connection shows its user online.
        visible: bool,
    },
    /// Run this call and give its result back before anything else.
    Call(Call),
    /// A request to run alongside others; its reply goes to [`Session::finished`].
    Start {
        /// The request id the answer carries.
        rid: u64,
        /// The user the connection is authenticated as.
        identity: Arc<Identity>,
        /// The request.
        body: client_frame::Body,
    },
    /// Write what is in [`Session::out`], then close.
    Close(Close),
}

/// The result of [`Call::Authenticate`], as the driver saw it.
#[derive(Debug)]
pub enum Authenticated {
    /// The user's home is another node.
    Redirect(pb::Redirect),
    /// Authenticated and registered on this node; the token expires at `expires`.
    Registered {
        /// The user.
        identity: Identity,
        /// The answer, with the token.
        ok: pb::AuthOk,
        /// When the token runs out.
        expires: Instant,
    },
    /// Authenticated, but the node would not register the connection (the user's connection
    /// cap, or signed out meanwhile): answered, not counted as a failed authentication.
    Refused(RequestError),
    /// Not authenticated.
    Failed(RequestError),
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    bounds: Bounds,
    identity: Option<Arc<Identity>>,
    /// The sequence number of the last push written.
    seq: u64,
    auth_failures: u32,
    /// `Hello.hide_presence`, then `SetPresence`: the connection never shows its user online.
    hide_presence: bool,
    inflight: usize,
    /// A call is out: no frame until its result.
    calling: bool,
    /// Authenticate by then; once authenticated, the token's expiry.
    deadline: Instant,
    out: BytesMut,
}

impl Session {
    /// A connection that must authenticate within `auth_timeout` of `now`.
    pub fn new(bounds: Bounds, now: Instant, auth_timeout: Duration) -> Self {
        Self {
            bounds: Bounds {
                max_auth_failures: bounds.max_auth_failures.max(1),
                max_inflight: bounds.max_inflight.max(1),
                ..bounds
            },
            identity: None,
            seq: 0,
            auth_failures: 0,
            hide_presence: false,
            inflight: 0,
            calling: false,
            deadline: now + auth_timeout,
            out: BytesMut::new(),
        }
    }

    /// The user this connection is authenticated as.
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    /// The instant [`Session::expired`] is due.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The bytes to write to the stream, in order.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Whether the next frame may be read: no call is out and fewer than `max_inflight`
    /// requests are in progress.
    pub fn wants_frame(&self) -> bool {
        !self.calling && self.inflight < self.bounds.max_inflight
    }

    /// Whether an authentication-family call is out (its result not yet given back).
    pub fn calling(&self) -> bool {
        self.calling
    }

    /// Requests started and not yet finished.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// The sequence number of the last push written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The handshake completed: the user to show online now, when the connection
    /// authenticated in early data (a replay must not show anyone online) and is not hidden.
    pub fn handshake_complete(&self) -> Option<UserId> {
        match &self.identity {
            Some(me) if !self.hide_presence => Some(me.user),
            _ => None,
        }
    }

    /// The deadline passed: the connection did not authenticate in time, or its token ran
    /// out without a refresh. The reason is written first (request id 0).
    pub fn expired(&mut self) -> Close {
        if self.identity.is_some() {
            self.put(&code_frame(
                0,
                ErrorCode::TokenExpired,
                "this connection's token expired: authenticate with a fresh token, or log in",
            ));
            Close::with(ErrorCode::TokenExpired, b"token expired")
        } else {
            self.put(&code_frame(
                0,
                ErrorCode::AuthTimeout,
                "not authenticated in time",
            ));
            Close::with(ErrorCode::AuthTimeout, b"not authenticated in time")
        }
    }

    /// Writes queued push events (each a `Push` body encoded once for every recipient with
    /// `seq = 0`) as frames numbered on from the last; `batch` is left empty.
    pub fn pushes(&mut self, batch: &mut Vec<Bytes>) {
        for event in batch.drain(..) {
            self.seq += 1;
            encode_push_frame(self.seq, &event, &mut self.out);
        }
    }

    /// A frame read from the stream, or the decoder's error. `early`: read from 0-RTT data
    /// (replayable) because the handshake is not complete yet.
    pub fn frame(
        &mut self,
        host: &impl Host,
        frame: Result<ClientFrame, CodecError>,
        early: bool,
    ) -> Next {
        debug_assert!(self.wants_frame(), "a frame read while none is wanted");
        let frame = match frame {
            Ok(f) => f,
            Err(CodecError::FrameTooLarge { len, max }) => {
                let msg = format!("frame of {len} bytes is over the maximum of {max}");
                self.put(&code_frame(0, ErrorCode::FrameTooLarge, &msg));
                // The stream cannot be resynchronised after an unread body.
                return Next::Close(Close::with(ErrorCode::FrameTooLarge, b"frame too large"));
            }
            Err(CodecError::Malformed(e)) => {
                // The whole frame was consumed: the stream stays in sync.
                let msg = format!("frame is not a valid ClientFrame: {e}");
                self.put(&code_frame(0, ErrorCode::MalformedFrame, &msg));
                return Next::Skipped;
            }
            Err(CodecError::Io(e)) => {
                debug!(error = %e, "read failed");
                return Next::Close(Close::CLEAN);
            }
        };
        let rid = frame.request_id;
        let Some(body) = frame.body else {
            return self.refuse(rid, &RequestError::UnknownRequest);
        };
        if rid == 0 {
            // Id 0 is the pushes': a reply carrying it could not be told from one. Refused,
            // not handled (nothing happens), with id 0.
            return self.refuse(
                0,
                &RequestError::InvalidArgument(
                    "request_id 0 is reserved for pushes: use 1 or more".into(),
                ),
            );
        }
        // 0-RTT data can be replayed: only replay-safe requests are served from it; the
        // client sends the others again later.
        if early && !meshchat_proto::replay_safe(&body) {
            return self.refuse(rid, &RequestError::TooEarly);
        }
        use client_frame::Body as B;
        match (body, self.identity.clone()) {
            (B::Hello(h), me) => {
                let hide = h.hide_presence && !self.hide_presence;
                if hide {
                    self.hide_presence = true;
                }
                let outcome = if h.protocol_version == meshchat_proto::PROTOCOL_VERSION {
                    self.answer(rid, server_frame::Body::HelloOk(host.hello_ok()));
                    "ok"
                } else {
                    self.refuse_quietly(
                        rid,
                        &RequestError::VersionMismatch {
                            got: h.protocol_version,
                            want: meshchat_proto::PROTOCOL_VERSION,
                        },
                    )
                };
                match me {
                    // Already authenticated: hidden from now on.
                    Some(me) if hide => Next::Visible {
                        outcome,
                        user: me.user,
                        visible: false,
                    },
                    _ => Next::Answered(outcome),
                }
            }
            (body @ (B::Register(_) | B::Login(_) | B::Authenticate(_)), None) => {
                self.call(Call::Authenticate {
                    rid,
                    body,
                    visible: !self.hide_presence && !early,
                })
            }
            (B::Authenticate(a), Some(identity)) => self.call(Call::Refresh {
                rid,
                identity,
                token: a.token,
            }),
            (B::ChangePassword(body), Some(identity)) => self.call(Call::ChangePassword {
                rid,
                identity,
                body,
            }),
            (B::Logout(l), Some(identity)) => self.call(Call::Logout {
                rid,
                identity,
                everywhere: l.everywhere,
            }),
            (B::SetPresence(p), Some(me)) => {
                // Never early data here (not replay-safe): the handshake is complete.
                self.hide_presence = p.hidden;
                self.answer(rid, server_frame::Body::Done(pb::Done {}));
                Next::Visible {
                    outcome: "ok",
                    user: me.user,
                    visible: !p.hidden,
                }
            }
            (B::Ping(p), None) => {
                self.answer(rid, server_frame::Body::Pong(pb::Pong { nonce: p.nonce }));
                Next::Answered("ok")
            }
            (_, None) => self.refuse(rid, &RequestError::Unauthenticated),
            (body, Some(identity)) => {
                self.inflight += 1;
                Next::Start {
                    rid,
                    identity,
                    body,
                }
            }
        }
    }

    /// The reply to a started request (or its refusal before it ran).
    pub fn finished(&mut self, reply: &ServerFrame) {
        debug_assert!(self.inflight > 0, "a reply with no request in progress");
        self.inflight = self.inflight.saturating_sub(1);
        self.put(reply);
    }

    /// The result of [`Call::Authenticate`] for request `rid`.
    pub fn authenticated(&mut self, rid: u64, result: Authenticated) -> Next {
        self.calling = false;
        match result {
            Authenticated::Redirect(r) => {
                debug!(to = r.node_id, "redirecting to the user's home node");
                self.answer(rid, server_frame::Body::Redirect(r));
                Next::Answered("ok")
            }
            Authenticated::Registered {
                identity,
                ok,
                expires,
            } => {
                debug!(user = identity.user.0, "authenticated");
                self.deadline = expires;
                self.identity = Some(Arc::new(identity));
                self.answer(rid, server_frame::Body::AuthOk(ok));
                Next::Answered("ok")
            }
            Authenticated::Refused(e) => self.refuse(rid, &e),
            Authenticated::Failed(e) => {
                let outcome = self.refuse_quietly(rid, &e);
                if matches!(
                    e,
                    RequestError::BadCredentials
                        | RequestError::TokenInvalid(_)
                        | RequestError::TokenExpired
                ) {
                    self.auth_failures += 1;
                    if self.auth_failures >= self.bounds.max_auth_failures {
                        // A guesser opens a new connection (another handshake) every few
                        // tries.
                        debug!(
                            failures = self.auth_failures,
                            "too many failed authentications"
                        );
                        return Next::Close(Close {
                            outcome: Some(outcome),
                            ..Close::with(
                                ErrorCode::BadCredentials,
                                b"too many failed authentications",
                            )
                        });
                    }
                }
                Next::Answered(outcome)
            }
        }
    }

    /// The result of [`Call::Refresh`] or [`Call::ChangePassword`]: the identity and token
    /// the connection goes on with (expiring at the instant given), or the error.
    pub fn renewed(
        &mut self,
        rid: u64,
        result: Result<(Identity, pb::AuthOk, Instant), RequestError>,
    ) -> Next {
        self.calling = false;
        match result {
            Ok((identity, ok, expires)) => {
                self.deadline = expires;
                self.identity = Some(Arc::new(identity));
                self.answer(rid, server_frame::Body::AuthOk(ok));
                Next::Answered("ok")
            }
            Err(e) => self.refuse(rid, &e),
        }
    }

    /// The result of [`Call::Logout`]: once done, the connection closes cleanly (code 0)
    /// after the requests in progress are answered and the `Done` is delivered.
    pub fn logged_out(&mut self, rid: u64, result: Result<(), RequestError>) -> Next {
        self.calling = false;
        match result {
            Ok(()) => {
                self.answer(rid, server_frame::Body::Done(pb::Done {}));
                Next::Close(Close {
                    answer_inflight: true,
                    outcome: Some("ok"),
                    ..Close::CLEAN
                })
            }
            Err(e) => self.refuse(rid, &e),
        }
    }

    /// Hands `call` to the driver; no frame is read until its result comes back.
    fn call(&mut self, call: Call) -> Next {
        self.calling = true;
        Next::Call(call)
    }

    fn answer(&mut self, rid: u64, body: server_frame::Body) {
        self.put(&ServerFrame {
            request_id: rid,
            body: Some(body),
        });
    }

    fn refuse(&mut self, rid: u64, e: &RequestError) -> Next {
        Next::Answered(self.refuse_quietly(rid, e))
    }

    /// Writes the error; its code's name is the request's outcome.
    fn refuse_quietly(&mut self, rid: u64, e: &RequestError) -> &'static str {
        self.put(&error_frame(rid, e));
        e.code().as_str_name()
    }

    fn put(&mut self, frame: &ServerFrame) {
        put(frame, self.bounds.max_frame, &mut self.out);
    }
}

/// Appends one `ServerFrame { push: Push { seq, <event> } }` frame, where `event` is a `Push`
/// body encoded once for all recipients with `seq = 0` (so it holds only the event field).
pub fn encode_push_frame(seq: u64, event: &Bytes, out: &mut BytesMut) {
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

/// Encodes `frame` into `out`. One that does not fit a frame (an error quoting too much, a
/// reply over the budget) is answered `INTERNAL` with the same request id instead: never
/// dropped, so a client never waits for an answer that will not come.
pub fn put(frame: &ServerFrame, max_frame: usize, out: &mut BytesMut) {
    if let Err(e) = encode_into(frame, max_frame, out) {
        warn!(error = %e, request_id = frame.request_id, "reply did not encode");
        let _ = encode_into(
            &code_frame(frame.request_id, ErrorCode::Internal, "reply too large"),
            max_frame,
            out,
        );
    }
}

/// A frame answering request `request_id` with `e`.
pub fn error_frame(request_id: u64, e: &RequestError) -> ServerFrame {
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

#[cfg(test)]
mod tests {
    //! The machine driven by hand: frames in, decisions and bytes out, instants made up.

    use super::*;
    use meshchat_proto::client::push;
    use prost::Message;

    struct Fixed;

    impl Host for Fixed {
        fn hello_ok(&self) -> pb::HelloOk {
            pb::HelloOk {
                protocol_version: meshchat_proto::PROTOCOL_VERSION,
                node_id: 3,
                ..Default::default()
            }
        }
    }

    const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

    fn session(max_inflight: usize, max_auth_failures: u32) -> (Session, Instant) {
        let t0 = Instant::now();
        let s = Session::new(
            Bounds {
                max_frame: 64 * 1024,
                max_inflight,
                max_auth_failures,
            },
            t0,
            AUTH_TIMEOUT,
        );
        (s, t0)
    }

    fn frame(rid: u64, body: client_frame::Body) -> Result<ClientFrame, CodecError> {
        Ok(ClientFrame {
            request_id: rid,
            body: Some(body),
        })
    }

    fn token(t: &str) -> client_frame::Body {
        client_frame::Body::Authenticate(pb::Authenticate { token: t.into() })
    }

    fn login() -> client_frame::Body {
        client_frame::Body::Login(pb::Login {
            user_name: "ann".into(),
            password: "pw".into(),
        })
    }

    fn ping(nonce: u64) -> client_frame::Body {
        client_frame::Body::Ping(pb::Ping { nonce })
    }

    fn who(user: u64) -> Identity {
        Identity {
            user: UserId(user),
            name: format!("u{user}"),
            auth_time_ms: 1,
        }
    }

    fn auth_ok(user: u64) -> pb::AuthOk {
        pb::AuthOk {
            user_id: user,
            user_name: format!("u{user}"),
            token: "t".into(),
            expires_unix_ms: 99,
        }
    }

    /// Every frame written so far, decoded; the output is left empty.
    fn written(s: &mut Session) -> Vec<ServerFrame> {
        let out = s.out().split();
        let mut frames = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u32::from_be_bytes(out[at..at + 4].try_into().expect("a length")) as usize;
            frames.push(ServerFrame::decode(&out[at + 4..at + 4 + len]).expect("decodes"));
            at += 4 + len;
        }
        frames
    }

    fn error_code(f: &ServerFrame) -> ErrorCode {
        match &f.body {
            Some(server_frame::Body::Error(e)) => {
                ErrorCode::try_from(e.code).expect("a known code")
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    /// Authenticates `s` as `user` with a token running out at `expires`.
    fn authenticate(s: &mut Session, user: u64, expires: Instant) {
        match s.frame(&Fixed, frame(1, token("t")), false) {
            Next::Call(Call::Authenticate {
                rid: 1, visible, ..
            }) => assert!(visible),
            other => panic!("{other:?}"),
        }
        let next = s.authenticated(
            1,
            Authenticated::Registered {
                identity: who(user),
                ok: auth_ok(user),
                expires,
            },
        );
        assert!(matches!(next, Next::Answered("ok")));
        written(s);
    }

    #[test]
    fn a_connection_that_does_not_authenticate_in_time_is_told_why_and_closed() {
        let (mut s, t0) = session(4, 3);
        assert_eq!(s.deadline(), t0 + AUTH_TIMEOUT);
        let close = s.expired();
        assert_eq!(
            close.code,
            Some((ErrorCode::AuthTimeout, &b"not authenticated in time"[..]))
        );
        let f = written(&mut s);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].request_id, 0);
        assert_eq!(error_code(&f[0]), ErrorCode::AuthTimeout);
    }

    #[test]
    fn before_authentication_only_hello_ping_and_the_auth_requests_are_served() {
        let (mut s, _) = session(4, 3);
        let hello = client_frame::Body::Hello(pb::Hello {
            protocol_version: meshchat_proto::PROTOCOL_VERSION,
            ..Default::default()
        });
        assert!(matches!(
            s.frame(&Fixed, frame(1, hello), false),
            Next::Answered("ok")
        ));
        assert!(matches!(
            s.frame(&Fixed, frame(2, ping(7)), false),
            Next::Answered("ok")
        ));
        let history = client_frame::Body::History(pb::HistoryQuery::default());
        assert!(matches!(
            s.frame(&Fixed, frame(3, history), false),
            Next::Answered("UNAUTHENTICATED")
        ));
        let f = written(&mut s);
        assert!(matches!(&f[0].body, Some(server_frame::Body::HelloOk(h)) if h.node_id == 3));
        assert!(matches!(&f[1].body, Some(server_frame::Body::Pong(p)) if p.nonce == 7));
        assert_eq!(
            (f[2].request_id, error_code(&f[2])),
            (3, ErrorCode::Unauthenticated)
        );
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn bad_frames_are_answered_and_the_stream_goes_on_unless_it_cannot() {
        let (mut s, _) = session(4, 3);
        let old = client_frame::Body::Hello(pb::Hello {
            protocol_version: meshchat_proto::PROTOCOL_VERSION + 1,
            ..Default::default()
        });
        assert!(matches!(
            s.frame(&Fixed, frame(1, old), false),
            Next::Answered("VERSION_MISMATCH")
        ));
        // Request id 0 is the pushes'.
        assert!(matches!(
            s.frame(&Fixed, frame(0, ping(1)), false),
            Next::Answered("INVALID_ARGUMENT")
        ));
        let empty = Ok(ClientFrame {
            request_id: 4,
            body: None,
        });
        assert!(matches!(
            s.frame(&Fixed, empty, false),
            Next::Answered("UNKNOWN_REQUEST")
        ));
        let not_a_frame = ClientFrame::decode(&[0xff_u8][..]).expect_err("not a frame");
        let malformed = Err(CodecError::Malformed(not_a_frame));
        assert!(matches!(s.frame(&Fixed, malformed, false), Next::Skipped));
        assert!(s.wants_frame());
        let too_large = Err(CodecError::FrameTooLarge { len: 9, max: 8 });
        match s.frame(&Fixed, too_large, false) {
            Next::Close(c) => assert_eq!(c.code.map(|c| c.0), Some(ErrorCode::FrameTooLarge)),
            other => panic!("{other:?}"),
        }
        let f = written(&mut s);
        let codes: Vec<_> = f.iter().map(|f| (f.request_id, error_code(f))).collect();
        assert_eq!(
            codes,
            [
                (1, ErrorCode::VersionMismatch),
                (0, ErrorCode::InvalidArgument),
                (4, ErrorCode::UnknownRequest),
                (0, ErrorCode::MalformedFrame),
                (0, ErrorCode::FrameTooLarge),
            ]
        );
    }

    #[test]
    fn early_data_serves_replay_safe_requests_and_refuses_the_others() {
        let (mut s, _) = session(4, 3);
        assert!(matches!(
            s.frame(&Fixed, frame(1, login()), true),
            Next::Answered("TOO_EARLY")
        ));
        assert_eq!(error_code(&written(&mut s)[0]), ErrorCode::TooEarly);
        // An early Authenticate is served, but does not show the user online: a replay must
        // not. The handshake's completion does.
        match s.frame(&Fixed, frame(2, token("t")), true) {
            Next::Call(Call::Authenticate { visible, .. }) => assert!(!visible),
            other => panic!("{other:?}"),
        }
        assert!(!s.wants_frame(), "nothing is read while a call is out");
        let until = Instant::now() + Duration::from_secs(60);
        s.authenticated(
            2,
            Authenticated::Registered {
                identity: who(5),
                ok: auth_ok(5),
                expires: until,
            },
        );
        assert_eq!(s.handshake_complete(), Some(UserId(5)));
        // Hidden later (Hello again): the completion shows no one.
        let hide = client_frame::Body::Hello(pb::Hello {
            protocol_version: meshchat_proto::PROTOCOL_VERSION,
            hide_presence: true,
            ..Default::default()
        });
        match s.frame(&Fixed, frame(3, hide), true) {
            Next::Visible { user, visible, .. } => assert_eq!((user, visible), (UserId(5), false)),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.handshake_complete(), None);
        // SetPresence is not replay-safe.
        let show = client_frame::Body::SetPresence(pb::SetPresence { hidden: false });
        assert!(matches!(
            s.frame(&Fixed, frame(4, show.clone()), true),
            Next::Answered("TOO_EARLY")
        ));
        match s.frame(&Fixed, frame(5, show), false) {
            Next::Visible { visible, .. } => assert!(visible),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_run_up_to_the_bound_and_their_replies_free_it() {
        let (mut s, t0) = session(2, 3);
        authenticate(&mut s, 9, t0 + Duration::from_secs(60));
        for rid in [10, 11] {
            match s.frame(&Fixed, frame(rid, ping(rid)), false) {
                Next::Start {
                    rid: r, identity, ..
                } => {
                    assert_eq!((r, identity.user), (rid, UserId(9)));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(s.inflight(), 2);
        assert!(!s.wants_frame(), "the bound holds further frames back");
        s.finished(&ServerFrame {
            request_id: 11,
            body: Some(server_frame::Body::Pong(pb::Pong { nonce: 11 })),
        });
        assert!(s.wants_frame());
        assert_eq!(written(&mut s)[0].request_id, 11);
    }

    #[test]
    fn failed_authentications_close_the_connection_at_the_bound_and_refusals_do_not_count() {
        let (mut s, _) = session(4, 2);
        let attempt = |s: &mut Session, result: Authenticated| {
            assert!(matches!(
                s.frame(&Fixed, frame(1, login()), false),
                Next::Call(_)
            ));
            s.authenticated(1, result)
        };
        // The node's refusal to register (cap, signed out) is not a guess.
        for _ in 0..3 {
            let next = attempt(&mut s, Authenticated::Refused(RequestError::TokenExpired));
            assert!(matches!(next, Next::Answered("TOKEN_EXPIRED")));
        }
        // Neither is a failure that is not about credentials.
        let busy = Authenticated::Failed(RequestError::Overloaded("busy".into()));
        assert!(matches!(
            attempt(&mut s, busy),
            Next::Answered("OVERLOADED")
        ));
        let bad = attempt(&mut s, Authenticated::Failed(RequestError::BadCredentials));
        assert!(matches!(bad, Next::Answered("BAD_CREDENTIALS")));
        match attempt(
            &mut s,
            Authenticated::Failed(RequestError::TokenInvalid("x".into())),
        ) {
            Next::Close(c) => {
                assert_eq!(c.code.map(|c| c.0), Some(ErrorCode::BadCredentials));
                assert_eq!(c.outcome, Some("TOKEN_INVALID"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(written(&mut s).len(), 6, "every attempt was answered");
    }

    #[test]
    fn a_token_runs_out_unless_refreshed_and_a_refresh_moves_the_deadline() {
        let (mut s, t0) = session(4, 3);
        let first = t0 + Duration::from_secs(60);
        authenticate(&mut s, 9, first);
        assert_eq!(s.deadline(), first);
        match s.frame(&Fixed, frame(2, token("newer")), false) {
            Next::Call(Call::Refresh {
                token, identity, ..
            }) => {
                assert_eq!((token.as_str(), identity.user), ("newer", UserId(9)));
            }
            other => panic!("{other:?}"),
        }
        let later = first + Duration::from_secs(60);
        assert!(matches!(
            s.renewed(2, Ok((who(9), auth_ok(9), later))),
            Next::Answered("ok")
        ));
        assert_eq!(s.deadline(), later);
        // A refused refresh keeps the old deadline.
        assert!(matches!(
            s.frame(&Fixed, frame(3, token("bad")), false),
            Next::Call(_)
        ));
        assert!(matches!(
            s.renewed(3, Err(RequestError::TokenInvalid("x".into()))),
            Next::Answered("TOKEN_INVALID")
        ));
        assert_eq!(s.deadline(), later);
        written(&mut s);
        let close = s.expired();
        assert_eq!(close.code.map(|c| c.0), Some(ErrorCode::TokenExpired));
        assert_eq!(error_code(&written(&mut s)[0]), ErrorCode::TokenExpired);
    }

    #[test]
    fn a_logout_closes_cleanly_after_the_requests_in_progress() {
        let (mut s, t0) = session(4, 3);
        authenticate(&mut s, 9, t0 + Duration::from_secs(60));
        let logout = client_frame::Body::Logout(pb::Logout { everywhere: false });
        assert!(matches!(
            s.frame(&Fixed, frame(2, logout.clone()), false),
            Next::Call(Call::Logout { .. })
        ));
        // A failed logout leaves the connection as it was.
        assert!(matches!(
            s.logged_out(2, Err(RequestError::Internal("x".into()))),
            Next::Answered("INTERNAL")
        ));
        assert!(matches!(
            s.frame(&Fixed, frame(3, logout), false),
            Next::Call(_)
        ));
        match s.logged_out(3, Ok(())) {
            Next::Close(c) => {
                assert_eq!(c.code, None);
                assert!(c.answer_inflight);
            }
            other => panic!("{other:?}"),
        }
        let f = written(&mut s);
        assert!(matches!(f[1].body, Some(server_frame::Body::Done(_))));
    }

    #[test]
    fn pushes_are_numbered_on_across_batches() {
        let (mut s, t0) = session(4, 3);
        authenticate(&mut s, 9, t0 + Duration::from_secs(60));
        let event = |c: u64| {
            crate::node::encode_push(push::Event::Channel(pb::ChannelEvent {
                channel_id: c,
                user_id: 9,
                joined: true,
                by_user_id: 3,
            }))
        };
        let mut batch = vec![event(1), event(2)];
        s.pushes(&mut batch);
        assert!(batch.is_empty());
        batch.push(event(3));
        s.pushes(&mut batch);
        let seqs: Vec<_> = written(&mut s)
            .into_iter()
            .map(|f| match f.body {
                Some(server_frame::Body::Push(p)) => (f.request_id, p.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, [(0, 1), (0, 2), (0, 3)]);
        assert_eq!(s.seq(), 3);
    }

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
